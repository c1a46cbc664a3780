"""Memory-bounded attention and LM loss for long sequences.

`attention`: exact softmax attention by query chunks and key blocks
(online softmax), with a custom gradient that recomputes per block.
`attention_layers`: installs it on keras_hub / Keras attention layers.
`lm_loss`: the LM head and its cross-entropy by sequence chunks.
"""

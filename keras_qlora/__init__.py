"""keras_qlora: QLoRA fine-tuning for Keras 3 on TensorFlow."""

"""The name table: keras_hub layer paths -> Hugging Face module names."""

import numpy as np
import pytest

from keras_qlora.interop import names
from keras_qlora.interop.fused_state import join
from keras_qlora.interop.fused_state import split
from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import quantize_nf4

BERT = names.NAMINGS["hf-bert"]
GPT2 = names.NAMINGS["hf-gpt2"]


@pytest.mark.parametrize(
    "path, module",
    [
        (
            "transformer_layer_0/self_attention_layer/query",
            "encoder.layer.0.attention.self.query",
        ),
        (
            "transformer_layer_11/self_attention_layer/value",
            "encoder.layer.11.attention.self.value",
        ),
        (
            "transformer_layer_2/self_attention_layer/attention_output",
            "encoder.layer.2.attention.output.dense",
        ),
        (
            "transformer_layer_3/feedforward_intermediate_dense",
            "encoder.layer.3.intermediate.dense",
        ),
        (
            "transformer_layer_3/feedforward_output_dense",
            "encoder.layer.3.output.dense",
        ),
        ("pooled_dense", "pooler.dense"),
        # A backbone inside a task model keeps its layers' names.
        (
            "bert_backbone/transformer_layer_1/self_attention_layer/key",
            "encoder.layer.1.attention.self.key",
        ),
    ],
)
def test_bert_names(path, module):
    assert names.target_for(BERT, path) == names.Target(module, 0, 1)


def test_gpt2_names_and_fused_pieces():
    block = "transformer_layer_5/self_attention"
    assert names.target_for(GPT2, f"{block}/query") == names.Target(
        "h.5.attn.c_attn", 0, 3
    )
    assert names.target_for(GPT2, f"{block}/key").piece == 1
    assert names.target_for(GPT2, f"{block}/value").piece == 2
    assert names.target_for(GPT2, f"{block}/attention_output") == (
        names.Target("h.5.attn.c_proj")
    )
    assert names.target_for(
        GPT2, "transformer_layer_5/feedforward_intermediate_dense"
    ) == names.Target("h.5.mlp.c_fc")
    assert names.target_for(
        GPT2, "transformer_layer_5/feedforward_output_dense"
    ) == names.Target("h.5.mlp.c_proj")


def test_unmapped_paths_and_no_naming():
    # BERT's attention is `self_attention_layer`, GPT-2's `self_attention`.
    assert (
        names.target_for(BERT, "transformer_layer_0/self_attention/q") is None
    )
    assert names.target_for(GPT2, "pooled_dense") is None
    # Whole path components only: a name that merely ends alike is not it.
    assert names.target_for(BERT, "my_pooled_dense") is None
    assert names.target_for(BERT, "a/xtransformer_layer_0/pooled") is None
    assert (
        names.target_for(
            BERT, "xtransformer_layer_0/self_attention_layer/query"
        )
        is None
    )
    assert names.target_for(None, "a/b/query") == names.Target("a.b.query")
    assert names.module_roots(BERT) == ("bert.", "")
    assert names.module_roots(GPT2) == ("transformer.", "")
    assert names.module_roots(None) == ("",)


def test_unknown_naming():
    assert names.get_naming(None) is None
    assert names.get_naming("hf-gpt2") is GPT2
    with pytest.raises(
        ValueError,
        match=r"naming must be one of \['hf-bert', 'hf-gpt2'\] or None.*"
        r"Received: naming='llama'",
    ):
        names.get_naming("llama")


# -- cutting and joining fused NF4 weights ------------------------------------


def _pieces(k, n, block_size, double_quant, seed=0):
    rng = np.random.default_rng(seed)
    return [
        quantize_nf4(
            (rng.standard_normal((k, n)) * 0.1).astype("float32"),
            block_size,
            double_quant,
        )
        for _ in range(3)
    ]


def test_join_then_split_is_exact_without_double_quant():
    pieces = _pieces(32, 16, 32, double_quant=False)
    fused = join(pieces, "c_attn")
    assert fused.shape == (32, 48) and not fused.double_quant
    np.testing.assert_array_equal(
        dequantize_nf4(fused),
        np.concatenate([dequantize_nf4(p) for p in pieces], axis=1),
    )
    for back, piece in zip(split(fused, 3, "c_attn"), pieces, strict=True):
        np.testing.assert_array_equal(back.packed, piece.packed)
        np.testing.assert_array_equal(back.absmax, piece.absmax)


def test_join_of_double_quant_pieces_expands_their_scales_exactly():
    # Each piece has its own offset: one double-quantized state cannot hold
    # all three, so the join has float32 scales with the same values.
    pieces = _pieces(32, 16, 32, double_quant=True)
    assert len({p.absmax_offset for p in pieces}) == 3
    fused = join(pieces, "c_attn")
    assert not fused.double_quant and fused.absmax.dtype == np.float32
    np.testing.assert_array_equal(
        dequantize_nf4(fused),
        np.concatenate([dequantize_nf4(p) for p in pieces], axis=1),
    )


def test_split_of_a_double_quant_weight_needs_whole_groups():
    # 256 blocks of 32 per piece: the nested groups end at the cuts.
    rng = np.random.default_rng(1)
    kernel = (rng.standard_normal((128, 3 * 64)) * 0.1).astype("float32")
    fused = quantize_nf4(kernel, 32, double_quant=True)
    pieces = split(fused, 3, "c_attn")
    assert all(p.double_quant for p in pieces)
    np.testing.assert_array_equal(
        np.concatenate([dequantize_nf4(p) for p in pieces], axis=1),
        dequantize_nf4(fused),
    )
    joined = join(pieces, "c_attn")  # same offset, whole groups: nested
    assert joined.double_quant
    np.testing.assert_array_equal(joined.absmax, fused.absmax)
    np.testing.assert_array_equal(joined.absmax_scale, fused.absmax_scale)

    small = quantize_nf4(kernel[:32, :96], 32, double_quant=True)
    with pytest.raises(ValueError, match="groups straddle pieces"):
        split(small, 3, "c_attn")


def test_cuts_must_fall_on_block_boundaries():
    rng = np.random.default_rng(2)
    state = quantize_nf4(rng.standard_normal((5, 9)).astype("float32"), 32)
    with pytest.raises(ValueError, match="not a multiple of block_size=32"):
        split(state, 3, "c_attn")
    with pytest.raises(ValueError, match="not divisible into 2 equal"):
        split(state, 2, "c_attn")


# -- biases in HF order -------------------------------------------------------


def test_einsum_bias_follows_the_2d_output_order():
    import keras

    from keras_qlora.interop import hf_modules
    from keras_qlora.layers import QLoRAEinsumDense

    # Kernel free axes (e, d) but output (d, e): the bias must be permuted.
    layer = QLoRAEinsumDense("abc,ced->abde", (8, 3, 2), bias_axes="de")
    layer.build((None, None, 8))
    bias = np.arange(6, dtype="float32").reshape(2, 3)
    layer.bias.assign(bias)
    vector = hf_modules.bias_to_vector(layer)
    # Column j of the 2-D view [M, N] lands where the plan puts it.
    placed = layer.plan.output_from_2d(vector.reshape(1, 6), (1, 1))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(placed)[0, 0], bias
    )
    assert not np.array_equal(vector, bias.reshape(-1))
    np.testing.assert_array_equal(
        hf_modules.bias_from_vector(layer, vector), bias
    )
    partial = QLoRAEinsumDense("abc,ced->abde", (8, 3, 2), bias_axes="d")
    partial.build((None, None, 8))
    with pytest.raises(ValueError, match="only a bias over every output"):
        hf_modules.bias_to_vector(partial)

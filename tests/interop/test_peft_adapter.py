"""PEFT LoRA adapter directories <-> our adapters (keras_hub BERT, GPT-2).

The PEFT files are written here with numpy (torch is not needed). The
reference for the layouts is keras_hub's own HF converter (see
interop_helpers): a float backbone given `W + (alpha / r) * B @ A` through
it must compute what the QLoRA model computes with the loaded adapter.
"""

import json
import os
import struct

import keras
import numpy as np
import pytest
import safetensors.numpy
from interop_helpers import clone
from interop_helpers import hf_linear_weights
from interop_helpers import output
from interop_helpers import port_hf_weights
from interop_helpers import qlora
from interop_helpers import tiny_bert
from interop_helpers import tiny_gpt2

import keras_qlora
from keras_qlora.interop import from_bitsandbytes_model
from keras_qlora.interop import load_peft_adapter
from keras_qlora.interop import save_peft_adapter
from keras_qlora.interop import to_bitsandbytes
from keras_qlora.quantizers import dequantize_nf4
from keras_qlora.quantizers import quantize_nf4

RANK, ALPHA = 4, 8
PREFIX = "base_model.model."
BLOCK = "transformer_layer_0/self_attention"


def prepared(kind, backbone, **kwargs):
    """A QLoRA model whose NF4 base is known: HF weights quantized by us and
    loaded through the bitsandbytes format. Returns it and the dequantized
    HF weights `{module: (W [out, in], bias)}`."""
    kwargs.setdefault("double_quant", False)  # GPT-2 c_attn: see bnb tests
    model = qlora(backbone, block_size=32, **kwargs)
    state_dict, base = {}, {}
    for module, (weight, bias) in hf_linear_weights(kind).items():
        state = quantize_nf4(weight.T, 32, kwargs["double_quant"], False)
        state_dict.update(to_bitsandbytes(state, prefix=f"{module}.weight"))
        state_dict[f"{module}.bias"] = bias
        base[module] = (dequantize_nf4(state).T, bias)
    from_bitsandbytes_model(model, state_dict, naming=f"hf-{kind}")
    return model, base


def peft_pairs(base, modules, rank=RANK, seed=11):
    rng = np.random.default_rng(seed)
    out = {}
    for module in modules:
        out_dim, in_dim = base[module][0].shape
        a = rng.standard_normal((rank, in_dim)).astype("float32") * 0.2
        b = rng.standard_normal((out_dim, rank)).astype("float32") * 0.2
        out[module] = (a, b)
    return out


def write_peft(directory, pairs, config=None, bf16=False, extra=None):
    """A PEFT adapter directory as `PeftModel.save_pretrained` writes it."""
    os.makedirs(directory, exist_ok=True)
    config = dict(
        {
            "peft_type": "LORA",
            "r": RANK,
            "lora_alpha": ALPHA,
            "target_modules": ["query", "key", "value"],
            "lora_dropout": 0.1,
            "bias": "none",
        },
        **(config or {}),
    )
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    tensors = dict(extra or {})
    for module, (a, b) in pairs.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
    path = os.path.join(directory, "adapter_model.safetensors")
    if bf16:
        _write_bf16(path, tensors)
    else:
        safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    return directory


def _write_bf16(path, tensors):
    """The safetensors format by hand: numpy has no bfloat16."""
    header, chunks, offset = {}, [], 0
    for key, value in tensors.items():
        bits = value.astype("<f4").view("<u4") >> 16  # truncate to bf16
        data = bits.astype("<u2").tobytes()
        header[key] = {
            "dtype": "BF16",
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))


def with_delta(base, pairs, scale):
    out = dict(base)
    for module, (a, b) in pairs.items():
        weight, bias = base[module]
        out[module] = (weight + scale * (b @ a), bias)
    return out


def assert_matches_converter(model, backbone, kind, weights):
    reference = clone(backbone)
    port_hf_weights(reference, kind, weights)
    np.testing.assert_allclose(
        output(model, kind), output(reference, kind), atol=3e-5
    )


def lora_values(model, name="default"):
    return {
        path: [v.numpy() for v in layer.adapter_variables(name)]
        for path, layer in model.qlora_layers(lora_only=True).items()
    }


def randomize_lora(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.qlora_layers(lora_only=True).values():
        for variable in (layer.lora_a, layer.lora_b):
            variable.assign(rng.standard_normal(variable.shape) * 0.2)


@pytest.fixture(scope="module")
def bert():
    return tiny_bert(seed=0)


@pytest.fixture(scope="module")
def bert_setup(bert):
    model, base = prepared("bert", bert)
    modules = [m for m in base if m != "pooler.dense"]
    return model, base, modules


# -- loading PEFT files -------------------------------------------------------


def test_bert_adapter_matches_keras_hub_conversion(tmp_path, bert, bert_setup):
    model, base, modules = bert_setup
    pairs = peft_pairs(base, modules)
    path = write_peft(tmp_path / "peft", pairs)
    before = output(model, "bert")
    loaded = load_peft_adapter(model, path, naming="hf-bert", name="task")
    assert len(loaded) == 12
    assert keras_qlora.list_adapters(model) == ["default", "task"]
    layers = model.qlora_layers()
    query = layers["transformer_layer_1/self_attention_layer/query"]
    a, b = pairs["encoder.layer.1.attention.self.query"]
    lora_a, lora_b = query.adapter_variables("task")
    np.testing.assert_array_equal(lora_a.numpy(), a.T)  # [in, r]
    np.testing.assert_array_equal(lora_b.numpy(), b.T)  # [r, out]
    # Our delta on the 2-D view is PEFT's delta transposed.
    np.testing.assert_allclose(
        query.lora_scale * lora_a.numpy() @ lora_b.numpy(),
        (ALPHA / RANK * (b @ a)).T,
        rtol=1e-6,
    )
    np.testing.assert_array_equal(output(model, "bert"), before)  # inactive
    keras_qlora.set_adapter(model, "task")
    after = output(model, "bert")
    assert np.abs(after - before).max() > 0.1
    assert_matches_converter(
        model, bert, "bert", with_delta(base, pairs, ALPHA / RANK)
    )
    keras_qlora.set_adapter(model, "default")


def test_gpt2_fused_c_attn_adapter_matches_keras_hub_conversion(tmp_path):
    backbone = tiny_gpt2(seed=1)
    model, base = prepared("gpt2", backbone)
    pairs = peft_pairs(base, list(base))
    config = {"target_modules": ["c_attn", "c_proj", "c_fc"]}
    config["fan_in_fan_out"] = True
    path = write_peft(tmp_path / "peft", pairs, config)
    before = output(model, "gpt2")
    load_peft_adapter(model, path, naming="hf-gpt2")
    a, b = pairs["h.0.attn.c_attn"]  # a rank-4 LoRA on the fused c_attn
    layers = model.qlora_layers()
    for piece, name in enumerate(("query", "key", "value")):
        layer = layers[f"{BLOCK}/{name}"]
        np.testing.assert_array_equal(layer.lora_a.numpy(), a.T)  # shared A
        np.testing.assert_array_equal(
            layer.lora_b.numpy(), b[piece * 32 : (piece + 1) * 32].T
        )
    assert np.abs(output(model, "gpt2") - before).max() > 0.1
    assert_matches_converter(
        model, backbone, "gpt2", with_delta(base, pairs, ALPHA / RANK)
    )


def test_bfloat16_files_and_the_task_model_prefix(tmp_path, bert_setup):
    model, base, modules = bert_setup
    pairs = peft_pairs(base, modules, seed=3)
    rooted = {f"bert.{m}": pair for m, pair in pairs.items()}
    path = write_peft(tmp_path / "peft", rooted, bf16=True)
    load_peft_adapter(model, path, naming="hf-bert")
    layer = model.qlora_layers()["transformer_layer_0/feedforward_output_dense"]
    a, _ = pairs["encoder.layer.0.output.dense"]
    truncated = (a.view("<u4") >> 16 << 16).view("<f4")
    np.testing.assert_array_equal(layer.lora_a.numpy(), truncated.T)
    assert not np.array_equal(truncated, a)


# -- saving, and reading back -------------------------------------------------


def test_bert_save_then_load_round_trip(tmp_path, bert, bert_setup):
    model, _, _ = bert_setup
    randomize_lora(model, seed=5)
    target = save_peft_adapter(model, tmp_path / "saved", naming="hf-bert")
    with open(os.path.join(target, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert config["peft_type"] == "LORA" and config["rank_pattern"] == {}
    assert config["fan_in_fan_out"] is False
    # PEFT's suffix matching on these picks exactly the 12 LoRA modules
    # (`output.dense` covers `attention.output.dense` too), not the pooler.
    assert config["target_modules"] == [
        "intermediate.dense",
        "key",
        "output.dense",
        "query",
        "value",
    ]
    tensors = safetensors.numpy.load_file(
        os.path.join(target, "adapter_model.safetensors")
    )
    assert len(tensors) == 24
    layer = model.qlora_layers()["transformer_layer_1/self_attention_layer/key"]
    key = f"{PREFIX}encoder.layer.1.attention.self.key"
    np.testing.assert_array_equal(
        tensors[f"{key}.lora_A.weight"], layer.lora_a.numpy().T
    )
    np.testing.assert_array_equal(
        tensors[f"{key}.lora_B.weight"], layer.lora_b.numpy().T
    )
    fresh = qlora(bert, block_size=32)
    load_peft_adapter(fresh, target, naming="hf-bert", name="peft")
    expected = lora_values(model)
    for path, values in lora_values(fresh, "peft").items():
        for got, want in zip(values, expected[path], strict=True):
            np.testing.assert_array_equal(got, want, path)


def test_gpt2_save_writes_an_exact_block_adapter(tmp_path):
    backbone = tiny_gpt2(seed=2)
    model = qlora(backbone, block_size=32)
    randomize_lora(model, seed=6)
    target = save_peft_adapter(model, tmp_path / "saved", naming="hf-gpt2")
    with open(os.path.join(target, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["rank_pattern"] == {"c_attn": 3 * RANK}
    assert config["alpha_pattern"] == {"c_attn": 3 * ALPHA}
    assert config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert config["fan_in_fan_out"] is True
    tensors = safetensors.numpy.load_file(
        os.path.join(target, "adapter_model.safetensors")
    )
    a = tensors[f"{PREFIX}h.1.attn.c_attn.lora_A.weight"]
    b = tensors[f"{PREFIX}h.1.attn.c_attn.lora_B.weight"]
    assert a.shape == (12, 32) and b.shape == (96, 12)
    # What PEFT computes with that config equals our three deltas.
    peft_delta = (3 * ALPHA) / (3 * RANK) * (b @ a)  # [out, in]
    layers = model.qlora_layers()
    ours = [
        layers[f"transformer_layer_1/self_attention/{name}"]
        for name in ("query", "key", "value")
    ]
    our_delta = np.concatenate(
        [x.lora_scale * x.lora_a.numpy() @ x.lora_b.numpy() for x in ours],
        axis=1,
    )
    np.testing.assert_allclose(peft_delta, our_delta.T, rtol=1e-6, atol=1e-7)
    fresh = qlora(backbone, block_size=32)
    load_peft_adapter(fresh, target, naming="hf-gpt2")
    expected = lora_values(model)
    for path, values in lora_values(fresh).items():
        for got, want in zip(values, expected[path], strict=True):
            np.testing.assert_array_equal(got, want, path)


def test_gpt2_query_value_only_with_rslora(tmp_path):
    backbone = tiny_gpt2(seed=3, layers=1)
    model = qlora(backbone, ("query", "value"), use_rslora=True)
    randomize_lora(model, seed=7)
    target = save_peft_adapter(model, tmp_path / "saved", naming="hf-gpt2")
    with open(os.path.join(target, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["target_modules"] == ["c_attn"]
    assert config["use_rslora"] is True
    assert config["rank_pattern"] == {"c_attn": 2 * RANK}
    # alpha / sqrt(2r) == ALPHA / sqrt(r): PEFT keeps our scale.
    alpha = config["alpha_pattern"]["c_attn"]
    assert alpha / np.sqrt(2 * RANK) == pytest.approx(ALPHA / np.sqrt(RANK))
    fresh = qlora(backbone, ("query", "value"), use_rslora=True)
    load_peft_adapter(fresh, target, naming="hf-gpt2")
    expected = lora_values(model)
    for path, values in lora_values(fresh).items():
        for got, want in zip(values, expected[path], strict=True):
            np.testing.assert_array_equal(got, want, path)
    # A c_attn LoRA that also changes key outputs has nowhere to go.
    rng = np.random.default_rng(0)
    pairs = {
        "h.0.attn.c_attn": (
            rng.standard_normal((RANK, 32)).astype("float32"),
            rng.standard_normal((96, RANK)).astype("float32"),
        )
    }
    path = write_peft(tmp_path / "qkv", pairs, {"use_rslora": True})
    with pytest.raises(
        ValueError,
        match="'h.0.attn.c_attn' changes its key outputs, but the model "
        "has no LoRA on that layer",
    ):
        load_peft_adapter(fresh, path, naming="hf-gpt2")
    # Rank 8 spread over all columns cannot become rank-4 layers.
    wide = {
        "h.0.attn.c_attn": (
            rng.standard_normal((2 * RANK, 32)).astype("float32"),
            rng.standard_normal((96, 2 * RANK)).astype("float32"),
        )
    }
    wide["h.0.attn.c_attn"][1][32:64] = 0.0
    path = write_peft(tmp_path / "wide", wide, {"r": 2 * RANK})
    with pytest.raises(ValueError, match="delta of rank up to 8"):
        load_peft_adapter(fresh, path, naming="hf-gpt2")


# -- bad input ----------------------------------------------------------------


def test_bad_adapters_leave_the_model_unchanged(tmp_path, bert_setup):
    model, base, modules = bert_setup
    before = lora_values(model)
    count = [0]

    def attempt(pairs, match, config=None, error=ValueError, **kwargs):
        count[0] += 1
        path = write_peft(tmp_path / f"bad{count[0]}", pairs, config, **kwargs)
        with pytest.raises(error, match=match):
            load_peft_adapter(model, path, naming="hf-bert")
        for path_, values in lora_values(model).items():
            for got, want in zip(values, before[path_], strict=True):
                np.testing.assert_array_equal(got, want, path_)

    good = peft_pairs(base, modules)
    attempt(
        peft_pairs(base, modules, rank=8),
        r"has weights of rank 8 but the config gives it r=4",
    )
    attempt(
        peft_pairs(base, modules, rank=8),
        r"has rank 8 .*the model's LoRA rank is 4. apply\(\) the model with "
        "rank=8",
        {"r": 8},
    )
    attempt(
        good,
        r"scales B @ A by lora_alpha / 4 = 16 / 4 = 4 \(use_rslora=False\); "
        r"layer '.*' uses 2 \(alpha=8, rank=4",
        {"lora_alpha": 16},
    )
    attempt(
        good,
        r"uses 2 \(alpha=8",
        {"alpha_pattern": {"query": 16}},
    )
    partial = dict(good)
    del partial["encoder.layer.1.output.dense"]
    attempt(
        partial,
        r"only in the adapter \[\], only in the model "
        r"\['encoder.layer.1.output.dense'\]",
    )
    attempt(
        dict(good, **peft_pairs(base, ["pooler.dense"])),
        r"only in the adapter \['pooler.dense'\]",
    )
    attempt(
        good,
        r"not LoRA A/B weights .*\['base_model.model.classifier.weight'\]",
        extra={f"{PREFIX}classifier.weight": np.zeros((2, 32), "float32")},
    )
    attempt(
        good,
        r"\['encoder.layer.0.output.dense.x'\] have lora_A or lora_B but not",
        extra={
            f"{PREFIX}encoder.layer.0.output.dense.x.lora_A.weight": np.zeros(
                (4, 3), "float32"
            )
        },
    )
    narrow = dict(good)
    narrow["encoder.layer.0.intermediate.dense"] = peft_pairs(
        {"m": (np.zeros((64, 16)), None)}, ["m"]
    )["m"]
    attempt(narrow, r"maps \[in=16\] -> \[out=64\]; the model's layer")
    nan = dict(good)
    a, b = nan["encoder.layer.0.output.dense"]
    nan["encoder.layer.0.output.dense"] = (a, b * np.nan)
    attempt(nan, "lora_B has NaN or Inf")
    attempt(good, r"'r' must be a positive int. Received: r='4'", {"r": "4"})
    attempt(good, "only LoRA adapters .* peft_type='IA3'", {"peft_type": "IA3"})
    attempt(good, "DoRA adapters", {"use_dora": True})
    attempt(good, "'rank_pattern' must map", {"rank_pattern": {"q": 0}})
    attempt(good, "'target_modules' must be", {"target_modules": 3})


def test_corrupt_and_missing_files(tmp_path, bert_setup):
    model, base, modules = bert_setup
    path = write_peft(tmp_path / "peft", peft_pairs(base, modules))
    weights = os.path.join(path, "adapter_model.safetensors")
    with open(weights, "rb") as f:
        data = f.read()
    with open(weights, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_peft_adapter(model, path)
    safetensors.numpy.save_file(
        {f"{PREFIX}a.lora_A.weight": np.zeros(3, "int32")}, weights
    )
    with pytest.raises(ValueError, match="has dtype I32; LoRA weights must"):
        load_peft_adapter(model, path)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_peft_adapter(model, path)
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="adapter file missing"):
        load_peft_adapter(model, path)
    with pytest.raises(FileNotFoundError, match="No PEFT adapter directory"):
        load_peft_adapter(model, tmp_path / "nowhere")
    with pytest.raises(TypeError, match="expects the model returned by"):
        load_peft_adapter(model.base_model, path)
    with pytest.raises(ValueError, match="An adapter name must be"):
        load_peft_adapter(model, path, name="a b")


def test_save_refuses_to_overwrite_and_to_drop_modules(tmp_path, bert_setup):
    model, _, _ = bert_setup
    target = tmp_path / "out"
    save_peft_adapter(model, target)
    with pytest.raises(FileExistsError, match="Pass overwrite=True"):
        save_peft_adapter(model, target)
    save_peft_adapter(model, target, overwrite=True)
    assert sorted(os.listdir(target)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    with pytest.raises(ValueError, match="is not an adapter directory"):
        save_peft_adapter(model, blocker, overwrite=True)
    assert blocker.read_text() == "keep me"
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        save_peft_adapter(model, tmp_path / "x", name="nope")

    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(8, name="query")(inputs)
    small = keras_qlora.apply(
        keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden)),
        rank=2,
        modules_to_save=["head"],
        verbose=False,
    )
    with pytest.raises(ValueError, match=r"modules_to_save \['head'\]"):
        save_peft_adapter(small, tmp_path / "small", naming=None)


def test_layer_path_names_without_a_table(tmp_path):
    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(8, name="query")(inputs)
    model = keras_qlora.apply(
        keras.Model(inputs, keras.layers.Dense(4, name="value")(hidden)),
        rank=2,
        alpha=4,
        target_modules=("query", "value"),
        verbose=False,
    )
    randomize_lora(model, seed=8)
    target = save_peft_adapter(model, tmp_path / "plain", naming=None)
    tensors = safetensors.numpy.load_file(
        os.path.join(target, "adapter_model.safetensors")
    )
    assert sorted(tensors) == [
        f"{PREFIX}query.lora_A.weight",
        f"{PREFIX}query.lora_B.weight",
        f"{PREFIX}value.lora_A.weight",
        f"{PREFIX}value.lora_B.weight",
    ]
    x = np.random.default_rng(0).standard_normal((3, 16)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    randomize_lora(model, seed=9)
    assert not np.allclose(keras.ops.convert_to_numpy(model(x)), expected)
    load_peft_adapter(model, target, naming=None)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model(x)), expected
    )

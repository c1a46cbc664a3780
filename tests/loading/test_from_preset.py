"""`keras_qlora.from_preset` equals `apply(model_class.from_preset(...))`.

Each case writes a small random model with the real savers (`transformers`
`save_pretrained`; keras_hub `save_to_preset` for its own format), loads it
both ways and compares the NF4 bytes, every other variable, the outputs and
the summary. The float kernels of quantized layers must never be allocated:
TensorFlow's variable creator sees every variable created.
"""

import contextlib
import re

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

import keras_qlora
import preset_helpers as ph

APPLY = dict(target_modules="all-linear", verbose=False)

# (family, layout, checkpoint dtype, sharded): every family in both
# layouts; dtypes and sharding alternate so both values of each are
# covered in both layouts.
CASES = [
    ("llama", "hf", "bfloat16", True),
    ("llama", "keras", "float32", False),
    ("mistral", "hf", "float32", False),
    ("mistral", "keras", "bfloat16", True),
    ("gemma", "hf", "float16", True),
    ("gemma", "keras", "float32", True),
    ("qwen2", "hf", "float32", True),
    ("qwen2", "keras", "bfloat16", False),
    ("gpt2", "hf", "bfloat16", False),
    ("gpt2", "keras", "float32", True),
    ("bert", "hf", "float32", False),
    ("bert", "keras", "bfloat16", True),
]


def make_preset(tmp_path, family, layout, dtype, sharded):
    hf = ph.write_hf_preset(tmp_path / "hf", family, dtype, sharded)
    if layout == "hf":
        return hf
    return ph.write_keras_preset(tmp_path / "keras", family, hf, sharded)


@contextlib.contextmanager
def record_variables():
    """Records `(name, shape, dtype)` of every tf.Variable created."""
    created = []

    def creator(next_creator, **kwargs):
        variable = next_creator(**kwargs)
        created.append(
            (variable.name, tuple(variable.shape), variable.dtype.name)
        )
        return variable

    with tf.variable_creator_scope(creator):
        yield created


def float_kernels(created):
    return [
        c for c in created if c[0].endswith("/kernel:0") and "float" in c[2]
    ]


def _unnumber(path):
    """A path without Keras' numbering of a repeated auto-generated name
    (a task's `llama3_backbone_1/...` is the reference's
    `llama3_backbone/...`)."""
    return re.sub(r"^(\w+_backbone)_\d+/", r"\1/", path)


def _unnumbered(mapping):
    return {_unnumber(key): value for key, value in mapping.items()}


def assert_same_model(a, b, inputs):
    qa = _unnumbered(a.qlora_layers())
    qb = _unnumbered(b.qlora_layers())
    assert list(qa) == list(qb)
    for path in qa:
        sa, sb = qa[path].nf4_state(), qb[path].nf4_state()
        assert sa.shape == sb.shape, path
        for field in ("packed", "absmax", "absmax_scale"):
            np.testing.assert_array_equal(
                getattr(sa, field), getattr(sb, field), err_msg=path
            )
        assert sa.absmax_offset == sb.absmax_offset, path
    # In order: a replaced layer's variable paths are not unique (the
    # layer's name without its block), so they cannot key a dict.
    assert len(a.weights) == len(b.weights)
    for va, vb in zip(a.weights, b.weights):
        assert _unnumber(va.path) == _unnumber(vb.path)
        assert va.dtype == vb.dtype, va.path
        assert va.trainable == vb.trainable, va.path
        if "lora_a" not in va.path:  # random init, B = 0 makes it inert
            np.testing.assert_array_equal(
                va.numpy(), vb.numpy(), err_msg=va.path
            )
    tf.nest.map_structure(
        lambda x, y: np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y)
        ),
        a(inputs),
        b(inputs),
    )
    assert _summary(a) == _summary(b)


def _summary(model):
    # Without the first line: Keras numbers the auto-generated model names
    # (llama3_backbone, llama3_backbone_1) of the second model built.
    # Columns are as wide as the longest path, so compare words.
    lines = keras_qlora.summary(model, print_fn=None).split("\n")[1:]
    return [_unnumber(line).split() for line in lines]


@pytest.mark.parametrize("family,layout,dtype,sharded", CASES)
def test_equals_apply_of_keras_hub_load(tmp_path, family, layout, dtype,
                                        sharded):
    preset = make_preset(tmp_path, family, layout, dtype, sharded)
    if sharded:
        assert len(ph.weight_files(preset)) > 1
    cls = ph.backbone_class(family)
    with record_variables() as created:
        ours = keras_qlora.from_preset(cls, preset, **APPLY)
    assert float_kernels(created) == []
    reference = keras_qlora.apply(cls.from_preset(preset), **APPLY)
    assert len(ours.qlora_layers()) >= 12
    assert_same_model(ours, reference, ph.backbone_inputs(family))


def test_dtype_argument_matches_keras_hub(tmp_path):
    preset = make_preset(tmp_path, "llama", "hf", "float32", False)
    cls = ph.backbone_class("llama")
    ours = keras_qlora.from_preset(cls, preset, dtype="bfloat16", **APPLY)
    reference = keras_qlora.apply(
        cls.from_preset(preset, dtype="bfloat16"), **APPLY
    )
    assert ours.base_model.token_embedding.embeddings.dtype == "bfloat16"
    assert_same_model(ours, reference, ph.backbone_inputs("llama"))


def test_task_class_with_lora_targets_and_training_options(tmp_path):
    preset = make_preset(tmp_path, "llama", "hf", "bfloat16", True)
    options = dict(
        rank=4,
        target_modules=["query", "value"],
        gradient_checkpointing=True,
        optimizer_8bit=True,
        verbose=False,
    )
    model_kwargs = {"preprocessor": None}
    ours = keras_qlora.from_preset(
        keras_hub.models.LlamaCausalLM,
        preset,
        model_kwargs=model_kwargs,
        **options,
    )
    reference = keras_qlora.apply(
        keras_hub.models.LlamaCausalLM.from_preset(preset, **model_kwargs),
        **options,
    )
    # Paths below the auto-numbered backbone name (llama3_backbone_1).
    def blocks(model):
        return [path.split("/", 1)[1] for path in model.remat_paths]

    assert blocks(ours) == blocks(reference) != []
    inputs = ph.backbone_inputs("llama")
    assert_same_model(ours, reference, inputs)
    assert len(ours.trainable_variables) == 8
    # It trains: fit runs and moves the LoRA weights only.
    ours.compile(
        optimizer=keras.optimizers.AdamW(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    frozen = [v.numpy() for v in ours.non_trainable_variables]
    before = [v.numpy() for v in ours.trainable_variables]
    history = ours.fit(inputs, inputs["token_ids"], epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    for v, value in zip(ours.non_trainable_variables, frozen, strict=True):
        np.testing.assert_array_equal(v.numpy(), value, err_msg=v.path)
    moved = [
        v.path
        for v, value in zip(ours.trainable_variables, before, strict=True)
        if not np.array_equal(v.numpy(), value)
    ]
    assert len(moved) == 8


def test_keras_round_trip_and_adapter(tmp_path):
    preset = make_preset(tmp_path, "gpt2", "hf", "float32", False)
    cls = ph.backbone_class("gpt2")
    model = keras_qlora.from_preset(cls, preset, **APPLY)
    inputs = ph.backbone_inputs("gpt2")
    path = str(tmp_path / "model.keras")
    model.save(path)
    with record_variables() as created:
        loaded = keras.saving.load_model(path)
    # Loading a QLoRA model never rebuilds the float kernels.
    assert float_kernels(created) == []
    assert [c for c in created if c[0].endswith("/nf4_packed:0")]
    np.testing.assert_array_equal(model(inputs), loaded(inputs))
    adapter = keras_qlora.save_adapter(model, str(tmp_path / "adapter"))
    fresh = keras_qlora.from_preset(cls, preset, **APPLY)
    keras_qlora.load_adapter(fresh, adapter)
    np.testing.assert_array_equal(model(inputs), fresh(inputs))


def test_keras_load_of_applied_model_has_no_float_kernels(tmp_path):
    # The same instrumentation shows the float path does allocate them.
    preset = make_preset(tmp_path, "bert", "hf", "float32", False)
    cls = ph.backbone_class("bert")
    with record_variables() as created:
        model = keras_qlora.apply(cls.from_preset(preset), **APPLY)
    assert len(float_kernels(created)) == 13
    path = str(tmp_path / "bert.keras")
    model.save(path)
    with record_variables() as created:
        keras.saving.load_model(path)
    assert float_kernels(created) == []


def test_progress_bar_counts_layers_and_bytes(tmp_path, capsys):
    preset = make_preset(tmp_path, "llama", "hf", "float32", False)
    keras_qlora.from_preset(
        ph.backbone_class("llama"), preset, target_modules="all-linear"
    )
    out = capsys.readouterr().out
    assert "14/14" in out and "MiB read" in out


def test_modules_kept_float_are_loaded_as_float(tmp_path):
    preset = make_preset(tmp_path, "llama", "keras", "float32", False)
    cls = ph.backbone_class("llama")
    options = dict(APPLY, modules_to_save=["feedforward_gate_dense"])
    ours = keras_qlora.from_preset(cls, preset, **options)
    reference = keras_qlora.apply(cls.from_preset(preset), **options)
    assert len(ours.qlora_layers()) == 12
    assert_same_model(ours, reference, ph.backbone_inputs("llama"))


@pytest.mark.slow
def test_real_minilm_equals_apply(minilm_preset):
    preset = minilm_preset
    cls = keras_hub.models.BertBackbone
    ours = keras_qlora.from_preset(cls, preset, **APPLY)
    reference = keras_qlora.apply(cls.from_preset(preset), **APPLY)
    assert len(ours.qlora_layers()) == 37
    tokens = np.array([[101, 1037, 2158, 2003, 5983, 2833, 1012, 102]])
    inputs = {
        "token_ids": tokens,
        "segment_ids": np.zeros_like(tokens),
        "padding_mask": np.ones_like(tokens),
    }
    assert_same_model(ours, reference, inputs)
    assert ["Replaced", "layers:", "37", "NF4"] in [
        line[:4] for line in _summary(ours)
    ]


@pytest.mark.parametrize("quant_type", ["fp4", "int8"])
def test_base_formats_equal_apply(tmp_path, quant_type):
    preset = make_preset(tmp_path, "llama", "hf", "bfloat16", False)
    cls = ph.backbone_class("llama")
    kwargs = dict(APPLY, quant_type=quant_type)
    with record_variables() as created:
        ours = keras_qlora.from_preset(cls, preset, **kwargs)
    assert float_kernels(created) == []
    for layer in ours.qlora_layers().values():
        assert layer.nf4_state().quant_type == quant_type
    reference = keras_qlora.apply(cls.from_preset(preset), **kwargs)
    assert_same_model(ours, reference, ph.backbone_inputs("llama"))

"""TensorFlow SavedModel export of QLoRA models, and loading them back.

Two kinds of SavedModel, both with the base weights stored 4-bit (the
uint8 NF4 variables) and the LoRA matrices in float32:

- fused (default): the graph runs the op `KerasQLoRA>NF4Matmul`, so
  TensorFlow can load it only in a process where the op library is loaded;
  `load_saved_model` does that first.
- portable (`portable=True`): the graph dequantizes the NF4 variables with
  stock TensorFlow ops (the reference path of `keras_qlora.ops`), so it
  loads and serves anywhere TensorFlow does (`tf.saved_model.load`, TF
  Serving) without this package.
"""

import contextlib
import os

import keras
import numpy as np

from keras_qlora import atomic
from keras_qlora import internals
from keras_qlora import ops as qops

_NOT_REGISTERED = "Op type not registered"
_SAVED_MODEL_PB = "saved_model.pb"
_CUSTOM_OP_PREFIX = qops.OP_TYPE.split(">")[0] + ">"


def export(
    model,
    path,
    overwrite: bool = False,
    verbose: bool = False,
    portable: bool = False,
) -> str:
    """Exports `model` as a TF SavedModel (inference), written atomically.

    The SavedModel has the endpoint `serve` and the signature
    `serving_default`, both taking the model's inputs (a dict of named
    tensors for a model with dict inputs, e.g. keras_hub backbones).

    Args:
        model: a built Keras model, e.g. the `QLoRAModel` from
            `keras_qlora.apply`, called or not. Its input signature comes
            from the base model's inputs (Functional, Sequential, keras_hub
            backbones), else from the model's first call.
        path: the SavedModel directory to create.
        overwrite: replace an existing SavedModel directory at `path`.
        verbose: let Keras print the exported signatures.
        portable: when True, trace the graph on the pure-TF reference path:
            no `KerasQLoRA>*` op, loadable by plain TensorFlow. When False,
            the graph uses the fused NF4 op if it is available (see
            `keras_qlora.ops.active_path()`); load it with
            `load_saved_model`.

    Returns:
        The absolute path of the SavedModel, as a string.

    Raises:
        TypeError: `model` is not a Keras model, or `overwrite` /
            `portable` is not a bool.
        ValueError: the model is not built or its inputs are unknown, or
            `path` exists and is not a SavedModel directory.
        FileExistsError: `path` exists and `overwrite` is False.
        keras_qlora.adapters.NonFiniteError (a ValueError): a weight holds
            NaN or Inf (training diverged); nothing is written and an
            existing SavedModel at `path` stays.
        RuntimeError: a portable export still contains `KerasQLoRA>*` ops.

    Example:

    ```python
    model = keras_qlora.apply(keras_hub.models.BertBackbone(...))
    keras_qlora.export(model, "bert_portable", portable=True)
    # In any TensorFlow process, without keras_qlora:
    serve = tf.saved_model.load("bert_portable").signatures[
        "serving_default"]
    ```
    """
    _check_flag("overwrite", overwrite)
    _check_flag("portable", portable)
    signature = input_signature(model)
    target = os.path.abspath(os.fspath(path))
    atomic.check_replaceable(
        target, overwrite, _SAVED_MODEL_PB, "a SavedModel directory"
    )
    check_finite_weights(model, target)
    tracing = qops.reference_path() if portable else contextlib.nullcontext()
    with atomic.staging_dir(target) as tmp:
        with tracing:
            _write_saved_model(model, tmp, signature, verbose)
        if portable:
            _check_portable(tmp, model)
        atomic.commit_dir(tmp, target, overwrite=overwrite)
    return target


def check_finite_weights(model, target=None):
    """Raises `NonFiniteError` (a ValueError) naming the float variables of
    `model` that hold NaN or Inf: a diverged model is never written
    (`export`, `QLoRAModel.save`). `target` is the path to be written."""
    counts = {}
    for variable in model.weights:
        if "float" not in keras.backend.standardize_dtype(variable.dtype):
            continue
        value = np.asarray(variable.numpy()).astype("float32")
        counts[variable.path] = int(value.size - np.isfinite(value).sum())
    atomic.refuse_non_finite(counts, f"Model '{model.name}'", target)


def input_signature(model) -> list:
    """The input signature `export` uses for `model`.

    A `QLoRAModel` is a subclassed wrapper, built when `apply` returns but
    never traced by Keras, so Keras cannot infer its inputs (it reports
    "The model provided has never called", even after the model has been
    called or fit). The base model knows them: a Functional / Sequential
    model from its `Input`s, a subclassed one from its first call.

    Args:
        model: a built Keras model (a `QLoRAModel` or any other).

    Returns:
        A list of `keras.InputSpec` structures, one per positional input.

    Raises:
        TypeError: `model` is not a `keras.Model`.
        ValueError: the model is not built, or neither it nor its base
            model has inputs or a recorded call.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "export expects a keras.Model. Received: "
            f"model={model!r} of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built; build it (call it on "
            "example data, or create it from keras.Input) before export."
        )
    base = getattr(model, "base_model", None)
    reasons = []
    for candidate in (base, model):
        if not isinstance(candidate, keras.Model):
            continue
        try:
            return internals.input_signature(candidate)
        except ValueError as err:
            reasons.append(f"'{candidate.name}': {err}")
    raise ValueError(
        f"Cannot export model '{model.name}': its inputs are unknown "
        f"({'; '.join(reasons)}). Call the model once on example data, or "
        "build it from keras.Input, before export."
    )


def load_saved_model(path):
    """Loads a SavedModel exported from a QLoRA model (fused or portable).

    If the graph uses the fused op, loads its library first, so that
    `KerasQLoRA>NF4Matmul` nodes can be restored. The result is what
    `tf.saved_model.load` returns: call `loaded.serve(x)` or
    `loaded.signatures["serving_default"](**inputs)`.

    Args:
        path: a SavedModel directory written by `export`.

    Returns:
        The loaded TensorFlow object.

    Raises:
        FileNotFoundError: no `saved_model.pb` in `path`.
        ValueError: a truncated or corrupt SavedModel (the message names
            the path and what TensorFlow said).
        RuntimeError: not on the TensorFlow backend, or the SavedModel needs
            the fused op and its library could not be loaded in this
            process (the message says why).

    Example:

    ```python
    loaded = keras_qlora.load_saved_model("saved")
    y = loaded.serve(x)
    ```
    """
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "load_saved_model needs the TensorFlow backend "
            "(KERAS_BACKEND=tensorflow)."
        )
    pb = os.path.join(os.fspath(path), _SAVED_MODEL_PB)
    if not os.path.isfile(pb):
        raise FileNotFoundError(
            f"No SavedModel at {path}: {_SAVED_MODEL_PB} is missing."
        )
    # Portable graphs need no library: do not build it for them.
    if custom_op_types(path):
        qops.fused_library()
    try:
        return tf.saved_model.load(str(path))
    except Exception as err:
        if _NOT_REGISTERED in str(err) and qops.OP_TYPE in str(err):
            reason = qops.library_status()["reason"]
            raise RuntimeError(
                f"The SavedModel at {path} uses the fused op {qops.OP_TYPE}, "
                f"but its library could not be loaded here ({reason}). Run "
                "`python -m keras_qlora.ops --build` to see why, or export "
                "it with keras_qlora.export(model, path, portable=True)."
            ) from err
        raise ValueError(
            f"Could not load the SavedModel at {path}; it may be truncated "
            f"or corrupt. TensorFlow said: {type(err).__name__}: {err}"
        ) from err


def custom_op_types(path) -> list:
    """The `KerasQLoRA>*` op types in a SavedModel's graphs, sorted.

    Looks at the top-level graph and every function in its library (the
    endpoints, their gradients, nested calls). Empty for a portable export.

    Args:
        path: a SavedModel directory.

    Returns:
        Sorted list of op type names; empty when there are none or `path`
        holds no `saved_model.pb`.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    pb = os.path.join(os.fspath(path), _SAVED_MODEL_PB)
    if not os.path.isfile(pb):
        return []
    saved = saved_model_pb2.SavedModel()
    with open(pb, "rb") as f:
        data = f.read()
    try:
        saved.ParseFromString(data)
    except Exception as err:  # protobuf's DecodeError, by implementation
        raise ValueError(
            f"{pb} is not a readable SavedModel ({len(data)} bytes; "
            f"{type(err).__name__}: {err}); it may be truncated or corrupt."
        ) from None
    found = set()
    for graph in saved.meta_graphs:
        nodes = list(graph.graph_def.node)
        for function in graph.graph_def.library.function:
            nodes.extend(function.node_def)
        found.update(n.op for n in nodes if n.op.startswith(_CUSTOM_OP_PREFIX))
    return sorted(found)


# -- private helpers ----------------------------------------------------------


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(
            f"export: {name} must be a bool (True or False). "
            f"Received: {name}={value!r}"
        )


def _write_saved_model(model, directory, signature, verbose):
    """What `model.export(format="tf_saved_model")` does, each weight once.

    Keras' archive tracks the model's `keras.Variable` wrappers and, when
    writing, the `tf.Variable`s its endpoint captures; both save the same
    values, so every weight is stored twice (Keras 3.15). Tracking the
    `tf.Variable`s in both places stores each one once.
    """
    archive = keras.export.ExportArchive()
    archive.track_and_add_endpoint("serve", model, signature)
    trackable = internals.export_archive_trackable(archive)
    for name in ("variables", "trainable_variables", "non_trainable_variables"):
        tracked = getattr(trackable, name, None)
        if tracked is not None:
            setattr(trackable, name, [_tf_variable(v) for v in tracked])
    archive.write_out(directory, verbose=verbose)


def _tf_variable(variable):
    """The `tf.Variable` behind a `keras.Variable` (itself if there is
    none)."""
    import tensorflow as tf

    value = getattr(variable, "value", None)
    return value if isinstance(value, tf.Variable) else variable


def _check_portable(directory, model):
    # A layer that multiplies by NF4 weights outside `qops.nf4_matmul`
    # would still emit the fused op; never write such a model as portable.
    found = custom_op_types(directory)
    if found:
        raise RuntimeError(
            f"The portable export of model '{model.name}' still contains "
            f"the ops {found}, which plain TensorFlow cannot load: some "
            "layer calls the op directly instead of through "
            "keras_qlora.ops.nf4_matmul."
        )

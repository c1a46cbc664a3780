"""TensorFlow SavedModel export of QLoRA models, and loading them back.

A SavedModel of a model whose layers run the fused op contains
`KerasQLoRA>NF4Matmul` nodes; TensorFlow can load it only in a process where
the op library is loaded. `load_saved_model` does that first.
"""

import os
import pathlib
import shutil
import tempfile

import keras

from keras_qlora import ops as qops

_NOT_REGISTERED = "Op type not registered"


def export(model, path, overwrite=False, verbose=False):
    """Exports `model` as a TF SavedModel (inference), written atomically.

    The graph uses the fused NF4 op when it is available (see
    `keras_qlora.ops.active_path()`); load it with `load_saved_model`.

    Args:
        model: a built Keras model (e.g. from `keras_qlora.apply`).
        path: the SavedModel directory to create.
        overwrite: replace an existing directory at `path`.
        verbose: let Keras print the exported signatures.

    Returns:
        The path, as a string.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
    """
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True to replace it."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        model.export(
            tmp,
            format="tf_saved_model",
            verbose=verbose,
            input_signature=_input_signature(model),
        )
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def _input_signature(model):
    """The wrapped model's signature: a QLoRAModel is a subclassed model
    that may never have been called, but its base model usually knows its
    inputs (Functional, Sequential, keras_hub backbones)."""
    from keras.src.export.export_utils import get_input_signature

    base = getattr(model, "base_model", None)
    if getattr(model, "_called", False) or base is None:
        return None  # let Keras infer it from the model itself
    try:
        return get_input_signature(base)
    except ValueError:
        return None


def load_saved_model(path):
    """Loads a SavedModel exported from a QLoRA model (fused or not).

    Loads the fused op library first, so graphs with `KerasQLoRA>NF4Matmul`
    nodes can be restored. The result is what `tf.saved_model.load`
    returns: call `loaded.serve(x)`.

    Raises:
        RuntimeError: the SavedModel needs the fused op and it could not be
            loaded in this process (the message says why).
    """
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "load_saved_model needs the TensorFlow backend "
            "(KERAS_BACKEND=tensorflow)."
        )
    qops.fused_library()
    try:
        return tf.saved_model.load(str(path))
    except Exception as err:
        if _NOT_REGISTERED in str(err) and qops.OP_TYPE in str(err):
            reason = qops._library.status()["reason"]
            raise RuntimeError(
                f"The SavedModel at {path} uses the fused op {qops.OP_TYPE}, "
                f"but its library could not be loaded here ({reason}). Run "
                "`python -m keras_qlora.ops --build` to see why, or export a "
                "portable model from a process with KERAS_QLORA_PURE_TF=1."
            ) from err
        raise

"""Quantizing each kernel the moment a checkpoint loader writes it.

keras_hub's loaders (its converters for Transformers checkpoints, Keras'
`load_weights` for its own presets) fill a model by calling
`variable.assign(tensor)` one tensor at a time. On a skeleton whose
quantized layers' float kernels are deferred (never allocated), we catch
that call for those kernels: the tensor is checked, quantized straight into
the QLoRA layer's NF4 variables and dropped. So at most one layer's float
kernel exists at a time, and the loading code stays keras_hub's own.
"""

import contextlib

import keras
import numpy as np
from keras import ops

from keras_qlora import convert
from keras_qlora.layers.source_checks import check_source_kernel

_READ = "MiB read"


class KernelCapture:
    """What was caught while loading: kernels quantized, bytes read."""

    def __init__(self, targets, verbose):
        # {id(kernel variable): (path, float layer, QLoRA layer)}
        self.targets = targets
        self.filled = set()
        self.bytes_read = 0
        self._progress = (
            keras.utils.Progbar(len(targets), stateful_metrics=(_READ,))
            if verbose and targets
            else None
        )

    def missing(self) -> list:
        """Paths of the quantized layers whose kernel was never loaded."""
        return [
            path
            for key, (path, _, _) in self.targets.items()
            if key not in self.filled
        ]

    def kernel_assign(self, variable):
        path, layer, qlora = self.targets[id(variable)]

        def assign(value):
            tensor = _kernel_tensor(value, variable, path)
            self.bytes_read += _nbytes(value, variable)
            kernel = check_source_kernel(layer, tensor)
            del tensor
            qlora.set_nf4_state(qlora.quantize_kernel(kernel))
            del kernel
            # The kernel's float copies were freed between long-lived NF4
            # buffers: hand those heap holes back before the next layer.
            convert.release_free_memory()
            self.filled.add(id(variable))
            self._tick()

        return assign

    def counting_assign(self, variable):
        plain = type(variable).assign

        def assign(value):
            self.bytes_read += _nbytes(value, variable)
            return plain(variable, value)

        return assign

    def _tick(self):
        if self._progress is not None:
            mib = round(self.bytes_read / 2**20, 1)
            self._progress.update(len(self.filled), values=[(_READ, mib)])


@contextlib.contextmanager
def capture_kernels(variables, targets, verbose):
    """While active, kernels in `targets` are quantized on `assign`.

    Args:
        variables: every variable of the model being loaded; their writes
            are counted (bytes read).
        targets: `{id(kernel variable): (path, float layer, QLoRA layer)}`
            for the deferred kernels of the layers that become NF4 (each
            quantized with its QLoRA layer's settings).
        verbose: show a progress bar over the quantized layers.

    Yields:
        The `KernelCapture`, to ask what was never loaded.
    """
    capture = KernelCapture(targets, verbose)
    hooked = []
    try:
        for variable in variables:
            if id(variable) in targets:
                hook = capture.kernel_assign(variable)
            else:
                hook = capture.counting_assign(variable)
            variable.assign = hook  # shadows the method on this instance
            hooked.append(variable)
        yield capture
    finally:
        for variable in hooked:
            del variable.assign


def _kernel_tensor(value, variable, path):
    """The loaded value as the kernel variable would hold it, checked."""
    dtype = getattr(value, "dtype", None)
    name = None if dtype is None else keras.backend.standardize_dtype(dtype)
    if name is not None and "float" not in name:
        raise ValueError(
            f"The checkpoint tensor for '{path}/kernel' has dtype {name}; "
            "a float tensor is expected."
        )
    shape = tuple(getattr(value, "shape", np.shape(value)))
    if shape != tuple(variable.shape):
        raise ValueError(
            f"The checkpoint tensor for '{path}/kernel' has shape {shape}; "
            f"the model expects {tuple(variable.shape)}. Does the preset's "
            "config match its weights?"
        )
    # As KerasVariable.assign converts: to the variable's dtype first, so
    # that the NF4 bytes equal those of the float model's kernel.
    return ops.convert_to_tensor(np.asarray(value), dtype=variable.dtype)


def _nbytes(value, variable):
    nbytes = getattr(value, "nbytes", None)
    return int(nbytes) if nbytes is not None else convert.nbytes(variable)

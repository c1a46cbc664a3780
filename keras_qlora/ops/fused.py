"""The op wrapper: the single entry point for every 4-bit matmul.

Layers call `nf4_matmul(x, weight)`, the weight as one `NF4Tensors`; nothing
else multiplies by an NF4 weight. On TensorFlow it runs the fused C++ op
`KerasQLoRA>NF4Matmul` (custom_ops/), which never materializes the float
weight; its input gradient is the same op with `transpose=True`, registered
below at import. When the op library
cannot be built or loaded, or `KERAS_QLORA_PURE_TF=1`, it runs the pure
`keras.ops` reference (dequantize, then matmul) and warns once. Inside
`with reference_path():` it runs the reference without warning, whatever
the library's state: graphs traced there hold stock TensorFlow ops only
(portable SavedModels, see `keras_qlora.export`).

The reference path also carries its own gradient on TensorFlow: the input
gradient dequantizes again in the backward pass, so autodiff never keeps a
layer's float kernel alive from the forward pass to the backward pass. No
gradient flows to the 4-bit state on either path.
"""

import contextlib
import threading

import keras

from keras_qlora.ops import loader
from keras_qlora.ops.checks import check_inputs
from keras_qlora.ops.reference import nf4_matmul_reference
from keras_qlora.ops.tensors import NF4Tensors
from keras_qlora.quantizers import NF4State

OP_TYPE = "KerasQLoRA>NF4Matmul"
# Per thread: tf.function traces in the calling thread, and a portable
# export must not switch the path of a model training in another thread.
_forced = threading.local()


@contextlib.contextmanager
def reference_path():
    """Runs `nf4_matmul` on the pure-TF reference path inside the block.

    Graphs traced inside (e.g. a SavedModel export) then contain only stock
    TensorFlow ops, with the 4-bit variables dequantized in the graph, so
    they load without this package. Affects the calling thread only; nests.
    Meant for inference graphs: the reference runs here without its custom
    gradient, so autodiff (still correct) keeps each dequantized kernel
    until the backward pass.

    Example:

    ```python
    with keras_qlora.ops.reference_path():
        model.export("saved", format="tf_saved_model")
    ```
    """
    depth = getattr(_forced, "depth", 0)
    _forced.depth = depth + 1
    try:
        yield
    finally:
        _forced.depth = depth


def _reference_forced():
    return getattr(_forced, "depth", 0) > 0


def fused_library():
    """The loaded op module, or None (building it on first use).

    The first time, the op also runs a tiny self-test against the reference;
    a library that loads but lacks a kernel (or computes wrong results) is
    not used.
    """
    if keras.backend.backend() != "tensorflow":
        return None
    return loader.checked(_eager_self_test)


def _eager_self_test(lib) -> bool:
    import tensorflow as tf

    # First use is often while fit() traces its step function: run the
    # self-test eagerly, outside that graph.
    with tf.init_scope():
        return _self_test(lib)


# (m, k, n, dtype, transpose, quant_type) of the self-test. On a GPU they
# reach every CUDA kernel family (nf4_cuda_plan.h): K = 70 the reference
# kernel, the float32 cases at M = 2 the forward and transposed GEMV, the
# bfloat16 case at M = 24 the tensor-core kernel; on a CPU, the CPU
# kernels' paths. The last two check the other base formats.
_SELF_TEST_CASES = (
    (2, 70, 3, "float32", False, "nf4"),
    (2, 64, 40, "float32", False, "nf4"),
    (2, 64, 40, "float32", True, "nf4"),
    (24, 64, 40, "bfloat16", False, "nf4"),
    (24, 64, 40, "float32", True, "fp4"),
    (24, 70, 40, "float32", False, "int8"),
)


def _self_test(lib):
    import numpy as np
    import tensorflow as tf

    from keras_qlora.quantizers import quantize

    case = None
    try:
        rng = np.random.default_rng(0)
        for case in _SELF_TEST_CASES:
            m, k, n, dtype, transpose, quant_type = case
            weight = NF4Tensors.from_state(
                quantize(
                    rng.standard_normal((k, n)).astype("float32"), quant_type
                )
            )
            x = tf.cast(
                rng.standard_normal((m, n if transpose else k)).astype(
                    "float32"
                ),
                dtype,
            )
            got = _fused(lib, x, weight, transpose)
            want = nf4_matmul_reference(x, weight, transpose)
            got = np.asarray(tf.cast(got, "float32"))
            want = np.asarray(tf.cast(want, "float32"))
            # float32: accumulation order only; bfloat16: output rounding.
            tol = 1e-4 if dtype == "float32" else 1e-2 * np.abs(want).max()
            if got.shape != want.shape or not np.allclose(got, want, atol=tol):
                raise ValueError(
                    f"results differ from the reference (largest difference "
                    f"{np.abs(got - want).max():.3g}, allowed {tol:.3g})"
                )
    except Exception as err:
        m, k, n, dtype, transpose, quant_type = case or (
            (0, 0, 0, "?", False, "?")
        )
        loader.mark_failed(
            f"self-test of the fused op failed for {dtype} x [{m}, "
            f"{n if transpose else k}] @ W{'^T' if transpose else ''} "
            f"(W [{k}, {n}], {quant_type}): {err}"
        )
        return False
    return True


def active_path() -> tuple:
    """Returns `(name, reason)` of the implementation `nf4_matmul` uses."""
    if keras.backend.backend() != "tensorflow":
        return ("reference", f"Keras backend is {keras.backend.backend()}")
    if _reference_forced():
        return ("reference", "forced by keras_qlora.ops.reference_path()")
    if fused_library() is not None:
        return ("fused", f"C++ op library {loader.status()['path']}")
    return ("reference", loader.status()["reason"])


def nf4_matmul(x, weight, transpose=False):
    """Computes `x @ W` (or `x @ W^T` with `transpose=True`) for NF4 `W`.

    Args:
        x: float32 / float16 / bfloat16 tensor of rank >= 2, last axis K
            (N when `transpose`).
        weight: the quantized weight `W` (`[K, N]`) in any base format
            (NF4, FP4, int8): an `NF4Tensors` (tensors or variables, e.g. a
            layer's), or an `NF4State` (numpy arrays).
        transpose: multiply by `W^T` (used for input gradients).

    Returns:
        A tensor of x's dtype with last axis N (K when `transpose`).

    Raises:
        TypeError: `weight` is neither, an input has a wrong dtype, or
            `transpose` is not a bool.
        ValueError: shapes or the block size do not fit (`ops/checks.py`:
            the same checks and messages on the fused and pure paths).

    Example:
    >>> import numpy as np
    >>> from keras_qlora.quantizers import quantize_nf4
    >>> state = quantize_nf4(np.random.randn(64, 8).astype("float32"))
    >>> nf4_matmul(np.ones((2, 64), "float32"), state).shape
    TensorShape([2, 8])
    """
    weight = _as_tensors(weight)
    _check_dtypes(x, *weight.arrays())
    check_inputs(x, weight, transpose)
    # Under reference_path(): plain ops, without the custom-gradient
    # wrapper, which is slow to trace and adds gradient functions to
    # exported graphs.
    if keras.backend.backend() != "tensorflow" or _reference_forced():
        return nf4_matmul_reference(x, weight, transpose=transpose)
    lib = fused_library()
    if lib is not None:
        return _fused(lib, x, weight, transpose)
    loader.warn_fallback()
    return _reference_with_gradient(x, weight, transpose)


def _as_tensors(weight) -> NF4Tensors:
    if isinstance(weight, NF4Tensors):
        return weight
    if isinstance(weight, NF4State):
        return NF4Tensors.from_state(weight)
    raise TypeError(
        "nf4_matmul: weight must be an NF4Tensors or an NF4State. "
        f"Received: weight of type {type(weight).__name__}"
    )


_ALLOWED_DTYPES = (
    ("x", ("float32", "bfloat16", "float16")),
    ("packed", ("uint8",)),
    ("absmax", ("float32", "uint8")),
    ("absmax_scale", ("float32",)),
    ("absmax_offset", ("float32",)),
)


def _check_dtypes(*tensors):
    """TypeError naming the argument, before anything is cast silently."""
    for (name, allowed), value in zip(_ALLOWED_DTYPES, tensors, strict=True):
        if value is None and name in ("absmax_scale", "absmax_offset"):
            continue
        dtype = keras.backend.standardize_dtype(getattr(value, "dtype", None))
        if dtype not in allowed:
            raise TypeError(
                f"nf4_matmul: {name} must have dtype in {allowed}. "
                f"Received: {name}.dtype={dtype}"
            )


def _fused(lib, x, weight, transpose):
    import tensorflow as tf

    packed, absmax, absmax_scale, absmax_offset = weight.arrays()
    if absmax_scale is None:
        absmax_scale = tf.zeros((0,), tf.float32)
        absmax_offset = tf.zeros((), tf.float32)
    return lib.keras_q_lo_ra_nf4_matmul(
        x,
        packed,
        absmax,
        absmax_scale,
        absmax_offset,
        k=int(weight.shape[0]),
        n=int(weight.shape[1]),
        block_size=int(weight.block_size),
        transpose=bool(transpose),
        quant_type=weight.quant_type,
    )


def _reference_with_gradient(x, weight, transpose):
    import tensorflow as tf

    # Read variables outside the custom-gradient function, behind
    # stop_gradient: it then closes over constants, the forward ops record
    # nothing on an eager tape (so they keep no float kernel alive), and no
    # gradient can reach the 4-bit state.
    weight = weight.replace_arrays(
        None if t is None else tf.stop_gradient(tf.convert_to_tensor(t))
        for t in weight.arrays()
    )

    def product(inputs, flip):
        return nf4_matmul_reference(inputs, weight, transpose=flip)

    @tf.custom_gradient
    def forward(inputs):
        def grad(dy):
            return product(dy, not transpose)

        return product(tf.stop_gradient(inputs), transpose), grad

    return forward(x)


def _register_gradient():
    """Input gradient of the fused op: the transposed product."""
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    @tf.RegisterGradient(OP_TYPE)
    def _nf4_matmul_grad(op, dy):
        lib = loader.load()
        dx = lib.keras_q_lo_ra_nf4_matmul(
            dy,
            *op.inputs[1:],
            k=op.get_attr("k"),
            n=op.get_attr("n"),
            block_size=op.get_attr("block_size"),
            transpose=not op.get_attr("transpose"),
            quant_type=_attr_text(op.get_attr("quant_type")),
        )
        return [dx, None, None, None, None]


def _attr_text(value):
    # A string attribute reads back as bytes in graph mode.
    return value.decode() if isinstance(value, bytes) else value


try:
    _register_gradient()
except KeyError:  # registered already (module re-imported)
    pass

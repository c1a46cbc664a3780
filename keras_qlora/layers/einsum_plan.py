"""Reduces an EinsumDense equation to one matmul `[M, K] @ [K, N]`.

keras_hub writes attention projections as einsums: `abc,cde->abde` (query,
kernel `(hidden, heads, head_dim)`), `abcd,cde->abe` (output), Gemma's
`btd,ndh->btnh` with the contracted axis in the middle of the kernel, and so
on. Each is a matmul after permuting the kernel to `(contracted..., free...)`
and the input to `(batch..., contracted...)`; `EinsumPlan` holds those
permutations, computed once from the equation and the kernel shape.
"""

import dataclasses
import math
import numbers
import re

from keras import ops

_SPEC = re.compile(r"^(\.\.\.)?([a-zA-Z]*)$")


@dataclasses.dataclass(frozen=True)
class EinsumPlan:
    """How to evaluate `einsum(equation, x, kernel)` as a 2-D matmul.

    Attributes:
        equation: the equation, e.g. `"abc,cde->abde"`.
        kernel_shape: the kernel's shape in equation order.
        kernel_perm: kernel axes in `(contracted..., free...)` order.
        input_perm: input axes in `(batch..., contracted...)` order (None if
            already in that order).
        output_perm: axes of `(batch..., free...)` in output order (None if
            already in that order).
        k: product of the contracted kernel dims.
        n: product of the free kernel dims.
        free_shape: free kernel dims, in kernel order.
        num_batch: explicit batch letters (besides a leading `...`).
        ellipsis: whether input and output start with `...`.
        output_spec: output letters (without `...`).
    """

    equation: str
    kernel_shape: tuple
    kernel_perm: tuple
    input_perm: tuple
    output_perm: tuple
    k: int
    n: int
    free_shape: tuple
    num_batch: int
    ellipsis: bool
    output_spec: str

    def kernel_to_2d(self, kernel):
        """Kernel in equation layout -> `[K, N]`."""
        return ops.reshape(
            ops.transpose(kernel, self.kernel_perm), (self.k, self.n)
        )

    def kernel_from_2d(self, kernel_2d):
        """`[K, N]` -> kernel in equation layout (inverse of kernel_to_2d)."""
        permuted = [self.kernel_shape[i] for i in self.kernel_perm]
        inverse = [self.kernel_perm.index(i) for i in range(len(permuted))]
        return ops.transpose(ops.reshape(kernel_2d, permuted), inverse)

    def input_to_2d(self, x):
        """Input -> `([M, K] tensor, batch shape)`."""
        if self.input_perm is not None:
            lead = len(x.shape) - len(self.input_perm)
            perm = list(range(lead)) + [lead + i for i in self.input_perm]
            x = ops.transpose(x, perm)
        batch_shape = ops.shape(x)[: self._batch_rank(len(x.shape))]
        return ops.reshape(x, (-1, self.k)), batch_shape

    def output_from_2d(self, y2d, batch_shape):
        """`[M, N]` -> output in equation layout."""
        y = ops.reshape(y2d, tuple(batch_shape) + self.free_shape)
        if self.output_perm is not None:
            lead = len(y.shape) - len(self.output_perm)
            perm = list(range(lead)) + [lead + i for i in self.output_perm]
            y = ops.transpose(y, perm)
        return y

    def bias_shape(self, bias_axes):
        """Shape of a bias over `bias_axes`, broadcastable to the output.

        Same rule as Keras' EinsumDense: from the first biased output axis to
        the last, with 1 on axes that are not biased.
        """
        if not bias_axes:
            return None
        free_dims = dict(
            zip(self._free_letters(), self.free_shape, strict=True)
        )
        for c in bias_axes:
            if c not in free_dims:
                raise ValueError(
                    f"bias_axes may only name output axes taken from the "
                    f"kernel ({''.join(free_dims)}) for equation "
                    f"'{self.equation}'. Received: bias_axes='{bias_axes}'"
                )
        first = min(self.output_spec.index(c) for c in bias_axes)
        return tuple(
            free_dims[c] if c in bias_axes else 1
            for c in self.output_spec[first:]
        )

    def compute_output_shape(self, input_shape):
        rank = len(input_shape)
        batch = list(input_shape[: self._batch_rank(rank)])
        if self.input_perm is not None:
            lead = rank - len(self.input_perm)
            order = list(range(lead)) + [lead + i for i in self.input_perm]
            batch = [input_shape[i] for i in order][: len(batch)]
        out = batch + list(self.free_shape)
        if self.output_perm is not None:
            lead = len(out) - len(self.output_perm)
            out = out[:lead] + [out[lead + i] for i in self.output_perm]
        return tuple(out)

    def _batch_rank(self, rank):
        return rank - len(self.kernel_perm) + len(self.free_shape)

    def _free_letters(self):
        kernel_spec = self.equation.split(",")[1].split("->")[0]
        return [kernel_spec[i] for i in self.kernel_perm][
            len(self.kernel_perm) - len(self.free_shape) :
        ]


def plan_einsum(equation: str, kernel_shape) -> EinsumPlan:
    """Builds the `EinsumPlan` of `equation` for a kernel of `kernel_shape`.

    Raises:
        ValueError: naming the equation, when it is malformed or does not
            reduce to a single matmul (a kernel axis that is also a batch
            axis, an axis summed away on one side only, no contraction), or
            a kernel size is not positive.
        TypeError: an equation that is not a string, or a kernel_shape
            that is not a sequence of ints.
    """
    parsed = _parse(equation)
    inp, ker, out, ellipsis = parsed
    kernel_shape = _check_kernel_shape(equation, kernel_shape)
    if len(kernel_shape) != len(ker):
        raise ValueError(
            f"Equation '{equation}' has {len(ker)} kernel axes but the "
            f"kernel has shape {kernel_shape}."
        )

    def fail(why):
        raise ValueError(
            f"EinsumDense equation '{equation}' does not reduce to a single "
            f"matmul x[M, K] @ W[K, N]: {why}. Exclude this layer from "
            "quantize_modules/target_modules, or use a Dense layer."
        )

    for c in ker:
        if c in inp and c in out:
            fail(f"axis '{c}' is in the input, kernel and output")
        if c not in inp and c not in out:
            fail(f"kernel axis '{c}' is summed away")
    for c in inp:
        if c not in ker and c not in out:
            fail(f"input axis '{c}' is summed away")
    for c in out:
        if c not in inp and c not in ker:
            fail(f"output axis '{c}' comes from neither operand")
    contracted = [c for c in ker if c in inp]
    free = [c for c in ker if c in out]
    batch = [c for c in inp if c in out]
    if not contracted:
        fail("no axis is contracted")
    if not free:
        fail("the kernel has no output axis")

    kernel_perm = tuple(ker.index(c) for c in contracted + free)
    input_order = batch + contracted
    input_perm = tuple(inp.index(c) for c in input_order)
    current = batch + free
    output_perm = tuple(current.index(c) for c in out)
    identity = lambda p: p == tuple(range(len(p)))  # noqa: E731
    return EinsumPlan(
        equation=equation,
        kernel_shape=kernel_shape,
        kernel_perm=kernel_perm,
        input_perm=None if identity(input_perm) else input_perm,
        output_perm=None if identity(output_perm) else output_perm,
        k=math.prod(kernel_shape[ker.index(c)] for c in contracted),
        n=math.prod(kernel_shape[ker.index(c)] for c in free),
        free_shape=tuple(kernel_shape[ker.index(c)] for c in free),
        num_batch=len(batch),
        ellipsis=ellipsis,
        output_spec=out,
    )


def _check_kernel_shape(equation, kernel_shape) -> tuple:
    """`kernel_shape` as a tuple of positive ints, or an error naming it."""
    try:
        dims = tuple(kernel_shape)
    except TypeError:
        dims = None
    if dims is None or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool)
        for d in dims
    ):
        raise TypeError(
            f"kernel_shape of equation '{equation}' must be a tuple of "
            f"positive ints. Received: kernel_shape={kernel_shape!r}"
        )
    if not all(d > 0 for d in dims):
        raise ValueError(
            f"kernel_shape of equation '{equation}' must hold positive "
            f"sizes. Received: kernel_shape={kernel_shape!r}"
        )
    return tuple(int(d) for d in dims)


def _parse(equation):
    if not isinstance(equation, str):
        raise TypeError(
            "An EinsumDense equation must be a string like 'ab,bc->ac'. "
            f"Received: equation={equation!r}"
        )
    if equation.count("->") != 1:
        raise ValueError(
            "EinsumDense equation must look like 'ab,bc->ac'. "
            f"Received: equation={equation!r}"
        )
    lhs, out = equation.replace(" ", "").split("->")
    if lhs.count(",") != 1:
        raise ValueError(
            "EinsumDense equation must have exactly two inputs (x, kernel). "
            f"Received: equation={equation!r}"
        )
    inp, ker = lhs.split(",")
    m_in, m_ker, m_out = (_SPEC.match(s) for s in (inp, ker, out))
    if not (m_in and m_ker and m_out) or m_ker.group(1):
        raise ValueError(
            f"EinsumDense equation {equation!r} is not supported: letters "
            "only, with '...' allowed only at the start of the input and "
            "the output."
        )
    if bool(m_in.group(1)) != bool(m_out.group(1)):
        raise ValueError(
            f"EinsumDense equation {equation!r}: '...' must start both the "
            "input and the output, or neither."
        )
    specs = (m_in.group(2), m_ker.group(2), m_out.group(2))
    for spec in specs:
        if len(set(spec)) != len(spec):
            raise ValueError(
                f"EinsumDense equation {equation!r} repeats an axis letter "
                f"in '{spec}' (diagonals are not supported)."
            )
    return specs + (bool(m_in.group(1)),)

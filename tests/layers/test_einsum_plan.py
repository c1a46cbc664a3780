"""EinsumPlan: an EinsumDense equation as one matmul [M, K] @ [K, N]."""

import re

import numpy as np
import pytest
from keras import ops

from keras_qlora.layers import plan_einsum

# (equation, input shape, kernel shape): keras_hub BERT attention, Gemma
# query / output, an output permutation, and a leading ellipsis.
CASES = [
    ("abc,cde->abde", (2, 5, 12), (12, 3, 4)),
    ("abcd,cde->abe", (2, 5, 3, 4), (3, 4, 12)),
    ("btd,ndh->btnh", (2, 5, 12), (3, 12, 4)),
    ("btnh,nhd->btd", (2, 5, 3, 4), (3, 4, 12)),
    ("bqd,dhk->bhqk", (2, 5, 12), (12, 3, 4)),
    ("...b,bc->...c", (2, 3, 4, 12), (12, 7)),
    ("ab,bc->ac", (6, 12), (12, 7)),
    ("abc,dc->abd", (2, 5, 12), (7, 12)),  # contracted axis last
]


def random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def via_plan(plan, x, kernel):
    x2d, batch_shape = plan.input_to_2d(ops.convert_to_tensor(x))
    y2d = ops.matmul(x2d, plan.kernel_to_2d(ops.convert_to_tensor(kernel)))
    return ops.convert_to_numpy(plan.output_from_2d(y2d, batch_shape))


@pytest.mark.parametrize("equation, x_shape, kernel_shape", CASES)
def test_plan_matmul_equals_einsum(equation, x_shape, kernel_shape):
    plan = plan_einsum(equation, kernel_shape)
    x, kernel = random(x_shape, 0), random(kernel_shape, 1)
    expected = np.einsum(equation, x, kernel)
    got = via_plan(plan, x, kernel)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert plan.compute_output_shape(x_shape) == expected.shape
    assert plan.k * plan.n == int(np.prod(kernel_shape))


@pytest.mark.parametrize("equation, x_shape, kernel_shape", CASES)
def test_kernel_from_2d_inverts_kernel_to_2d(equation, x_shape, kernel_shape):
    plan = plan_einsum(equation, kernel_shape)
    kernel = random(kernel_shape, 2)
    kernel_2d = plan.kernel_to_2d(kernel)
    assert tuple(kernel_2d.shape) == (plan.k, plan.n)
    back = ops.convert_to_numpy(plan.kernel_from_2d(kernel_2d))
    np.testing.assert_array_equal(back, kernel)


def test_gemma_query_plan_by_hand():
    plan = plan_einsum("btd,ndh->btnh", (8, 64, 16))
    assert plan.kernel_perm == (1, 0, 2)  # (d, n, h)
    assert (plan.k, plan.n) == (64, 8 * 16)
    assert plan.free_shape == (8, 16)
    assert plan.input_perm is None and plan.output_perm is None


def test_output_permutation_plan_by_hand():
    plan = plan_einsum("bqd,dhk->bhqk", (64, 8, 16))
    assert plan.kernel_perm == (0, 1, 2)
    # matmul gives (b, q, h, k); the equation wants (b, h, q, k).
    assert plan.output_perm == (0, 2, 1, 3)
    assert plan.compute_output_shape((None, 10, 64)) == (None, 8, 10, 16)


def test_compute_output_shape_keeps_unknown_dims():
    plan = plan_einsum("abc,cde->abde", (12, 3, 4))
    assert plan.compute_output_shape((None, None, 12)) == (None, None, 3, 4)
    plan = plan_einsum("...b,bc->...c", (12, 7))
    assert plan.compute_output_shape((None, 2, 12)) == (None, 2, 7)


def test_bias_shape():
    assert plan_einsum("abc,cde->abde", (12, 3, 4)).bias_shape("de") == (3, 4)
    assert plan_einsum("abc,cde->abde", (12, 3, 4)).bias_shape("e") == (4,)
    assert plan_einsum("abc,cde->abde", (12, 3, 4)).bias_shape("d") == (3, 1)
    assert plan_einsum("abcd,cde->abe", (3, 4, 12)).bias_shape("e") == (12,)
    assert plan_einsum("ab,bc->ac", (3, 4)).bias_shape(None) is None
    with pytest.raises(
        ValueError, match=r"bias_axes may only name .*Received: bias_axes='b'"
    ):
        plan_einsum("abc,cde->abde", (12, 3, 4)).bias_shape("b")


@pytest.mark.parametrize(
    "equation, kernel_shape, why",
    [
        ("ab,abc->ac", (3, 4, 5), "axis 'a' is in the input, kernel and out"),
        ("abc,cd->abcd", (4, 5), "axis 'c' is in the input, kernel and out"),
        ("ab,cd->ad", (4, 5), "kernel axis 'c' is summed away"),
        ("abc,cd->abd", (4, 5), None),  # valid, control case
        ("abc,bd->ad", (4, 5), "input axis 'c' is summed away"),
        ("ab,bc->acz", (4, 5), "output axis 'z' comes from neither"),
        ("ab,c->abc", (5,), "no axis is contracted"),
        ("ab,b->a", (4,), "the kernel has no output axis"),
    ],
)
def test_non_reducible_equations_name_the_equation(equation, kernel_shape, why):
    if why is None:
        plan_einsum(equation, kernel_shape)
        return
    pattern = re.escape(f"'{equation}' does not reduce") + ".*" + re.escape(why)
    with pytest.raises(ValueError, match=pattern):
        plan_einsum(equation, kernel_shape)


@pytest.mark.parametrize(
    "equation, match",
    [
        ("ab,bc->ac,x", "'ab,bc->ac,x' is not supported"),
        ("aab,bc->ac", "'aab,bc->ac' repeats an axis letter in 'aab'"),
        ("ab,bbc->ac", "'ab,bbc->ac' repeats an axis letter in 'bbc'"),
        ("ab,bc", "must look like 'ab,bc->ac'. Received: equation='ab,bc'"),
        ("ab,bc,cd->ad", "exactly two inputs.*'ab,bc,cd->ad'"),
        ("ab,...bc->ac", r"'ab,\.\.\.bc->ac' is not supported"),
        ("...b,bc->c", r"'\.\.\.b,bc->c': '\.\.\.' must start both"),
        ("a1,1c->ac", "'a1,1c->ac' is not supported"),
    ],
)
def test_malformed_equations(equation, match):
    with pytest.raises(ValueError, match=match):
        plan_einsum(equation, (4, 5))


def test_kernel_rank_must_match_equation():
    with pytest.raises(
        ValueError,
        match=r"'abc,cde->abde' has 3 kernel axes but the kernel has shape "
        r"\(12, 3\)",
    ):
        plan_einsum("abc,cde->abde", (12, 3))

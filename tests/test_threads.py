"""The cpu backend's mmd_loss on several threads, against the float64 reference. The rest of the suite runs one
thread, and csrc/cpu/mmd.cpp takes other paths when the threads outnumber its tasks (a task is a block of pairs of
one group): it splits the features of a task over threads, sums the parts before the finalize, and sums all of D
again in double where a part overflowed float; groups of M > 16 rows are cut into several row blocks, with pair
blocks off the diagonal. The thread count decides the path, not the cores: these run on any machine."""

import pytest
import torch
from conftest import rel_error, rtol, threads

import imm_kernels
from imm_kernels import reference

pytestmark = pytest.mark.skipif("cpu" not in imm_kernels.available_backends("cpu"), reason="needs the C++ backend")

# D just above 3 x 4096 (the smallest share of D a thread takes) and not a multiple of the 256-feature tile: 4
# threads split one group's features into 3 parts, the last one short.
SPLIT_FEATURES = 3 * 4096 + 100


def loss_and_grads(y_t, y_r, group_size, backend, **options):
    """Loss (per group) and the gradients of a fixed random functional of it."""
    a, b = (y.detach().clone().requires_grad_() for y in (y_t, y_r))
    loss = imm_kernels.mmd_loss(a, b, group_size, backend=backend, reduction="none", **options)
    probe = torch.linspace(-1.0, 2.0, loss.numel(), dtype=torch.float64)
    (loss.double() * probe).sum().backward()
    return loss, a.grad, b.grad


def assert_matches_float64(y_t, y_r, group_size, bound, **options):
    got = loss_and_grads(y_t, y_r, group_size, "cpu", **options)
    want = loss_and_grads(y_t.double(), y_r.double(), group_size, "reference", **options)
    for name, g, w in zip(("loss", "grad_t", "grad_r"), got, want):
        err = rel_error(g, w)
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.1g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kernel", ["laplace", "rbf", "energy"])
@pytest.mark.parametrize("group_size", [4, 20], ids=["M4", "M20"])
def test_features_split_over_threads(dtype, kernel, group_size):
    """One group, few pair blocks, large D: with 4 threads the forward and the backward split D into parts
    (M = 20: two row blocks, so pair blocks on and off the diagonal, each split)."""
    y_t = torch.randn(group_size, SPLIT_FEATURES, dtype=dtype)
    y_r = y_t + 0.3 * torch.randn_like(y_t)
    with threads(4):
        assert_matches_float64(y_t, y_r, group_size, rtol(dtype, "cpu", "cpu"), kernel=kernel, bandwidth=2.0)


@pytest.mark.parametrize("kernel", ["laplace", "rbf", "energy"])
def test_float_overflow_in_one_part_is_summed_again_in_double(kernel):
    """An element near 1e30 overflows the float sums of the part that holds it: the block is summed again in
    double and the finite answer comes out (float64's, to float32 accuracy)."""
    y_t = torch.randn(4, SPLIT_FEATURES)
    y_r = y_t + 0.01 * torch.randn_like(y_t)
    y_t[1, 5] = 1e30
    with threads(4):
        assert_matches_float64(y_t, y_r, 4, 1e-6, kernel=kernel)


@pytest.mark.parametrize("count", [1, 4])
@pytest.mark.parametrize("kernel", ["laplace", "rbf", "energy"])
@pytest.mark.parametrize("estimator", ["v", "u", "unpaired"])
@pytest.mark.parametrize("group_size", [17, 40])
def test_groups_of_several_row_blocks(count, kernel, estimator, group_size):
    """M > 16: pair blocks on and off the diagonal, the last row block short (17 = 16 + 1, 40 = 16 + 16 + 8), and
    the backward's row blocks; per-group bandwidths and weights."""
    groups = 3
    y_t = torch.randn(groups * group_size, 37, dtype=torch.float64)
    y_r = y_t + 0.5 * torch.randn_like(y_t)
    y_r[group_size + 3] = y_t[group_size + 3] + 1e-6  # near duplicates: the other gradient form
    options = dict(bandwidth=torch.rand(groups, dtype=torch.float64) + 0.5,
                   weight=torch.randn(groups, dtype=torch.float64))
    with threads(count):
        assert_matches_float64(y_t, y_r, group_size, rtol(torch.float64, "cpu", "cpu"), kernel=kernel,
                               estimator=estimator, **options)

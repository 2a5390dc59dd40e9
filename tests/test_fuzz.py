"""Whatever the Python layer lets through, the native backends return (never crash) with the right shapes, and
where the float64 answer is finite their loss and gradients are as close to it as the dtype allows: huge and
tiny scales, saturated kernels, enormous elements, exact and near duplicates, and odd layouts (expanded,
overlapping, sliced and transposed rows), in every dtype."""

import os

import pytest
import torch
from conftest import BACKEND_CASES, refuses_unpaired, rel_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imm_kernels
from imm_kernels import reference

# IMM_FUZZ_EXAMPLES=2000 for a longer hunt than CI's.
EXAMPLES = int(os.environ.get("IMM_FUZZ_EXAMPLES", "60"))
# Scales and special values a dtype can hold (float16 tops out at 65504).
SCALES = {torch.float16: [1e-3, 1.0, 50.0], torch.bfloat16: [1e-20, 1e-3, 1.0, 50.0, 1e15],
          torch.float32: [1e-20, 1e-3, 1.0, 50.0, 1e15], torch.float64: [1e-20, 1e-3, 1.0, 50.0, 1e15]}
SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e30, float("nan"), float("inf"), -float("inf")]
LAYOUTS = ["contiguous", "expanded", "overlapping", "sliced", "transposed"]
# Relative error of our result against float64, beyond what the same-precision reference makes itself: the
# rounding of the inputs and outputs (float16, bfloat16) or of the float32 sums.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout (expanded: every row equal to the first)."""
    if kind == "expanded":
        return x[:1].expand_as(x)
    if kind == "overlapping":  # row i starts one element after row i - 1: values shift, which is fine here
        flat = torch.cat([x.reshape(-1), x.reshape(-1)])
        return flat.as_strided(x.shape, (1, 1))
    if kind == "sliced":
        return torch.cat([x, x], 1)[:, ::2]
    if kind == "transposed":
        return x.t().contiguous().t()
    return x


@st.composite
def mmd_problems(draw):
    groups = draw(st.integers(1, 4))
    estimator = draw(st.sampled_from(["v", "u", "unpaired"]))
    group_size = draw(st.integers(1 if estimator == "v" else 2, 6))
    features = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    scale = draw(st.sampled_from(SCALES[dtype]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))  # so that hypothesis can replay
    y_t = torch.randn(groups * group_size, features, dtype=torch.float64, generator=generator) * scale
    offset = torch.randn(y_t.shape, dtype=torch.float64, generator=generator)
    y_r = y_t + offset * scale * draw(st.sampled_from([0.0, 1e-6, 1e-2, 1.0]))  # exact and near duplicates
    specials = draw(st.lists(st.tuples(st.sampled_from(["t", "r"]), st.integers(0, y_t.numel() - 1),
                                       st.sampled_from(SPECIAL)), max_size=2))
    for side, index, value in specials:
        (y_t if side == "t" else y_r).view(-1)[index] = value
    return dict(
        y_t=layout(y_t.to(dtype), draw(st.sampled_from(LAYOUTS))),
        y_r=layout(y_r.to(dtype), draw(st.sampled_from(LAYOUTS))), group_size=group_size, estimator=estimator,
        kernel=draw(st.sampled_from(["laplace", "rbf", "energy"])),
        bandwidth=draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30])),
        eps=draw(st.sampled_from([0.0, 1e-8, 1.0])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        grad=draw(st.sampled_from(["t", "r", "both", "none"])))


def loss_and_grads(fn, y_t, y_r, grad, **options):
    y_t = y_t.detach().requires_grad_(grad in ("t", "both"))
    y_r = y_r.detach().requires_grad_(grad in ("r", "both"))
    loss = fn(y_t, y_r, **options)
    wanted = [y for y in (y_t, y_r) if y.requires_grad]
    return [loss] + (list(torch.autograd.grad(loss.sum(), wanted)) if wanted else [])


def term_scales(y_t, y_r, grad, group_size, kernel, bandwidth, eps, reduction, **_):
    """In float64, the sizes of what the answer is a difference of (the self and the cross kernel sums, and
    their gradients): a float64 reference cancels them to no better than about 1e-16 of these, so errors are
    measured against at least 1e-6 of them, where the answer is that small (exact duplicates: 0)."""

    def kernel_sum(a, b):
        groups = a.shape[0] // group_size
        a, b = a.reshape(groups, group_size, -1), b.reshape(groups, group_size, -1)
        squared = (a[:, :, None] - b[:, None]).square().sum(-1)
        total = reference.kernel_matrix(kernel, squared, bandwidth, a.shape[-1], eps).sum()
        return total / group_size**2 / (groups if reduction == "mean" else 1)

    parts = [lambda a, b: kernel_sum(a, a) + kernel_sum(b, b), lambda a, b: 2 * kernel_sum(a, b)]
    sizes = [[v.abs().sum() if i == 0 else v.norm() for i, v in enumerate(loss_and_grads(part, y_t, y_r, grad))]
             for part in parts]
    return [a + b for a, b in zip(*sizes)]


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=mmd_problems())
def test_mmd_never_crashes_and_is_accurate(device, backend, problem):
    grad = problem.pop("grad")
    y_t, y_r = problem.pop("y_t").to(device), problem.pop("y_r").to(device)
    if problem["estimator"] == "unpaired" and refuses_unpaired(device, backend):
        with pytest.raises(ValueError, match="GPU-verified CUDA kernels"):
            imm_kernels.mmd_loss(y_t, y_r, backend=backend, **problem)
        return
    got = loss_and_grads(lambda a, b, **o: imm_kernels.mmd_loss(a, b, backend=backend, **o), y_t, y_r, grad,
                         **problem)
    groups = y_t.shape[0] // problem["group_size"]
    assert got[0].shape == ((groups,) if problem["reduction"] == "none" else ())
    assert all(g.shape == y_t.shape and g.dtype == y_t.dtype for g in got[1:])
    want = loss_and_grads(reference.mmd_loss, y_t.double(), y_r.double(), grad, **problem)
    if not all(torch.isfinite(w).all() for w in want):
        return  # NaN and inf inputs: any NaN or inf out is right (the reference's own placement may differ)
    try:  # the same precision's own error
        same = loss_and_grads(reference.mmd_loss, y_t, y_r, grad, **problem)
    except RuntimeError:  # a bandwidth float16 cannot hold: the bound is the tolerance alone
        same = want
    scales = term_scales(y_t.double(), y_r.double(), grad, **problem)
    size = max(y_t.double().norm().item(), y_r.double().norm().item())
    for name, g, w, s, scale in zip(("loss", "first gradient", "second gradient"), got, want, same, scales):
        if g is not got[0] and y_t.dtype != torch.float64 and not 1e-30 < w.norm().item() / size < 1e30:
            continue  # per-pair gradient coefficients (about |grad| / |y|) beyond float32's range: not crashing is all
        floor = 1e-6 * scale.item()
        error, own = rel_error(g, w, floor), rel_error(s, w, floor)
        assert error <= max(2 * own, TOLERANCE[y_t.dtype]), (
            f"{name}: relative error {error:.3g} against float64 (the {y_t.dtype} reference's: {own:.3g})")

"""Whatever the Python layer lets through, the native backends return (never crash) with the right shapes,
finite results on finite moderate inputs, and agree with the float64 reference there."""

import os

import pytest
import torch
from conftest import BACKEND_CASES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imm_kernels
from imm_kernels import reference

# IMM_FUZZ_EXAMPLES=2000 for a longer hunt than CI's.
EXAMPLES = int(os.environ.get("IMM_FUZZ_EXAMPLES", "60"))
SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e30, float("nan"), float("inf"), -float("inf")]


@st.composite
def mmd_problems(draw):
    groups = draw(st.integers(1, 4))
    estimator = draw(st.sampled_from(["v", "u"]))
    group_size = draw(st.integers(2 if estimator == "u" else 1, 6))
    features = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    y_t = torch.randn(groups * group_size, features, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    y_r = y_t + torch.randn_like(y_t) * draw(st.sampled_from([0.0, 1e-6, 1.0]))  # exact and near duplicates
    specials = draw(st.lists(st.tuples(st.integers(0, y_t.numel() - 1), st.sampled_from(SPECIAL)), max_size=3))
    for index, value in specials:
        y_t.view(-1)[index] = value
    return dict(
        y_t=y_t.to(dtype), y_r=y_r.to(dtype), group_size=group_size, estimator=estimator,
        kernel=draw(st.sampled_from(["laplace", "rbf", "energy"])),
        bandwidth=draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30])),
        eps=draw(st.sampled_from([0.0, 1e-8, 1.0])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        grad=draw(st.sampled_from(["t", "r", "both", "none"])),
        finite=not specials or all(v in (0.0, -0.0, 1e-30, -1e-30) for _, v in specials))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=mmd_problems())
def test_mmd_never_crashes(device, backend, problem):
    grad = problem.pop("grad")
    finite = problem.pop("finite")
    y_t = problem.pop("y_t").to(device).requires_grad_(grad in ("t", "both"))
    y_r = problem.pop("y_r").to(device).requires_grad_(grad in ("r", "both"))
    loss = imm_kernels.mmd_loss(y_t, y_r, backend=backend, **problem)
    groups = y_t.shape[0] // problem["group_size"]
    assert loss.shape == ((groups,) if problem["reduction"] == "none" else ())
    if grad != "none":
        loss.sum().backward()
    if finite and y_t.dtype in (torch.float32, torch.float64) and problem["bandwidth"] <= 1e3:
        assert torch.isfinite(loss).all()
        expected = reference.mmd_loss(y_t.detach().double(), y_r.detach().double(), **problem)
        scale = max(1.0, float(y_t.detach().abs().max())) if problem["kernel"] == "energy" else 1.0
        assert (loss.double() - expected).abs().max() <= 1e-4 * scale

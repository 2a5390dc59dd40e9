"""Every kernel variant (imm_kernels/_dispatch.py VARIANTS) against the float64 reference, on the backends it
changes (the Triton interpreter on CPUs; the GPU backends where there is a GPU): the sweep of tests/gpu_check.sh
times only designs that are right."""

import pytest
import torch
from conftest import BACKEND_CASES, rel_error, skip_where_refused

import imm_kernels
from imm_kernels import _dispatch, reference

SETTINGS = [(name, value) for name, values in _dispatch.VARIANTS.items() for value in values[1:]]


def cases_for(name: str):
    backend = "triton" if name.startswith("IMM_TRITON_") else "cuda"
    return [case for case in BACKEND_CASES if case.values[1] == backend]


PARAMS = [pytest.param(name, value, device, backend, id=f"{name}={value}-{device}-{backend}")
          for name, value in SETTINGS for device, backend in (c.values for c in cases_for(name))]


def test_unknown_variant_is_refused(monkeypatch):
    monkeypatch.setenv("IMM_TRITON_MMD", "fastest")
    with pytest.raises(ValueError, match="IMM_TRITON_MMD must be one of"):
        _dispatch.variant("IMM_TRITON_MMD")


@pytest.mark.parametrize("name,value,device,backend", PARAMS)
@pytest.mark.parametrize("kernel", ["laplace", "rbf", "energy"])
@pytest.mark.parametrize("estimator", ["v", "u", "unpaired"])
@pytest.mark.parametrize("shape", [(3, 4, 33), (2, 3, 5000), (1, 17, 40)], ids=["groups", "split", "M17"])
def test_mmd_loss_variant(monkeypatch, name, value, device, backend, kernel, estimator, shape):
    if estimator == "unpaired" and shape != (3, 4, 33):
        pytest.skip("unpaired differs from u in its pair weights only (the shared coefficient code): one shape")
    monkeypatch.setenv(name, value)
    skip_where_refused(device, backend, estimator)
    groups, group_size, features = shape
    y_t = torch.randn(groups * group_size, features, device=device, dtype=torch.float64, requires_grad=True)
    y_r = torch.randn_like(y_t, requires_grad=True)
    options = dict(kernel=kernel, estimator=estimator, bandwidth=torch.rand(groups, device=device) + 0.5,
                   reduction="none")
    loss = imm_kernels.mmd_loss(y_t, y_r, group_size, backend=backend, **options)
    probe = torch.randn_like(loss)
    got = (loss,) + torch.autograd.grad((loss * probe).sum(), (y_t, y_r))
    want = reference.mmd_loss(y_t, y_r, group_size, **options)
    want = (want,) + torch.autograd.grad((want * probe).sum(), (y_t, y_r))
    for g, w in zip(got, want):
        assert rel_error(g, w) <= 1e-10


@pytest.mark.parametrize("name,value,device,backend", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_interpolant_ops_variant(monkeypatch, name, value, device, backend, dtype):
    monkeypatch.setenv(name, value)
    x = torch.randn(5, 3, 2000, device=device).to(dtype).requires_grad_()
    g = torch.randn_like(x).requires_grad_()
    t = torch.rand(5, device=device) * 0.9 + 0.05
    for fn, times in ((imm_kernels.interpolate_pair, (t, t * 0.5)), (imm_kernels.imm_output, (t * 0.3, t))):
        out = fn(x, g, *times, backend=backend)
        outs = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(outs, (x, g), [torch.ones_like(o) for o in outs])
        x64, g64 = (v.detach().double().requires_grad_() for v in (x, g))
        want = getattr(reference, fn.__name__)(x64, g64, *(v.double() for v in times))
        wants = want if isinstance(want, tuple) else (want,)
        want_grads = torch.autograd.grad(wants, (x64, g64), [torch.ones_like(w) for w in wants])
        for got, expected in zip(outs + grads, wants + want_grads):
            assert rel_error(got, expected) <= (1e-6 if dtype == torch.float32 else 1e-2)

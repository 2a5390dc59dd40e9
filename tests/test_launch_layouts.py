"""Shapes that reach every launch layout of the GPU backends, against the float64 reference (skipped without a
GPU; tests/gpu_check.sh runs them first). The layout a shape gets, in the CUDA kernels (csrc/cuda/mmd.cu plan():
warps per group = min(4096 / G, D / 512), one team of 1, 2 or 4 warps per group up to 4, else the features split
into chunks) and in Triton (imm_kernels/triton/mmd.py: one program per group, or chunks of at least 2048
features when G is under 512 / (D / 2048)), and the tile edge (4 for M <= 4 in float32, else 2)."""

import pytest
import torch
from conftest import BACKEND_CASES, rel_error

import imm_kernels
from imm_kernels import reference

CUDA_CASES = [case for case in BACKEND_CASES if case.values[0] == "cuda"]
pytestmark = pytest.mark.skipif(not CUDA_CASES, reason="needs a CUDA device and a GPU backend")

LAYOUTS = {  # (G, M, D): what it reaches
    "team of 1 warp": (8, 4, 700),
    "team of 2 warps": (8, 4, 1100),
    "team of 4 warps": (8, 4, 2000),
    "chunks, Triton split": (2, 4, 9000),
    "many groups, one warp each": (4100, 2, 64),
    "edge 2 tiles (M = 6)": (16, 6, 2000),
    "edge 2 tiles, chunks (M = 9)": (2, 9, 7000),
    "M = 1": (32, 1, 1500),
}


@pytest.mark.parametrize("device,backend", CUDA_CASES)
@pytest.mark.parametrize("shape", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_launch_layout(device, backend, shape, dtype):
    groups, group_size, features = shape
    y_t = torch.randn(groups * group_size, features, device=device, dtype=dtype, requires_grad=True)
    y_r = (y_t.detach() + 0.3 * torch.randn_like(y_t)).requires_grad_()
    bandwidth = torch.rand(groups, device=device, dtype=dtype) + 0.5
    loss = imm_kernels.mmd_loss(y_t, y_r, group_size, bandwidth=bandwidth, reduction="none", backend=backend)
    probe = torch.randn_like(loss)
    got = (loss,) + torch.autograd.grad((loss * probe).sum(), (y_t, y_r))
    y64 = [y.detach().double().requires_grad_() for y in (y_t, y_r)]
    want = reference.mmd_loss(*y64, group_size, bandwidth=bandwidth.double(), reduction="none")
    want = (want,) + torch.autograd.grad((want * probe.double()).sum(), y64)
    for g, w in zip(got, want):
        assert rel_error(g, w) <= (1e-10 if dtype == torch.float64 else 1e-5)

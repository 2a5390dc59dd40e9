"""IMM's loss head forward+backward: imm_mmd_loss (imm_<backend>: fused, the outputs c_skip x + c_out g formed inside
the MMD kernels) against the same loss composed from the backend's ops (composed_<backend>: imm_output twice, then
mmd_loss), and the float64-capable reference composition (eager). The target side is under stop-gradient, as in
training: the gradient written is g_t's.

Byte model, in units of one (B, D) tensor: fused 9 (forward reads x_t, g_t, x_r, g_r; backward reads them again and
writes grad g_t), composed 13 (imm_output 3 + 3, mmd_loss 2 + 3, imm_output's backward 2). The peak extra memory of a
call shows the temporaries: the fused head allocates the gradient only (0.25 of its four inputs), the composition
also y_t, y_r and grad y_t. On the cuda backend imm_mmd_loss is the composition itself (no GPU-proven fused kernel)."""

from __future__ import annotations

import pytest
import torch

import imm_kernels
from imm_kernels import imm, reference

from .harness import (DEVICES, SMOKE, graph_replay_ms, input_sets, native_providers, peak_extra_bytes, record,
                      reference_mean, require_backend, sync, time_ms)

SHAPES = {  # (G, M, D)
    "cuda": [(1024, 4, 4096), (512, 8, 3072), (8, 8, 196608)],
    "cpu": [(16, 4, 65536), (256, 4, 3072), (64, 16, 3072)],
}
if SMOKE:
    SHAPES = {device: [(4, 4, 64)] for device in SHAPES}
DTYPES = [torch.float32, torch.bfloat16]
BYTE_UNITS = {"fused": 9, "composed": 13}


def head(x_t, g_t, x_r, g_r, s, r, t, group_size, backend):
    return imm_kernels.imm_mmd_loss(x_t, g_t, x_r, g_r, s, r, t, group_size, bandwidth=imm.kernel_bandwidth(s, t),
                                    weight=imm.time_weight(t), backend=backend)


def composed(ops, x_t, g_t, x_r, g_r, s, r, t, group_size, reduction="mean", **backend):
    rows = [v.repeat_interleave(group_size) for v in (s, r, t)]
    y_t = ops.imm_output(x_t, g_t, rows[0], rows[2], **backend)
    y_r = ops.imm_output(x_r, g_r, rows[0], rows[1], **backend)
    return ops.mmd_loss(y_t, y_r, group_size, bandwidth=imm.kernel_bandwidth(s, t), weight=imm.time_weight(t),
                        reduction=reduction, **backend)


def provider_fn(name: str):
    kind, _, backend = name.partition("_")
    if name == "eager":
        return lambda *inputs: composed(reference, *inputs)
    if kind == "imm":
        return lambda *inputs: head(*inputs, backend)
    return lambda *inputs: composed(imm_kernels, *inputs, backend=backend)


def providers(device: str) -> list[str]:
    ours = native_providers(device)
    return ours + [p.replace("imm_", "composed_") for p in ours] + ["eager"]


CASES = [pytest.param(d, s, p, id=f"{d}-{'x'.join(map(str, s))}-{p}") for d in DEVICES for s in SHAPES[d]
         for p in providers(d)]


def expected(inputs, group_size):
    """The float64 reference's loss and g_t gradient."""
    x_t, g_t, x_r, g_r, s, r, t = (v.detach().double() for v in inputs)
    g_t.requires_grad_()

    def summed(chunk, rows):
        return composed(reference, x_t[rows], g_t[rows], x_r[rows], g_r[rows], s[chunk], r[chunk], t[chunk],
                        group_size, reduction="sum")

    return reference_mean(summed, s.shape[0], group_size, x_t.shape[1], x_t.device), g_t.grad


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("device,shape,provider", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_loss_head(benchmark, device, shape, provider, dtype):
    if provider != "eager":
        require_backend("imm_" + provider.partition("_")[2], device)
    g, m, d = shape
    fn = provider_fn(provider)

    def make():
        torch.manual_seed(0)
        tensors = [(torch.randn(g * m, d, device=device) * 0.5).to(dtype) for _ in range(4)]
        tensors[1].requires_grad_()
        t = 0.1 + 0.85 * torch.rand(g, dtype=torch.float64, device=device)
        s = t * torch.rand_like(t) * 0.9
        return [*tensors, s, s + (t - s) * 0.9, t]

    element = torch.finfo(dtype).bits // 8
    tensor = g * m * d * element
    sets = input_sets(make, device, 4 * tensor)

    def run(inputs):
        loss = fn(*inputs, m)
        inputs[1].grad = None
        loss.backward()
        return loss

    # Correct first: a fast wrong answer fails here instead of winning below.
    loss = run(sets[0])
    want_loss, want_grad = expected(sets[0], m)
    errors = [relative(loss, want_loss), relative(sets[0][1].grad, want_grad)]
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    if max(errors) > tolerance:
        pytest.fail(f"{provider} is wrong: relative errors {[f'{e:.2g}' for e in errors]} > {tolerance}")
    median = time_ms(run, sets, device)
    graph = graph_replay_ms(run, sets, device)
    peak = peak_extra_bytes(lambda: run(sets[0]), device)
    benchmark.pedantic(lambda: (run(sets[0]), sync(device)), rounds=1 if SMOKE else 3, iterations=1)
    units = BYTE_UNITS["fused" if provider.startswith("imm_") and provider != "imm_cuda" else "composed"]
    benchmark.extra_info["byte_units"] = units
    record(benchmark, device=device, provider=provider, op="loss_head", mode="forward_backward", shape=shape,
           dtype=dtype, median_ms=median, min_bytes=units * tensor, peak_bytes=peak, input_bytes=4 * tensor,
           graph=graph)

"""mmd_loss, forward and forward+backward, against the eager reference, torch.compile of it, the
torch.cdist formulation of public IMM code, geomloss (when installed), and a plain torch.sum over the
same bytes. IMM's setting: y_r is detached, so forward+backward writes the gradient of y_t only."""

from __future__ import annotations

import functools

import pytest
import torch

import imm_kernels
from imm_kernels import reference

from .harness import (DEVICES, SMOKE, graph_replay_ms, input_sets, native_providers, peak_extra_bytes, record,
                      reference_mean, require_backend, sync, time_ms)

SHAPES = {  # (G, M, D)
    "cuda": [(1024, 4, 4096), (512, 8, 3072), (64, 16, 16384), (8, 8, 196608)],
    "cpu": [(256, 4, 3072), (64, 16, 3072), (16, 4, 65536)],
}
if SMOKE:
    SHAPES = {device: [(4, 4, 64)] for device in SHAPES}
DTYPES = [torch.float32, torch.bfloat16]
BANDWIDTH = 2.0


def cdist_mmd(y_t, y_r, group_size, weight):
    """The torch.cdist formulation common in public IMM code (Laplace kernel, V statistic)."""
    g = y_t.shape[0] // group_size
    x, y = y_t.reshape(g, group_size, -1), y_r.reshape(g, group_size, -1)
    scale = BANDWIDTH / x.shape[-1]

    def k(a, b):
        return torch.exp(-scale * torch.cdist(a, b)).mean((1, 2))

    return (weight * (k(x, x) + k(y, y) - 2 * k(x, y))).mean()


def geomloss_mmd(y_t, y_r, group_size, weight):
    """geomloss' laplacian kernel loss is half the V-statistic MMD: doubled to match."""
    geomloss = pytest.importorskip("geomloss")
    g = y_t.shape[0] // group_size
    x, y = y_t.reshape(g, group_size, -1), y_r.reshape(g, group_size, -1)
    loss = geomloss.SamplesLoss("laplacian", blur=x.shape[-1] / BANDWIDTH, backend="tensorized")
    return (weight * 2 * loss(x, y)).mean()


def reference_mmd(y_t, y_r, group_size, weight):
    return reference.mmd_loss(y_t, y_r, group_size, bandwidth=BANDWIDTH, weight=weight)


@functools.cache
def compiled_reference():
    return torch.compile(reference_mmd, dynamic=False)


def provider_fn(name: str):
    if name.startswith("imm_"):
        backend = name.removeprefix("imm_")
        return lambda y_t, y_r, m, w: imm_kernels.mmd_loss(y_t, y_r, m, bandwidth=BANDWIDTH, weight=w,
                                                            backend=backend)
    return {"eager": reference_mmd, "compiled": lambda *a: compiled_reference()(*a), "cdist": cdist_mmd,
            "geomloss": geomloss_mmd, "torch_sum": lambda y_t, y_r, m, w: y_t.sum() + y_r.sum()}[name]


def providers(device: str) -> list[str]:
    return native_providers(device) + ["eager", "compiled", "cdist", "geomloss", "torch_sum"]


CASES = [pytest.param(d, s, p, id=f"{d}-{'x'.join(map(str, s))}-{p}") for d in DEVICES for s in SHAPES[d]
         for p in providers(d)]


def expected_loss_and_grad(y_t, y_r, group_size, weight):
    """The float64 reference's loss and y_t gradient."""
    y64 = y_t.detach().double().requires_grad_()
    r64 = y_r.detach().double()

    def summed(chunk, rows):
        return reference.mmd_loss(y64[rows], r64[rows], group_size, bandwidth=BANDWIDTH,
                                  weight=weight[chunk].double(), reduction="sum")

    return reference_mean(summed, weight.shape[0], group_size, y_t.shape[1], y_t.device), y64.grad


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("device,shape,provider", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_mmd(benchmark, device, shape, provider, dtype, mode):
    if provider == "torch_sum" and mode != "forward":
        pytest.skip("the read-bandwidth yardstick is forward only")
    if provider.startswith("imm_"):
        require_backend(provider, device)
    g, m, d = shape
    fn = provider_fn(provider)
    backward = mode == "forward_backward"

    def make():
        y_t = torch.randn(g * m, d, device=device).to(dtype).requires_grad_(backward)
        return y_t, torch.randn(g * m, d, device=device).to(dtype), torch.rand(g, device=device) + 0.5

    element = torch.finfo(dtype).bits // 8
    sets = input_sets(make, device, 2 * g * m * d * element)

    def run(inputs):
        y_t, y_r, weight = inputs
        loss = fn(y_t, y_r, m, weight)
        if backward:
            y_t.grad = None
            loss.backward()
        return loss

    # Correct first: a fast wrong answer fails here instead of winning below.
    if provider != "torch_sum":
        y_t, y_r, weight = sets[0]
        try:
            loss = run(sets[0])
        except NotImplementedError as missing:  # e.g. torch.cdist has no bf16 CPU kernel
            pytest.skip(f"{provider} cannot run this case: {missing}")
        want_loss, want_grad = expected_loss_and_grad(y_t, y_r, m, weight)
        ours = provider.startswith("imm_")
        tolerance = {torch.float32: 1e-4 if ours else 1e-3, torch.bfloat16: 2e-2 if ours else 0.15}[dtype]
        errors = [relative(loss, want_loss)] + ([relative(y_t.grad, want_grad)] if backward else [])
        if max(errors) > tolerance:  # ours: a failure; a baseline: not timed, with its error in the summary
            message = f"{provider} is wrong: relative errors {[f'{e:.2g}' for e in errors]} > {tolerance}"
            pytest.fail(message) if ours else pytest.skip(message)
    median = time_ms(run, sets, device)
    graph = graph_replay_ms(run, sets, device)
    peak = peak_extra_bytes(lambda: run(sets[0]), device)
    benchmark.pedantic(lambda: (run(sets[0]), sync(device)), rounds=1 if SMOKE else 3, iterations=1)
    tensor = g * m * d * element
    # Minimum bytes: forward reads y_t and y_r; backward reads both again and writes grad y_t (5 units in all).
    record(benchmark, device=device, provider=provider, op="mmd_loss", mode=mode, shape=shape, dtype=dtype,
           median_ms=median, min_bytes=(5 if backward else 2) * tensor, peak_bytes=peak, input_bytes=2 * tensor,
           graph=graph)

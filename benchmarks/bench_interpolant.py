"""interpolate_pair and imm_output, forward and forward+backward, against the eager reference and
torch.compile of it. Per-sample times; the roofline counts each tensor read or written once."""

from __future__ import annotations

import functools

import pytest
import torch

import imm_kernels
from imm_kernels import reference

from .harness import (DEVICES, SMOKE, graph_replay_ms, input_sets, native_providers, peak_extra_bytes, record,
                      require_backend, sync, time_ms)

SHAPES = {  # (B, features)
    "cuda": [(4096, 4096), (4096, 3072), (64, 196608)],
    "cpu": [(1024, 3072), (64, 65536)],
}
if SMOKE:
    SHAPES = {device: [(8, 96)] for device in SHAPES}


def interpolate_pair(module, x, noise, s, r, t, **backend):
    return module.interpolate_pair(x, noise, t, r, **backend)


def imm_output(module, x, g, s, r, t, **backend):
    return (module.imm_output(x, g, s, t, **backend),)


OPS = {"interpolate_pair": (interpolate_pair, 2), "imm_output": (imm_output, 1)}  # op -> (call, outputs)


@functools.cache
def compiled(op: str):
    return torch.compile(functools.partial(OPS[op][0], reference), dynamic=False)


def provider_fn(op: str, name: str):
    if name.startswith("imm_"):
        return functools.partial(OPS[op][0], imm_kernels, backend=name.removeprefix("imm_"))
    return functools.partial(OPS[op][0], reference) if name == "eager" else compiled(op)


def providers(device: str) -> list[str]:
    return native_providers(device) + ["eager", "compiled"]


CASES = [pytest.param(d, s, p, id=f"{d}-{'x'.join(map(str, s))}-{p}") for d in DEVICES for s in SHAPES[d]
         for p in providers(d)]


@pytest.mark.parametrize("device,shape,provider", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("op", list(OPS))
def test_interpolant(benchmark, op, device, shape, provider, dtype, mode):
    if provider.startswith("imm_"):
        require_backend(provider, device)
    rows, features = shape
    fn = provider_fn(op, provider)
    backward = mode == "forward_backward"
    element = torch.finfo(dtype).bits // 8

    def make():
        x, y = (torch.randn(rows, features, device=device).to(dtype).requires_grad_(backward) for _ in range(2))
        t = torch.rand(rows, device=device) * 0.9 + 0.05
        r = t * torch.rand(rows, device=device)
        s = r * torch.rand(rows, device=device)
        grads = [torch.randn(rows, features, device=device).to(dtype) for _ in range(OPS[op][1])]
        return x, y, s, r, t, grads

    sets = input_sets(make, device, 2 * rows * features * element)

    def run(inputs):
        x, y, s, r, t, grads = inputs
        outputs = fn(x, y, s, r, t)
        if backward:
            x.grad = y.grad = None
            torch.autograd.backward(outputs, grads)
        return outputs

    # Correct first, against float64.
    x, y, s, r, t, grads = sets[0]
    got = run(sets[0])
    x64, y64 = (v.detach().double().requires_grad_(backward) for v in (x, y))
    want = OPS[op][0](reference, x64, y64, s.double(), r.double(), t.double())
    if backward:
        torch.autograd.backward(want, [g.double() for g in grads])
    pairs = list(zip(got, want)) + ([(x.grad, x64.grad), (y.grad, y64.grad)] if backward else [])
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for a, b in pairs:
        error = ((a.double() - b).norm() / b.norm()).item()
        if error > tolerance:
            pytest.fail(f"{provider} is wrong: relative error {error:.3g} > {tolerance}")
    median = time_ms(run, sets, device)
    graph = graph_replay_ms(run, sets, device)
    peak = peak_extra_bytes(lambda: run(sets[0]), device)
    benchmark.pedantic(lambda: (run(sets[0]), sync(device)), rounds=1 if SMOKE else 3, iterations=1)
    tensor = rows * features * element
    outputs = OPS[op][1]
    moved = (2 + outputs) * tensor + ((outputs + 2) * tensor if backward else 0)
    record(benchmark, device=device, provider=provider, op=op, mode=mode, shape=shape, dtype=dtype,
           median_ms=median, min_bytes=moved, peak_bytes=peak, input_bytes=2 * tensor, graph=graph)

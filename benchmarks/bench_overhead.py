"""Per-call cost: each op at a tiny shape, where its own arithmetic is negligible, against its plain PyTorch
formula, timed in the same interleaved rounds, forward+backward and forward only under no_grad. On CPUs with one
thread; on GPUs the host's time per call (the kernels are microseconds) and a CUDA-graph replay of the call.

Formulas: for mmd_loss the grouped MMD written as three torch.cdist calls (the form of public IMM code), and, as
a floor no MMD can reach, a single torch.cdist(y_t, y_r).mean(); for interpolate_pair the two lines
alpha x + sigma noise; for imm_output c_skip x_t + c_out g with the coefficients computed from (s, t)."""

from __future__ import annotations

import pytest
import torch

import imm_kernels
from imm_kernels import reference

from .harness import (DEVICES, SMOKE, graph_replay_ms, machine, native_providers, per_call_us, require_backend,
                      variant)

GROUPS, GROUP, FEATURES = 2, 4, 16  # mmd_loss: (G, M, D)
ROWS = 8  # interpolant ops: (ROWS, FEATURES)
SIGMA_DATA = 0.5


def cdist_mmd(y_t, y_r):
    x, y = y_t.reshape(GROUPS, GROUP, -1), y_r.reshape(GROUPS, GROUP, -1)

    def k(a, b):
        return torch.exp(-torch.cdist(a, b) / FEATURES).mean((1, 2))

    return (k(x, x) + k(y, y) - 2 * k(x, y)).mean()


def interpolate_pair_formula(x, noise, t, r):
    t, r = t[:, None], r[:, None]
    return (1 - t) * x + t * noise, (1 - r) * x + r * noise


def imm_output_formula(x, g, s, t):
    s, t = s[:, None], t[:, None]
    norm2 = (1 - t) ** 2 + t**2
    return ((1 - t) * (1 - s) + t * s) / norm2 * x - SIGMA_DATA * (t - s) / norm2.sqrt() * g


def cases(device: str):
    """{op: (inputs (those requiring grad first), {provider: fn}, float64 reference)}."""
    mmd_inputs = [torch.randn(GROUPS * GROUP, FEATURES, device=device) for _ in range(2)]
    pair = [torch.randn(ROWS, FEATURES, device=device) for _ in range(2)]
    t = torch.rand(ROWS, device=device) * 0.9 + 0.05
    r = t * 0.5

    def ours(op, *times):
        return {f"imm_{b.removeprefix('imm_')}": (lambda b: lambda a, c: getattr(imm_kernels, op)(
            a, c, *times, backend=b.removeprefix("imm_")))(b) for b in native_providers(device)}

    return {
        "mmd_loss": (mmd_inputs, {**{p: (lambda b: lambda a, c: imm_kernels.mmd_loss(a, c, GROUP, bandwidth=1.0,
                                                                                    backend=b))(p.removeprefix("imm_"))
                                     for p in native_providers(device)},
                                  "formula": cdist_mmd, "cdist_mean": lambda a, c: torch.cdist(a, c).mean()},
                     lambda a, c: reference.mmd_loss(a, c, GROUP, bandwidth=1.0)),
        "interpolate_pair": (pair, {**ours("interpolate_pair", t, r),
                                    "formula": lambda a, c: interpolate_pair_formula(a, c, t, r)},
                             lambda a, c: reference.interpolate_pair(a, c, t.double(), r.double())),
        "imm_output": (pair, {**ours("imm_output", r, t), "formula": lambda a, c: imm_output_formula(a, c, r, t)},
                       lambda a, c: reference.imm_output(a, c, r.double(), t.double(), sigma_data=SIGMA_DATA)),
    }


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["mmd_loss", "interpolate_pair", "imm_output"])
@pytest.mark.parametrize("mode", ["forward_backward", "forward_no_grad"])
def test_per_call(benchmark, device, op, mode):
    for provider in native_providers(device):
        require_backend(provider, device)
    inputs, providers, oracle = cases(device)[op]
    backward = mode == "forward_backward"
    inputs = [x.requires_grad_(backward) for x in inputs]
    want = as_tuple(oracle(*(x.detach().double() for x in inputs)))
    for name, fn in providers.items():  # correct first (the cdist floor is not an MMD: only timed)
        if name != "cdist_mean":
            for got, expected in zip(as_tuple(fn(*inputs)), want):
                error = ((got.double() - expected).norm() / expected.norm()).item()
                assert error < 1e-5, f"{name} is wrong: relative error {error:.3g}"
    grads = [torch.randn_like(o) for o in as_tuple(providers["formula"](*inputs))]

    def timed(fn):
        """One call: forward and backward (gradients given, both sides alike), or forward under no_grad."""
        if backward:
            return lambda: torch.autograd.grad(as_tuple(fn(*inputs)), inputs, grads)

        def forward():
            with torch.no_grad():
                fn(*inputs)

        return forward

    runs = {name: timed(fn) for name, fn in providers.items()}
    times = per_call_us(runs, device)
    graphs = {name: graph_replay_ms(lambda _, run=run: run(), [None], device) for name, run in runs.items()}
    benchmark.pedantic(runs[native_providers(device)[0]], rounds=1 if SMOKE else 3, iterations=1)
    benchmark.extra_info.update(
        op=op, mode=mode, device=device, kind="per_call", variant=variant(), machine=machine(device),
        threads=torch.get_num_threads(),
        shape=[GROUPS, GROUP, FEATURES] if op == "mmd_loss" else [ROWS, FEATURES], per_call_us=times,
        graph_us={name: None if ms is None else ms * 1e3 for name, (ms, _) in graphs.items()},
        graph_errors={name: error for name, (_, error) in graphs.items() if error})

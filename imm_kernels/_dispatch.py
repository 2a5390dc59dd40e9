"""Backends behind one table: which implementation runs an op, whether it can run here, and how to get it."""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

from . import _native

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

# backend="auto": the first usable backend per device type and op. On CPUs the C++ kernels. On GPUs the CUDA
# extension where it is built: on an H200 (2026-11-26, README) it beat Triton in all 16 timed mmd_loss cases
# (about 2x) and in 22 of 24 interpolant cases, though a whole small-MLP IMM step was 5% faster with Triton
# (3.80 vs 3.98 ms); Triton where the extension is not built.
AUTO_ORDER = {
    "cpu": {"mmd": ("cpu", "reference"), "combine": ("cpu", "reference")},
    "cuda": {"mmd": ("cuda", "triton", "reference"), "combine": ("cuda", "triton", "reference")},
}

# Modules that register an op's implementation for a backend when imported (imported on first use, so
# triton is never imported unless asked for).
_PROVIDERS = {
    ("mmd", "cpu"): "imm_kernels.mmd",
    ("mmd", "cuda"): "imm_kernels.mmd",
    ("mmd", "triton"): "imm_kernels.triton.mmd",
    ("combine", "cpu"): "imm_kernels.interpolant",
    ("combine", "cuda"): "imm_kernels.interpolant",
    ("combine", "triton"): "imm_kernels.triton.interpolant",
}

_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}


def register(op: str, backend: str):
    def decorate(fn: Callable) -> Callable:
        _IMPLEMENTATIONS[(op, backend)] = fn
        return fn

    return decorate


def implementation(op: str, backend: str) -> Callable:
    if (op, backend) not in _IMPLEMENTATIONS:
        importlib.import_module(_PROVIDERS[(op, backend)])
    return _IMPLEMENTATIONS[(op, backend)]


def _triton_problem() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return f"triton is not installed ({error}): pip install 'imm_kernels[triton]'"
    return None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on tensors of `device`, else what is missing and how to get it."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors; got {device.type} tensors (use 'cuda', 'triton' or 'auto')"
        _, reason = _native.load("cpu")
        return reason and f"{reason}: install from source with `pip install .` (needs a C++17 compiler, CMake, OpenMP)"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors; got {device.type} tensors"
        _, reason = _native.load("cuda")
        return reason and (f"{reason}: build it with CUDAARCHS='90a-real' pip install . "
                           "-Ccmake.define.IMM_CUDA=ON (see the README)")
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' runs on CUDA tensors; got {device.type} tensors"
        return _triton_problem()
    raise AssertionError(backend)


@torch.compiler.assume_constant_result  # decided once while tracing: no imports or probing inside the graph
def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend for `op` on `device`; raises with instructions when it cannot run."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason:
            raise RuntimeError(f"backend {backend!r} is unavailable: {reason}")
        return backend
    for candidate in AUTO_ORDER.get(device.type, {}).get(op, ("reference",)):
        if unavailable_reason(candidate, device) is None:
            return candidate
    return "reference"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The concrete backends that can run on tensors of `device` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device) is None]

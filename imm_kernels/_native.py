"""The compiled modules (imm_kernels._C for CPUs, imm_kernels._cuda for NVIDIA GPUs) and what crosses into
them: integer codes (csrc/common/platform.h), pointers, and per-device launch arguments."""

from __future__ import annotations

import functools
import importlib
import os

import torch

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
KERNEL_CODES = {"laplace": 0, "rbf": 1, "energy": 2}
ESTIMATOR_CODES = {"v": 0, "u": 1}
SCHEDULE_CODES = {"fm": 0, "cosine": 1}
PARAM_CODES = {"simple_edm": 0, "euler_fm": 1, "identity": 2}
COMBINE_KIND_CODES = {"interpolate": 0, "imm_output": 1}

_MODULES = {"cpu": "imm_kernels._C", "cuda": "imm_kernels._cuda"}


@functools.cache
def load(backend: str):
    """(module, None) when the backend's extension imports and works here, else (None, reason)."""
    try:
        module = importlib.import_module(_MODULES[backend])
    except ImportError as error:
        return None, f"{_MODULES[backend]} is not built ({error})"
    if backend == "cuda" and not module.device_available():
        return None, f"{_MODULES[backend]} is built but found no usable CUDA device or driver"
    return module, None


def launch_options(device: torch.device) -> dict:
    """The per-device tail of every native call: the thread count on CPUs, the current stream on GPUs."""
    if device.type == "cuda":
        return {"stream": torch.cuda.current_stream(device).cuda_stream}
    return {"num_threads": torch.get_num_threads()}


def ptr(x: torch.Tensor | None) -> int:
    return 0 if x is None or x.numel() == 0 else x.data_ptr()


# Tests set IMM_KERNELS_POISON=1 so that every output a kernel fails to write shows up as NaN.
_POISON = os.environ.get("IMM_KERNELS_POISON") == "1"


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON and not isinstance(out, torch._subclasses.FakeTensor):
        out.fill_(float("nan"))
    return out

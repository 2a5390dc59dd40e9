"""Every argument check of the public API, with the messages users read, and the normalisation of what
passes (tensors to (rows, features), scalars to per-group or per-row tensors). Nothing here syncs a GPU:
value checks on tensors (times in [0, 1], positive bandwidths) run only for CPU tensors outside torch.compile."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KERNELS = ("laplace", "rbf", "energy")
ESTIMATORS = ("v", "u")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


def real(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return value


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _checkable(x: torch.Tensor) -> bool:
    """Whether the values of x can be inspected without a device sync or a graph break."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def float_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16; got {x.dtype}")
    if x.dim() == 0 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty batch of shape (B, ...); got shape {tuple(x.shape)}")
    return x


def same_batch(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype; got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device; got {a.device} and {b.device}")


def rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, D) with contiguous features (a copy only when the view cannot be made)."""
    x2 = x.reshape(x.shape[0], -1)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def per_group(name: str, value, groups: int, like: torch.Tensor, *, positive: bool) -> torch.Tensor:
    """A float or a (G,) / 0-d tensor -> a contiguous (G,) tensor in the accumulation dtype."""
    dtype = accumulation_dtype(like.dtype)
    if isinstance(value, torch.Tensor):
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor; got {value.dtype}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != groups):
            raise ValueError(f"{name} must be a float or a tensor of shape ({groups},) (one per group); "
                             f"got shape {tuple(value.shape)}")
        if value.device != like.device:
            raise ValueError(f"{name} must be on {like.device} like the inputs; got {value.device}")
        if positive and _checkable(value) and not bool((value > 0).all()):
            raise ValueError(f"{name} must be > 0 for every group")
        return value.detach().to(dtype).expand(groups).contiguous()
    value = real(name, value, positive=positive)
    return torch.full((groups,), value, dtype=dtype, device=like.device)


@dataclass(frozen=True)
class MMDArguments:
    y_t: torch.Tensor  # (B, D), contiguous features
    y_r: torch.Tensor
    group_size: int
    groups: int
    bandwidth: torch.Tensor  # (G,) accumulation dtype
    weight: torch.Tensor  # (G,) accumulation dtype
    eps: float


def mmd_arguments(y_t, y_r, group_size, kernel, bandwidth, weight, estimator, eps, reduction) -> MMDArguments:
    float_tensor("y_t", y_t)
    float_tensor("y_r", y_r)
    same_batch("y_t", y_t, "y_r", y_r)
    choice("kernel", kernel, KERNELS)
    choice("estimator", estimator, ESTIMATORS)
    choice("reduction", reduction, REDUCTIONS)
    positive_int("group_size", group_size, minimum=2 if estimator == "u" else 1)
    batch = y_t.shape[0]
    if batch % group_size:
        raise ValueError(f"the batch size {batch} of y_t must be a multiple of group_size={group_size}")
    groups = batch // group_size
    eps = real("eps", eps, nonnegative=True)
    bw = per_group("bandwidth", bandwidth, groups, y_t, positive=True)
    w = per_group("weight", 1.0 if weight is None else weight, groups, y_t, positive=False)
    return MMDArguments(rows(y_t), rows(y_r), group_size, groups, bw, w, eps)


def time_range(T, eps_t) -> None:
    T = real("T", T)
    eps_t = real("eps_t", eps_t)
    if not 0 <= eps_t < T <= 1:
        raise ValueError(f"times must satisfy 0 <= eps_t < T <= 1; got eps_t={eps_t}, T={T}")


def imm_output_options(schedule: str, param: str, sigma_data) -> None:
    from .imm import PARAMS
    from .schedules import SCHEDULES

    choice("schedule", schedule, SCHEDULES)
    choice("param", param, PARAMS)
    if param == "euler_fm" and schedule != "fm":
        raise ValueError(f"param='euler_fm' is defined for schedule='fm' only; got schedule={schedule!r}")
    real("sigma_data", sigma_data, positive=True)


def times(name: str, value, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A float, a 0-d tensor or a (B,) tensor of times in [0, 1] -> (B,) in the accumulation dtype
    (a stride-0 view for one shared time)."""
    dtype = accumulation_dtype(like.dtype)
    if isinstance(value, torch.Tensor):
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float or a float tensor; got {value.dtype}")
        if value.numel() not in (1, batch) or (value.numel() == batch and value.dim() > 1
                                               and any(n != 1 for n in value.shape[1:])):
            raise ValueError(f"{name} must be a float or a tensor of shape ({batch},) (one per sample); "
                             f"got shape {tuple(value.shape)}")
        if value.device != like.device:
            raise ValueError(f"{name} must be on {like.device} like the inputs; got {value.device}")
        if _checkable(value) and not bool(((value >= 0) & (value <= 1)).all()):
            raise ValueError(f"{name} must lie in [0, 1]")
        return value.detach().reshape(-1).to(dtype).expand(batch)
    value = real(name, value)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must lie in [0, 1]; got {value}")
    return torch.full((1,), value, dtype=dtype, device=like.device).expand(batch)


def ordered(name_s: str, s: torch.Tensor, name_t: str, t: torch.Tensor) -> None:
    """s <= t elementwise (checked where that costs no sync)."""
    if _checkable(s) and _checkable(t) and not bool((s <= t).all()):
        raise ValueError(f"{name_s} must be <= {name_t} (the target time comes before the source time)")

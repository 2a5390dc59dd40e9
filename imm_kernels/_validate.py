"""Every argument check of the public API, with the messages users read, and the normalisation of what passes.
Checks of shapes, dtypes, devices and Python scalars run here, on every call (they cost about a microsecond),
before any native code. Checks of values inside tensors (positive bandwidths, times in [0, 1], s <= t) would cost
a device sync on GPUs: for CPU tensors the native backends make them inside the op (so they hold under
torch.compile too), the reference and Triton backends here (in eager mode); on GPUs nothing checks them."""

from __future__ import annotations

import math

import torch

KERNELS = ("laplace", "rbf", "energy")
ESTIMATORS = ("v", "u", "unpaired")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Dtypes the native kernels read scalar operands in (common/problems.h ScalarArg); others are converted.
_NATIVE_SCALAR_DTYPES = (torch.float32, torch.float64)
_SYMBOLIC = (torch.SymInt, torch.SymFloat)  # a Python number traced by torch.compile(dynamic=True)


def choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


def real(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A finite Python number as a float; a symbolic one (torch.compile with dynamic shapes) as it is. The tests
    are comparisons, which torch.compile turns into guards on a symbolic number (math.isfinite has no such form)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, *_SYMBOLIC)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    if not isinstance(value, _SYMBOLIC):
        value = float(value)
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite; got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return value


#: The dtype the kernels accumulate in, by the inputs' (float) dtype: float64 for float64 inputs, float32 for everything
#: narrower. A dict's own lookup, which costs no Python frame on the hot path.
accumulation_dtype = {torch.float64: torch.float64, torch.float32: torch.float32, torch.float16: torch.float32,
                      torch.bfloat16: torch.float32}.__getitem__


def checkable(x: torch.Tensor) -> bool:
    """Whether the values of x can be inspected without a device sync, a graph break or a functorch transform
    (torch.vmap cannot branch on values)."""
    return (x.device.type == "cpu" and not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is None)


def float_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16; got {x.dtype}")
    if x.dim() == 0 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty batch of shape (B, ...); got shape {tuple(x.shape)}")
    return x


def op_rows(group_size: int, *named) -> int:
    """Row operands of a custom op called through torch.ops (the public functions check theirs before; the kernels
    index every operand by the first one's shape): float tensors of one shape, dtype and device, the batch a
    multiple of group_size -> the number of groups. named: (name, tensor) pairs."""
    (first_name, first), *others = named
    float_tensor(first_name, first)
    for name, x in others:
        float_tensor(name, x)
        same_batch(first_name, first, name, x)
    positive_int("group_size", group_size)
    if first.shape[0] % group_size:
        raise ValueError(f"the batch size {first.shape[0]} of {first_name} must be a multiple of "
                         f"group_size={group_size}")
    return first.shape[0] // group_size


def op_backward_state(grad_output, saved, groups: int, size: int, dtype: torch.dtype, like: torch.Tensor) -> None:
    """A backward op's grad_output (0-d, or (G,) for the per-group losses, in like's dtype and on its device) and
    the forward op's saved state (size values of dtype, contiguous, on like's device), checked before the
    kernels read them."""
    if not (isinstance(grad_output, torch.Tensor) and grad_output.dtype == like.dtype
            and grad_output.device == like.device and (grad_output.ndim == 0 or grad_output.shape == (groups,))):
        raise ValueError(f"grad_output must be a {like.dtype} tensor on {like.device} of shape () or ({groups},); "
                         f"got {described(grad_output)}")
    if not (isinstance(saved, torch.Tensor) and saved.dtype == dtype and saved.device == like.device
            and saved.is_contiguous() and saved.numel() == size):
        raise ValueError(f"saved must be the forward op's saved state: {size} contiguous {dtype} values on "
                         f"{like.device}; got {described(saved)}")


def described(x) -> str:
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    return f"{x.dtype} of shape {tuple(x.shape)} on {x.device}"


def same_batch(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype; got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device; got {a.device} and {b.device}")


def matching_dtypes(name_a: str, a, name_b: str, b):
    """(a, b) in one dtype. The autocast policy of every op: two float tensors of different dtypes run in the
    wider one under torch.autocast (as ATen's elementwise ops promote there; the ops accumulate in float32 at
    least, so they never downcast to autocast's dtype), and are refused outside it."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype == b.dtype:
        return a, b
    float_tensor(name_a, a)
    float_tensor(name_b, b)
    if not torch.is_autocast_enabled(a.device.type):
        raise TypeError(f"{name_a} and {name_b} must have the same dtype; got {a.dtype} and {b.dtype} (under "
                        "torch.autocast they run in the wider of the two)")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def scalar_operand(name: str, value, count: int, what: str, device: torch.device, *, positive: bool):
    """A float, or a 0-d or (count,) float tensor on `device` -> (tensor or None, float value): what the native
    kernels read per group or per sample (common/problems.h ScalarArg). Tensor values are not checked here."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float or a float tensor; got {value.dtype}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != count):
            raise ValueError(f"{name} must be a float or a tensor of shape ({count},) ({what}); "
                             f"got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} must be on {device} like the inputs; got {value.device}")
        if value.dtype not in _NATIVE_SCALAR_DTYPES:  # float16 / bfloat16: rare, converted once here
            value = value.float()
        return value, 0.0
    return None, real(name, value, positive=positive)


_NATIVE_SCALAR_SET = frozenset(_NATIVE_SCALAR_DTYPES)


def native_scalar(name: str, tensor: torch.Tensor | None, count: int, like: torch.Tensor) -> None:
    """Inside the ops (they are public through torch.ops too): a scalar operand the kernels will read must be
    float32/float64 with one value or `count` of them, on like's device, or they would read out of bounds."""
    if tensor is not None and not (tensor.dtype in _NATIVE_SCALAR_SET and tensor.device == like.device and (
            tensor.numel() == 1 and tensor.ndim <= 1 or tensor.shape == (count,))):
        raise ValueError(f"{name} must be a float32 or float64 tensor on {like.device} of shape (), (1,) or "
                         f"({count},); got {tensor.dtype} of shape {tuple(tensor.shape)} on {tensor.device}")


def positive_values(name: str, tensor: torch.Tensor | None, what: str) -> None:
    """Eager check on CPU tensors, for the backends that make no check of their own (reference, Triton)."""
    if tensor is not None and checkable(tensor) and not bool((tensor > 0).all()):
        raise ValueError(f"{name} must be > 0 for every {what}")


def smallest_group(estimator: str) -> int:
    """The least group size an estimator takes: the u-statistics need a pair i != j."""
    return 1 if estimator == "v" else 2


_FLOAT_SET = frozenset(FLOAT_DTYPES)
_KERNEL_SET, _ESTIMATOR_SET, _REDUCTION_SET = frozenset(KERNELS), frozenset(ESTIMATORS), frozenset(REDUCTIONS)


# The common case's choices (kernel, estimator, reduction) -> the least group size they take.
_PLAIN_CHOICES = {(k, e, r): smallest_group(e) for k in KERNELS for e in ESTIMATORS for r in REDUCTIONS}


def plain_mmd_device(y_t, y_r, group_size, kernel, bandwidth, weight, estimator, eps, reduction):
    """The inputs' device where mmd_loss's arguments are the training step's common case, valid as they are: two
    plain tensors of one float dtype, shape and device, a known kernel, estimator and reduction, a group size that
    divides the batch, plain float eps and bandwidth, no weight; else None. The fewest and cheapest tests (no
    torch.device or torch.Size built twice): this runs on every call, and spread over the helpers above the checks
    cost 3-5 us a call on a CPU (2026-12-02)."""
    if not (type(y_t) is torch.Tensor and type(y_r) is torch.Tensor and type(group_size) is int
            and type(eps) is float and type(bandwidth) is float and weight is None):
        return None
    try:
        least_group = _PLAIN_CHOICES.get((kernel, estimator, reduction))
    except TypeError:  # an unhashable choice
        return None
    shape, device = y_t.shape, y_t.device
    if (least_group and least_group <= group_size and y_t.dtype in _FLOAT_SET and y_r.dtype is y_t.dtype and shape
            and shape == y_r.shape and not shape[0] % group_size and y_t.numel() and device == y_r.device
            and 0 <= eps < math.inf and 0 < bandwidth < math.inf):
        return device
    return None


def mmd_options(y_t, y_r, group_size, kernel, bandwidth, weight, estimator, eps, reduction):
    """The checked arguments of mmd_loss -> (groups, bandwidth tensor or None, bandwidth value, weight tensor or
    None, weight value, eps). The common case is one test (plain_mmd_device), the rest full_mmd_options."""
    if plain_mmd_device(y_t, y_r, group_size, kernel, bandwidth, weight, estimator, eps, reduction) is not None:
        return y_t.shape[0] // group_size, None, bandwidth, None, 1.0, eps
    return full_mmd_options(y_t, y_r, group_size, kernel, bandwidth, weight, estimator, eps, reduction)


def full_mmd_options(y_t, y_r, group_size, kernel, bandwidth, weight, estimator, eps, reduction):
    """mmd_options for any arguments: the helpers above raise the message of whichever check fails."""
    if not (isinstance(y_t, torch.Tensor) and isinstance(y_r, torch.Tensor) and y_t.dtype in _FLOAT_SET
            and y_r.dtype == y_t.dtype and y_t.shape == y_r.shape and y_t.ndim and y_t.numel()
            and y_t.device == y_r.device):
        float_tensor("y_t", y_t)
        float_tensor("y_r", y_r)
        same_batch("y_t", y_t, "y_r", y_r)
    choice("kernel", kernel, KERNELS)
    choice("estimator", estimator, ESTIMATORS)
    choice("reduction", reduction, REDUCTIONS)
    positive_int("group_size", group_size, minimum=smallest_group(estimator))
    batch = y_t.shape[0]
    if batch % group_size:
        raise ValueError(f"the batch size {batch} of y_t must be a multiple of group_size={group_size}")
    groups = batch // group_size
    eps = real("eps", eps, nonnegative=True)
    bw, bw_value = scalar_operand("bandwidth", bandwidth, groups, "one per group", y_t.device, positive=True)
    if weight is None:
        w, w_value = None, 1.0
    else:
        w, w_value = scalar_operand("weight", weight, groups, "one per group", y_t.device, positive=False)
    return groups, bw, bw_value, w, w_value, eps


def time_range(T, eps_t) -> None:
    T = real("T", T)
    eps_t = real("eps_t", eps_t)
    if not 0 <= eps_t < T <= 1:
        raise ValueError(f"times must satisfy 0 <= eps_t < T <= 1; got eps_t={eps_t}, T={T}")


def imm_output_options(schedule: str, param: str, sigma_data) -> float:
    from .imm import PARAMS
    from .schedules import SCHEDULES

    choice("schedule", schedule, SCHEDULES)
    choice("param", param, PARAMS)
    if param == "euler_fm" and schedule != "fm":
        raise ValueError(f"param='euler_fm' is defined for schedule='fm' only; got schedule={schedule!r}")
    return real("sigma_data", sigma_data, positive=True)


def time_operand(name: str, value, batch: int, device: torch.device):
    """A time: a float in [0, 1], or a 0-d, (1,) or (B,) (or (B, 1, ...)) float tensor -> (tensor or None, value)."""
    if isinstance(value, torch.Tensor):
        if value.numel() not in (1, batch) or (value.numel() == batch and value.dim() > 1
                                               and any(n != 1 for n in value.shape[1:])):
            raise ValueError(f"{name} must be a float or a tensor of shape ({batch},) (one per sample); "
                             f"got shape {tuple(value.shape)}")
        value = value.reshape(-1) if value.dim() != 1 else value
        if value.numel() == 1 and batch != 1:
            value = value.expand(batch)  # a stride-0 view: one time for every sample
        return scalar_operand(name, value, batch, "one per sample", device, positive=False)
    value = real(name, value)
    if not isinstance(value, _SYMBOLIC) and not 0 <= value <= 1:
        raise ValueError(f"{name} must lie in [0, 1]; got {value}")
    return None, value


def time_values(name: str, tensor: torch.Tensor | None) -> None:
    """Eager check on CPU tensors of times in [0, 1] (NaN refused), for the backends without their own."""
    if tensor is not None and checkable(tensor) and not bool(((tensor >= 0) & (tensor <= 1)).all()):
        raise ValueError(f"{name} must lie in [0, 1]")


def ordered_values(name_s: str, s, name_t: str, t) -> None:
    """Eager check of s <= t elementwise where either is a CPU tensor, for the backends without their own."""
    tensors = [x for x in (s, t) if isinstance(x, torch.Tensor)]
    if tensors and all(checkable(x) for x in tensors) and not bool(torch.as_tensor(s <= t).all()):
        raise ValueError(f"{name_s} must be <= {name_t} (the target time comes before the source time)")

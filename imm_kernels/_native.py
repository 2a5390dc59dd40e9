"""The compiled modules (imm_kernels._C for CPUs, imm_kernels._cuda for NVIDIA GPUs) and what crosses into
them: integer codes (csrc/common/platform.h), pointers and strides, scalar operands, and per-device launch
arguments."""

from __future__ import annotations

import functools
import importlib
import os

import torch

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
KERNEL_CODES = {"laplace": 0, "rbf": 1, "energy": 2}
ESTIMATOR_CODES = {"v": 0, "u": 1, "unpaired": 2}
REDUCTION_CODES = {"mean": 0, "sum": 1, "none": 2}
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
    LOADED[backend] = module
    return module, None


class _Extensions(dict):
    """The extensions that load() found working, by backend; indexing loads a missing one (or raises why it
    cannot run), so the custom ops can be called through torch.ops (an exported program, a hand-written graph)
    before any public function has chosen a backend."""

    def __missing__(self, backend: str):
        loaded, reason = load(backend)
        if loaded is None:
            raise RuntimeError(f"backend {backend!r} is unavailable: {reason}")
        return loaded


LOADED = _Extensions()

#: The backend's extension, loaded on first use (LOADED's lookup itself: no Python frame on the hot path).
module = LOADED.__getitem__


def launch_arg(x: torch.Tensor):
    """The per-device tail of every native call on x's device: the thread count on CPUs, the current stream on
    GPUs."""
    if x.is_cpu:
        return torch.get_num_threads()
    return torch.cuda.current_stream(x.device).cuda_stream


def ptr(x: torch.Tensor | None) -> int:
    """The data pointer; 0 (nothing to read or write) for None and for an empty placeholder."""
    return 0 if x is None or not x.numel() else x.data_ptr()


def scalar_arg(tensor: torch.Tensor | None, value: float) -> tuple:
    """(pointer, stride, is_double, value) of a ScalarArg (common/problems.h): a float32/float64 tensor of one
    value (stride 0) or one per index, or else the plain value."""
    if tensor is None:
        return 0, 0, False, value
    return tensor.data_ptr(), tensor.stride()[0] if tensor.numel() > 1 else 0, tensor.dtype == torch.float64, 0.0


def scalar_args(first: torch.Tensor | None, first_value: float, second: torch.Tensor | None,
                second_value: float) -> tuple:
    """scalar_arg of two operands, in one call (the hot path's case, two plain values, decided first)."""
    if first is None and second is None:
        return 0, 0, False, first_value, 0, 0, False, second_value
    return (*scalar_arg(first, first_value), *scalar_arg(second, second_value))


def mix_rows(mix) -> tuple:
    """(f_t, f_r, stride_ft, stride_fr, coefficients) of the loss head's mix (f_t, f_r, (G, 4) float64
    coefficients): f_t and f_r as rows with packed features (rows()) and their row strides."""
    (f_t, stride_ft, _), (f_r, stride_fr, _) = rows(mix[0]), rows(mix[1])
    return f_t, f_r, stride_ft, stride_fr, mix[2]


NO_MIX = (0, 0, 0, 0, 0)  # an OutputMix's arguments for no mix


def mix_arg(mix) -> tuple:
    """(mix_rows(mix) as an OutputMix's arguments (common/problems.h: pointers and strides), the tensors they
    point into). The caller keeps the tensors until the native call has returned: f_t and f_r may be packed
    copies that nothing else holds."""
    f_t, f_r, stride_ft, stride_fr, coefficients = mix_rows(mix)
    return (f_t.data_ptr(), f_r.data_ptr(), stride_ft, stride_fr, coefficients.data_ptr()), (f_t, f_r, coefficients)


def _feature_stride(x: torch.Tensor) -> tuple[int, int] | None:
    """(stride between features, count of features) when x's features (all dims but the first) are one
    strided run (packed: stride 1; expanded: stride 0), else None."""
    shape, strides = x.shape, x.stride()
    step = next((st for n, st in zip(reversed(shape[1:]), reversed(strides[1:])) if n != 1), 1)
    count = 1
    for size, stride in zip(reversed(shape[1:]), reversed(strides[1:])):
        if size != 1 and stride != step * count:
            return None
        count *= size
    return step, count


def rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(tensor, row stride, features) of x seen as (B, D) rows with packed features: x itself when they are
    (any row stride, also 0 or overlapping rows), else a packed copy."""
    if x.is_contiguous():
        features = x.numel() // x.shape[0]
        return x, features, features
    layout = _feature_stride(x)
    if layout is None or (layout[0] != 1 and layout[1] != 1):
        x = x.reshape(x.shape[0], -1).contiguous()
        return x, x.stride(0), x.shape[1]
    return x, x.stride(0), layout[1]


def row_pair(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """(a, b, row stride of a, row stride of b, features): rows() of two tensors of one shape, in one call (the
    hot path's case, both contiguous, decided first)."""
    if a.is_contiguous() and b.is_contiguous():
        features = a.numel() // a.shape[0]
        return a, b, features, features, features
    (a, stride_a, features), (b, stride_b, _) = rows(a), rows(b)
    return a, b, stride_a, stride_b, features


def operand(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, row stride, feature stride, features) of x seen as (B, F): any single feature stride (0 for an
    expanded gradient such as that of a sum), else a packed copy."""
    if x.is_contiguous():
        features = x.numel() // x.shape[0]
        return x, features, 1, features
    layout = _feature_stride(x)
    if layout is None:
        x = x.reshape(x.shape[0], -1).contiguous()
        return x, x.stride(0), 1, x.shape[1]
    return x, x.stride(0), layout[0], layout[1]


def memory_order(x: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x and others permuted (views, no copy) so that x's features are packed in memory order, when x is dense in
    another order with the batch outermost (channels-last images): the kernels then read and write every row as
    one run, and outputs made in that order and permuted back keep x's memory format. Otherwise as they are."""
    if x.is_contiguous() or x.dim() < 3:
        return (x, *others)
    order = sorted(range(1, x.dim()), key=lambda dim: -x.stride(dim))
    permuted = x.permute(0, *order)
    if not permuted.is_contiguous():
        return (x, *others)
    return (permuted, *(y.permute(0, *order) for y in others))


def restore_order(like: torch.Tensor, permuted: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out, made in the order of `permuted` (a memory_order view of like), in like's dimension order."""
    if permuted is like:
        return out
    order = sorted(range(1, like.dim()), key=lambda dim: -like.stride(dim))
    inverse = [0] * like.dim()
    for position, dim in enumerate((0, *order)):
        inverse[dim] = position
    return out.permute(*inverse)


def batch_first(x: torch.Tensor, dim: int | None, n: int) -> torch.Tensor:
    """A vmapped operand with its n problems along dimension 0: moved there from `dim`, or expanded when unbatched."""
    return x.movedim(dim, 0) if dim is not None else x.expand(n, *x.shape)


def stacked(x: torch.Tensor, dim: int | None, n: int) -> torch.Tensor:
    """A vmapped operand as one batch: (n, B, ...) (batch_first), then (n B, ...)."""
    x = batch_first(x, dim, n)
    return x.reshape(n * x.shape[1], *x.shape[2:])


def stacked_per_row(x: torch.Tensor | None, dim: int | None, n: int, count: int) -> torch.Tensor | None:
    """A vmapped operand of one value per row, group or output ((), (1,) or (count,) per problem; batched along
    dim) as one value per row of the n problems stacked, (n count,); an unbatched single value as it is."""
    if x is None or (dim is None and x.numel() == 1):
        return x
    return batch_first(x, dim, n).reshape(n, -1).expand(n, count).reshape(n * count)


def unstacked(x: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of stacked for an output: (n B, ...) -> (n, B, ...); an empty placeholder as it is."""
    return x.view(n, -1, *x.shape[1:]) if x.numel() else x


_COUNTERS: dict = {}


def reduction_counter(device: torch.device) -> torch.Tensor:
    """The arrival counter of a GPU reduction (the last block or program to arrive adds up the loss and resets
    it): zero between launches, one per device and stream (launches on one stream never overlap)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _COUNTERS[key]


# Tests set IMM_KERNELS_POISON=1 so that every output a kernel fails to write shows up as NaN.
POISON = os.environ.get("IMM_KERNELS_POISON") == "1"


def op_outputs(like: torch.Tensor, first: torch.Tensor | None, second: torch.Tensor | None) -> tuple:
    """A custom op's two outputs: the schemas have no optional outputs, so a missing one is an empty tensor (of
    like's dtype and device) there."""
    return tuple(out if out is not None else like.new_empty(0) for out in (first, second))


def poison(*outputs) -> None:
    """Under POISON, NaN in every element of the outputs (None and fake tensors, which have no values, skipped)."""
    for out in outputs:
        if out is not None and not isinstance(out, torch._subclasses.FakeTensor):
            out.fill_(float("nan"))


def output_pair(like: torch.Tensor, first: bool, second: bool) -> tuple:
    """Two uninitialized outputs, contiguous in like's shape and dtype on its device, None where not wanted
    (NaN-filled under POISON): the gradients of a backward, the destinations of the interpolant ops. empty_like
    costs about half of new_empty on a CPU (0.7 against 1.2 us, 2026-12-02), and 0.17 us less again without a
    memory format where like is contiguous already."""
    if like.is_contiguous():
        pair = (torch.empty_like(like) if first else None, torch.empty_like(like) if second else None)
    else:
        layout = torch.contiguous_format
        pair = (torch.empty_like(like, memory_format=layout) if first else None,
                torch.empty_like(like, memory_format=layout) if second else None)
    if POISON:
        poison(*pair)
    return pair

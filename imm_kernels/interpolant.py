"""The per-sample linear ops of IMM: interpolate, interpolate_pair, ddim and imm_output (docs/math.md sections
1-3).

Each is out_o = a_o(times) * in0 + b_o(times) * in1 per sample, with the schedule coefficients computed inside
the kernel from the times (a float, or per-sample float32/float64 tensors), so one op, imm_kernels::combine,
serves them all: forward (in0, in1) -> outputs, and its transpose, the backward (grad outputs -> grad inputs).
Being linear, the transpose of the transpose is the forward again, which gives gradients of gradients. Times
are constants (no gradient flows to them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch, _native, _validate, reference
from .schedules import SCHEDULES


def combine_outputs(src0: Tensor, write0: bool, write1: bool):
    """The destinations, contiguous in src0's shape; None for an unwanted one."""

    return (_native.new_output(src0, src0.shape) if write0 else None,
            _native.new_output(src0, src0.shape) if write1 else None)


@torch.library.custom_op("imm_kernels::combine", mutates_args=())
def combine(src0: Tensor, src1: Tensor | None, time0: Tensor | None, time0_value: float, time1: Tensor | None,
            time1_value: float, kind: str, outputs: int, transpose: bool, write0: bool, write1: bool, schedule: str,
            param: str, sigma_data: float, backend: str) -> tuple[Tensor, Tensor]:
    """dst_o = sum_i C[o][i] src_i per sample (C transposed when `transpose`) for same-shaped (B, ...) sources;
    the coefficients of `kind` ("interpolate" or "imm_output", with `outputs` forward outputs) come from the
    times: a (B,) or 0-d float32/float64 tensor, or None for the plain value beside it. Returns (dst0, dst1), an
    unwritten one as an empty tensor."""
    return _op_outputs(src0, *_dispatch.implementation("combine", backend)(
        src0, src1, time0, time0_value, time1, time1_value, kind, outputs, transpose, write0, write1, schedule, param,
        sigma_data, backend))


@combine.register_fake
def _(src0, src1, time0, time0_value, time1, time1_value, kind, outputs, transpose, write0, write1, schedule, param,
      sigma_data, backend):
    return _op_outputs(src0, *combine_outputs(src0, write0, write1))


def _op_outputs(like: Tensor, dst0: Tensor | None, dst1: Tensor | None) -> tuple[Tensor, Tensor]:
    """The custom op's schema has no optional outputs: an unwritten one is an empty tensor there."""
    return tuple(dst if dst is not None else like.new_empty(0) for dst in (dst0, dst1))


_dispatch.register_custom_op("combine", torch.ops.imm_kernels.combine)


@_dispatch.register("combine", "cpu")
def _native_combine(src0, src1, time0, time0_value, time1, time1_value, kind, outputs, transpose, write0, write1,
                    schedule, param, sigma_data, backend):
    _validate.native_scalar("time0", time0, src0.shape[0], src0)
    _validate.native_scalar("time1", time1, src0.shape[0], src0)
    dst0, dst1 = combine_outputs(src0, write0, write1)
    s0, row0, step0, features = _native.operand(src0)
    s1, row1, step1, _ = _native.operand(src1) if src1 is not None else (None, 0, 0, 0)
    _native.LOADED[backend].combine(
        src0.shape[0], features, _native.DTYPE_CODES[src0.dtype], _native.COMBINE_KIND_CODES[kind],
        _native.SCHEDULE_CODES[schedule], _native.PARAM_CODES[param], sigma_data,
        *_native.scalar_arg(time0, time0_value), *_native.scalar_arg(time1, time1_value), outputs, transpose,
        src0.is_cpu and not transpose, s0.data_ptr(), row0, step0, _native.ptr(s1), row1, step1, _native.ptr(dst0),
        _native.ptr(dst1), _native.launch_arg(src0))
    return dst0, dst1


@_dispatch.register("combine", "cuda")
def _cuda_combine(*arguments):
    """The cuda backend: the GPU-verified kernel, or with IMM_CUDA_KERNELS=next that of the current contract."""
    if _dispatch.variant("IMM_CUDA_KERNELS") == "next":
        return _native_combine(*arguments)
    return _verified_cuda_combine(*arguments)


def _verified_cuda_combine(src0, src1, time0, time0_value, time1, time1_value, kind, outputs, transpose, write0,
                           write1, schedule, param, sigma_data, backend):
    """The GPU-verified kernel (csrc/cuda/verified.h): packed sources and times in the accumulation dtype."""
    _validate.native_scalar("time0", time0, src0.shape[0], src0)
    _validate.native_scalar("time1", time1, src0.shape[0], src0)
    dst0, dst1 = combine_outputs(src0, write0, write1)
    rows, acc, device = src0.shape[0], _validate.accumulation_dtype(src0.dtype), src0.device

    def times(tensor, value):
        if tensor is None:
            return torch.full((1,), value, dtype=acc, device=device).expand(rows)
        return tensor.to(acc).expand(rows)

    def packed(x):
        return None if x is None else x.reshape(rows, -1).contiguous()

    t0, t1 = times(time0, time0_value), times(time1, time1_value)
    s0, s1 = packed(src0), packed(src1)
    _native.LOADED["cuda"].verified_combine(
        rows, s0.shape[1], _native.DTYPE_CODES[src0.dtype], _native.COMBINE_KIND_CODES[kind],
        _native.SCHEDULE_CODES[schedule], _native.PARAM_CODES[param], sigma_data, t0.data_ptr(), t0.stride(0),
        t1.data_ptr(), t1.stride(0), outputs, s0.data_ptr(), _native.ptr(s1), _native.ptr(dst0), _native.ptr(dst1),
        transpose, _native.launch_arg(src0))
    return dst0, dst1


class _Combine(torch.autograd.Function):
    """Autograd of imm_kernels::combine. spec: the op's arguments after the times' tensors, without the write
    flags: (time0_value, time1_value, kind, outputs, transpose, schedule, param, sigma_data, backend), one
    argument because Function.apply costs per argument. The backward is the same op in the other direction,
    through this Function again when a graph of the gradient is asked for."""

    @staticmethod
    def forward(ctx, src0, src1, time0, time1, spec, write0, write1):
        time0_value, time1_value, kind, outputs, transpose, schedule, param, sigma_data, backend = spec
        ctx.set_materialize_grads(False)  # an output nobody used (x_r of interpolate_pair under no_grad) costs nothing
        ctx.save_for_backward(time0, time1)
        ctx.spec = spec
        dst0, dst1 = _dispatch.call("combine", backend)(src0, src1, time0, time0_value, time1, time1_value, kind,
                                                        outputs, transpose, write0, write1, schedule, param,
                                                        sigma_data, backend)
        # An unwritten destination (the custom op's empty placeholder) is no output: no gradient comes back for it.
        return dst0 if write0 else None, dst1 if write1 else None

    @staticmethod
    def backward(ctx, grad0, grad1):
        time0, time1 = ctx.saved_tensors
        time0_value, time1_value, kind, outputs, transpose, schedule, param, sigma_data, backend = ctx.spec
        need0, need1 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad0 is None and grad1 is None:
            return None, None, None, None, None, None, None
        if grad0 is None:  # only the second destination was used
            grad0 = torch.zeros_like(grad1)
        reverse = (time0_value, time1_value, kind, outputs, not transpose, schedule, param, sigma_data, backend)
        if torch.is_grad_enabled():  # create_graph=True
            in0, in1 = _Combine.apply(grad0, grad1, time0, time1, reverse, need0, need1)
        else:
            in0, in1 = _dispatch.call("combine", backend)(grad0, grad1, time0, time0_value, time1, time1_value, kind,
                                                          outputs, not transpose, need0, need1, schedule, param,
                                                          sigma_data, backend)
        return in0 if need0 else None, in1 if need1 else None, None, None, None, None, None


def _backend(name0: str, in0, name1: str, in1, backend: str) -> str:
    """Checks the two same-shaped inputs; the concrete backend for them."""
    _validate.float_tensor(name0, in0)
    _validate.float_tensor(name1, in1)
    _validate.same_batch(name0, in0, name1, in1)
    return _dispatch.resolve("combine", backend, in0.device)


def _run(in0, in1, times, kind: str, outputs: int, schedule: str, param: str, sigma_data: float, backend: str):
    """Checks the two times ((name, value) each) and runs `kind` on a native or Triton backend."""
    batch, device = in0.shape[0], in0.device
    (time0, value0), (time1, value1) = (_validate.time_operand(name, value, batch, device) for name, value in times)
    if kind == "imm_output" and time0 is None and time1 is None and value0 > value1:
        raise ValueError(f"{times[0][0]} must be <= {times[1][0]} (the target time comes before the source time); "
                         f"got {value0} > {value1}")
    if torch.is_grad_enabled() and (in0.requires_grad or in1.requires_grad):
        spec = (value0, value1, kind, outputs, False, schedule, param, sigma_data, backend)
        out0, out1 = _Combine.apply(in0, in1, time0, time1, spec, True, outputs == 2)
    else:
        out0, out1 = _dispatch.call("combine", backend)(in0, in1, time0, value0, time1, value1, kind, outputs, False,
                                                        True, outputs == 2, schedule, param, sigma_data, backend)
    return (out0, out1) if outputs == 2 else out0


def interpolate(x: Tensor, noise: Tensor, t, *, schedule: str = "fm", backend: str = "auto") -> Tensor:
    """x_t = alpha_t x + sigma_t noise; t a float or (B,) per-sample times in [0, 1]."""
    _validate.choice("schedule", schedule, SCHEDULES)
    backend = _backend("x", x, "noise", noise, backend)
    if backend == "reference":
        return reference.interpolate(x, noise, t, schedule=schedule)
    return _run(x, noise, (("t", t), ("t", t)), "interpolate", 1, schedule, "simple_edm", 1.0, backend)


def interpolate_pair(x: Tensor, noise: Tensor, t, r, *, schedule: str = "fm", backend: str = "auto"):
    """(x_t, x_r) from the same x and noise in one pass over them."""
    _validate.choice("schedule", schedule, SCHEDULES)
    backend = _backend("x", x, "noise", noise, backend)
    if backend == "reference":
        return reference.interpolate_pair(x, noise, t, r, schedule=schedule)
    return _run(x, noise, (("t", t), ("r", r)), "interpolate", 2, schedule, "simple_edm", 1.0, backend)


def imm_output(x_t: Tensor, g: Tensor, s, t, *, schedule: str = "fm", param: str = "simple_edm",
               sigma_data: float = 0.5, backend: str = "auto") -> Tensor:
    """f_{s,t}(x_t) = c_skip(s, t) x_t + c_out(s, t) g for the network output g; s <= t.
    param: "simple_edm", "euler_fm" (fm only) or "identity" (DDIM(x_t, g, s, t))."""
    sigma_data = _validate.imm_output_options(schedule, param, sigma_data)
    backend = _backend("x_t", x_t, "g", g, backend)
    if backend == "reference":
        return reference.imm_output(x_t, g, s, t, schedule=schedule, param=param, sigma_data=sigma_data)
    return _run(x_t, g, (("s", s), ("t", t)), "imm_output", 1, schedule, param, sigma_data, backend)


def ddim(x_t: Tensor, x_hat: Tensor, s, t, *, schedule: str = "fm", backend: str = "auto") -> Tensor:
    """DDIM(x_t, x_hat, s, t): moves x_t at time t to time s <= t given the clean estimate x_hat."""
    _validate.choice("schedule", schedule, SCHEDULES)
    backend = _backend("x_t", x_t, "x_hat", x_hat, backend)
    if backend == "reference":
        return reference.ddim(x_t, x_hat, s, t, schedule=schedule)
    return _run(x_t, x_hat, (("s", s), ("t", t)), "imm_output", 1, schedule, "identity", 1.0, backend)

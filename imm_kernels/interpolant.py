"""The per-sample linear ops of IMM: interpolate, interpolate_pair, ddim and imm_output.

Each is out_o = a_o(times) * in0 + b_o(times) * in1 per sample, with the schedule coefficients computed
inside the kernel from (B,) times, so one op, imm_kernels::combine, serves them all: forward
(in0, in1) -> outputs, and backward as its transpose (grad outputs -> grad inputs). Times are constants
(no gradient flows to them).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _dispatch, _native, _validate, reference
from .schedules import SCHEDULES


def combine_outputs(src0: Tensor, write0: bool, write1: bool):
    def out(wanted: bool) -> Tensor:
        return _native.new_output(src0.shape if wanted else (0,), src0.dtype, src0.device)

    return out(write0), out(write1)


@torch.library.custom_op("imm_kernels::combine", mutates_args=())
def combine(src0: Tensor, src1: Tensor | None, time0: Tensor, time1: Tensor, kind: str, outputs: int,
            transpose: bool, write0: bool, write1: bool, schedule: str, param: str, sigma_data: float,
            backend: str) -> tuple[Tensor, Tensor]:
    """dst_o = sum_i C[o][i] src_i per row (C transposed when `transpose`) for the (B, F) sources; the
    coefficients of `kind` ("interpolate" or "imm_output", with `outputs` forward outputs) come from the (B,)
    times. Returns (dst0, dst1), an unwritten one as an empty tensor."""
    return _dispatch.implementation("combine", backend)(src0, src1, time0, time1, kind, outputs, transpose, write0,
                                                        write1, schedule, param, sigma_data)


@combine.register_fake
def _(src0, src1, time0, time1, kind, outputs, transpose, write0, write1, schedule, param, sigma_data, backend):
    return combine_outputs(src0, write0, write1)


def _native_combine(backend: str, src0, src1, time0, time1, kind, outputs, transpose, write0, write1, schedule, param,
                    sigma_data):
    module, _ = _native.load(backend)
    dst0, dst1 = combine_outputs(src0, write0, write1)
    module.combine(
        rows=src0.shape[0], features=src0.shape[1], dtype=_native.DTYPE_CODES[src0.dtype],
        kind=_native.COMBINE_KIND_CODES[kind], schedule=_native.SCHEDULE_CODES[schedule],
        param=_native.PARAM_CODES[param], sigma_data=sigma_data, time0=time0.data_ptr(), time0_stride=time0.stride(0),
        time1=time1.data_ptr(), time1_stride=time1.stride(0), outputs=outputs, src0=src0.data_ptr(),
        src1=_native.ptr(src1), dst0=_native.ptr(dst0), dst1=_native.ptr(dst1), transpose=transpose,
        **_native.launch_options(src0.device))
    return dst0, dst1


for _backend in ("cpu", "cuda"):
    _dispatch.register("combine", _backend)(functools.partial(_native_combine, _backend))


class CombineFunction(torch.autograd.Function):
    """Autograd of imm_kernels::combine for (B, F) inputs and validated (B,) times."""

    @staticmethod
    def forward(ctx, in0, in1, time0, time1, kind, outputs, schedule, param, sigma_data, backend):
        out0, out1 = torch.ops.imm_kernels.combine(in0, in1, time0, time1, kind, outputs, False, True, outputs == 2,
                                                   schedule, param, sigma_data, backend)
        ctx.save_for_backward(time0, time1)
        ctx.config = (kind, outputs, schedule, param, sigma_data, backend)
        return (out0, out1) if outputs == 2 else out0

    @staticmethod
    def backward(ctx, *grad_outputs):
        time0, time1 = ctx.saved_tensors
        kind, outputs, schedule, param, sigma_data, backend = ctx.config
        need0, need1 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        go1 = grad_outputs[1].contiguous() if outputs == 2 else None
        g0, g1 = torch.ops.imm_kernels.combine(grad_outputs[0].contiguous(), go1, time0, time1, kind, outputs, True,
                                               need0, need1, schedule, param, sigma_data, backend)
        return (g0 if need0 else None, g1 if need1 else None) + (None,) * 8


def _apply(name0, in0, name1, in1, times, kind, outputs, schedule, param, sigma_data, backend):
    """Validates two same-shaped inputs and their times, then runs `kind` on the chosen backend."""
    _validate.float_tensor(name0, in0)
    _validate.float_tensor(name1, in1)
    _validate.same_batch(name0, in0, name1, in1)
    backend = _dispatch.resolve("combine", backend, in0.device)
    batch = in0.shape[0]
    time0, time1 = (_validate.times(name, value, batch, in0) for name, value in times)
    if kind == "imm_output":
        _validate.ordered(times[0][0], time0, times[1][0], time1)
    if backend == "reference":
        return None, backend
    # The combine kernels walk (B, F) row-major: rows must be packed, not just have contiguous features.
    out = CombineFunction.apply(_validate.rows(in0).contiguous(), _validate.rows(in1).contiguous(), time0, time1,
                                kind, outputs, schedule, param, sigma_data, backend)
    if outputs == 2:
        return tuple(o.view(in0.shape) for o in out), backend
    return out.view(in0.shape), backend


def interpolate(x: Tensor, noise: Tensor, t, *, schedule: str = "fm", backend: str = "auto") -> Tensor:
    """x_t = alpha_t x + sigma_t noise; t a float or (B,) per-sample times in [0, 1]."""
    _validate.choice("schedule", schedule, SCHEDULES)
    out, backend = _apply("x", x, "noise", noise, (("t", t), ("t", t)), "interpolate", 1, schedule, "simple_edm",
                          1.0, backend)
    return reference.interpolate(x, noise, t, schedule=schedule) if backend == "reference" else out


def interpolate_pair(x: Tensor, noise: Tensor, t, r, *, schedule: str = "fm", backend: str = "auto"):
    """(x_t, x_r) from the same x and noise in one pass over them."""
    _validate.choice("schedule", schedule, SCHEDULES)
    out, backend = _apply("x", x, "noise", noise, (("t", t), ("r", r)), "interpolate", 2, schedule, "simple_edm",
                          1.0, backend)
    return reference.interpolate_pair(x, noise, t, r, schedule=schedule) if backend == "reference" else out


def imm_output(x_t: Tensor, g: Tensor, s, t, *, schedule: str = "fm", param: str = "simple_edm",
               sigma_data: float = 0.5, backend: str = "auto") -> Tensor:
    """f_{s,t}(x_t) = c_skip(s, t) x_t + c_out(s, t) g for the network output g; s <= t.
    param: "simple_edm", "euler_fm" (fm only) or "identity" (DDIM(x_t, g, s, t))."""
    _validate.imm_output_options(schedule, param, sigma_data)
    out, backend = _apply("x_t", x_t, "g", g, (("s", s), ("t", t)), "imm_output", 1, schedule, param,
                          float(sigma_data), backend)
    if backend == "reference":
        return reference.imm_output(x_t, g, s, t, schedule=schedule, param=param, sigma_data=sigma_data)
    return out


def ddim(x_t: Tensor, x_hat: Tensor, s, t, *, schedule: str = "fm", backend: str = "auto") -> Tensor:
    """DDIM(x_t, x_hat, s, t): moves x_t at time t to time s <= t given the clean estimate x_hat."""
    _validate.choice("schedule", schedule, SCHEDULES)
    out, backend = _apply("x_t", x_t, "x_hat", x_hat, (("s", s), ("t", t)), "imm_output", 1, schedule, "identity",
                          1.0, backend)
    return reference.ddim(x_t, x_hat, s, t, schedule=schedule) if backend == "reference" else out

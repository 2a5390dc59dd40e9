"""imm_kernels::combine in Triton: the per-sample linear maps of interpolate / interpolate_pair / ddim /
imm_output, forward (dst_o = a_o src0 + b_o src1) and backward (the transpose), with the coefficients
(csrc/common/schedule_math.h) computed in the kernel from the row's times (a per-sample tensor or one value).
One launch per call on a (rows, feature blocks) grid; sources may be strided views, destinations are packed.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _dispatch, _native, _validate
from .mmd import scalar_operand

_HALF_PI = tl.constexpr(math.pi / 2)
# Features per program and warps, by design (_dispatch.VARIANTS["IMM_TRITON_COMBINE"]): 16 features a thread,
# loaded as 16-byte vectors; "wide" gives each program twice the bytes in flight.
_BLOCK_F = {"row": (2048, 4), "wide": (4096, 8)}


@triton.jit
def _alpha_sigma(t, SCHEDULE: tl.constexpr):
    if SCHEDULE == "fm":
        alpha = 1.0 - t
        sigma = t
    else:
        alpha = tl.cos(t * _HALF_PI)
        sigma = tl.sin(t * _HALF_PI)
    return alpha, sigma


@triton.jit
def _cross_term(s, t, SCHEDULE: tl.constexpr):
    """alpha_s sigma_t - alpha_t sigma_s, formed analytically so that s -> t does not cancel."""
    if SCHEDULE == "fm":
        cross = t - s
    else:
        cross = tl.sin((t - s) * _HALF_PI)
    return cross


@triton.jit
def _dot_term(s, t, SCHEDULE: tl.constexpr):
    """alpha_t alpha_s + sigma_t sigma_s."""
    if SCHEDULE == "fm":
        dot = (1.0 - t) * (1.0 - s) + t * s
    else:
        dot = tl.cos((t - s) * _HALF_PI)
    return dot


@triton.jit
def _imm_output_coefficients(s, t, sigma_data, SCHEDULE: tl.constexpr, PARAM: tl.constexpr):
    """(c_skip, c_out) of f_{s,t}(x_t) = c_skip x_t + c_out g."""
    alpha_t, sigma_t = _alpha_sigma(t, SCHEDULE)
    if PARAM == "euler_fm":
        c_skip = tl.full((), 1.0, t.dtype)
        c_out = -(t - s) * sigma_data
    elif PARAM == "identity":  # DDIM(x_t, g, s, t); from t = 0 only s = t = 0 is allowed: the identity
        _, sigma_s = _alpha_sigma(s, SCHEDULE)
        at_zero = sigma_t == 0.0
        safe_sigma_t = tl.where(at_zero, 1.0, sigma_t)
        c_skip = tl.where(at_zero, 1.0, sigma_s / safe_sigma_t)
        c_out = tl.where(at_zero, 0.0, _cross_term(s, t, SCHEDULE) / safe_sigma_t)
    else:  # simple_edm
        norm2 = alpha_t * alpha_t + sigma_t * sigma_t
        c_skip = _dot_term(s, t, SCHEDULE) / norm2
        c_out = -sigma_data * _cross_term(s, t, SCHEDULE) / tl.sqrt(norm2)
    return c_skip, c_out


@triton.jit
def _output_coefficients(time0, time1, sigma_data, OUTPUT: tl.constexpr, KIND: tl.constexpr,
                         SCHEDULE: tl.constexpr, PARAM: tl.constexpr):
    """(a, b) of forward output OUTPUT: interpolate gives (alpha, sigma) at time OUTPUT; imm_output has one
    output, at (s, t) = (time0, time1)."""
    if KIND == "interpolate":
        if OUTPUT == 0:
            a, b = _alpha_sigma(time0, SCHEDULE)
        else:
            a, b = _alpha_sigma(time1, SCHEDULE)
    else:
        a, b = _imm_output_coefficients(time0, time1, sigma_data, SCHEDULE, PARAM)
    return a, b


@triton.jit
def _combine_sources(c0, x0, c1, x1, HAS_SRC1: tl.constexpr):
    """c0 x0 + c1 x1, or c0 x0 when there is no second source (backward with one output gradient)."""
    if HAS_SRC1:
        out = c0 * x0 + c1 * x1
    else:
        out = c0 * x0
    return out


@triton.jit
def _time(pointer, stride, value, row, TENSOR: tl.constexpr, ACC: tl.constexpr):
    """The row's time: pointer[row * stride] or the plain value, in the accumulation dtype."""
    if TENSOR:
        time = tl.load(pointer + row * stride).to(ACC)
    else:
        time = tl.full((), value, ACC)
    return time


@triton.jit
def _combine_kernel(src0_ptr, src1_ptr, dst0_ptr, dst1_ptr, src0_row_stride, src0_feature_stride, src1_row_stride,
                    src1_feature_stride, time0_ptr, time0_stride, time0_value: tl.float64, time1_ptr, time1_stride,
                    time1_value: tl.float64, sigma_data: tl.float64, features, KIND: tl.constexpr,
                    SCHEDULE: tl.constexpr, PARAM: tl.constexpr, OUTPUTS: tl.constexpr, TRANSPOSE: tl.constexpr,
                    HAS_SRC1: tl.constexpr, WRITE0: tl.constexpr, WRITE1: tl.constexpr, TIME0_TENSOR: tl.constexpr,
                    TIME1_TENSOR: tl.constexpr, BLOCK_F: tl.constexpr, ACC: tl.constexpr):
    """One block of features of one row (grid: rows x feature blocks)."""
    row = tl.program_id(0)
    feature = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = feature < features
    offset = row.to(tl.int64) * features + feature
    time0 = _time(time0_ptr, time0_stride, time0_value, row, TIME0_TENSOR, ACC)
    time1 = _time(time1_ptr, time1_stride, time1_value, row, TIME1_TENSOR, ACC)
    sigma_data = tl.full((), sigma_data, ACC)
    a0, b0 = _output_coefficients(time0, time1, sigma_data, 0, KIND, SCHEDULE, PARAM)  # mix[0] = (a0, b0)
    if OUTPUTS == 2:
        a1, b1 = _output_coefficients(time0, time1, sigma_data, 1, KIND, SCHEDULE, PARAM)
    else:  # mix[1] = 0, as in the native kernels
        a1 = tl.zeros((), ACC)
        b1 = a1
    # c<d><s>: the weight of source s in destination d.
    if TRANSPOSE:  # dst_i = sum_o mix[o][i] src_o
        c00, c01, c10, c11 = a0, a1, b0, b1
    else:  # dst_o = sum_i mix[o][i] src_i
        c00, c01, c10, c11 = a0, b0, a1, b1
    # Converted right after the load: narrow-float arithmetic is wrong in the Triton interpreter.
    x0 = tl.load(src0_ptr + row.to(tl.int64) * src0_row_stride + feature * src0_feature_stride, mask=mask).to(ACC)
    if HAS_SRC1:
        x1 = tl.load(src1_ptr + row.to(tl.int64) * src1_row_stride + feature * src1_feature_stride,
                     mask=mask).to(ACC)
    else:
        x1 = x0  # not read: _combine_sources drops the second source
    if WRITE0:
        tl.store(dst0_ptr + offset, _combine_sources(c00, x0, c01, x1, HAS_SRC1).to(dst0_ptr.dtype.element_ty),
                 mask=mask)
    if WRITE1:
        tl.store(dst1_ptr + offset, _combine_sources(c10, x0, c11, x1, HAS_SRC1).to(dst1_ptr.dtype.element_ty),
                 mask=mask)


def block_features(features: int, design: str = "row") -> tuple[int, int]:
    """(features per program, warps): a whole row up to the design's block."""
    block, warps = _BLOCK_F[design]
    block = min(triton.next_power_of_2(features), block)
    return block, max(1, min(warps, block // 512))


@_dispatch.register("combine", "triton")
def combine(src0, src1, time0, time0_value, time1, time1_value, kind, outputs, transpose, write0, write1, schedule,
            param, sigma_data, backend):
    _validate.native_scalar("time0", time0, src0.shape[0], src0)
    _validate.native_scalar("time1", time1, src0.shape[0], src0)
    if src0.device.type == "cpu" and not transpose:  # under the interpreter: the native CPU backend's checks
        names = ("t", "r") if kind == "interpolate" else ("s", "t")
        _validate.time_values(names[0], time0)
        _validate.time_values(names[1], time1)
        if kind == "imm_output":
            _validate.ordered_values("s", time0 if time0 is not None else time0_value,
                                     "t", time1 if time1 is not None else time1_value)
    dst0, dst1 = _native.output_pair(src0, write0, write1)
    s0, row0, step0, features = _native.operand(src0)
    s1, row1, step1, _ = _native.operand(src1) if src1 is not None else (s0, 0, 0, 0)
    block_f, warps = block_features(features, _dispatch.variant("IMM_TRITON_COMBINE"))
    acc = tl.float64 if src0.dtype == torch.float64 else tl.float32
    with torch.cuda.device_of(src0):  # Triton launches on the current device
        _combine_kernel[(src0.shape[0], triton.cdiv(features, block_f))](
            s0, s1, dst0 if dst0 is not None else s0, dst1 if dst1 is not None else s0, row0, step0, row1, step1,
            *scalar_operand(time0, time0_value, s0), *scalar_operand(time1, time1_value, s0), sigma_data, features,
            KIND=kind,
            SCHEDULE=schedule, PARAM=param, OUTPUTS=outputs, TRANSPOSE=transpose, HAS_SRC1=src1 is not None,
            WRITE0=write0, WRITE1=write1, TIME0_TENSOR=time0 is not None, TIME1_TENSOR=time1 is not None,
            BLOCK_F=block_f, ACC=acc, num_warps=warps)
    return dst0, dst1

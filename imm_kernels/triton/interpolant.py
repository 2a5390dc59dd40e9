"""imm_kernels::combine in Triton: the per-sample linear maps of interpolate / interpolate_pair / ddim /
imm_output, forward (dst_o = a_o src0 + b_o src1) and backward (the transpose), with the coefficients
(csrc/common/schedule_math.h) computed in the kernel from the row's times. One launch per call on a
(rows, feature blocks) grid.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _dispatch
from ..interpolant import combine_outputs

_HALF_PI = tl.constexpr(math.pi / 2)
_MAX_BLOCK_F = 2048  # features per program: 16 a thread at 4 warps, loaded as 16-byte vectors


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
def _combine_kernel(src0_ptr, src1_ptr, dst0_ptr, dst1_ptr, time0_ptr, time0_stride, time1_ptr, time1_stride,
                    sigma_data: tl.float64, features, KIND: tl.constexpr, SCHEDULE: tl.constexpr,
                    PARAM: tl.constexpr, OUTPUTS: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_SRC1: tl.constexpr,
                    WRITE0: tl.constexpr, WRITE1: tl.constexpr, BLOCK_F: tl.constexpr):
    """One block of features of one row (grid: rows x feature blocks)."""
    row = tl.program_id(0)
    feature = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = feature < features
    offset = row.to(tl.int64) * features + feature
    # The times are stored in the accumulation dtype (float64 for float64 data, else float32).
    time0 = tl.load(time0_ptr + row * time0_stride)
    time1 = tl.load(time1_ptr + row * time1_stride)
    acc = time0.dtype
    sigma_data = tl.full((), sigma_data, acc)
    a0, b0 = _output_coefficients(time0, time1, sigma_data, 0, KIND, SCHEDULE, PARAM)  # mix[0] = (a0, b0)
    if OUTPUTS == 2:
        a1, b1 = _output_coefficients(time0, time1, sigma_data, 1, KIND, SCHEDULE, PARAM)
    else:  # mix[1] = 0, as in the native kernels
        a1 = tl.zeros((), acc)
        b1 = a1
    # c<d><s>: the weight of source s in destination d.
    if TRANSPOSE:  # dst_i = sum_o mix[o][i] src_o
        c00, c01, c10, c11 = a0, a1, b0, b1
    else:  # dst_o = sum_i mix[o][i] src_i
        c00, c01, c10, c11 = a0, b0, a1, b1
    # Converted right after the load: narrow-float arithmetic is wrong in the Triton interpreter.
    x0 = tl.load(src0_ptr + offset, mask=mask).to(acc)
    if HAS_SRC1:
        x1 = tl.load(src1_ptr + offset, mask=mask).to(acc)
    else:
        x1 = x0  # not read: _combine_sources drops the second source
    if WRITE0:
        tl.store(dst0_ptr + offset, _combine_sources(c00, x0, c01, x1, HAS_SRC1).to(dst0_ptr.dtype.element_ty),
                 mask=mask)
    if WRITE1:
        tl.store(dst1_ptr + offset, _combine_sources(c10, x0, c11, x1, HAS_SRC1).to(dst1_ptr.dtype.element_ty),
                 mask=mask)


def block_features(features: int) -> int:
    """Features per program: a whole row up to _MAX_BLOCK_F."""
    return min(triton.next_power_of_2(features), _MAX_BLOCK_F)


@_dispatch.register("combine", "triton")
def combine(src0, src1, time0, time1, kind, outputs, transpose, write0, write1, schedule, param, sigma_data):
    dst0, dst1 = combine_outputs(src0, write0, write1)
    rows, features = src0.shape
    block_f = block_features(features)
    has_src1 = src1 is not None
    with torch.cuda.device_of(src0):  # Triton launches on the current device
        _combine_kernel[(rows, triton.cdiv(features, block_f))](
            src0, src1 if has_src1 else src0, dst0, dst1, time0, time0.stride(0), time1, time1.stride(0),
            sigma_data, features, KIND=kind, SCHEDULE=schedule, PARAM=param, OUTPUTS=outputs, TRANSPOSE=transpose,
            HAS_SRC1=has_src1, WRITE0=write0, WRITE1=write1, BLOCK_F=block_f)
    return dst0, dst1

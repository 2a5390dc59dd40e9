"""Grouped MMD (imm_kernels.mmd_loss) in Triton, with the math of csrc/common/mmd_math.h (docs/math.md section 4).

Forward: pass 1 sums, per ordered pair (i, j) of a group, five quantities over the features by direct differences
(never |x|^2 + |y|^2 - 2xy, which cancels when y_r ~ y_t):
    tt = |t_i - t_j|^2, rr = |r_i - r_j|^2, tr = |t_i - r_j|^2,
    dt = sum (t_j - r_j)((t_i - r_j) + (t_i - t_j)),  dr = -sum (t_j - r_j)((r_i - r_j) + (r_i - t_j)).
A finalize step turns them, in float64, into the group's loss and, when a gradient will be wanted, the per-pair
gradient coefficients (own, cross, gap) of each side; the losses are reduced (mean, sum) by the last program to
finish, in group order (deterministic), through a counter it resets for the next launch.
Backward: grad_X_i = go_g sum_j own_ij (X_i - X_j) + cross_ij (X_i - Y_j) + gap_ij (X_j - Y_j), go_g read from the
output's gradient inside the kernel.

Launches (no host syncs, so a call can be captured in a CUDA graph):
- enough groups to fill the GPU (e.g. G, M, D = 1024, 4, 4096): forward one program per group (pass 1, finalize,
  reduction), backward one program per group: one launch each way;
- few large groups (e.g. 8, 8, 196608): each group's features are split into chunks; forward runs pass 1 per
  (group, chunk) into partial sums, then the finalize per group (chunks summed as one block, not one by one);
  backward one program per (group, chunk).
A group's M rows are padded to a power of two (masked); a tile holds (M, M, BLOCK_D) pair differences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch, _native, _validate
from ..mmd import COEFFICIENT_BLOCKS, forward_outputs

PAIR_SUMS = tl.constexpr(5)  # square (M x M) blocks of pass-1 sums per group: tt, rr, tr, dt, dr
SIDE_BLOCKS = tl.constexpr(COEFFICIENT_BLOCKS // 2)  # own, cross, gap of one side

_TILE_BYTES = 8192  # one (M, M, BLOCK_D) pair tile: ~100-130 registers a thread at 4 warps, no spills (sm_90)
_STREAM_BYTES = 2048  # "stream": five (M, M, BLOCK_D) accumulators of this, 80 registers a thread at 1 warp
_STREAM_WARPS = 1  # "stream" forward: one warp a program, 4-element rows a thread (16-byte loads)
_MAX_BLOCK_D = 1024
_TARGET_PROGRAMS = 512  # enough programs to keep every SM of a large GPU (an H100 has 132) busy
_MIN_CHUNK = 2048  # features of one group per program, at least, when a group's features are split
_CHUNK_BLOCK = tl.constexpr(16)  # chunks' partial sums the split finalize adds at once
_REDUCE_BLOCK = tl.constexpr(1024)  # group losses the last program adds at once


@triton.jit
def _expm1(x):
    """exp(x) - 1 to a few ulp for |x| < 1 (where the callers use it): the rounding error of u = exp(x)
    cancels between u - 1 and log(u) (Kahan). libdevice's expm1 has no Triton-interpreter version."""
    u = tl.exp(x)
    tiny = u == 1.0  # |x| below an ulp of 1, where expm1(x) = x
    return tl.where(tiny, x, (u - 1.0) * x / tl.log(tl.where(tiny, 2.0, u)))


@triton.jit
def _pair_terms(a2, b2, delta, c, eps, KERNEL: tl.constexpr):
    """(phi(a), phi(a) - phi(b), psi(a), psi(a) - psi(b), psi(b)) of mmd_math.h's pair_terms, elementwise in
    float64, for squared distances a2, b2 and delta = b2 - a2."""
    if KERNEL == "rbf":  # phi = exp(-c d^2)
        phi_a = tl.exp(-c * a2)
        phi_b = tl.exp(-c * b2)
        gap = c * delta
        near = (gap < 0.5) & (gap > -0.5)  # where phi(a) - phi(b) would cancel: expm1
        dphi = tl.where(near, -phi_a * _expm1(-tl.where(near, gap, 0.0)), phi_a - phi_b)
        psi_a = -2.0 * c * phi_a
        dpsi = -2.0 * c * dphi
        psi_b = -2.0 * c * phi_b
    else:
        a = tl.sqrt(a2)
        b = tl.sqrt(b2)
        total = a + b
        b_minus_a = tl.where(total > 0.0, delta / tl.where(total > 0.0, total, 1.0), 0.0)
        if KERNEL == "laplace":  # phi = exp(-c max(d, eps)); psi = -c exp(-c d) / d above the floor, else 0
            a_floored = tl.where(a < eps, eps, a)
            b_floored = tl.where(b < eps, eps, b)
            both_live = ~(a <= eps) & ~(b <= eps)
            gap = tl.where(both_live, b_minus_a, b_floored - a_floored)
            c_gap = c * gap
            near = (c_gap < 0.5) & (c_gap > -0.5)
            em = _expm1(-tl.where(near, c_gap, 0.0))
            ea = tl.exp(-c * a_floored)
            eb = tl.exp(-c * b_floored)
            phi_a = ea
            dphi = tl.where(near, -ea * em, ea - eb)
            psi_a = tl.where(a <= eps, 0.0, -c * ea / tl.where(a <= eps, 1.0, a))
            psi_b = tl.where(b <= eps, 0.0, -c * eb / tl.where(b <= eps, 1.0, b))
            # Close distances: psi(a) - psi(b) = psi(a) (1 - e^{-c gap} a / b), expanded so nothing cancels.
            close = both_live & near
            dpsi_close = psi_a * (-em + (gap / tl.where(close, b, 1.0)) * tl.exp(-tl.where(close, c_gap, 0.0)))
            dpsi = tl.where(close, dpsi_close, psi_a - psi_b)
        else:  # energy: phi = -d (no scale: c is unused)
            a_live = ~(a <= 0.0)
            b_live = ~(b <= 0.0)
            phi_a = -a
            dphi = b_minus_a
            psi_a = tl.where(a_live, -1.0 / tl.where(a_live, a, 1.0), 0.0)
            psi_b = tl.where(b_live, -1.0 / tl.where(b_live, b, 1.0), 0.0)
            both_live = a_live & b_live
            dpsi = tl.where(both_live, -b_minus_a / tl.where(both_live, a * b, 1.0), psi_a - psi_b)
    return phi_a, dphi, psi_a, dpsi, psi_b


@triton.jit
def _pair_coefficients(a2, b2, delta, e2, diagonal, self_w, cross_w, grad_w, c, eps, KERNEL: tl.constexpr):
    """Loss contribution and gradient coefficients (own, cross, gap) of each ordered pair of one side
    (mmd_math.h: the near-duplicate form where e_j < a / 2 off the diagonal, else the textbook form)."""
    phi_a, dphi, psi_a, dpsi, psi_b = _pair_terms(a2, b2, delta, c, eps, KERNEL)
    loss = cross_w * dphi + (self_w - cross_w) * phi_a
    near = ~diagonal & (4.0 * e2 < a2)
    far_psi_b = -grad_w * cross_w * psi_b
    own = tl.where(near, grad_w * (cross_w * dpsi + (self_w - cross_w) * psi_a),
                   tl.where(diagonal, 0.0, grad_w * self_w * psi_a))
    return loss, own, tl.where(near, 0.0, far_psi_b), tl.where(near, far_psi_b, 0.0)


@triton.jit
def _group_coefficients(tt, rr, tr, dt, dr, bandwidth, weight, grad_scale, eps, features,
                        GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, KERNEL: tl.constexpr,
                        ESTIMATOR: tl.constexpr):
    """A group's float64 pair sums -> its loss (weight * MMD) and the (own, cross, gap) coefficients of the y_t
    and the y_r side (weight and grad_scale, 1/G for a mean, folded in), zero outside the group's M x M pairs."""
    i = tl.arange(0, GROUP_PAD)[:, None]
    j = tl.arange(0, GROUP_PAD)[None, :]
    in_group = (i < GROUP_SIZE) & (j < GROUP_SIZE)
    diagonal = i == j
    # Divided as float64 tensors: the interpreter would round a quotient of Python numbers to float32.
    one = tl.full((), 1.0, tl.float64)
    cross_w = one / (GROUP_SIZE * GROUP_SIZE)
    if ESTIMATOR == "v":
        self_w = cross_w
    else:  # u and unpaired: self terms without i = j, over M (M - 1)
        self_w = tl.where(diagonal, 0.0, one / (GROUP_SIZE * (GROUP_SIZE - 1)))
    if ESTIMATOR == "unpaired":  # and cross terms without the partners i = j
        cross_w = self_w
    c = bandwidth.to(tl.float64) / features
    if KERNEL == "energy":
        c = one
    weight = weight.to(tl.float64)
    grad_w = 2.0 * weight * grad_scale
    e2 = tl.sum(tl.where(diagonal, tr, 0.0), axis=0)[None, :]  # |t_j - r_j|^2 of the partner j
    loss_t, own_t, cross_t, gap_t = _pair_coefficients(tt, tr, dt, e2, diagonal, self_w, cross_w, grad_w, c, eps,
                                                       KERNEL)
    # y_r side: b2 = |r_i - t_j|^2 = tr[j][i].
    loss_r, own_r, cross_r, gap_r = _pair_coefficients(rr, tl.trans(tr), dr, e2, diagonal, self_w, cross_w, grad_w,
                                                       c, eps, KERNEL)
    loss = weight * tl.sum(tl.sum(tl.where(in_group, loss_t + loss_r, 0.0), axis=1), axis=0)
    return (loss, tl.where(in_group, own_t, 0.0), tl.where(in_group, cross_t, 0.0), tl.where(in_group, gap_t, 0.0),
            tl.where(in_group, own_r, 0.0), tl.where(in_group, cross_r, 0.0), tl.where(in_group, gap_r, 0.0))


@triton.jit
def _tile_indices(group, d0, end, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row indices (int64, GROUP_PAD x 1), feature indices (1 x BLOCK_D) and mask of one tile of a group."""
    member = tl.arange(0, GROUP_PAD)[:, None]
    feature = d0 + tl.arange(0, BLOCK_D)[None, :]
    row = group.to(tl.int64) * GROUP_SIZE + member
    return row, feature, (member < GROUP_SIZE) & (feature < end)


@triton.jit
def _sides(y_t_ptr, y_r_ptr, stride_t, stride_r, f_t_ptr, f_r_ptr, stride_ft, stride_fr, mix_ptr, group,
           MIX: tl.constexpr):
    """Each side's rows as the loads read them, (y, row stride, f, row stride, skip, out): y itself, or with the
    loss head's mix (loss_head.py) the output skip * y + out * f, skip and out (float64) from mix[group]."""
    if MIX:
        base = mix_ptr + group.to(tl.int64) * 4
        side_t = (y_t_ptr, stride_t, f_t_ptr, stride_ft, tl.load(base), tl.load(base + 1))
        side_r = (y_r_ptr, stride_r, f_r_ptr, stride_fr, tl.load(base + 2), tl.load(base + 3))
    else:
        side_t = (y_t_ptr, stride_t, y_t_ptr, stride_t, _float64(1.0), _float64(0.0))
        side_r = (y_r_ptr, stride_r, y_r_ptr, stride_r, _float64(1.0), _float64(0.0))
    return side_t, side_r


@triton.jit
def _load_side(side, row, feature, mask, ACC: tl.constexpr, MIX: tl.constexpr):
    """Rows `row` (int64), features `feature` of one side in the accumulation dtype, zero outside the mask.
    (Converted right after the load: narrow-float arithmetic is wrong in the Triton interpreter.)"""
    value = tl.load(side[0] + row * side[1] + feature, mask=mask, other=0.0).to(ACC)
    if MIX:
        f = tl.load(side[2] + row * side[3] + feature, mask=mask, other=0.0).to(ACC)
        value = side[4].to(ACC) * value + side[5].to(ACC) * f
    return value


@triton.jit
def _load_tile(side_t, side_r, row, feature, mask, ACC: tl.constexpr, MIX: tl.constexpr):
    """One tile of y_t and y_r rows (see _sides) in the accumulation dtype, zero outside the mask."""
    return _load_side(side_t, row, feature, mask, ACC, MIX), _load_side(side_r, row, feature, mask, ACC, MIX)


@triton.jit
def _pair_products(x, y):
    """The five pass-1 sums' products of every pair (i, j) of one (GROUP_PAD, BLOCK_D) tile of y_t rows (x) and y_r
    rows (y), each (GROUP_PAD, GROUP_PAD, BLOCK_D): |t_i - t_j|^2, |r_i - r_j|^2, |t_i - r_j|^2 and the two
    b^2 - a^2 differences (mmd_math.h) by direct differences, never by expanded squares."""
    t_i = x[:, None, :]
    r_i = y[:, None, :]
    t_j = x[None, :, :]
    r_j = y[None, :, :]
    t_minus_r_j = t_j - r_j
    u = t_i - r_j
    v = t_i - t_j
    w = r_i - r_j
    z = r_i - t_j
    return v * v, w * w, u * u, t_minus_r_j * (u + v), -t_minus_r_j * (w + z)


@triton.jit
def _pair_sums(side_t, side_r, group, start, end, GROUP_SIZE: tl.constexpr,
               GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, MIX: tl.constexpr):
    """Pass 1 over features [start, end) of one group: (tt, rr, tr, dt, dr), each GROUP_PAD x GROUP_PAD."""
    tt = tl.zeros((GROUP_PAD, GROUP_PAD), ACC)
    rr = tl.zeros((GROUP_PAD, GROUP_PAD), ACC)
    tr = tl.zeros((GROUP_PAD, GROUP_PAD), ACC)
    dt = tl.zeros((GROUP_PAD, GROUP_PAD), ACC)
    dr = tl.zeros((GROUP_PAD, GROUP_PAD), ACC)
    for d0 in range(start, end, BLOCK_D):
        row, feature, mask = _tile_indices(group, d0, end, GROUP_SIZE, GROUP_PAD, BLOCK_D)
        x, y = _load_tile(side_t, side_r, row, feature, mask, ACC, MIX)
        tt_d, rr_d, tr_d, dt_d, dr_d = _pair_products(x, y)
        tt += tl.sum(tt_d, axis=2)
        rr += tl.sum(rr_d, axis=2)
        tr += tl.sum(tr_d, axis=2)
        dt += tl.sum(dt_d, axis=2)
        dr += tl.sum(dr_d, axis=2)
    return tt, rr, tr, dt, dr


@triton.jit
def _member_row(side, group, member, d0, end, GROUP_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                MIX: tl.constexpr):
    """Features [d0, d0 + BLOCK_D) of row `member` of a group, as a (1, BLOCK_D) tile in ACC, zero past `end`."""
    feature = d0 + tl.arange(0, BLOCK_D)[None, :]
    return _load_side(side, group.to(tl.int64) * GROUP_SIZE + member, feature, feature < end, ACC, MIX)


@triton.jit
def _pair_sums_stream(side_t, side_r, group, start, end, GROUP_SIZE: tl.constexpr,
                      GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, MIX: tl.constexpr):
    """_pair_sums in the "stream" design: the (M, M, BLOCK_D) products accumulate elementwise over the tiles and
    are reduced once at the end, not once per tile (the reduction's shuffles then cost nothing per byte)."""
    tt = tl.zeros((GROUP_PAD, GROUP_PAD, BLOCK_D), ACC)
    rr = tl.zeros((GROUP_PAD, GROUP_PAD, BLOCK_D), ACC)
    tr = tl.zeros((GROUP_PAD, GROUP_PAD, BLOCK_D), ACC)
    dt = tl.zeros((GROUP_PAD, GROUP_PAD, BLOCK_D), ACC)
    dr = tl.zeros((GROUP_PAD, GROUP_PAD, BLOCK_D), ACC)
    for d0 in range(start, end, BLOCK_D):
        row, feature, mask = _tile_indices(group, d0, end, GROUP_SIZE, GROUP_PAD, BLOCK_D)
        x, y = _load_tile(side_t, side_r, row, feature, mask, ACC, MIX)
        tt_d, rr_d, tr_d, dt_d, dr_d = _pair_products(x, y)
        tt += tt_d
        rr += rr_d
        tr += tr_d
        dt += dt_d
        dr += dr_d
    return tl.sum(tt, axis=2), tl.sum(rr, axis=2), tl.sum(tr, axis=2), tl.sum(dt, axis=2), tl.sum(dr, axis=2)


@triton.jit
def _design_pair_sums(side_t, side_r, group, start, end, GROUP_SIZE: tl.constexpr,
                      GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, DESIGN: tl.constexpr,
                      MIX: tl.constexpr):
    """Pass 1 in the chosen design (_dispatch.VARIANTS["IMM_TRITON_MMD"])."""
    if DESIGN == "stream":
        sums = _pair_sums_stream(side_t, side_r, group, start, end, GROUP_SIZE, GROUP_PAD, BLOCK_D, ACC, MIX)
    else:
        sums = _pair_sums(side_t, side_r, group, start, end, GROUP_SIZE, GROUP_PAD, BLOCK_D, ACC, MIX)
    return sums


@triton.jit
def _pair_sums_f64(side_t, side_r, group, start, end, GROUP_SIZE: tl.constexpr,
                   GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, DESIGN: tl.constexpr,
                   MIX: tl.constexpr):
    """Pass-1 sums as float64: in ACC, and summed again in float64 where ACC overflowed (inputs near 1e19 and
    beyond in float32; finite inputs then give the float64 answer; NaN and inf inputs give NaN either way)."""
    tt, rr, tr, dt, dr = _design_pair_sums(side_t, side_r, group, start, end, GROUP_SIZE, GROUP_PAD, BLOCK_D, ACC,
                                           DESIGN, MIX)
    tt, rr, tr, dt, dr = tt.to(tl.float64), rr.to(tl.float64), tr.to(tl.float64), dt.to(tl.float64), dr.to(tl.float64)
    if ACC != tl.float64:
        # Any inf or NaN among the sums makes this sum of magnitudes inf or NaN (float32 values cannot reach
        # float64's overflow by adding up).
        size = tl.sum(tl.sum(tl.abs(tt) + tl.abs(rr) + tl.abs(tr) + tl.abs(dt) + tl.abs(dr), axis=1), axis=0)
        if (size >= float("inf")) | (size != size):
            tt, rr, tr, dt, dr = _design_pair_sums(side_t, side_r, group, start, end, GROUP_SIZE, GROUP_PAD, BLOCK_D,
                                                   tl.float64, DESIGN, MIX)
    return tt, rr, tr, dt, dr


@triton.jit
def _square_offsets(GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr):
    """Offsets of the row-major GROUP_SIZE x GROUP_SIZE block in a GROUP_PAD x GROUP_PAD tile, and its mask."""
    i = tl.arange(0, GROUP_PAD)[:, None]
    j = tl.arange(0, GROUP_PAD)[None, :]
    return i * GROUP_SIZE + j, (i < GROUP_SIZE) & (j < GROUP_SIZE)


@triton.jit
def _store_coefficients(coefficients_ptr, group, own_t, cross_t, gap_t, own_r, cross_r, gap_r,
                        GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr):
    """coefficients[group] = [own, cross, gap of y_t; own, cross, gap of y_r], each M x M (mmd.py's layout)."""
    square = GROUP_SIZE * GROUP_SIZE
    offsets, mask = _square_offsets(GROUP_SIZE, GROUP_PAD)
    out = coefficients_ptr + group.to(tl.int64) * (2 * SIDE_BLOCKS * square) + offsets
    kind = coefficients_ptr.dtype.element_ty
    tl.store(out, own_t.to(kind), mask=mask)
    tl.store(out + square, cross_t.to(kind), mask=mask)
    tl.store(out + 2 * square, gap_t.to(kind), mask=mask)
    tl.store(out + 3 * square, own_r.to(kind), mask=mask)
    tl.store(out + 4 * square, cross_r.to(kind), mask=mask)
    tl.store(out + 5 * square, gap_r.to(kind), mask=mask)


@triton.jit
def _output_value(x, pointer):
    """A float64 loss in the output's dtype; narrow ones through float32 (as the CPU kernels round, and
    float64 -> bfloat16 is wrong in the interpreter)."""
    kind = pointer.dtype.element_ty
    if kind == tl.float64:
        value = x
    elif kind == tl.bfloat16:  # rounded to nearest even by hand: the interpreter truncates
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        value = tl.where(x == x, rounded, x.to(tl.float32).to(tl.bfloat16))  # NaN stays NaN
    else:
        value = x.to(tl.float32).to(kind)
    return value


@triton.jit
def _finish_loss(loss, group, groups, out_ptr, partial_ptr, counter_ptr, REDUCTION: tl.constexpr):
    """Writes group `group`'s loss: as is for reduction "none"; else into partial[group], and the last program to
    get here adds all of them up in group order, writes the mean or sum, and resets the counter."""
    if REDUCTION == "none":
        tl.store(out_ptr + group, _output_value(loss, out_ptr))
    else:
        tl.store(partial_ptr + group, loss)
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")  # publishes the store above to the last program
        if arrived == groups - 1:
            total = tl.zeros((), tl.float64)
            for first in range(0, groups, _REDUCE_BLOCK):
                index = first + tl.arange(0, _REDUCE_BLOCK)
                total += tl.sum(tl.load(partial_ptr + index, mask=index < groups, other=0.0, volatile=True))
            if REDUCTION == "mean":
                total = total / groups
            tl.store(out_ptr, _output_value(total, out_ptr))
            tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _finalize_group(tt, rr, tr, dt, dr, group, bandwidth_ptr, bandwidth_stride, bandwidth_value, weight_ptr,
                    weight_stride, weight_value, eps, grad_scale, groups, features, out_ptr, partial_ptr, counter_ptr,
                    coefficients_ptr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, KERNEL: tl.constexpr,
                    ESTIMATOR: tl.constexpr, REDUCTION: tl.constexpr, BANDWIDTH_TENSOR: tl.constexpr,
                    WEIGHT_TENSOR: tl.constexpr, SAVE: tl.constexpr):
    """A group's float64 pass-1 sums -> its coefficients (when saved) and its share of the loss."""
    bandwidth = _scalar(bandwidth_ptr, bandwidth_stride, bandwidth_value, group, BANDWIDTH_TENSOR)
    weight = _scalar(weight_ptr, weight_stride, weight_value, group, WEIGHT_TENSOR)
    loss, own_t, cross_t, gap_t, own_r, cross_r, gap_r = _group_coefficients(
        tt, rr, tr, dt, dr, bandwidth, weight, _float64(grad_scale), _float64(eps), features, GROUP_SIZE, GROUP_PAD,
        KERNEL, ESTIMATOR)
    if SAVE:
        _store_coefficients(coefficients_ptr, group, own_t, cross_t, gap_t, own_r, cross_r, gap_r, GROUP_SIZE,
                            GROUP_PAD)
    _finish_loss(loss, group, groups, out_ptr, partial_ptr, counter_ptr, REDUCTION)


@triton.jit
def _mmd_forward_kernel(y_t_ptr, y_r_ptr, stride_t, stride_r, f_t_ptr, f_r_ptr, stride_ft, stride_fr, mix_ptr,
                        bandwidth_ptr, bandwidth_stride,
                        bandwidth_value: tl.float64, weight_ptr, weight_stride, weight_value: tl.float64,
                        eps: tl.float64, grad_scale: tl.float64, groups, features, out_ptr, partial_ptr, counter_ptr,
                        coefficients_ptr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, KERNEL: tl.constexpr,
                        ESTIMATOR: tl.constexpr, REDUCTION: tl.constexpr, BANDWIDTH_TENSOR: tl.constexpr,
                        WEIGHT_TENSOR: tl.constexpr, SAVE: tl.constexpr, BLOCK_D: tl.constexpr,
                        ACC: tl.constexpr, DESIGN: tl.constexpr, MIX: tl.constexpr):
    """All of one group's forward (grid: G): pass 1, the finalize, its share of the reduction."""
    group = tl.program_id(0)
    side_t, side_r = _sides(y_t_ptr, y_r_ptr, stride_t, stride_r, f_t_ptr, f_r_ptr, stride_ft, stride_fr, mix_ptr,
                            group, MIX)
    tt, rr, tr, dt, dr = _pair_sums_f64(side_t, side_r, group, 0, features, GROUP_SIZE, GROUP_PAD, BLOCK_D, ACC,
                                        DESIGN, MIX)
    _finalize_group(tt, rr, tr, dt, dr, group, bandwidth_ptr, bandwidth_stride, bandwidth_value, weight_ptr,
                    weight_stride, weight_value, eps, grad_scale, groups, features, out_ptr, partial_ptr, counter_ptr,
                    coefficients_ptr, GROUP_SIZE, GROUP_PAD, KERNEL, ESTIMATOR, REDUCTION, BANDWIDTH_TENSOR,
                    WEIGHT_TENSOR, SAVE)


@triton.jit
def _float64(value):
    """A float argument as a float64 tensor. (Built with tl.full: the interpreter turns a float argument into a
    float32 tensor, annotation or not, where it is used as a tensor.)"""
    return tl.full((), value, tl.float64)


@triton.jit
def _scalar(pointer, stride, value, index, TENSOR: tl.constexpr):
    """A ScalarArg (common/problems.h): pointer[index * stride] as float64, or the plain value."""
    if TENSOR:
        result = tl.load(pointer + index * stride).to(tl.float64)
    else:
        result = _float64(value)
    return result


@triton.jit
def _mmd_partial_sums_kernel(y_t_ptr, y_r_ptr, stride_t, stride_r, f_t_ptr, f_r_ptr, stride_ft, stride_fr, mix_ptr,
                             features, chunk, sums_ptr,
                             GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                             ACC: tl.constexpr, DESIGN: tl.constexpr, MIX: tl.constexpr):
    """Split forward, pass 1 of one feature chunk of one group (grid: G x chunks) into sums[group, chunk]
    (5 GROUP_PAD x GROUP_PAD blocks, float64)."""
    group = tl.program_id(0)
    part = tl.program_id(1)
    start = part * chunk
    side_t, side_r = _sides(y_t_ptr, y_r_ptr, stride_t, stride_r, f_t_ptr, f_r_ptr, stride_ft, stride_fr, mix_ptr,
                            group, MIX)
    tt, rr, tr, dt, dr = _pair_sums_f64(side_t, side_r, group, start, tl.minimum(start + chunk, features), GROUP_SIZE,
                                        GROUP_PAD, BLOCK_D, ACC, DESIGN, MIX)
    square = GROUP_PAD * GROUP_PAD
    offsets = tl.arange(0, GROUP_PAD)[:, None] * GROUP_PAD + tl.arange(0, GROUP_PAD)[None, :]
    out = sums_ptr + (group.to(tl.int64) * tl.num_programs(1) + part) * (PAIR_SUMS * square) + offsets
    tl.store(out, tt)
    tl.store(out + square, rr)
    tl.store(out + 2 * square, tr)
    tl.store(out + 3 * square, dt)
    tl.store(out + 4 * square, dr)


@triton.jit
def _mmd_finalize_kernel(sums_ptr, chunks, bandwidth_ptr, bandwidth_stride, bandwidth_value: tl.float64,
                         weight_ptr, weight_stride, weight_value: tl.float64, eps: tl.float64,
                         grad_scale: tl.float64, groups, features, out_ptr, partial_ptr, counter_ptr,
                         coefficients_ptr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, KERNEL: tl.constexpr,
                         ESTIMATOR: tl.constexpr, REDUCTION: tl.constexpr, BANDWIDTH_TENSOR: tl.constexpr,
                         WEIGHT_TENSOR: tl.constexpr, SAVE: tl.constexpr):
    """Split forward: one group's chunks of sums, added _CHUNK_BLOCK at a time -> its loss, coefficients and
    share of the reduction (grid: G)."""
    group = tl.program_id(0)
    square = GROUP_PAD * GROUP_PAD
    chunk = tl.arange(0, _CHUNK_BLOCK)[:, None, None]
    offsets = tl.arange(0, GROUP_PAD)[None, :, None] * GROUP_PAD + tl.arange(0, GROUP_PAD)[None, None, :]
    base = sums_ptr + group.to(tl.int64) * chunks * (PAIR_SUMS * square)
    tt = tl.zeros((GROUP_PAD, GROUP_PAD), tl.float64)
    rr = tl.zeros((GROUP_PAD, GROUP_PAD), tl.float64)
    tr = tl.zeros((GROUP_PAD, GROUP_PAD), tl.float64)
    dt = tl.zeros((GROUP_PAD, GROUP_PAD), tl.float64)
    dr = tl.zeros((GROUP_PAD, GROUP_PAD), tl.float64)
    for first in range(0, chunks, _CHUNK_BLOCK):
        index = first + chunk
        sums = base + index * (PAIR_SUMS * square) + offsets
        mask = index < chunks
        tt += tl.sum(tl.load(sums, mask=mask, other=0.0), axis=0)
        rr += tl.sum(tl.load(sums + square, mask=mask, other=0.0), axis=0)
        tr += tl.sum(tl.load(sums + 2 * square, mask=mask, other=0.0), axis=0)
        dt += tl.sum(tl.load(sums + 3 * square, mask=mask, other=0.0), axis=0)
        dr += tl.sum(tl.load(sums + 4 * square, mask=mask, other=0.0), axis=0)
    _finalize_group(tt, rr, tr, dt, dr, group, bandwidth_ptr, bandwidth_stride, bandwidth_value, weight_ptr,
                    weight_stride, weight_value, eps, grad_scale, groups, features, out_ptr, partial_ptr, counter_ptr,
                    coefficients_ptr, GROUP_SIZE, GROUP_PAD, KERNEL, ESTIMATOR, REDUCTION, BANDWIDTH_TENSOR,
                    WEIGHT_TENSOR, SAVE)


@triton.jit
def _side_gradient(own, other, c_own, c_cross, c_gap):
    """grad_i = sum_j c_own_ij (own_i - own_j) + c_cross_ij (own_i - other_j) + c_gap_ij (own_j - other_j) for tiles
    of one side's rows (own) and the other side's (other), from differences of the inputs themselves."""
    own_i = own[:, None, :]
    own_j = own[None, :, :]
    other_j = other[None, :, :]
    terms = (c_own[:, :, None] * (own_i - own_j) + c_cross[:, :, None] * (own_i - other_j)
             + c_gap[:, :, None] * (own_j - other_j))
    return tl.sum(terms, axis=1)


@triton.jit
def _coefficient_column(blocks, block, j, scale, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
                        ACC: tl.constexpr):
    """Column j of coefficient block `block` (rows i < M), scaled, as a (GROUP_PAD, 1) tile."""
    i = tl.arange(0, GROUP_PAD)[:, None]
    value = tl.load(blocks + block * GROUP_SIZE * GROUP_SIZE + i * GROUP_SIZE + j, mask=i < GROUP_SIZE, other=0.0)
    return scale * value.to(ACC)


@triton.jit
def _write_gradients_rows(side_t, side_r, features, blocks, scale_t, scale_r, grad_t_ptr, grad_r_ptr, group, start, end,
                          GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, WRITE_T: tl.constexpr,
                          WRITE_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, MIX: tl.constexpr):
    """The backward in the "stream" design: each partner row j streams past the group's (M, BLOCK_D) tiles, its
    coefficient columns scaling the differences; the gradient tiles accumulate elementwise (no reduction)."""
    for d0 in range(start, end, BLOCK_D):
        row, feature, mask = _tile_indices(group, d0, end, GROUP_SIZE, GROUP_PAD, BLOCK_D)
        x, y = _load_tile(side_t, side_r, row, feature, mask, ACC, MIX)
        grad_t = tl.zeros((GROUP_PAD, BLOCK_D), ACC)
        grad_r = tl.zeros((GROUP_PAD, BLOCK_D), ACC)
        for j in range(GROUP_SIZE):
            x_j = _member_row(side_t, group, j, d0, end, GROUP_SIZE, BLOCK_D, ACC, MIX)
            y_j = _member_row(side_r, group, j, d0, end, GROUP_SIZE, BLOCK_D, ACC, MIX)
            d_j = x_j - y_j
            if WRITE_T:  # X = y_t, Y = y_r: X_j - Y_j = t_j - r_j
                grad_t += (_coefficient_column(blocks, 0, j, scale_t, GROUP_SIZE, GROUP_PAD, ACC) * (x - x_j)
                           + _coefficient_column(blocks, 1, j, scale_t, GROUP_SIZE, GROUP_PAD, ACC) * (x - y_j)
                           + _coefficient_column(blocks, 2, j, scale_t, GROUP_SIZE, GROUP_PAD, ACC) * d_j)
            if WRITE_R:  # X = y_r, Y = y_t: X_j - Y_j = r_j - t_j
                grad_r += (_coefficient_column(blocks, 3, j, scale_r, GROUP_SIZE, GROUP_PAD, ACC) * (y - y_j)
                           + _coefficient_column(blocks, 4, j, scale_r, GROUP_SIZE, GROUP_PAD, ACC) * (y - x_j)
                           - _coefficient_column(blocks, 5, j, scale_r, GROUP_SIZE, GROUP_PAD, ACC) * d_j)
        offset = row * features + feature
        if WRITE_T:
            tl.store(grad_t_ptr + offset, grad_t.to(grad_t_ptr.dtype.element_ty), mask=mask)
        if WRITE_R:
            tl.store(grad_r_ptr + offset, grad_r.to(grad_r_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mmd_backward_kernel(y_t_ptr, y_r_ptr, stride_t, stride_r, f_t_ptr, f_r_ptr, stride_ft, stride_fr, mix_ptr,
                         features, chunk, coefficients_ptr, grad_output_ptr, grad_output_stride, grad_t_ptr,
                         grad_r_ptr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, WRITE_T: tl.constexpr,
                         WRITE_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, DESIGN: tl.constexpr,
                         MIX: tl.constexpr):
    """The gradients of one feature chunk of one group (grid: G x chunks), scaled by the output's gradient (and
    with a mix by each side's out factor: the gradients are f's)."""
    group = tl.program_id(0)
    start = tl.program_id(1) * chunk
    end = tl.minimum(start + chunk, features)
    side_t, side_r = _sides(y_t_ptr, y_r_ptr, stride_t, stride_r, f_t_ptr, f_r_ptr, stride_ft, stride_fr, mix_ptr,
                            group, MIX)
    scale_t = tl.load(grad_output_ptr + group * grad_output_stride).to(ACC)
    scale_r = scale_t
    if MIX:
        scale_r = scale_t * side_r[5].to(ACC)
        scale_t = scale_t * side_t[5].to(ACC)
    square = GROUP_SIZE * GROUP_SIZE
    group_blocks = coefficients_ptr + group.to(tl.int64) * (2 * SIDE_BLOCKS * square)
    if DESIGN == "stream":
        _write_gradients_rows(side_t, side_r, features, group_blocks, scale_t, scale_r, grad_t_ptr, grad_r_ptr, group,
                              start, end, GROUP_SIZE, GROUP_PAD, WRITE_T, WRITE_R, BLOCK_D, ACC, MIX)
        return
    offsets, mask = _square_offsets(GROUP_SIZE, GROUP_PAD)
    blocks = group_blocks + offsets
    own_t = scale_t * tl.load(blocks, mask=mask, other=0.0).to(ACC)
    cross_t = scale_t * tl.load(blocks + square, mask=mask, other=0.0).to(ACC)
    gap_t = scale_t * tl.load(blocks + 2 * square, mask=mask, other=0.0).to(ACC)
    own_r = scale_r * tl.load(blocks + 3 * square, mask=mask, other=0.0).to(ACC)
    cross_r = scale_r * tl.load(blocks + 4 * square, mask=mask, other=0.0).to(ACC)
    gap_r = scale_r * tl.load(blocks + 5 * square, mask=mask, other=0.0).to(ACC)
    for d0 in range(start, end, BLOCK_D):
        row, feature, tile_mask = _tile_indices(group, d0, end, GROUP_SIZE, GROUP_PAD, BLOCK_D)
        x, y = _load_tile(side_t, side_r, row, feature, tile_mask, ACC, MIX)
        offset = row * features + feature
        if WRITE_T:
            grad = _side_gradient(x, y, own_t, cross_t, gap_t)
            tl.store(grad_t_ptr + offset, grad.to(grad_t_ptr.dtype.element_ty), mask=tile_mask)
        if WRITE_R:
            grad = _side_gradient(y, x, own_r, cross_r, gap_r)
            tl.store(grad_r_ptr + offset, grad.to(grad_r_ptr.dtype.element_ty), mask=tile_mask)


def block_features(group_pad: int, features: int, acc: torch.dtype, device: torch.device, design: str,
                   backward: bool = False) -> int:
    """Features per tile: on GPUs what keeps a (M, M, BLOCK_D) pair tile at _TILE_BYTES ("tile"), or the five
    pair accumulators at _STREAM_BYTES ("stream" forward), or an (M, BLOCK_D) row tile at _TILE_BYTES ("stream"
    backward); in the interpreter (CPU tensors), which has no registers to budget but a cost per operation, as
    wide as allowed. Never wider than D needs."""
    widest = min(triton.next_power_of_2(features), _MAX_BLOCK_D)
    if device.type != "cuda":
        return widest
    if design == "stream":
        tile = _TILE_BYTES // group_pad if backward else _STREAM_BYTES // (group_pad * group_pad)
    else:
        tile = _TILE_BYTES // (group_pad * group_pad)
    return max(1, min(widest, tile // acc.itemsize))


def feature_chunk(groups: int, features: int, block_d: int) -> int:
    """Features per program: all of D when there are enough groups to fill the GPU, else D split into chunks
    (multiples of the tile, at least _MIN_CHUNK) so that about _TARGET_PROGRAMS programs run."""
    wanted = max(_MIN_CHUNK, triton.cdiv(features, triton.cdiv(_TARGET_PROGRAMS, groups)))
    return min(features, triton.cdiv(wanted, block_d) * block_d)


def scalar_operand(tensor, value, placeholder):
    """(pointer, stride, value) of a ScalarArg for _scalar (a placeholder pointer where there is no tensor)."""
    if tensor is None:
        return placeholder, 0, value
    return tensor, tensor.stride()[0] if tensor.numel() > 1 else 0, value


def _layout(y_t, y_r, group_size, mix, backward=False):
    """The rows' arguments (y_t, y_r, their row strides, then the mix's: f_t, f_r, their strides, the (G, 4)
    coefficients; placeholders without a mix), and the launch shapes of a direction."""
    t, r, stride_t, stride_r, features = _native.row_pair(y_t, y_r)
    rows = (t, r, stride_t, stride_r,
            *(_native.mix_rows(mix) if mix is not None else (t, r, stride_t, stride_r, t)))
    groups = y_t.shape[0] // group_size
    acc = _validate.accumulation_dtype(y_t.dtype)
    group_pad = triton.next_power_of_2(group_size)
    design = _dispatch.variant("IMM_TRITON_MMD")
    block_d = block_features(group_pad, features, acc, y_t.device, design, backward)
    chunk = feature_chunk(groups, features, block_d)
    shape = dict(GROUP_SIZE=group_size, GROUP_PAD=group_pad, ACC=tl.float64 if acc == torch.float64 else tl.float32,
                 DESIGN=design, MIX=mix is not None)
    return rows, groups, features, block_d, chunk, shape


@_dispatch.register("mmd_forward", "triton")
def mmd_forward(y_t, y_r, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel, estimator, eps,
                reduction, grad_t, grad_r, backend, mix=None):
    """mix: (f_t, f_r, coefficients) of the loss head (loss_head.py), y_t and y_r being x_t and x_r."""
    out, coefficients = forward_outputs(y_t, group_size, bandwidth, weight, reduction, grad_t, grad_r, backend)
    if y_t.device.type == "cpu":  # under the interpreter: the native CPU backend's value check
        _validate.positive_values("bandwidth", bandwidth, "group")
    rows, groups, features, block_d, chunk, shape = _layout(y_t, y_r, group_size, mix)
    chunks = triton.cdiv(features, chunk)
    reduced = reduction != "none"
    partial = torch.empty(groups if reduced else 0, dtype=torch.float64, device=y_t.device)
    counter = _native.reduction_counter(y_t.device) if reduced else partial
    scalars = (*scalar_operand(bandwidth, bandwidth_value, out), *scalar_operand(weight, weight_value, out), eps,
               1.0 / groups if reduction == "mean" else 1.0)
    finish = (groups, features, out, partial, counter, coefficients if coefficients is not None else out)
    flags = dict(KERNEL=kernel, ESTIMATOR=estimator, REDUCTION=reduction, BANDWIDTH_TENSOR=bandwidth is not None,
                 WEIGHT_TENSOR=weight is not None, SAVE=coefficients is not None, **shape)
    warps = _STREAM_WARPS if shape["DESIGN"] == "stream" else 4
    with torch.cuda.device_of(y_t):  # Triton launches on the current device
        if chunks == 1:
            _mmd_forward_kernel[(groups,)](*rows, *scalars, *finish, BLOCK_D=block_d, num_warps=warps, **flags)
        else:
            square = shape["GROUP_PAD"] ** 2
            sums = torch.empty((groups, chunks, PAIR_SUMS.value, square), dtype=torch.float64, device=y_t.device)
            _mmd_partial_sums_kernel[(groups, chunks)](*rows, features, chunk, sums, BLOCK_D=block_d, num_warps=warps,
                                                       **shape)
            del flags["ACC"], flags["DESIGN"], flags["MIX"]
            _mmd_finalize_kernel[(groups,)](sums, chunks, *scalars, *finish, **flags)
    return out, coefficients


@_dispatch.register("mmd_backward", "triton")
def mmd_backward(grad_output, y_t, y_r, saved, group_size, grad_t, grad_r, backend, mix=None):
    """With the loss head's mix (see mmd_forward) the gradients are those of f_t and f_r."""
    out_t, out_r = _native.output_pair(y_t, grad_t, grad_r)
    rows, groups, features, block_d, chunk, shape = _layout(y_t, y_r, group_size, mix, backward=True)
    grads = (out_t if out_t is not None else saved, out_r if out_r is not None else saved)
    with torch.cuda.device_of(y_t):
        _mmd_backward_kernel[(groups, triton.cdiv(features, chunk))](
            *rows, features, chunk, saved, grad_output, grad_output.stride(0) if grad_output.ndim else 0, *grads,
            WRITE_T=grad_t, WRITE_R=grad_r, BLOCK_D=block_d, **shape)
    return out_t, out_r


@_dispatch.register("loss_head_forward", "triton")
def loss_head_forward(x_t, g_t, x_r, g_r, coefficients, bandwidth, bandwidth_value, weight, weight_value, group_size,
                      kernel, estimator, eps, reduction, grad_t, grad_r, backend):
    return mmd_forward(x_t, x_r, bandwidth, bandwidth_value, weight, weight_value, group_size, kernel, estimator, eps,
                       reduction, grad_t, grad_r, backend, mix=(g_t, g_r, coefficients))


@_dispatch.register("loss_head_backward", "triton")
def loss_head_backward(grad_output, x_t, g_t, x_r, g_r, coefficients, saved, group_size, grad_t, grad_r, backend):
    return mmd_backward(grad_output, x_t, x_r, saved, group_size, grad_t, grad_r, backend, mix=(g_t, g_r, coefficients))

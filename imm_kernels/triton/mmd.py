"""Grouped MMD (imm_kernels.mmd_loss) in Triton, with the math of csrc/common/mmd_math.h and csrc/cpu/mmd.cpp.

Pass 1 sums, per ordered pair (i, j) of a group, five quantities over the features by direct differences
(never |x|^2 + |y|^2 - 2xy, which cancels when y_r ~ y_t):
    tt = |t_i - t_j|^2, rr = |r_i - r_j|^2, tr = |t_i - r_j|^2,
    dt = sum (t_j - r_j)((t_i - r_j) + (t_i - t_j)),  dr = -sum (t_j - r_j)((r_i - r_j) + (r_i - t_j)).
A finalize step turns them, in float64, into the group's loss and the per-pair gradient coefficients P, Q of
each side, and pass 2 writes grad_X_i = sum_j P_ij (Y_j - X_j) + Q_ij (X_i - Y_j).

Launches (no host syncs, so a call can be captured in a CUDA graph):
- enough groups to fill the GPU (e.g. G, M, D = 1024, 4, 4096): one program per group runs pass 1, the
  finalize and pass 2, so pass 2 finds the group's rows still in cache;
- few large groups (e.g. 8, 8, 196608): each group's features are split into chunks, and three kernels run
  pass 1 per (group, chunk) into partial sums, the finalize per group, and pass 2 per (group, chunk).
A group's M rows are padded to a power of two (masked); a tile holds (M, M, BLOCK_D) pair differences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _dispatch
from ..mmd import mmd_outputs

# Square (M x M) blocks per group: pair sums tt, rr, tr, dt, dr; coefficients P_t, Q_t, P_r, Q_r.
PAIR_SUMS = tl.constexpr(5)
COEFFICIENT_BLOCKS = tl.constexpr(4)

_TILE_BYTES = 8192  # one (M, M, BLOCK_D) pair tile: ~100-130 registers a thread at 4 warps, no spills (sm_90)
_MAX_BLOCK_D = 1024
_TARGET_PROGRAMS = 512  # enough programs to keep every SM of a large GPU (an H100 has 132) busy
_MIN_CHUNK = 2048  # features of one group per program, at least, when a group's features are split


@triton.jit
def _expm1(x):
    """exp(x) - 1 to a few ulp for |x| < 1 (where the callers use it): the rounding error of u = exp(x)
    cancels between u - 1 and log(u) (Kahan). libdevice's expm1 has no Triton-interpreter version."""
    u = tl.exp(x)
    tiny = u == 1.0  # |x| below an ulp of 1, where expm1(x) = x
    return tl.where(tiny, x, (u - 1.0) * x / tl.log(tl.where(tiny, 2.0, u)))


@triton.jit
def _exp_difference(xa, xb, gap):
    """exp(-xa) - exp(-xb), given gap = xb - xa accurately: expm1 where the two are close (the difference
    would cancel), the plain difference elsewhere (where expm1 could overflow against an underflowed exp)."""
    close = (gap < 0.5) & (gap > -0.5)
    return tl.where(close, -tl.exp(-xa) * _expm1(-tl.where(close, gap, 0.0)), tl.exp(-xa) - tl.exp(-xb))


@triton.jit
def _laplace_psi(d, c, eps):
    """phi'(d) / d of the Laplace kernel; zero at or below the floor, NaN for NaN d."""
    below = d <= eps
    return tl.where(below, 0.0, -c * tl.exp(-c * d) / tl.where(below, 1.0, d))


@triton.jit
def _pair_terms(a2, b2, delta, c, eps, KERNEL: tl.constexpr):
    """(phi(a), phi(a) - phi(b), psi(a), psi(a) - psi(b)) of mmd_math.h's pair_terms, elementwise in float64,
    for squared distances a2, b2 and delta = b2 - a2."""
    if KERNEL == "rbf":  # phi = exp(-c d^2)
        phi_a = tl.exp(-c * a2)
        dphi = _exp_difference(c * a2, c * b2, c * delta)
        psi_a = -2.0 * c * phi_a
        dpsi = -2.0 * c * dphi
    else:
        a = tl.sqrt(a2)
        b = tl.sqrt(b2)
        total = a + b
        b_minus_a = tl.where(total > 0.0, delta / tl.where(total > 0.0, total, 1.0), 0.0)
        if KERNEL == "laplace":  # phi = exp(-c max(d, eps))
            a_floored = tl.where(a < eps, eps, a)
            b_floored = tl.where(b < eps, eps, b)
            both_live = ~(a <= eps) & ~(b <= eps)
            gap = tl.where(both_live, b_minus_a, b_floored - a_floored)
            c_gap = c * gap
            phi_a = tl.exp(-c * a_floored)
            dphi = _exp_difference(c * a_floored, c * b_floored, c_gap)
            psi_a = _laplace_psi(a, c, eps)
            # Close distances: psi(a) - psi(b) = psi(a) (1 - e^{-c gap} a / b), expanded so nothing cancels.
            close = both_live & (c_gap < 0.5) & (c_gap > -0.5)
            close_gap = tl.where(close, c_gap, 0.0)
            dpsi_close = psi_a * (-_expm1(-close_gap) + (gap / tl.where(close, b, 1.0)) * tl.exp(-close_gap))
            dpsi = tl.where(close, dpsi_close, psi_a - _laplace_psi(b, c, eps))
        else:  # energy: phi = -d (no scale: c is unused)
            a_live = ~(a <= 0.0)
            b_live = ~(b <= 0.0)
            phi_a = -a
            dphi = b_minus_a
            psi_a = tl.where(a_live, -1.0 / tl.where(a_live, a, 1.0), 0.0)
            psi_b = tl.where(b_live, -1.0 / tl.where(b_live, b, 1.0), 0.0)
            both_live = a_live & b_live
            dpsi = tl.where(both_live, -b_minus_a / tl.where(both_live, a * b, 1.0), psi_a - psi_b)
    return phi_a, dphi, psi_a, dpsi


@triton.jit
def _pair_coefficients(a2, b2, delta, self_w, cross_w, grad_w, c, eps, KERNEL: tl.constexpr):
    """Loss contribution and gradient coefficients (P, Q) of each ordered pair of one side (mmd_math.h)."""
    phi_a, dphi, psi_a, dpsi = _pair_terms(a2, b2, delta, c, eps, KERNEL)
    loss = cross_w * dphi + (self_w - cross_w) * phi_a
    p = grad_w * self_w * psi_a
    q = grad_w * (cross_w * dpsi + (self_w - cross_w) * psi_a)
    return loss, p, q


@triton.jit
def _group_coefficients(tt, rr, tr, dt, dr, bandwidth, weight, eps, features, GROUP_SIZE: tl.constexpr,
                        GROUP_PAD: tl.constexpr, KERNEL: tl.constexpr, ESTIMATOR: tl.constexpr):
    """A group's float64 pair sums -> its loss (weight * MMD) and (P, Q) of the y_t and the y_r side, zero
    outside the group's M x M pairs."""
    i = tl.arange(0, GROUP_PAD)[:, None]
    j = tl.arange(0, GROUP_PAD)[None, :]
    in_group = (i < GROUP_SIZE) & (j < GROUP_SIZE)
    # Divided as float64 tensors: the interpreter would round a quotient of Python numbers to float32.
    one = tl.full((), 1.0, tl.float64)
    cross_w = one / (GROUP_SIZE * GROUP_SIZE)
    if ESTIMATOR == "u":  # self terms without i = j, over M (M - 1)
        self_w = tl.where(i == j, 0.0, one / (GROUP_SIZE * (GROUP_SIZE - 1)))
    else:
        self_w = cross_w
    c = bandwidth.to(tl.float64) / features
    weight = weight.to(tl.float64)
    grad_w = 2.0 * weight
    loss_t, p_t, q_t = _pair_coefficients(tt, tr, dt, self_w, cross_w, grad_w, c, eps, KERNEL)
    # y_r side: b2 = |r_i - t_j|^2 = tr[j][i].
    loss_r, p_r, q_r = _pair_coefficients(rr, tl.trans(tr), dr, self_w, cross_w, grad_w, c, eps, KERNEL)
    loss = weight * tl.sum(tl.sum(tl.where(in_group, loss_t + loss_r, 0.0), axis=1), axis=0)
    return (loss, tl.where(in_group, p_t, 0.0), tl.where(in_group, q_t, 0.0), tl.where(in_group, p_r, 0.0),
            tl.where(in_group, q_r, 0.0))


@triton.jit
def _tile_indices(group, d0, end, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row indices (int64, GROUP_PAD x 1), feature indices (1 x BLOCK_D) and mask of one tile of a group."""
    member = tl.arange(0, GROUP_PAD)[:, None]
    feature = d0 + tl.arange(0, BLOCK_D)[None, :]
    row = group.to(tl.int64) * GROUP_SIZE + member
    return row, feature, (member < GROUP_SIZE) & (feature < end)


@triton.jit
def _load_tile(y_t_ptr, y_r_ptr, stride_t, stride_r, row, feature, mask, ACC: tl.constexpr):
    """One tile of y_t and y_r rows in the accumulation dtype, zero outside the mask. (Converted right after
    the load: narrow-float arithmetic is wrong in the Triton interpreter.)"""
    x = tl.load(y_t_ptr + row * stride_t + feature, mask=mask, other=0.0).to(ACC)
    y = tl.load(y_r_ptr + row * stride_r + feature, mask=mask, other=0.0).to(ACC)
    return x, y


@triton.jit
def _pair_sums(y_t_ptr, y_r_ptr, stride_t, stride_r, group, start, end, GROUP_SIZE: tl.constexpr,
               GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Pass 1 over features [start, end) of one group: (tt, rr, tr, dt, dr), each GROUP_PAD x GROUP_PAD."""
    tt = tl.zeros((GROUP_PAD, GROUP_PAD), ACC)
    rr = tl.zeros((GROUP_PAD, GROUP_PAD), ACC)
    tr = tl.zeros((GROUP_PAD, GROUP_PAD), ACC)
    dt = tl.zeros((GROUP_PAD, GROUP_PAD), ACC)
    dr = tl.zeros((GROUP_PAD, GROUP_PAD), ACC)
    for d0 in range(start, end, BLOCK_D):
        row, feature, mask = _tile_indices(group, d0, end, GROUP_SIZE, GROUP_PAD, BLOCK_D)
        x, y = _load_tile(y_t_ptr, y_r_ptr, stride_t, stride_r, row, feature, mask, ACC)
        t_i = x[:, None, :]
        r_i = y[:, None, :]
        t_j = x[None, :, :]
        r_j = y[None, :, :]
        t_minus_r_j = t_j - r_j
        u = t_i - r_j
        v = t_i - t_j
        w = r_i - r_j
        z = r_i - t_j
        tt += tl.sum(v * v, axis=2)
        rr += tl.sum(w * w, axis=2)
        tr += tl.sum(u * u, axis=2)
        dt += tl.sum(t_minus_r_j * (u + v), axis=2)
        dr -= tl.sum(t_minus_r_j * (w + z), axis=2)
    return tt, rr, tr, dt, dr


@triton.jit
def _side_gradient(own, other, p, q):
    """grad_i = sum_j p_ij (other_j - own_j) + q_ij (own_i - other_j) for tiles of one side's rows (own) and
    the other side's (other), from differences of the inputs themselves."""
    own_j = own[None, :, :]
    other_j = other[None, :, :]
    return tl.sum(p[:, :, None] * (other_j - own_j) + q[:, :, None] * (own[:, None, :] - other_j), axis=1)


@triton.jit
def _write_gradients(y_t_ptr, y_r_ptr, stride_t, stride_r, grad_t_ptr, grad_r_ptr, p_t, q_t, p_r, q_r, group, start,
                     end, features, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, WRITE_T: tl.constexpr,
                     WRITE_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Pass 2 over features [start, end) of one group into the contiguous (B, D) gradients asked for."""
    for d0 in range(start, end, BLOCK_D):
        row, feature, mask = _tile_indices(group, d0, end, GROUP_SIZE, GROUP_PAD, BLOCK_D)
        x, y = _load_tile(y_t_ptr, y_r_ptr, stride_t, stride_r, row, feature, mask, ACC)
        offset = row * features + feature
        if WRITE_T:
            tl.store(grad_t_ptr + offset, _side_gradient(x, y, p_t, q_t).to(grad_t_ptr.dtype.element_ty), mask=mask)
        if WRITE_R:
            tl.store(grad_r_ptr + offset, _side_gradient(y, x, p_r, q_r).to(grad_r_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _square_offsets(GROUP_PAD: tl.constexpr):
    """Offsets of a row-major GROUP_PAD x GROUP_PAD block."""
    return tl.arange(0, GROUP_PAD)[:, None] * GROUP_PAD + tl.arange(0, GROUP_PAD)[None, :]


@triton.jit
def _mmd_group_kernel(y_t_ptr, y_r_ptr, stride_t, stride_r, bandwidth_ptr, weight_ptr, eps: tl.float64, features,
                      loss_ptr, grad_t_ptr, grad_r_ptr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
                      KERNEL: tl.constexpr, ESTIMATOR: tl.constexpr, WRITE_T: tl.constexpr, WRITE_R: tl.constexpr,
                      BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """All of one group (grid: G): pass 1, the finalize, and pass 2 when a gradient is asked for."""
    group = tl.program_id(0)
    tt, rr, tr, dt, dr = _pair_sums(y_t_ptr, y_r_ptr, stride_t, stride_r, group, 0, features, GROUP_SIZE, GROUP_PAD,
                                    BLOCK_D, ACC)
    loss, p_t, q_t, p_r, q_r = _group_coefficients(
        tt.to(tl.float64), rr.to(tl.float64), tr.to(tl.float64), dt.to(tl.float64), dr.to(tl.float64),
        tl.load(bandwidth_ptr + group), tl.load(weight_ptr + group), eps, features, GROUP_SIZE, GROUP_PAD, KERNEL,
        ESTIMATOR)
    tl.store(loss_ptr + group, loss.to(ACC))
    if WRITE_T or WRITE_R:
        _write_gradients(y_t_ptr, y_r_ptr, stride_t, stride_r, grad_t_ptr, grad_r_ptr, p_t.to(ACC), q_t.to(ACC),
                         p_r.to(ACC), q_r.to(ACC), group, 0, features, features, GROUP_SIZE, GROUP_PAD, WRITE_T,
                         WRITE_R, BLOCK_D, ACC)


@triton.jit
def _mmd_partial_sums_kernel(y_t_ptr, y_r_ptr, stride_t, stride_r, features, chunk, sums_ptr,
                             GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                             ACC: tl.constexpr):
    """Pass 1 of one feature chunk of one group (grid: G x chunks) into sums[group, chunk] (5 square blocks)."""
    group = tl.program_id(0)
    part = tl.program_id(1)
    start = part * chunk
    tt, rr, tr, dt, dr = _pair_sums(y_t_ptr, y_r_ptr, stride_t, stride_r, group, start,
                                    tl.minimum(start + chunk, features), GROUP_SIZE, GROUP_PAD, BLOCK_D, ACC)
    square = GROUP_PAD * GROUP_PAD
    out = sums_ptr + (group * tl.num_programs(1) + part) * (PAIR_SUMS * square) + _square_offsets(GROUP_PAD)
    tl.store(out, tt)
    tl.store(out + square, rr)
    tl.store(out + 2 * square, tr)
    tl.store(out + 3 * square, dt)
    tl.store(out + 4 * square, dr)


@triton.jit
def _mmd_finalize_kernel(sums_ptr, chunks, bandwidth_ptr, weight_ptr, eps: tl.float64, features, loss_ptr,
                         coefficients_ptr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, KERNEL: tl.constexpr,
                         ESTIMATOR: tl.constexpr, ACC: tl.constexpr):
    """One group's partial sums, added in float64 -> its loss and coefficients[group] (P_t, Q_t, P_r, Q_r)."""
    group = tl.program_id(0)
    square = GROUP_PAD * GROUP_PAD
    offsets = _square_offsets(GROUP_PAD)
    tt = tl.zeros((GROUP_PAD, GROUP_PAD), tl.float64)
    rr = tl.zeros((GROUP_PAD, GROUP_PAD), tl.float64)
    tr = tl.zeros((GROUP_PAD, GROUP_PAD), tl.float64)
    dt = tl.zeros((GROUP_PAD, GROUP_PAD), tl.float64)
    dr = tl.zeros((GROUP_PAD, GROUP_PAD), tl.float64)
    for part in range(chunks):
        sums = sums_ptr + (group * chunks + part) * (PAIR_SUMS * square) + offsets
        tt += tl.load(sums).to(tl.float64)
        rr += tl.load(sums + square).to(tl.float64)
        tr += tl.load(sums + 2 * square).to(tl.float64)
        dt += tl.load(sums + 3 * square).to(tl.float64)
        dr += tl.load(sums + 4 * square).to(tl.float64)
    loss, p_t, q_t, p_r, q_r = _group_coefficients(tt, rr, tr, dt, dr, tl.load(bandwidth_ptr + group),
                                                   tl.load(weight_ptr + group), eps, features, GROUP_SIZE,
                                                   GROUP_PAD, KERNEL, ESTIMATOR)
    tl.store(loss_ptr + group, loss.to(ACC))
    out = coefficients_ptr + group * (COEFFICIENT_BLOCKS * square) + offsets
    tl.store(out, p_t.to(ACC))
    tl.store(out + square, q_t.to(ACC))
    tl.store(out + 2 * square, p_r.to(ACC))
    tl.store(out + 3 * square, q_r.to(ACC))


@triton.jit
def _mmd_gradient_kernel(y_t_ptr, y_r_ptr, stride_t, stride_r, features, chunk, coefficients_ptr, grad_t_ptr,
                         grad_r_ptr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, WRITE_T: tl.constexpr,
                         WRITE_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Pass 2 of one feature chunk of one group (grid: G x chunks)."""
    group = tl.program_id(0)
    start = tl.program_id(1) * chunk
    square = GROUP_PAD * GROUP_PAD
    coefficients = coefficients_ptr + group * (COEFFICIENT_BLOCKS * square) + _square_offsets(GROUP_PAD)
    _write_gradients(y_t_ptr, y_r_ptr, stride_t, stride_r, grad_t_ptr, grad_r_ptr, tl.load(coefficients),
                     tl.load(coefficients + square), tl.load(coefficients + 2 * square),
                     tl.load(coefficients + 3 * square), group, start, tl.minimum(start + chunk, features), features,
                     GROUP_SIZE, GROUP_PAD, WRITE_T, WRITE_R, BLOCK_D, ACC)


def block_features(group_pad: int, features: int, acc: torch.dtype, device: torch.device) -> int:
    """Features per tile: on GPUs a (M, M, BLOCK_D) pair tile of _TILE_BYTES; in the interpreter (CPU
    tensors), which has no registers to budget but a cost per operation, as wide as allowed. Never wider
    than D needs."""
    widest = min(triton.next_power_of_2(features), _MAX_BLOCK_D)
    if device.type != "cuda":
        return widest
    return max(1, min(widest, _TILE_BYTES // (group_pad * group_pad * acc.itemsize)))


def feature_chunk(groups: int, features: int, block_d: int) -> int:
    """Features per program: all of D when there are enough groups to fill the GPU, else D split into chunks
    (multiples of the tile, at least _MIN_CHUNK) so that about _TARGET_PROGRAMS programs run."""
    wanted = max(_MIN_CHUNK, triton.cdiv(features, triton.cdiv(_TARGET_PROGRAMS, groups)))
    return min(features, triton.cdiv(wanted, block_d) * block_d)


@_dispatch.register("mmd", "triton")
def mmd_fused(y_t, y_r, bandwidth, weight, group_size, kernel, estimator, eps, grad_t, grad_r):
    loss, out_t, out_r = mmd_outputs(y_t, group_size, grad_t, grad_r)
    groups, features = loss.shape[0], y_t.shape[1]
    acc = loss.dtype
    group_pad = triton.next_power_of_2(group_size)
    block_d = block_features(group_pad, features, acc, y_t.device)
    chunk = feature_chunk(groups, features, block_d)
    chunks = triton.cdiv(features, chunk)
    shape = dict(GROUP_SIZE=group_size, GROUP_PAD=group_pad, ACC=tl.float64 if acc == torch.float64 else tl.float32)
    rows = (y_t, y_r, y_t.stride(0), y_r.stride(0))
    with torch.cuda.device_of(y_t):  # Triton launches on the current device
        if chunks == 1:
            _mmd_group_kernel[(groups,)](*rows, bandwidth, weight, eps, features, loss, out_t, out_r, KERNEL=kernel,
                                         ESTIMATOR=estimator, WRITE_T=grad_t, WRITE_R=grad_r, BLOCK_D=block_d,
                                         **shape)
            return loss, out_t, out_r
        square = group_pad * group_pad
        sums = torch.empty((groups, chunks, PAIR_SUMS.value, square), dtype=acc, device=y_t.device)
        coefficients = torch.empty((groups, COEFFICIENT_BLOCKS.value, square), dtype=acc, device=y_t.device)
        _mmd_partial_sums_kernel[(groups, chunks)](*rows, features, chunk, sums, BLOCK_D=block_d, **shape)
        _mmd_finalize_kernel[(groups,)](sums, chunks, bandwidth, weight, eps, features, loss, coefficients,
                                        KERNEL=kernel, ESTIMATOR=estimator, **shape)
        if grad_t or grad_r:
            _mmd_gradient_kernel[(groups, chunks)](*rows, features, chunk, coefficients, out_t, out_r,
                                                   WRITE_T=grad_t, WRITE_R=grad_r, BLOCK_D=block_d, **shape)
    return loss, out_t, out_r

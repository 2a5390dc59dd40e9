"""The oracle: plain PyTorch versions of every op (docs/math.md), in the dtype they are given (pass float64 for the
ground truth), with pairwise distances from direct differences and gradients from autograd.
Memory is O(G (2M)^2 D): fine for checking, not for training at scale."""

from __future__ import annotations

import torch

from . import _validate
# The IMM schedule math is plain tensor code already: the reference serves it as it is.
from .imm import kernel_bandwidth, output_coefficients, r_from_st, sample_times, time_weight
from .schedules import alpha, sigma

__all__ = ["mmd_loss", "interpolate", "interpolate_pair", "ddim", "imm_output", "kernel_matrix", "output_coefficients",
           "kernel_bandwidth", "time_weight", "r_from_st", "sample_times"]


def _distance(sq: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (not NaN) at 0; NaN stays NaN."""
    live = ~(sq <= 0)
    return torch.where(live, torch.sqrt(torch.where(live, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def kernel_matrix(kernel: str, sq: torch.Tensor, bandwidth: torch.Tensor, features: int, eps: float):
    """k(d) for squared distances sq (..., N, N) and a bandwidth broadcastable to it."""
    if kernel == "rbf":
        return torch.exp(-bandwidth * sq / features)
    d = _distance(sq)
    if kernel == "laplace":
        # Flat at and below eps, gradient included at d == eps (where clamp would pass it), as in the native backends;
        # a NaN distance stays NaN.
        return torch.exp(-bandwidth * torch.where(d <= eps, eps, d) / features)
    return -d + 0 * bandwidth  # no bandwidth in -d: a bandwidth that requires grad gets a zero gradient, not None


def mmd_loss(y_t, y_r, group_size, *, kernel="laplace", bandwidth=1.0, weight=None, estimator="v", eps=1e-8,
             reduction="mean"):
    """Grouped MMD of docs/math.md section 4; same arguments and semantics as imm_kernels.mmd_loss."""
    y_t, y_r = _validate.matching_dtypes("y_t", y_t, "y_r", y_r)
    g, bw, bw_value, w, w_value, eps = _validate.mmd_options(y_t, y_r, group_size, kernel, bandwidth, weight,
                                                             estimator, eps, reduction)
    _validate.positive_values("bandwidth", bw, "group")
    m = group_size
    t = y_t.reshape(g, m, -1)
    r = y_r.reshape(g, m, -1)
    features = t.shape[-1]
    particles = torch.cat([t, r], dim=1)  # (G, 2M, D)
    diff = particles[:, :, None, :] - particles[:, None, :, :]
    sq = diff.square().sum(-1)  # (G, 2M, 2M)
    k = kernel_matrix(kernel, sq, _per_group(bw, bw_value, g, t).view(g, 1, 1), features, eps)

    self_w = torch.full((m, m), 1.0 / (m * m), dtype=t.dtype, device=t.device)
    cross_w = torch.full((m, m), -1.0 / (m * m), dtype=t.dtype, device=t.device)
    if estimator != "v":  # u and unpaired: no self pair i = j
        self_w.fill_(1.0 / (m * (m - 1))).fill_diagonal_(0.0)
    if estimator == "unpaired":  # nor a cross pair of partners (y_t^i, y_r^i)
        cross_w.fill_(-1.0 / (m * (m - 1))).fill_diagonal_(0.0)
    pair_w = torch.cat([torch.cat([self_w, cross_w], 1), torch.cat([cross_w, self_w], 1)], 0)
    per_group = _per_group(w, w_value, g, t) * (k * pair_w).sum((-2, -1))
    if reduction == "mean":
        return per_group.mean()
    return per_group.sum() if reduction == "sum" else per_group


def _per_group(tensor, value, groups: int, like: torch.Tensor, dtype: torch.dtype | None = None):
    """A checked bandwidth or weight (tensor or value) as (G,) on like's device, in `dtype` (default like's)."""
    dtype = like.dtype if dtype is None else dtype
    if tensor is None:
        return torch.full((groups,), value, dtype=dtype, device=like.device)
    return tensor.to(dtype).reshape(-1).expand(groups)


def _per_sample(name: str, time, x: torch.Tensor) -> torch.Tensor:
    """A float or per-sample times, checked and shaped to broadcast over x's features, in x's dtype."""
    tensor, value = _validate.time_operand(name, time, x.shape[0], x.device)
    _validate.time_values(name, tensor)
    if tensor is None:
        tensor = torch.full((x.shape[0],), value, dtype=x.dtype, device=x.device)
    return tensor.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def interpolate(x, noise, t, *, schedule="fm"):
    """x_t = alpha_t x + sigma_t noise."""
    t = _per_sample("t", t, x)
    return alpha(t, schedule) * x + sigma(t, schedule) * noise


def interpolate_pair(x, noise, t, r, *, schedule="fm"):
    """(x_t, x_r) from the same x and noise."""
    return interpolate(x, noise, t, schedule=schedule), interpolate(x, noise, r, schedule=schedule)


def imm_output(x_t, g, s, t, *, schedule="fm", param="simple_edm", sigma_data=0.5):
    """f_{s,t}(x_t) = c_skip(s, t) x_t + c_out(s, t) g."""
    s, t = _per_sample("s", s, x_t), _per_sample("t", t, x_t)
    _validate.ordered_values("s", s, "t", t)
    c_skip, c_out = output_coefficients(s, t, schedule=schedule, param=param, sigma_data=sigma_data)
    return c_skip * x_t + c_out * g


def ddim(x_t, x_hat, s, t, *, schedule="fm"):
    """DDIM(x_t, x_hat, s, t) = (alpha_s - sigma_s alpha_t / sigma_t) x_hat + (sigma_s / sigma_t) x_t."""
    return imm_output(x_t, x_hat, s, t, schedule=schedule, param="identity")

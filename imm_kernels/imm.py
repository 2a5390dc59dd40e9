"""IMM training quantities (docs/math.md sections 3-4) as plain tensor math: the output coefficients, the
kernel bandwidth, the time weight, the r(s, t) mapping and the time sampler."""

from __future__ import annotations

import math

import torch

from . import _validate
from .schedules import DEFAULT_T, SCHEDULES, alpha, eta, eta_inv, sigma

PARAMS = ("simple_edm", "euler_fm", "identity")
R_SPACINGS = ("eta", "angle")  # r_from_st: equal steps in eta (the paper's) or in its angle atan(eta)


def _pair(s, t) -> tuple[torch.Tensor, torch.Tensor]:
    s = s if isinstance(s, torch.Tensor) else torch.tensor(float(s), dtype=torch.float64)
    t = t if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=torch.float64)
    return torch.broadcast_tensors(s, t)


def output_coefficients(s, t, *, schedule: str = "fm", param: str = "simple_edm", sigma_data: float = 0.5):
    """(c_skip, c_out) of f_{s,t}(x_t) = c_skip x_t + c_out G (the identity param is DDIM(x_t, G, s, t))."""
    _validate.imm_output_options(schedule, param, sigma_data)
    s, t = _pair(s, t)
    a_s, s_s, a_t, s_t = alpha(s, schedule), sigma(s, schedule), alpha(t, schedule), sigma(t, schedule)
    if param == "euler_fm":
        return torch.ones_like(t), -(t - s) * sigma_data
    if param == "identity":  # from t = 0 only s = 0 is allowed: the identity map
        at_zero = s_t == 0
        safe = torch.where(at_zero, torch.ones_like(s_t), s_t)
        c_skip = torch.where(at_zero, torch.ones_like(t), s_s / safe)
        c_out = torch.where(at_zero, torch.zeros_like(t), a_s - s_s * a_t / safe)
        return c_skip, c_out
    norm2 = a_t**2 + s_t**2
    return (a_t * a_s + s_t * s_s) / norm2, -sigma_data * (a_s * s_t - a_t * s_s) / torch.sqrt(norm2)


def c_in(t, *, schedule: str = "fm", sigma_data: float = 0.5) -> torch.Tensor:
    """The network's input scale 1 / (sigma_d sqrt(alpha_t^2 + sigma_t^2))."""
    return 1 / (sigma_data * torch.sqrt(alpha(t, schedule) ** 2 + sigma(t, schedule) ** 2))


def kernel_bandwidth(s, t, *, schedule: str = "fm", param: str = "simple_edm", sigma_data: float = 0.5):
    """The kernel weight wt(s, t) = 1 / |c_out(s, t)| (infinite at s = t)."""
    return 1 / output_coefficients(s, t, schedule=schedule, param=param, sigma_data=sigma_data)[1].abs()


def time_weight(t, *, a: float = 1.0, b: float = 5.0, schedule: str = "fm") -> torch.Tensor:
    """w(s, t) of paper Eq. 13 (it depends on t only), written so it is finite on all of [0, 1]."""
    _validate.choice("schedule", schedule, SCHEDULES)
    t = t if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=torch.float64)
    e_b = math.exp(-b)
    if schedule == "fm":
        return t * (1 - t) ** (a - 1) / ((t**2 + e_b * (1 - t) ** 2) * ((1 - t) ** 2 + t**2))
    sin, cos = torch.sin(t * (math.pi / 2)), torch.cos(t * (math.pi / 2))
    return (math.pi / 2) * sin * cos ** (a - 1) / (sin**2 + e_b * cos**2)


def r_from_st(s, t, *, k: float = 12, schedule: str = "fm", T: float | None = None, eps_t: float = 0.0,
              delta: float | None = None, r_spacing: str = "eta") -> torch.Tensor:
    """r = max(s, eta^-1(eta_t - (eta(T) - eta(eps_t)) / 2^k)), the paper's (r_spacing "eta"); with r_spacing
    "angle" the step is (atan eta(T) - atan eta(eps_t)) / 2^k in atan(eta), the angle of (alpha_t, sigma_t): as
    many steps, short near the data where eta's are long. With delta (fp16 training), r <= t - delta."""
    _validate.choice("schedule", schedule, SCHEDULES)
    _validate.choice("r_spacing", r_spacing, R_SPACINGS)
    T = DEFAULT_T[schedule] if T is None else T
    _validate.time_range(T, eps_t)
    s, t = _pair(s, t)
    to_step, from_step = (torch.atan, torch.tan) if r_spacing == "angle" else (lambda x: x, lambda x: x)
    step_min = to_step(eta(eps_t, schedule).to(t.dtype))
    step = (to_step(eta(T, schedule).to(t.dtype)) - step_min) / 2.0**k
    # A large step (small k) can pass below eta(eps_t), where eta_inv leaves [0, 1] (fm: eta <= -1 gives r > 1).
    r = eta_inv(from_step(torch.clamp(to_step(eta(t, schedule)) - step, min=step_min)), schedule)
    # r <= t - delta (the spec's fp16 form); delta = 0 still catches eta_inv(eta(t)) rounding above t.
    return torch.maximum(s, torch.minimum(r, t - (0.0 if delta is None else delta)))


def sample_times(num_groups: int, *, schedule: str = "fm", k: float = 12, T: float | None = None,
                 eps_t: float = 0.0, delta: float | None = None, r_spacing: str = "eta",
                 generator: torch.Generator | None = None, device=None, dtype: torch.dtype = torch.float32):
    """(s, r, t) per group: t ~ U(eps_t, T), s ~ U(eps_t, t), r = r_from_st(s, t)."""
    _validate.positive_int("num_groups", num_groups)
    _validate.choice("schedule", schedule, SCHEDULES)
    T = DEFAULT_T[schedule] if T is None else T
    _validate.time_range(T, eps_t)
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.rand(2, num_groups, generator=generator, dtype=torch.float64, device=gen_device)
    t = eps_t + (T - eps_t) * u[0]
    s = eps_t + (t - eps_t) * u[1]
    r = r_from_st(s, t, k=k, schedule=schedule, T=T, eps_t=eps_t, delta=delta, r_spacing=r_spacing)
    return tuple(x.to(device=device, dtype=dtype) for x in (s, r, t))

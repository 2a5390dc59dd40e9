"""The IMM schedule math (docs/math.md sections 1-4) against closed forms written out independently here."""

import math

import pytest
import torch

from imm_kernels import imm, schedules

T = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)


def test_schedules_closed_forms():
    inner = T[1:-1]
    assert torch.allclose(schedules.alpha(inner, "fm"), 1 - inner)
    assert torch.allclose(schedules.sigma(inner, "cosine"), torch.sin(math.pi * inner / 2))
    for name in schedules.SCHEDULES:
        eta = schedules.eta(inner, name)
        assert torch.allclose(eta, schedules.sigma(inner, name) / schedules.alpha(inner, name))
        assert torch.allclose(schedules.eta_inv(eta, name), inner)
        assert torch.allclose(schedules.logsnr(inner, name), 2 * torch.log(1 / eta))


@pytest.mark.parametrize("schedule", ["fm", "cosine"])
@pytest.mark.parametrize("a,b", [(1, 5), (2, 4), (1, 4)])
def test_time_weight_is_eq13_and_finite(schedule, a, b):
    w = imm.time_weight(T, a=a, b=b, schedule=schedule)
    assert torch.isfinite(w).all() and (w >= 0).all()
    inner = T[1:-1]  # the textbook form, where it has no 0 * inf
    lam = schedules.logsnr(inner, schedule)
    h = 1e-6
    dlam = (schedules.logsnr(inner + h, schedule) - schedules.logsnr(inner - h, schedule)) / (2 * h)
    al, sg = schedules.alpha(inner, schedule), schedules.sigma(inner, schedule)
    textbook = 0.5 * torch.sigmoid(b - lam) * (-dlam) * al**a / (al**2 + sg**2)
    assert torch.allclose(w[1:-1], textbook, rtol=1e-6)


def test_output_coefficients_match_spec_table():
    s, t = torch.tensor([0.1, 0.3]), torch.tensor([0.6, 0.9])
    c_skip, c_out = imm.output_coefficients(s, t, schedule="fm", param="simple_edm", sigma_data=0.5)
    n2 = (1 - t) ** 2 + t**2
    assert torch.allclose(c_skip, ((1 - t) * (1 - s) + t * s) / n2)
    assert torch.allclose(c_out, -0.5 * (t - s) / n2.sqrt())
    c_skip, c_out = imm.output_coefficients(s, t, schedule="fm", param="euler_fm", sigma_data=0.5)
    assert torch.equal(c_skip, torch.ones(2)) and torch.allclose(c_out, -(t - s) * 0.5)
    c_skip, c_out = imm.output_coefficients(s, t, schedule="fm", param="identity")
    assert torch.allclose(c_skip, s / t) and torch.allclose(c_out, (1 - s) - s * (1 - t) / t)


def test_kernel_bandwidth_spec_forms():
    s, t = torch.tensor([0.1, 0.3]), torch.tensor([0.6, 0.9])
    wt = imm.kernel_bandwidth(s, t, schedule="fm", param="simple_edm", sigma_data=0.5)
    assert torch.allclose(wt, ((1 - t) ** 2 + t**2).sqrt() / (0.5 * (t - s)))
    wt = imm.kernel_bandwidth(s, t, schedule="fm", param="euler_fm", sigma_data=0.5)
    assert torch.allclose(wt, 1 / ((t - s) * 0.5))


@pytest.mark.parametrize("schedule", ["fm", "cosine"])
def test_r_from_st(schedule):
    t = torch.tensor([0.2, 0.5, 0.9, 0.994], dtype=torch.float64)
    s = torch.tensor([0.0, 0.1, 0.89999, 0.5], dtype=torch.float64)
    k, T_max = 10, schedules.DEFAULT_T[schedule]
    r = imm.r_from_st(s, t, k=k, schedule=schedule)
    step = (schedules.eta(T_max, schedule) - schedules.eta(0.0, schedule)) / 2**k
    expected = torch.maximum(s, schedules.eta_inv(schedules.eta(t, schedule) - step, schedule))
    assert torch.allclose(r, expected)
    assert (s <= r).all() and (r <= t).all() and r[2] == s[2]  # the clamp to s where the step overshoots
    r_fp16 = imm.r_from_st(s, t, k=30, schedule=schedule, delta=1e-3)
    assert (r_fp16 <= torch.maximum(s, t - 1e-3)).all()


@pytest.mark.parametrize("schedule", ["fm", "cosine"])
def test_r_from_st_angle_spacing(schedule):
    """r_spacing="angle": equal steps in atan(eta) between eps_t and T, clamped at eps_t and at s."""
    eps_t, k, T_max = 0.006, 6, schedules.DEFAULT_T[schedule]
    t = torch.tensor([0.01, 0.2, 0.5, 0.9, 0.994], dtype=torch.float64)
    s = torch.tensor([0.0, 0.006, 0.1, 0.89, 0.3], dtype=torch.float64)
    r = imm.r_from_st(s, t, k=k, schedule=schedule, eps_t=eps_t, r_spacing="angle")
    angle_min = math.atan(schedules.eta(eps_t, schedule))
    step = (math.atan(schedules.eta(T_max, schedule)) - angle_min) / 2**k
    angle_r = (torch.atan(schedules.eta(t, schedule)) - step).clamp(min=angle_min)
    expected = torch.maximum(s, schedules.eta_inv(torch.tan(angle_r), schedule))
    assert torch.allclose(r, expected, rtol=1e-12, atol=0)
    assert math.isclose(r[0], eps_t, rel_tol=1e-12) and r[3] == s[3]  # the clamps at eps_t and at s
    assert (s[1:3] < r[1:3]).all()
    if schedule == "cosine":  # atan(tan(pi t / 2)) = pi t / 2: equal steps in t
        assert torch.allclose(t[4] - r[4], torch.tensor((T_max - eps_t) / 2**k, dtype=torch.float64))
    eta_step = imm.r_from_st(s, t, k=k, schedule=schedule, eps_t=eps_t)
    assert (r[1:3] != eta_step[1:3]).all()  # the two spacings differ


@pytest.mark.parametrize("r_spacing", imm.R_SPACINGS)
@pytest.mark.parametrize("schedule", ["fm", "cosine"])
@pytest.mark.parametrize("k", [0, 1, 3, 7, 12])
def test_r_stays_between_s_and_t_for_any_k(schedule, k, r_spacing):
    """Small k makes the eta step larger than eta(t): r must still land in [s, t], never outside [0, 1]."""
    eps_t = 0.006 if schedule == "fm" else 0.0
    t = torch.linspace(eps_t, schedules.DEFAULT_T[schedule], 50, dtype=torch.float64)
    s = eps_t + (t - eps_t) * 0.3
    r = imm.r_from_st(s, t, k=k, schedule=schedule, eps_t=eps_t, r_spacing=r_spacing)
    assert (s <= r).all() and (r <= t).all()


def test_sample_times():
    g = torch.Generator().manual_seed(0)
    s, r, t = imm.sample_times(4096, schedule="fm", k=12, eps_t=0.006, generator=g)
    assert s.dtype == torch.float32 and s.shape == (4096,)
    assert (0.006 <= s).all() and (s <= r).all() and (r <= t).all() and (t <= 0.994).all()
    assert abs(t.mean().item() - (0.006 + 0.994) / 2) < 0.02
    s2, _, _ = imm.sample_times(4096, schedule="fm", k=12, eps_t=0.006, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, s2)


@pytest.mark.parametrize("call,error,match", [
    (lambda: imm.time_weight(0.5, schedule="ve"), ValueError, "schedule must be one of"),
    (lambda: imm.sample_times(0), ValueError, "num_groups must be >= 1"),
    (lambda: imm.sample_times(4, T=0.5, eps_t=0.6), ValueError, "0 <= eps_t < T <= 1"),
    (lambda: imm.kernel_bandwidth(0.1, 0.5, param="euler_fm", schedule="cosine"), ValueError, "euler_fm"),
    (lambda: imm.r_from_st(0.1, 0.5, T=2.0), ValueError, "0 <= eps_t < T <= 1"),
    (lambda: imm.sample_times(4, r_spacing="t"), ValueError, "r_spacing must be one of 'eta', 'angle'; got 't'"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def uniform_ks(u: torch.Tensor) -> float:
    """The Kolmogorov-Smirnov distance of the sample u from U(0, 1)."""
    u, n = u.sort().values, u.numel()
    above = torch.arange(1, n + 1, dtype=u.dtype) / n - u
    below = u - torch.arange(0, n, dtype=u.dtype) / n
    return max(above.max().item(), below.max().item())


@pytest.mark.parametrize("schedule,eps_t,T", [("fm", 0.006, None), ("cosine", 0.0, 0.9)])
def test_sample_times_distribution(schedule, eps_t, T):
    """t ~ U(eps_t, T) and, given t, s ~ U(eps_t, t): (t - eps_t) / (T - eps_t) is uniform, and so is
    (s - eps_t) / (t - eps_t) within every quarter of t's range. Kolmogorov-Smirnov at p = 0.001 (1.95 / sqrt(n)),
    on a fixed seed."""
    T_max = schedules.DEFAULT_T[schedule] if T is None else T
    s, _, t = imm.sample_times(200_000, schedule=schedule, eps_t=eps_t, T=T, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(3))
    u_t = (t - eps_t) / (T_max - eps_t)
    u_s = (s - eps_t) / (t - eps_t)
    assert uniform_ks(u_t) < 1.95 / math.sqrt(u_t.numel())
    for quarter in range(4):
        given_t = u_s[(u_t >= quarter / 4) & (u_t < (quarter + 1) / 4)]
        assert uniform_ks(given_t) < 1.95 / math.sqrt(given_t.numel()), f"s given t in quarter {quarter}"

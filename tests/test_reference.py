"""The oracle (imm_kernels/reference.py) against formulations of its own math written independently here: explicit
Python loops over the pairs (plain floats, the textbook gradient), torch.cdist distances, hand-computed two-point
cases with closed forms for every kernel and estimator, and the interpolant and IMM-output maps at times where
their coefficients are known numbers. Everything else in the suite trusts the oracle; this file checks it."""

import math

import pytest
import torch

from imm_kernels import reference

KERNELS = ["laplace", "rbf", "energy"]


def kernel_and_psi(kernel: str, d: float, c: float, eps: float) -> tuple[float, float]:
    """k(d) and psi(d) = k'(d) / d of docs/math.md section 4 (psi is 0 at and below the Laplace floor, and at
    d = 0 for the energy kernel)."""
    if kernel == "laplace":
        return math.exp(-c * max(d, eps)), (-c * math.exp(-c * d) / d if d > eps else 0.0)
    if kernel == "rbf":
        return math.exp(-c * d * d), -2 * c * math.exp(-c * d * d)
    return -d, (-1 / d if d > 0 else 0.0)


def loop_mmd(y_t, y_r, group_size, kernel, bandwidth, weight, estimator, eps, upstream):
    """Per-group losses and the gradients of sum_g upstream[g] * loss_g, one pair at a time in Python floats:
    loss_g = w [sum_ij s_ij (k(t_i, t_j) + k(r_i, r_j)) - 2 / M^2 sum_ij k(t_i, r_j)], and
    d loss_g / d X_i = 2 w [sum_j s_ij psi(|X_i - X_j|) (X_i - X_j) - 1 / M^2 sum_j psi(|X_i - Y_j|) (X_i - Y_j)]."""
    t, r = y_t.reshape(y_t.shape[0], -1).tolist(), y_r.reshape(y_r.shape[0], -1).tolist()
    m, features = group_size, len(t[0])
    grads = {"t": [[0.0] * features for _ in t], "r": [[0.0] * features for _ in r]}
    losses = []
    for g in range(len(t) // m):
        c = bandwidth[g] / features
        rows = {"t": t[g * m:(g + 1) * m], "r": r[g * m:(g + 1) * m]}
        loss = 0.0
        for side, other in (("t", "r"), ("r", "t")):
            for i, x_i in enumerate(rows[side]):
                for j in range(m):
                    if estimator == "v":
                        self_w = 1 / m**2
                    else:
                        self_w = 0.0 if i == j else 1 / (m * (m - 1))
                    cross_w = -self_w if estimator == "unpaired" else -1 / m**2
                    for partner, w_pair in ((rows[side][j], self_w), (rows[other][j], cross_w)):
                        diff = [a - b for a, b in zip(x_i, partner)]
                        d = math.sqrt(sum(v * v for v in diff))
                        k, psi = kernel_and_psi(kernel, d, c, eps)
                        loss += w_pair * k
                        scale = 2 * weight[g] * upstream[g] * w_pair * psi
                        row = grads[side][g * m + i]
                        for f, v in enumerate(diff):
                            row[f] += scale * v
        losses.append(weight[g] * loss)
    grad_t, grad_r = (torch.tensor(grads[side], dtype=torch.float64).reshape(y_t.shape) for side in ("t", "r"))
    return torch.tensor(losses, dtype=torch.float64), grad_t, grad_r


def reference_loss_and_grads(y_t, y_r, group_size, upstream, **options):
    a, b = (y.detach().clone().requires_grad_() for y in (y_t, y_r))
    loss = reference.mmd_loss(a, b, group_size, reduction="none", **options)
    (loss * upstream).sum().backward()
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ["v", "u", "unpaired"])
@pytest.mark.parametrize("group_size,features", [(2, 1), (3, 4), (5, 3)])
@pytest.mark.parametrize("eps", [0.0, 0.7])
def test_reference_matches_loops_over_pairs(kernel, estimator, group_size, features, eps):
    """Values and gradients; eps = 0.7 puts some distances below the Laplace floor (features of scale 0.3)."""
    groups = 3
    y_t = torch.randn(groups * group_size, features, dtype=torch.float64) * 0.3
    y_r = torch.randn_like(y_t) * 0.3
    y_t[1] = y_t[0] + 1e-3  # one close pair: below the floor, and a near duplicate for the others
    bandwidth = (torch.rand(groups, dtype=torch.float64) * 3 + 0.5).tolist()
    weight = torch.randn(groups, dtype=torch.float64).tolist()
    upstream = torch.randn(groups, dtype=torch.float64)
    want = loop_mmd(y_t, y_r, group_size, kernel, bandwidth, weight, estimator, eps, upstream.tolist())
    got = reference_loss_and_grads(y_t, y_r, group_size, upstream, kernel=kernel, estimator=estimator, eps=eps,
                                   bandwidth=torch.tensor(bandwidth, dtype=torch.float64),
                                   weight=torch.tensor(weight, dtype=torch.float64))
    for name, g, w in zip(("loss", "grad_t", "grad_r"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")


def cdist_mmd(y_t, y_r, group_size, kernel, bandwidth, estimator, eps):
    """Per-group losses from torch.cdist's distances (computed directly, not through |x|^2 + |y|^2 - 2xy)."""
    groups, m = y_t.shape[0] // group_size, group_size
    t, r = y_t.reshape(groups, m, -1), y_r.reshape(groups, m, -1)
    c = bandwidth.view(groups, 1, 1) / t.shape[-1]

    def k(a, b):
        d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
        if kernel == "laplace":
            return torch.exp(-c * d.clamp(min=eps))
        return torch.exp(-c * d * d) if kernel == "rbf" else -d

    def self_sum(kxx):
        if estimator == "v":
            return kxx.sum((1, 2)) / m**2
        return (kxx.sum((1, 2)) - kxx.diagonal(dim1=1, dim2=2).sum(1)) / (m * (m - 1))

    cross = self_sum(k(t, r)) if estimator == "unpaired" else k(t, r).sum((1, 2)) / m**2
    return self_sum(k(t, t)) + self_sum(k(r, r)) - 2 * cross


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("estimator", ["v", "u", "unpaired"])
@pytest.mark.parametrize("group_size,features", [(4, 3072), (16, 257), (8, 7)])
def test_reference_matches_cdist_formulation(kernel, estimator, group_size, features):
    groups = 3
    y_t = torch.randn(groups * group_size, features, dtype=torch.float64)
    y_r = torch.randn_like(y_t)
    bandwidth = torch.rand(groups, dtype=torch.float64) * 4 + 0.1
    weight = torch.randn(groups, dtype=torch.float64)
    want = weight * cdist_mmd(y_t, y_r, group_size, kernel, bandwidth, estimator, 1e-8)
    got = reference.mmd_loss(y_t, y_r, group_size, kernel=kernel, estimator=estimator, bandwidth=bandwidth,
                             weight=weight, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert reference.mmd_loss(y_t, y_r, group_size, kernel=kernel, estimator=estimator, bandwidth=bandwidth,
                              weight=weight).item() == pytest.approx(want.mean().item(), rel=1e-12)
    assert reference.mmd_loss(y_t, y_r, group_size, kernel=kernel, estimator=estimator, bandwidth=bandwidth,
                              weight=weight, reduction="sum").item() == pytest.approx(want.sum().item(), rel=1e-12)


# One point per side, t = (0, 0) and r = (3, 4) (d = 5, D = 2), the bandwidth chosen so that c d = 1 (laplace) or
# c d^2 = 1 (rbf): V-statistic loss k(0) + k(0) - 2 k(5) and its gradient in t (the one in r is its negative).
TWO_POINTS = {
    "laplace": (0.4, 2 - 2 / math.e, [2 * 0.2 / math.e * v for v in (-0.6, -0.8)]),  # c = 0.2
    "rbf": (0.08, 2 - 2 / math.e, [4 * 0.04 / math.e * v for v in (-3.0, -4.0)]),  # c = 0.04
    "energy": (1.0, 10.0, [2 * v for v in (-0.6, -0.8)]),  # loss 2 d, gradient 2 (t - r) / d
}


@pytest.mark.parametrize("kernel", KERNELS)
def test_two_points_closed_form(kernel):
    bandwidth, loss, grad_t = TWO_POINTS[kernel]
    t = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    value = reference.mmd_loss(t, r, 1, kernel=kernel, bandwidth=bandwidth, eps=0.0)
    value.backward()
    assert value.item() == pytest.approx(loss, rel=1e-14)
    torch.testing.assert_close(t.grad, torch.tensor([grad_t], dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(r.grad, -t.grad, rtol=1e-14, atol=0)


# Two points per side on a line, t = (0, 1) and r = (0, 2) (D = 1): with c = ln 2 the laplace kernel is 2^-d and
# the rbf kernel 2^-d^2. Worked by hand: self sums over (t1, t2) and (r1, r2), cross sum over the four (t_i, r_j)
# at distances 0, 2, 1, 1; V weighs every pair 1/4, U the two off-diagonal self pairs 1/2 each.
TWO_PAIRS = {("laplace", "v"): 0.25, ("laplace", "u"): -0.375, ("rbf", "v"): 0.25, ("rbf", "u"): -0.46875,
             ("energy", "v"): 0.5, ("energy", "u"): -1.0}
# unpaired: k(t1, t2) + k(r1, r2) - k(t1, r2) - k(t2, r1), the distances 1, 2, 2, 1 cancel for every kernel.
TWO_PAIRS.update({(kernel, "unpaired"): 0.0 for kernel in ("laplace", "rbf", "energy")})


@pytest.mark.parametrize("kernel,estimator", list(TWO_PAIRS))
def test_two_pairs_closed_form_with_weights_and_reductions(kernel, estimator):
    t = torch.tensor([[0.0], [1.0]] * 2, dtype=torch.float64)  # two groups of the same pairs
    r = torch.tensor([[0.0], [2.0]] * 2, dtype=torch.float64)
    options = dict(kernel=kernel, estimator=estimator, bandwidth=math.log(2), eps=0.0,
                   weight=torch.tensor([2.0, -0.5], dtype=torch.float64))
    mmd = TWO_PAIRS[(kernel, estimator)]
    per_group = reference.mmd_loss(t, r, 2, reduction="none", **options)
    torch.testing.assert_close(per_group, torch.tensor([2 * mmd, -0.5 * mmd], dtype=torch.float64), rtol=1e-14,
                               atol=1e-15)
    assert reference.mmd_loss(t, r, 2, reduction="sum", **options).item() == pytest.approx(1.5 * mmd, rel=1e-14)
    assert reference.mmd_loss(t, r, 2, **options).item() == pytest.approx(0.75 * mmd, rel=1e-14)


@pytest.mark.parametrize("eps,loss,grad_t", [(0.5, 0.0, 0.0),  # |t - r| = 0.25 below the floor: all k = e^-0.5
                                             (0.1, 2 * math.exp(-0.1) - 2 * math.exp(-0.25), -2 * math.exp(-0.25))])
def test_laplace_floor_closed_form(eps, loss, grad_t):
    """k = exp(-c max(d, eps)): below the floor a pair's kernel is constant and its gradient 0."""
    t = torch.tensor([[0.0]], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([[0.25]], dtype=torch.float64, requires_grad=True)
    value = reference.mmd_loss(t, r, 1, kernel="laplace", bandwidth=1.0, eps=eps)
    value.backward()
    assert value.item() == pytest.approx(loss, abs=1e-15)
    assert t.grad.item() == pytest.approx(grad_t, abs=1e-15)
    assert r.grad.item() == pytest.approx(-grad_t, abs=1e-15)


def test_laplace_gradient_is_zero_at_the_floor():
    t = torch.tensor([[0.0]], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([[0.25]], dtype=torch.float64, requires_grad=True)
    reference.mmd_loss(t, r, 1, kernel="laplace", bandwidth=1.0, eps=0.25).backward()
    assert t.grad.item() == 0.0 and r.grad.item() == 0.0


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("eps", [0.0, 1.0])
def test_nan_input_gives_nan(kernel, eps):
    """A NaN element makes its group's loss NaN, whatever the floor (no comparison may turn it into a number)."""
    t = torch.tensor([[float("nan")], [0.5]], dtype=torch.float64)
    r = torch.tensor([[1e-20], [0.25]], dtype=torch.float64)
    loss = reference.mmd_loss(t, r, 1, kernel=kernel, bandwidth=1e-30, eps=eps, reduction="none")
    assert loss[0].isnan() and loss[1].isfinite()


HALF_SQRT2 = math.sqrt(0.5)
# (schedule, t): (alpha_t, sigma_t) known exactly.
ALPHA_SIGMA = {("fm", 0.25): (0.75, 0.25), ("fm", 1.0): (0.0, 1.0), ("cosine", 0.5): (HALF_SQRT2, HALF_SQRT2),
               ("cosine", 1.0): (0.0, 1.0), ("cosine", 0.0): (1.0, 0.0)}


@pytest.mark.parametrize("schedule,t", list(ALPHA_SIGMA))
def test_interpolate_closed_form(schedule, t):
    x, noise = torch.tensor([[2.0, -1.0]], dtype=torch.float64), torch.tensor([[0.5, 3.0]], dtype=torch.float64)
    alpha, sigma = ALPHA_SIGMA[(schedule, t)]
    torch.testing.assert_close(reference.interpolate(x, noise, t, schedule=schedule), alpha * x + sigma * noise,
                               rtol=1e-15, atol=1e-15)
    x_t, x_r = reference.interpolate_pair(x, noise, t, 0.0, schedule=schedule)
    torch.testing.assert_close(x_t, alpha * x + sigma * noise, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(x_r, x, rtol=0, atol=0)


# (schedule, param, s, t): (c_skip, c_out) worked by hand from docs/math.md section 3 with sigma_d = 0.5:
# simple_edm c_skip = (a_t a_s + s_t s_s) / (a_t^2 + s_t^2), c_out = -sigma_d (a_s s_t - a_t s_s) / sqrt(a_t^2 + s_t^2);
# euler_fm (1, -(t - s) sigma_d); identity (DDIM) s_s / s_t and a_s - s_s a_t / s_t.
IMM_OUTPUT = {
    ("fm", "simple_edm", 0.25, 0.5): (1.0, -0.125 / HALF_SQRT2),  # a_t = s_t = 0.5, a_s = 0.75, s_s = 0.25
    ("fm", "euler_fm", 0.25, 0.5): (1.0, -0.125),
    ("fm", "identity", 0.25, 0.5): (0.5, 0.5),
    ("cosine", "simple_edm", 0.5, 1.0): (HALF_SQRT2, -0.5 * HALF_SQRT2),  # a_t = 0, s_t = 1
    ("cosine", "identity", 0.5, 1.0): (HALF_SQRT2, HALF_SQRT2),
    ("cosine", "simple_edm", 0.0, 0.5): (HALF_SQRT2, -0.5 * HALF_SQRT2),  # a_s = 1, s_s = 0
    ("fm", "simple_edm", 0.5, 0.5): (1.0, 0.0),  # s = t: the identity on x_t
}


@pytest.mark.parametrize("schedule,param,s,t", list(IMM_OUTPUT))
def test_imm_output_closed_form(schedule, param, s, t):
    x_t, g = torch.tensor([[2.0, -1.0]], dtype=torch.float64), torch.tensor([[0.5, 3.0]], dtype=torch.float64)
    c_skip, c_out = IMM_OUTPUT[(schedule, param, s, t)]
    got = reference.imm_output(x_t, g, s, t, schedule=schedule, param=param, sigma_data=0.5)
    torch.testing.assert_close(got, c_skip * x_t + c_out * g, rtol=1e-15, atol=1e-15)
    if param == "identity":
        torch.testing.assert_close(reference.ddim(x_t, g, s, t, schedule=schedule), got, rtol=0, atol=0)


@pytest.mark.parametrize("schedule", ["fm", "cosine"])
def test_ddim_from_the_true_clean_point_lands_on_the_path(schedule):
    """DDIM(x_t, x, s, t) = x_s when x_t = alpha_t x + sigma_t noise (docs/math.md section 2)."""
    x, noise = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64) * 0.9 + 0.05
    s = t * torch.rand(6, dtype=torch.float64)
    x_t = reference.interpolate(x, noise, t, schedule=schedule)
    torch.testing.assert_close(reference.ddim(x_t, x, s, t, schedule=schedule),
                               reference.interpolate(x, noise, s, schedule=schedule), rtol=1e-12, atol=1e-12)

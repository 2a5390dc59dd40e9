"""A closed-form oracle for IMM on Gaussian data, and a study that measures a trained model against it.

For data x ~ N(mu, diag(std^2)) and prior noise eps ~ N(0, sigma_d^2), every marginal of the interpolant
x_t = alpha_t x + sigma_t eps is Gaussian with mean alpha_t mu and per-coordinate standard deviation
std_t = sqrt(alpha_t^2 std^2 + sigma_t^2 sigma_d^2), and the probability-flow map from time t to time s is linear:

    f*_{s,t}(x_t) = alpha_s mu + (std_s / std_t) (x_t - alpha_t mu)

(the one increasing map between the two Gaussians, which the flow is). So every trained map f_{s,t} and every
sampler has a known right answer: this script trains on the "gaussian" data set (examples/data.py: std 1.0 and
0.5, mean (1, -0.5)), fits each trained map as y = A x + c per coordinate over a grid of (s, t), and reports A over
the exact std_s / std_t, the offset error over std_s, and the samples' std over the data's and mean error at 1, 2,
4 and 8 steps, pushforward and restart.

    python examples/gaussian.py [--estimator v u] [--seeds 0 1 2] [--jobs 2] [--out out/gaussian] [-- TRAIN ARGS]
    python examples/gaussian.py --smoke       # the pipeline at toy size
    python examples/gaussian.py --fixed-point # each estimator's one-step fixed point (no training, ~1.5 min)
    python examples/gaussian.py --fixed-point-support  # V and unpaired on Gaussian and uniform data, Laplace and RBF

A run whose folder already holds a finished run trained with the settings its options give today is measured, not
trained again (one from before a default moved is trained again).
Results: OUT/results.json and the tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import checkpoint
import data
from common import SIGMA_DATA, cli, imm_generator
from imm_kernels import imm, schedules
from imm_kernels.generator import time_grid
from sample import generate

EXAMPLES = Path(__file__).resolve().parent
STEPS = [1, 2, 4, 8]
MAP_T = [0.994, 0.8, 0.6, 0.4, 0.2]
MAP_S = [0.0, 0.2, 0.4, 0.6, 0.8]
# The samples' std of one noise draw of n is off by about 1 / sqrt(2 n), the same for every step count and
# sampler: 200,000, drawn afresh per training seed, put it under 0.2% (a mean over 3 seeds: 0.1%). One draw of
# 20,000 for every seed read 0.7% wide on its own.
SAMPLES = 200_000
SAMPLER_STEPS = [4, 8]  # the pushforward sampler's maps (edm grid) fitted one by one on their exact inputs


def _derivative(t: torch.Tensor, schedule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(d alpha / dt, d sigma / dt)."""
    if schedule == "fm":
        return -torch.ones_like(t), torch.ones_like(t)
    half_pi = math.pi / 2
    return -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t)


def marginal_std(t, std: torch.Tensor, schedule: str, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """The per-coordinate standard deviation of x_t."""
    alpha, sigma = schedules.alpha(t, schedule), schedules.sigma(t, schedule)
    return torch.sqrt(alpha**2 * std**2 + sigma**2 * sigma_data**2)


def exact_map(x_t: torch.Tensor, s, t, mean: torch.Tensor, std: torch.Tensor, schedule: str,
              sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """f*_{s,t}(x_t): the probability-flow map of Gaussian data from time t to time s (floats s <= t)."""
    ratio = marginal_std(s, std, schedule, sigma_data) / marginal_std(t, std, schedule, sigma_data)
    return schedules.alpha(s, schedule) * mean + ratio * (x_t - schedules.alpha(t, schedule) * mean)


def velocity(x: torch.Tensor, t: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, schedule: str,
             sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """The probability-flow velocity E[alpha'_t x + sigma'_t eps | x_t = x] of Gaussian data."""
    alpha, sigma = schedules.alpha(t, schedule), schedules.sigma(t, schedule)
    d_alpha, d_sigma = _derivative(t, schedule)
    variance = alpha**2 * std**2 + sigma**2 * sigma_data**2
    centred = x - alpha * mean
    return d_alpha * (mean + alpha * std**2 / variance * centred) + d_sigma * sigma * sigma_data**2 / variance * centred


def uniform_cdf(y: torch.Tensor, t, mean: torch.Tensor, std: torch.Tensor, schedule: str,
                sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """P(x_t <= y) per coordinate for data uniform on mean +- sqrt(3) std, coordinates independent (float t)."""
    alpha, sigma = float(schedules.alpha(t, schedule)), float(schedules.sigma(t, schedule))
    half = math.sqrt(3) * std
    centred = y - alpha * mean
    if sigma == 0:
        return ((centred + half) / (2 * half)).clamp(0, 1)
    spread = sigma * sigma_data

    def integral_of_cdf(u):  # an antiderivative of the standard normal CDF
        return u * torch.special.ndtr(u) + torch.exp(-u * u / 2) / math.sqrt(2 * math.pi)

    return spread / (2 * alpha * half) * (integral_of_cdf((centred + alpha * half) / spread)
                                          - integral_of_cdf((centred - alpha * half) / spread))


def uniform_exact_map(x_t: torch.Tensor, s, t, mean: torch.Tensor, std: torch.Tensor, schedule: str,
                      sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """f*_{s,t}(x_t) for uniform data (as uniform_cdf): per coordinate the increasing map between the two marginals,
    F_s^-1(F_t(x_t)), which the probability flow is (the coordinates flow independently; in one dimension the flow
    keeps the order of points). F_s is inverted by bisection to float64 resolution."""
    if s == t:
        return x_t.clone()
    level = uniform_cdf(x_t, t, mean, std, schedule, sigma_data)
    alpha, sigma = float(schedules.alpha(s, schedule)), float(schedules.sigma(s, schedule))
    centre, reach = alpha * mean, alpha * math.sqrt(3) * std + 40 * sigma * sigma_data
    low, high = (centre - reach).expand_as(x_t).clone(), (centre + reach).expand_as(x_t).clone()
    for _ in range(64):
        middle = (low + high) / 2
        below = uniform_cdf(middle, s, mean, std, schedule, sigma_data) < level
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    return (low + high) / 2


def true_parameters(dataset: data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the generating Gaussian in model space (examples/data.py centres and scales the points)."""
    mean = torch.tensor(data.GAUSSIAN_MEAN, dtype=torch.float64)
    std = torch.tensor(data.GAUSSIAN_STD, dtype=torch.float64)
    shift, scale = dataset.shift.double(), dataset.scale.double()
    return (mean - shift) / scale, std / scale


def fit_map(gen, x_t: torch.Tensor, s: float, t: float, mean: torch.Tensor, std: torch.Tensor, schedule: str) -> dict:
    """The trained map f_{s,t} fitted as y = A x + c per coordinate on the points x_t: A over the exact slope
    std_s / std_t ("scale", 1 is exact) and c's error over std_s ("offset")."""
    n = x_t.shape[0]
    y = gen(x_t, torch.full((n,), s, dtype=torch.float64), torch.full((n,), t, dtype=torch.float64))
    centred = x_t - x_t.mean(0)
    slope = (centred * (y - y.mean(0))).sum(0) / centred.square().sum(0)
    offset = y.mean(0) - slope * x_t.mean(0)
    exact_slope = marginal_std(s, std, schedule) / marginal_std(t, std, schedule)
    exact_offset = schedules.alpha(s, schedule) * mean - exact_slope * schedules.alpha(t, schedule) * mean
    return {"scale": (slope / exact_slope).tolist(),
            "offset": ((offset - exact_offset) / marginal_std(s, std, schedule)).tolist()}


@torch.no_grad()
def measure(folder: Path, samples: int = SAMPLES) -> dict:
    """Each trained map's fitted scale and offset against the exact ones (on the (s, t) grid, and the maps the
    pushforward sampler applies at SAMPLER_STEPS, each on its own exact input), and the samples' statistics."""
    torch.set_num_threads(1)
    state = checkpoint.load(folder)
    config = state["config"]
    schedule = config["schedule"]
    dataset = data.load(config["data"])
    mean, std = true_parameters(dataset)
    model = checkpoint.build_model(state)
    gen = imm_generator(model, config)
    generator = torch.Generator().manual_seed(1)

    def exact_marginal(t: float) -> torch.Tensor:
        return schedules.alpha(t, schedule) * mean + marginal_std(t, std, schedule) * torch.randn(
            samples, 2, generator=generator, dtype=torch.float64)

    maps = {}
    for t in MAP_T:
        x_t = exact_marginal(t)
        for s in (s for s in MAP_S if s < t):
            maps[f"{s:g},{t:g}"] = fit_map(gen, x_t, s, t, mean, std, schedule)
    sampler_maps = {}
    for steps in SAMPLER_STEPS:
        times = time_grid(steps, schedule=schedule, T=config["T"], eps_t=config["eps_t"]).tolist()
        sampler_maps[str(steps)] = [{"t": t, "s": s, **fit_map(gen, exact_marginal(t), s, t, mean, std, schedule)}
                                    for t, s in zip(times[:-1], times[1:])]
    sampled = {}
    for sampler in ("pushforward", "restart"):
        for steps in STEPS if sampler == "pushforward" else STEPS[1:]:
            x = generate(model, config, (2,), samples, None, steps=steps, sampler=sampler,
                         generator=torch.Generator().manual_seed(config["seed"]), device="cpu")
            sampled[f"{sampler} {steps}"] = {"std": (x.std(0) / std).tolist(),
                                              "mean": ((x.mean(0) - mean) / std).tolist()}
    return {"config": {k: config[k] for k in ("estimator", "group_size", "k", "seed", "iters")}, "maps": maps,
            "sampler_maps": sampler_maps, "samples": sampled}


ESTIMATORS = ("v", "u", "unpaired")
FIXED_POINT_ST = [(0.0, 0.994), (0.0, 0.8), (0.0, 0.6), (0.0, 0.4), (0.2, 0.4), (0.4, 0.8), (0.6, 0.8), (0.0, 0.2)]
# Chained maps (r above s: (0, 0.6), (0.4, 0.8), (0.6, 0.8)) and direct ones (r = s: (0, 0.3), (0.2, 0.4)) at k = 8.
SUPPORT_ST = [(0.0, 0.6), (0.4, 0.8), (0.6, 0.8), (0.0, 0.3), (0.2, 0.4)]
SUPPORT_KERNELS = [("laplace", 1.0), ("rbf", 4.0)]


def group_losses(distances: dict, bandwidth: float, estimator: str, features: int,
                 kernel: str = "laplace") -> torch.Tensor:
    """The MMD of each group from its (G, M, M) distance matrices "aa", "bb" and "ab" (a = y_t, b = y_r), written
    out for the Laplace or the RBF kernel: "v" and "u" as imm_kernels.mmd_loss; "unpaired" the U-statistic over
    i != j in every term, the cross term included, so that no y_t^i meets the y_r^i made from its own (x, eps)."""
    def kernel_of(d):
        return torch.exp(-bandwidth * (d.clamp_min(1e-8) if kernel == "laplace" else d.square()) / features)

    k_aa, k_bb, k_ab = (kernel_of(distances[pair]) for pair in ("aa", "bb", "ab"))
    if estimator == "v":
        return (k_aa + k_bb - 2 * k_ab).mean((1, 2))
    m = k_aa.shape[1]
    eye = torch.eye(m, dtype=torch.bool)

    def off_diagonal(k):
        return k.masked_fill(eye, 0).sum((1, 2)) / (m * (m - 1))

    cross = off_diagonal(k_ab) if estimator == "unpaired" else k_ab.mean((1, 2))
    return off_diagonal(k_aa) + off_diagonal(k_bb) - 2 * cross


def fixed_point_scale(s: float, t: float, estimator: str, mean: torch.Tensor, std: torch.Tensor, *, k: float = 8,
                      group_size: int = 64, groups: int = 1000, schedule: str = "fm", seed: int = 0,
                      support: str = "gaussian", kernel: str = "laplace", bandwidth_scale: float = 1.0) -> float:
    """Where one matching step of the objective puts the map f_{s,t} when its target f_{s,r} is exact: the scale c
    (1 is exact) that minimises the expected group loss of c-scaled exact outputs about their mean,
    f_c(x_t) = alpha_s mu + c (f*_{s,t}(x_t) - alpha_s mu), against f*_{s,r}(x_r), x_t and x_r from the same
    (x, eps) as in training; the bandwidth bandwidth_scale / |c_out(s, t)| (simple_edm; the paper's scale: 1).
    support: the data, "gaussian" (N(mean, std^2)) or "uniform" (mean +- sqrt(3) std: the same moments, bounded),
    coordinates independent. Monte Carlo over `groups` groups, the same draws for every c (a smooth objective),
    minimised by golden-section search on [0.8, 1.25]."""
    generator = torch.Generator().manual_seed(seed)
    r = float(imm.r_from_st(s, t, k=k, schedule=schedule))
    shape = (groups, group_size, len(mean))
    if support == "gaussian":
        x, flow = mean + std * torch.randn(shape, generator=generator, dtype=torch.float64), exact_map
    else:
        x = mean + math.sqrt(3) * std * (2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1)
        flow = uniform_exact_map
    noise = SIGMA_DATA * torch.randn(x.shape, generator=generator, dtype=torch.float64)

    def at(time):
        return schedules.alpha(time, schedule) * x + schedules.sigma(time, schedule) * noise

    target = flow(at(r), s, r, mean, std, schedule)
    centre = schedules.alpha(s, schedule) * mean
    offset = flow(at(t), s, t, mean, std, schedule) - centre
    bandwidth = bandwidth_scale * float(imm.kernel_bandwidth(s, t, schedule=schedule))
    unit = torch.cdist(offset, offset)  # the y_t distances scale with c; the y_r ones do not change
    distances = {"bb": torch.cdist(target, target)}

    def expected_loss(c):
        distances.update(aa=c * unit, ab=torch.cdist(centre + c * offset, target))
        return float(group_losses(distances, bandwidth, estimator, len(mean), kernel).mean())

    low, high, golden = 0.8, 1.25, (math.sqrt(5) - 1) / 2
    left, right = high - golden * (high - low), low + golden * (high - low)
    loss_left, loss_right = expected_loss(left), expected_loss(right)
    while high - low > 2e-4:
        if loss_left < loss_right:
            high, right, loss_right = right, left, loss_left
            left = high - golden * (high - low)
            loss_left = expected_loss(left)
        else:
            low, left, loss_left = left, right, loss_right
            right = low + golden * (high - low)
            loss_right = expected_loss(right)
    return (low + high) / 2


def fixed_point_table(k: float = 8, group_size: int = 64) -> str:
    """Markdown: fixed_point_scale per estimator and (s, t) on the gaussian set (model space; one scale for both
    coordinates)."""
    mean, std = true_parameters(data.load("gaussian"))
    lines = ["| estimator | " + " | ".join(f"s = {s:g}, t = {t:g}" for s, t in FIXED_POINT_ST) + " |",
             "|---|" + "---|" * len(FIXED_POINT_ST)]
    for estimator in ESTIMATORS:
        cells = [f"{fixed_point_scale(s, t, estimator, mean, std, k=k, group_size=group_size):.4f}"
                 for s, t in FIXED_POINT_ST]
        lines.append(f"| {estimator} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def support_table(k: float = 8, group_size: int = 64) -> str:
    """Markdown: fixed_point_scale of the V-statistic and the unpaired estimate on Gaussian and on uniform data of
    the same moments (the gaussian set's), with the paper's Laplace kernel and an RBF kernel (bandwidth scale 4)."""
    mean, std = true_parameters(data.load("gaussian"))
    lines = ["| kernel | data | estimator | " + " | ".join(f"s = {s:g}, t = {t:g}" for s, t in SUPPORT_ST) + " |",
             "|---|---|---|" + "---|" * len(SUPPORT_ST)]
    for kernel, scale in SUPPORT_KERNELS:
        for support in ("gaussian", "uniform"):
            for estimator in ("v", "unpaired"):
                options = dict(k=k, group_size=group_size, support=support, kernel=kernel, bandwidth_scale=scale)
                cells = [f"{fixed_point_scale(s, t, estimator, mean, std, **options):.4f}" for s, t in SUPPORT_ST]
                lines.append(f"| {kernel} (scale {scale:g}) | {support} | {estimator} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trained_as_now(folder: Path, arguments: list[str]) -> bool:
    """Whether folder holds a finished run (options.json written) whose settings are those train.py gives
    `arguments` today: a run from before a default moved is trained again, not measured as the new default."""
    if not (folder / "options.json").exists() or not (folder / "checkpoint.pt").exists():
        return False
    import train  # here, not at the top: this module's own train() and parse_args() hold those names there
    wanted = train.complete_config(train.training_config(train.parse_args(arguments), None),
                                   data.load("gaussian"), torch.device("cpu"), world_size=1)
    return checkpoint.load(folder)["config"] == wanted


def train(folder: Path, options: list[str]) -> None:
    """train.py on the gaussian data set, one thread, unless folder already holds a finished run trained so."""
    arguments = ["--data", "gaussian", "--out", str(folder), "--eval-every", "-1", *options]
    if trained_as_now(folder, arguments):
        return
    command = [sys.executable, str(EXAMPLES / "train.py"), *arguments]
    shutil.rmtree(folder, ignore_errors=True)
    finished = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if finished.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
    (folder / "options.json").write_text(json.dumps(options))  # the run finished


def train_and_measure(folder: Path, options: list[str], samples: int) -> dict:
    train(folder, options)
    return measure(folder, samples)


def _mean_over_seeds(results: dict, estimator: str, pick) -> str:
    """The per-coordinate pair pick(run) averaged over the estimator's seeds, as the tables print it."""
    runs = [result for name, result in results.items() if name.startswith(f"{estimator}-seed")]
    return ", ".join(f"{sum(pick(run)[axis] for run in runs) / len(runs):.3f}" for axis in range(2))


def format_tables(results: dict) -> str:
    """Markdown, means over the seeds per estimator: the samples' std over the data's per coordinate, then each
    map's fitted scale over the exact one, on the (s, t) grid and along the pushforward sampler's grids."""
    estimators = sorted({name.split("-")[0] for name in results}, reverse=True)
    first = next(iter(results.values()))
    columns = list(first["samples"])
    seeds = len(results) // len(estimators)
    lines = [f"Samples' std over the data's, per coordinate (1 is exact), mean over {seeds} seed(s):", "",
             "| estimator | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for estimator in estimators:
        cells = [_mean_over_seeds(results, estimator, lambda run: run["samples"][c]["std"]) for c in columns]
        lines.append(f"| {estimator.upper()} | " + " | ".join(cells) + " |")
    for estimator in estimators:
        lines += ["", f"{estimator.upper()}: each trained map's fitted scale over the exact std_s / std_t, per "
                      f"coordinate, mean over {seeds} seed(s) (rows: t, columns: s)", "",
                  "| t \\ s | " + " | ".join(f"{s:g}" for s in MAP_S) + " |", "|---|" + "---|" * len(MAP_S)]
        for t in MAP_T:
            row = [_mean_over_seeds(results, estimator, lambda run: run["maps"][f"{s:g},{t:g}"]["scale"])
                   if f"{s:g},{t:g}" in first["maps"] else "-" for s in MAP_S]
            lines.append(f"| {t:g} | " + " | ".join(row) + " |")
        for steps in SAMPLER_STEPS:
            lines += ["", f"{estimator.upper()}: the maps the {steps}-step pushforward applies, each on its own exact "
                          f"input: fitted scale over the exact one, per coordinate, mean over {seeds} seed(s)", "",
                      "| t -> s | scale |", "|---|---|"]
            chain = str(steps)
            for index, step in enumerate(first["sampler_maps"][chain]):
                scale = _mean_over_seeds(results, estimator, lambda run: run["sampler_maps"][chain][index]["scale"])
                lines.append(f"| {step['t']:.3g} -> {step['s']:.3g} | {scale} |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimator", nargs="+", default=["v", "u"], choices=["v", "u", "unpaired"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once, one thread each")
    parser.add_argument("--out", default="out/gaussian")
    parser.add_argument("--smoke", action="store_true", help="20 steps of batch 128 and 500 samples: the pipeline")
    parser.add_argument("--fixed-point", action="store_true",
                        help="print where one matching step puts each map against an exact target (no training)")
    parser.add_argument("--fixed-point-support", action="store_true",
                        help="the same for the V-statistic and the unpaired estimate on Gaussian and on bounded "
                             "(uniform) data, Laplace and RBF kernels (no training, ~6 min)")
    parser.add_argument("train_args", nargs="*", help="more train.py options, after --")
    return parser.parse_args(argv)


@cli
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.fixed_point:
        print(fixed_point_table())
        return
    if args.fixed_point_support:
        print(support_table())
        return
    out = Path(args.out)
    extra = args.train_args + (["--iters", "20", "--batch", "128"] if args.smoke else [])
    samples = 500 if args.smoke else SAMPLES
    runs = {f"{estimator}-seed{seed}": ["--estimator", estimator, "--seed", str(seed), *extra]
            for estimator in args.estimator for seed in args.seeds}
    # spawn: each worker starts clean instead of forking a process that holds torch's thread pools
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(train_and_measure, out / name, options, samples) for name, options in runs.items()}
        results = {name: future.result() for name, future in futures.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(format_tables(results))


if __name__ == "__main__":
    main()

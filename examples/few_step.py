"""Why the main job's pushforward samples got worse with more steps, and the defaults that fixed it.

Trains the main job (examples/run.sh: checkerboard, 5,000 steps of batch 1,024, one core) once per variant and
seed, each variant changing one setting of the defaults the main job had before this study; scores pushforward
and restart sampling at 1, 2, 4 and 8 steps (sliced Wasserstein over the real-data floor, scored as
examples/run.sh scores: the mean over 4 sets of 5,000 samples, the floor's over 4 sets of 5,000 training points);
measures how much each map f_{s,t} widens or narrows the distribution it is given; and writes
docs/few_step.md from the logged runs.

    python examples/few_step.py              # the study: about 100 minutes on one core
    python examples/few_step.py --smoke      # the pipeline at toy size, in out/few_step-smoke/

A run whose folder already holds a result for the same arguments is not trained again (examples/reproduce.py's
mechanism), so the document can be rewritten from the logged runs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import checkpoint
import data
import metrics
import plots
from common import cli
from imm_kernels import schedules
from map_error import map_errors
from reproduce import ROOT, Row, Run, add_jobs_option, logged_training, ratio, run_all, wall_seconds
from sample import TWO_STEP_ETA, generate

STEPS = [1, 2, 4, 8]
ROWS = [Row("pushforward", "pushforward"), Row("pushforward, uniform grid", "pushforward", "uniform"),
        Row("restart", "restart")]
# The main job's settings before this study, written out so that every run means the same after the defaults move.
BEFORE = ["--k", "10", "--group-size", "64", "--estimator", "v", "--time-embedding", "s", "--a", "1", "--b", "5",
          "--ema-decay", "0.999", "--width", "128", "--param", "simple_edm", "--iters", "5000", "--batch", "1024",
          "--partner", "kernel", "--r-spacing", "eta"]
# (name, what it changes, options on top of BEFORE). The first is the old default, the second the new one.
VARIANTS = [
    ("before", "the main job's defaults before this study", []),
    ("after", "the new training default", ["--k", "8"]),
    ("k = 12", "r(s, t) one eta step of (eta(T) - eta(eps_t)) / 2^12 (the paper's ImageNet k)", ["--k", "12"]),
    ("k = 6", "r(s, t) with k = 6", ["--k", "6"]),
    ("10,000 steps", "twice the training (twice the time)", ["--iters", "10000"]),
    ("t - s embedding", "the network's second time input is the stride t - s", ["--time-embedding", "stride"]),
    ("a = 2", "time weight alpha_t^2 (the paper's ImageNet multi-step choice)", ["--a", "2"]),
    ("M = 16", "groups of 16 particles", ["--group-size", "16"]),
    ("U-statistic", "the unbiased MMD estimate", ["--estimator", "u"]),
    ("EMA 0.99", "a shorter EMA for sampling", ["--ema-decay", "0.99"]),
]
# The old and the new defaults are trained at three seeds to show the spread; every other variant at one.
KEY_SEEDS, OTHER_SEEDS = [0, 1, 2], [0]
SMOKE = {"args": ["--iters", "20", "--batch", "128"], "eval_samples": 500, "seeds": [0], "variants": 2}
DISPERSION_T = [0.994, 0.8, 0.6, 0.4]
DISPERSION_S = [0.0, 0.2, 0.4, 0.6, 0.8]
DISPERSION_SAMPLES = 20_000
# Every score is the mean over SETS disjoint sets of EVAL_SAMPLES, as the main job's (examples/run.sh).
EVAL_SAMPLES, SETS = 5000, 4
# How far the floor of one set of EVAL_SAMPLES training points moves: this many disjoint sets, each scored alone.
FLOOR_STUDY_SETS = 40
# The 2-step grid's middle time t_1 (on fm), swept on the old and new defaults' runs.
STUDY_SCHEDULE = "fm"  # every run of the study trains on train.py's default schedule


def middle_time(eta: float) -> float:
    """The 2-step middle time t_1 whose eta is `eta`, rounded as the sweep logs it."""
    return round(float(schedules.eta_inv(eta, STUDY_SCHEDULE)), 3)


PAPER_MIDDLE_T = middle_time(TWO_STEP_ETA["images"])  # the paper's (CIFAR-10) and the main job's before this study
POINTS_MIDDLE_T = middle_time(TWO_STEP_ETA["points"])  # the sampler's default for points since this study
MIDDLE_T = sorted({0.2, 0.3, 0.45, 0.7, 0.8, PAPER_MIDDLE_T, POINTS_MIDDLE_T})
# The check of the points' middle time on training seeds 2 to 5 (runs not logged here): 2-step scores, each the mean
# of 6 sample sets over the floor then in use, one set of training points (the first of floor_sets).
MIDDLE_CHECK = {POINTS_MIDDLE_T: 1.81, PAPER_MIDDLE_T: 1.86}


def runs(smoke: bool) -> list[Run]:
    """Every variant at every seed; with smoke, the first variants at toy size."""
    variants = VARIANTS[:SMOKE["variants"]] if smoke else VARIANTS
    extra = SMOKE["args"] if smoke else []

    def seeds(name):
        return SMOKE["seeds"] if smoke else KEY_SEEDS if name in ("before", "after") else OTHER_SEEDS

    return [Run(f"{slug(name)}_seed{seed}", "imm", "checkerboard", BEFORE + change + extra + ["--seed", str(seed)],
                STEPS, ROWS, SMOKE["eval_samples"] if smoke else EVAL_SAMPLES, tags={"variant": name, "seed": seed},
                sets=SETS)
            for name, _, change in variants for seed in seeds(name)]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def dispersion(folder: Path) -> dict:
    """{t: {s: std(f_{s,t}(x_t)) / std(x_s)}}: how much the trained map from time t to time s widens (> 1) or
    narrows (< 1) the true marginal it is given, averaged over the coordinates, on DISPERSION_SAMPLES pairs."""
    torch.set_num_threads(1)
    table = map_errors(folder, DISPERSION_T, DISPERSION_S, DISPERSION_SAMPLES)
    return {str(t): {str(s): std for s, (std, _) in row.items()} for t, row in table.items()}


@torch.no_grad()
def middle_sweep(folder: Path, eval_samples: int, sets: int) -> dict:
    """{t_1: [score over the floor per set of samples]}: 2-step pushforward through the middle time t_1, scored
    like the runs' tables (whose 2-step cell is the mean of these sets at the default t_1)."""
    torch.set_num_threads(1)
    state = checkpoint.load(folder)
    config = state["config"]
    dataset = data.load(config["data"])
    evaluator = metrics.Evaluator(dataset, n=eval_samples, sets=sets)
    model = checkpoint.build_model(state)
    sweep = {}
    for middle_t in MIDDLE_T:
        middle_eta = float(schedules.eta(middle_t, config["schedule"]))
        x = generate(model, config, (2,), evaluator.samples_needed, None, steps=2, grid="eta",
                     middle_eta=middle_eta, generator=torch.Generator().manual_seed(0), device="cpu")
        samples = data.to_data(x, dataset.shift, dataset.scale)
        sweep[str(middle_t)] = [m["SW"] / evaluator.floor["SW"] for m in evaluator.measure_sets(samples)]
    return sweep


def floor_sets(eval_samples: int) -> list[float]:
    """SW of each of FLOOR_STUDY_SETS disjoint sets of eval_samples checkerboard training points to the held-out
    points: how far one set's floor is from another's."""
    dataset = data.load("checkerboard")
    evaluator = metrics.Evaluator(dataset, n=eval_samples)
    n = evaluator.n
    train = data.to_data(dataset.train[:FLOOR_STUDY_SETS * n].double(), dataset.shift, dataset.scale)
    return [metrics.sliced_wasserstein(train[i:i + n], evaluator.heldout, evaluator.directions,
                                       evaluator.heldout_projections) for i in range(0, len(train), n)]


def with_analysis(result: dict, out: Path) -> dict:
    """The result with the dispersion table of its checkpoint and, for the old and new defaults, the middle-time
    sweep: computed once and logged beside it."""
    if "scores" not in result:
        return result
    folder = out / result["run"]["name"]
    changed = False
    if "dispersion" not in result:
        result["dispersion"], changed = dispersion(folder), True
    if "middle" not in result and result["run"]["tags"]["variant"] in ("before", "after"):
        result["middle"], changed = middle_sweep(folder, result["run"]["eval_samples"], result["run"]["sets"]), True
    if changed:
        (folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def ratios(results: list[dict], row: str, steps: int) -> list[float]:
    return [ratio(r, row, steps) for r in results]


def cell(values: list[float]) -> str:
    """Mean over seeds, with the range when there are several."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def write_document(results: list[dict], floors: list[float], out: Path, doc: Path, command: str,
                   seconds: float) -> None:
    figures = doc.parent / "few_step"
    figures.mkdir(parents=True, exist_ok=True)
    by_variant = {}
    for r in results:
        by_variant.setdefault(r["run"]["tags"]["variant"], []).append(r)
    seeds = sorted({r["run"]["tags"]["seed"] for r in results})
    (figures / "results.json").write_text(json.dumps({"wall_seconds": seconds, "floor_sets": floors,
                                                      "results": results}, indent=1) + "\n")

    header = "| variant | what it changes | " + " | ".join(
        [f"pushforward {n}" for n in STEPS] + [f"uniform grid {n}" for n in STEPS[2:]] +
        [f"restart {n}" for n in STEPS[1:]]) + " | train s |"
    table = [header, "|---|---|" + "---|" * (len(STEPS) + 2 + len(STEPS) - 1) + "---|"]
    for name, description, change in (v for v in VARIANTS if v[0] in by_variant):
        rows = by_variant[name]
        cells = ([cell(ratios(rows, "pushforward", n)) for n in STEPS] +
                 [cell(ratios(rows, "pushforward, uniform grid", n)) for n in STEPS[2:]] +
                 [cell(ratios(rows, "restart", n)) for n in STEPS[1:]])
        seconds_each = statistics.mean(r["train_seconds"] for r in rows)
        table.append(f"| {name} | {description} (`{' '.join(change) or 'as before'}`) | " + " | ".join(cells) +
                     f" | {seconds_each:.0f} |")

    def dispersion_table(name: str) -> list[str]:
        first = by_variant[name][0]["dispersion"]
        lines = [f"| t \\ s | " + " | ".join(DISPERSION_S_TEXT) + " |", "|---|" + "---|" * len(DISPERSION_S)]
        for t, row in first.items():
            lines.append(f"| {t} | " + " | ".join(f"{row[str(s)]:.3f}" if str(s) in row else "" for s in DISPERSION_S)
                         + " |")
        return lines

    dataset = data.load("checkerboard")
    for name in ("before", "after"):
        state = checkpoint.load(out / by_variant[name][0]["run"]["name"])
        model = checkpoint.build_model(state)
        panels = {}
        for n in STEPS:
            x = generate(model, state["config"], (2,), 5000, None, steps=n,
                         generator=torch.Generator().manual_seed(0), device="cpu")
            panels[f"{name}, {n} step{'s' * (n > 1)}"] = data.to_data(x, dataset.shift, dataset.scale).numpy()
        plots.samples("points", panels, figures / f"samples_{name}.png")

    def pushforward(name):
        return [statistics.mean(ratios(by_variant[name], "pushforward", n)) for n in STEPS]

    def middle_mean(name, middle_t):
        """Per seed of the variant: the score through middle_t, averaged over the sets of samples."""
        return [statistics.mean(r["middle"][str(middle_t)]) for r in by_variant[name]]

    middle_table = ["| defaults | " + " | ".join(f"t_1 = {t:g} (eta {float(schedules.eta(t, STUDY_SCHEDULE)):.2f})"
                                                 for t in MIDDLE_T) + " |",
                    "|---|" + "---|" * len(MIDDLE_T)]
    for name, label in (("before", "old (k = 10)"), ("after", "new (k = 8)")):
        middle_table.append(f"| {label} | " + " | ".join(cell(middle_mean(name, t)) for t in MIDDLE_T) + " |")
    new_sets = [r["middle"][str(POINTS_MIDDLE_T)] for r in by_variant["after"]]  # per run: one score per set

    def extremes(name):
        """(largest widening, largest narrowing, the latter's map (t, s)) in the variant's dispersion table (first
        seed)."""
        cells = [(v, t, s) for t, row in by_variant[name][0]["dispersion"].items() for s, v in row.items()]
        widest, narrowest = max(cells), min(cells)
        return widest[0] - 1, 1 - narrowest[0], narrowest[1:]

    before, after = pushforward("before"), pushforward("after")
    restart = [statistics.mean(ratios(by_variant[name], "restart", n))
               for name in ("before", "after") for n in STEPS[1:]]
    # The mean of the single-set floors, and the floor every table divides by (SETS sets).
    floor_mean, floor_used = statistics.mean(floors), results[0]["floor"]
    # The old main job sampled 2 steps through the paper's middle point.
    before[1] = statistics.mean(middle_mean("before", PAPER_MIDDLE_T))
    after_runs = by_variant["after"]
    one_step_worst = max(ratios(after_runs, "pushforward", 1))
    no_worse = all(min(ratios(after_runs, "pushforward", n)) <= one_step_worst for n in STEPS[1:])
    (before_widening, _, _), (after_widening, after_narrowing, (narrow_t, narrow_s)) = (extremes("before"),
                                                                                        extremes("after"))
    text = DOCUMENT.format(
        command=command, date=time.strftime("%Y-%m-%d"), machine=platform.processor() or platform.machine(),
        cores=os.cpu_count(), torch=torch.__version__, runs=len(results), seeds=", ".join(map(str, seeds)),
        minutes=sum(r["train_seconds"] for r in results) / 60, wall=seconds / 60,
        before_curve=" -> ".join(f"{v:.2f}" for v in before), after_curve=" -> ".join(f"{v:.2f}" for v in after),
        before_widening=before_widening, after_widening=after_widening, after_narrowing=after_narrowing,
        narrow_t=narrow_t, narrow_s=narrow_s, key_seeds=len(by_variant["after"]),
        no_worse="holds" if no_worse else "does not hold", two_steps=after[1],
        within_2x="holds" if after[1] <= 2.0 else "does not hold",
        before=" ".join(BEFORE), table="\n".join(table), middle_table="\n".join(middle_table),
        sets=SETS, points_eta=TWO_STEP_ETA["points"], points_t=POINTS_MIDDLE_T,
        paper_eta=TWO_STEP_ETA["images"], paper_t=PAPER_MIDDLE_T,
        paper_middle=statistics.mean(middle_mean("after", PAPER_MIDDLE_T)),
        new_middle=statistics.mean(middle_mean("after", POINTS_MIDDLE_T)),
        sample_spread=statistics.mean(max(v) - min(v) for v in new_sets),
        floor_sets=len(floors), floor_min=min(floors), floor_max=max(floors), floor_mean=floor_mean,
        floor_std=statistics.pstdev(floors), floor_first=floors[0], floor_used=floor_used,
        check_new_then=MIDDLE_CHECK[POINTS_MIDDLE_T], check_paper_then=MIDDLE_CHECK[PAPER_MIDDLE_T],
        check_new=MIDDLE_CHECK[POINTS_MIDDLE_T] * floors[0] / floor_used,
        check_paper=MIDDLE_CHECK[PAPER_MIDDLE_T] * floors[0] / floor_used,
        before_trend=("got worse with every added step" if all(b > a for a, b in zip(before, before[1:])) else
                      "did not get better with more steps"),
        restart_low=min(restart), restart_high=max(restart),
        first_inflation=floor_mean / floors[0], used_inflation=floor_mean / floor_used,
        dispersion_before="\n".join(dispersion_table("before")),
        dispersion_after="\n".join(dispersion_table("after")))
    doc.write_text(text)


DISPERSION_S_TEXT = [f"s = {s:g}" for s in DISPERSION_S]
DOCUMENT = """# Few-step sampling on the main job: why more pushforward steps got worse, and the fix

Generated by `{command}` on {date} ({machine}, {cores} cores, torch {torch}) from {runs} logged runs
(seeds {seeds}), {minutes:.0f} minutes of training on one core ({wall:.0f} minutes of wall time for the passes
that trained them). Raw numbers: [few_step/results.json](few_step/results.json). Every number below is the
sliced Wasserstein distance (SW) of samples to 5,000 held-out points over the real-data floor, scored as `bash
examples/run.sh` scores: the mean over {sets} disjoint sets of 5,000 samples, over the mean of {sets} disjoint
sets of 5,000 training points (1 is as good as real data, lower is better).

On a Gaussian, where every map has a closed-form answer, the same defaults shrink the samples by 3 to 6% at every step count
(the V-statistic) and the U-statistic widens the 1-step map by 10 to 13%: [gaussian.md](gaussian.md). The cause
is each particle's partner (the one made from the same (x, eps)): the V-statistic is the unbiased MMD plus a
regression on the partner, whose fixed point is narrower; `--partner-weight` weighs that term less (gaussian.md).
On the checkerboard the maps trained through the chain of r-steps widen instead; the evidence points to the Laplace
kernel's shape in that same term (the section "Why the maps to intermediate times widen" below). Since
2026-12-03 the defaults for points replace that term with one whose fixed point is the conditional mean and space
the r-steps equally in angle (the section "The fix" below, on four data sets), and since 2026-12-04 they train
euler_fm maps instead of simple_edm (the section "The parameterisation"), with which a Gaussian keeps its width
within 0.8% at 2, 4 and 8 steps. Every section before "The fix" ran on the defaults of its date: add `--partner
kernel --r-spacing eta --param simple_edm` to its commands to reproduce it; "The fix" and "The network's time
features" ran with simple_edm: add `--param simple_edm` to theirs.

## In short

The main job (`bash examples/run.sh`: checkerboard, 5,000 steps of batch 1,024 on one core) trained with
`k = 10`, and sampling 2 steps through the paper's middle point (eta = {paper_eta:g}, t_1 = {paper_t:.3f}), gave pushforward
samples that {before_trend}: {before_curve} at 1, 2, 4 and 8 steps (mean of {key_seeds} seeds).
Two defaults changed: training uses `k = 8` (r(s, t) one eta step of (eta(T) - eta(eps_t)) / 2^8 below t, four
times the old step), and 2-step sampling of points goes through eta = {points_eta:g} (t_1 = {points_t:.3f});
together they give {after_curve}. Of the target, "2, 4 and 8 steps no worse than 1 step within the seed spread"
{no_worse} on these runs (each is at or below the worst 1-step seed); "2 steps within 2x the floor"
{within_2x} ({two_steps:.2f} on average). The price is a worse single step, for the reason below.

## Why

A pushforward sampler applies one trained map f_(s,t) per step, each to the output of the one before. The
dispersion tables below measure each map on its own: true samples x_t pushed to time s, the standard
deviation of f_(s,t)(x_t) over that of true x_s (1: the map keeps the spread right; 1.03: 3% too wide). With
`k = 10` the maps to intermediate times widen the distribution by up to {before_widening:.1%}, and the errors add
up over steps: the squares blur outward, and more steps means more blur. The direct maps to s = 0 were the
closest to exact, which is why one step was the best.

The maps are learned by bootstrapping: the loss matches f_(s,t)(x_t) with the network's own f_(s,r)(x_r) one
eta step below t, and only f_(s,s) = identity anchors the chain. With a tiny step (k = 10: 1/1024 of the eta
range) the information from that anchor crosses many steps, and at this training budget the maps to
intermediate times are left biased. A step four times larger (k = 8) brings the largest widening down to
{after_widening:.1%}, so the steps stop compounding; but its one-step map (t = {narrow_t}, s = {narrow_s}) now
narrows the distribution by {after_narrowing:.1%}, which is what costs the single step. Smaller k still (6)
keeps the curve flat out to 8 steps too (one seed), at a larger one-step cost and a worse 2-step score; the
paper's k = 12 (ImageNet) comes with orders of magnitude more training and is worse than k = 10 at every step
count here. Among the other settings (one seed each, on the old defaults), twice the training improves the
single step and is worse at every larger step count, a shorter EMA gives the same single step, better 2 and 4
steps and falls back at 8, and the rest make the single step much worse without beating k = 8 at more steps
(table). Restart sampling (jump to eps_t, then
re-noise to the next time) does not compound the maps' errors: under both settings it stays between
{restart_low:.1f}x and {restart_high:.1f}x the floor from 2 to 8 steps.

The 2-step grid's middle time t_1 is a free choice: the paper found eta(t_1) = {paper_eta:g} empirically on CIFAR-10.
On the checkerboard, with the new training defaults, a lower t_1 is better (the sweep below): through
t_1 = {points_t:.3f} they score {new_middle:.2f} on average against {paper_middle:.2f} through t_1 = {paper_t:.3f}; with the old
defaults the scores show no trend in t_1. The examples keep the paper's point for images and use
eta = {points_eta:g} for points (`examples/sample.py --middle-eta` sets it). It was picked on a first pair of runs with the new defaults (seeds 0
and 1, six sample sets each) and checked on four more seeds (2 to 5), where it was better on three of the four:
{check_new:.2f} against {check_paper:.2f} on average ({check_new_then:.2f} against {check_paper_then:.2f} over
the single-set floor in use then). Those six runs are not among this document's logged runs.

## The kernel's width (2026-12-02, first runs)

The paper's kernel is exp(-|y - y'| / (|c_out(s, t)| D)). On images D is in the thousands and the distances
between outputs are about sqrt(D) times their scale, so the kernel is nearly linear over a group (the energy
distance, weighted per group by 1 / (|c_out| D)). With D = 2 its width |c_out| D is comparable to the distances
between points, and for short maps (t - s small, |c_out| small) far smaller. `--bandwidth-scale c`
(`IMMGenerator.loss(bandwidth_scale=c)`) multiplies the bandwidth 1 / |c_out(s, t)| by c; c < 1 widens the kernel.
The main job's defaults otherwise, each run scored as above (`bash examples/run.sh --bandwidth-scale C --seed S`,
with `--k 6` where marked); cells: one run (seed 0), or mean (range) over seeds 0, 1 and 2:

| bandwidth scale | 1 step | 2 steps | 4 steps | 8 steps | restart 2 / 4 / 8 |
|---|---|---|---|---|---|
| 4 (a sharper kernel), seed 0 | 2.28 | 2.51 | 3.46 | 3.97 | 1.64 / 1.93 / 1.77 |
| 1 (the default; the "after" row below) | 2.24 (2.11-2.34) | 1.53 (1.49-1.55) | 1.83 (1.64-2.19) | 1.87 (1.72-2.01) | 1.49 / 1.64 / 1.65 |
| 1/4, seed 0 | 2.72 | 1.51 | 1.70 | 1.66 | 1.64 / 1.81 / 1.67 |
| 1/16 | 2.99 (2.88-3.20) | 1.59 (1.43-1.68) | 1.75 (1.58-1.97) | 1.75 (1.62-1.95) | 1.84 / 1.84 / 1.72 |
| 1/4, `--k 6` | 3.06 (2.82-3.33) | 1.63 (1.51-1.73) | 1.70 (1.56-1.87) | 1.61 (1.57-1.66) | 1.78 / 1.65 / 1.60 |

A sharper kernel makes every added step worse. A wider one trades the first steps for the later ones: with 1/4
and `--k 6` the mean over three seeds no longer gets worse after 2 steps (8 steps 1.61 against 1.63), the only
setting so far where it does not, but one step (3.06) and two (1.63) are worse than the defaults' and the best 8-step
score of three seeds is still above the defaults' best 2-step one. On the Gaussian (`python examples/gaussian.py
--estimator v -- --bandwidth-scale C`, seed 0) the wider kernels shrink the samples more than the default does:
with 1/16 the std over the data's is 0.958 / 0.921 at 1 step, 0.983 / 0.960 at 2, 0.987 / 0.952 at 4 and 0.996 /
0.971 at 8 (per axis); with 1/4 and `--k 6` 0.941 / 0.908, 0.977 / 0.946, 0.981 / 0.962, 0.991 / 0.968. On
8gaussians and spirals (seed 0, `--data 8gaussians` or `--data spirals` in place of the checkerboard) 1/4 with
`--k 6` scores 2.59 / 1.21 / 1.43 / 1.32 and 2.20 / 1.12 / 1.18 / 1.22 at 1 / 2 / 4 / 8 steps, against the
defaults' 1.95 / 1.23 / 1.41 / 1.41 and 1.61 / 1.17 / 1.30 / 1.36: better at 8 steps, still worse than at 2. So
none of these settings is a default.

## Why the maps to intermediate times widen: the kernel's shape in the partners' term (2026-12-03, first runs)

`python examples/map_error.py --ckpt DIR` measures each trained map on its own true input: for a grid of (t, s) it
feeds f_(s,t) points of the exact t-marginal and prints the std of f_(s,t)(x_t) over that of true x_s and the SW
from f_(s,t)(x_t) to true x_s over the SW between two independent sets of true x_s (1: as close as the marginal's
own sampling noise; one set of 20,000 each, so about +-0.3). The main job's defaults, seed 0 (`IMM_RUN_DIR=out/cb
bash examples/run.sh`, then `python examples/map_error.py --ckpt out/cb --t 0.994 0.8 0.6 0.375 --s 0 0.2 0.375
0.6 0.8`); cells: std ratio / SW ratio:

| t \\ s | s = 0 | s = 0.2 | s = 0.375 | s = 0.6 | s = 0.8 |
|---|---|---|---|---|---|
| 0.994 | 0.969 / 3.74 | 1.010 / 1.51 | 0.999 / 1.54 | 1.028 / 2.35 | 1.012 / 1.11 |
| 0.8 | 0.991 / 2.15 | 0.996 / 1.07 | 1.003 / 1.39 | 1.028 / 2.24 |  |
| 0.6 | 0.982 / 2.16 | 0.994 / 1.08 | 1.007 / 1.54 |  |  |
| 0.375 | 0.987 / 1.51 | 1.001 / 0.98 |  |  |  |

Even the short map from t = 0.8 to s = 0.6 widens by 2.8%, where on the Gaussian the same maps are exact within
1% ([gaussian.md](gaussian.md)), while the maps from t = 0.375 are within 1.3% and near the floor. Those are maps
that k = 8 trains directly: where eta(t) - eta(s) is below one r-step (0.65 in eta: every t below 0.39 for s = 0,
below 0.68 for s = 0.6), r(s, t) is clamped at s and the target is the data x_s itself. Every other map is trained
through the chain of r-steps down to that region, and those are the ones that widen.

What the evidence points to: the partners' term ([gaussian.md](gaussian.md)) with the Laplace kernel is a
regression whose fixed point is not the conditional mean. One matching step against an exact target shows it
without training (gaussian.md, "Bounded data"; `python examples/gaussian.py --fixed-point-support`): on data with
bounded support the V-statistic's chained maps with the Laplace kernel sit 0.17 to 0.46% per r-step wider than on
Gaussian data (the short ones widen outright), and with the RBF kernel or the unpaired estimate none widens.
Given x_t, the partner's f_(s,r)(x_r) is spread around the value the flow needs, its conditional mean (the probability-flow velocity is a conditional mean). A kernel
with a cusp at 0 is an L1-like loss where it is wide (its minimiser is the conditional median) and a mode-seeking
one where it is sharp; chained over the r-steps, the maps then follow a median or mode flow, not the probability
flow. On a Gaussian median, mode and mean coincide, which is why the Gaussian study sees only the shrink of the
direct regression. Near the edge of a bounded support (the checkerboard's outer squares) the posterior of the data
point given x_t is a Gaussian cut at the edge, whose mode lies on the edge, outside its mean: the maps push the
edge outward. An L1-like term's gradient does not vanish at its minimum, so it holds its fixed point against the
smooth MMD term at any weight: `--partner-weight 0.25` leaves the widening as it is (t = 0.8 to s = 0.6: 1.023).
The runs that test this (checkerboard, seed 0; pushforward 1 / 2 / 4 / 8 steps, SW over the floor as above, and
the widest map):

| run | 1 step | 2 steps | 4 steps | 8 steps | map t = 0.8 to s = 0.6 | map t = 0.994 to s = 0 |
|---|---|---|---|---|---|---|
| the defaults (Laplace) | 2.26 | 1.55 | 1.66 | 1.87 | 1.028 / 2.24 | 0.969 / 3.74 |
| `--partner-weight 0.25` | 2.91 | 1.51 | 1.61 | 2.08 | 1.023 / 1.87 | 0.952 / 5.28 |
| Laplace, r-steps constant in t (*) | 2.89 | 2.77 | 2.39 | 3.08 | 1.038 / 2.81 | 1.021 / 4.31 |
| `--kernel rbf` | 6.10 | 3.04 | 2.89 | 2.80 | 1.002 / 1.02 | 0.873 / 11.35 |
| `--kernel rbf --bandwidth-scale 4` | 5.33 | 2.64 | 2.06 | 1.69 | 0.994 / 1.18 | 0.887 / 9.93 |
| `--kernel rbf --bandwidth-scale 16` | 4.44 | 1.96 | 1.52 | 1.74 | 1.011 / 1.35 | 0.906 / 8.30 |
| `--kernel rbf --bandwidth-scale 4 --k 6` | 4.39 | 2.36 | 2.08 | 1.82 | 0.991 / 1.32 | 0.911 / 8.13 |
| rbf, scale 4, r-steps constant in t (*) | 3.55 | 3.17 | 3.31 | 3.64 | 1.009 / 1.38 | 0.973 / 6.09 |

(*) A patched r(s, t) = max(s, t - (T - eps_t) / 2^8), not an option: the chain then covers every map, the low
ones included. With the Laplace kernel every map widens (by 2 to 5%); a sharper Laplace kernel (`--bandwidth-scale
4`, the first table of the section above) makes every added step worse. The RBF kernel, whose partners' term is an
L2 regression at these distances (fixed point: the conditional mean), leaves the chained maps that it trains at
the right width (t = 0.8 to s = 0.6: 1.002), and its pushforward gets better with every step, as the paper's does on images; but the RBF term's gradient falls
with the distance between partners, so information crosses the roughly 250 r-steps near T (k = 8) too slowly for
5,000 steps: the maps from T are 10 to 13% narrow and one and two steps are far worse than the defaults'. On the
Gaussian (`python examples/gaussian.py --estimator v -- --kernel rbf [--bandwidth-scale 4]`, seed 0) the RBF
kernel's samples are 0.889, 0.785 / 0.954, 0.877 / 1.010, 0.956 / 1.059, 1.005 of the data's std at 1 / 2 / 4 / 8
steps (scale 4: 0.884, 0.830 / 0.919, 0.865 / 0.965, 0.941 / 1.004, 0.968). Neither the constant-t r-steps (which
train the maps from T to the right width with the RBF kernel, 0.973, but lose the direct regression that keeps the
low maps sharp) nor a larger partners' weight in the chained groups with the partners left out where r = s (RBF,
scale 4, weight 4: 6.31 / 2.78 / 2.16 / 1.86, maps from T 14% narrow) fixes that.

So the two kernels fail in opposite ways: the Laplace kernel carries the chain fast and biases it on data that is
not Gaussian, the RBF kernel carries it without that bias and too slowly. No setting above makes every added
step better on both the Gaussian and the checkerboard; the next section's partners' term has the RBF kernel's
fixed point and the Laplace kernel's pull.

## The fix: a partners' term with the mean's fixed point, and r-steps equal in angle (2026-12-03)

Two options, both now the defaults for points (images keep the paper's, `--partner kernel --r-spacing eta`):

- `--partner mean` (`IMMGenerator.loss(partner="mean")`). The V-statistic is (1 - 1/M) U_unpaired + (2/M) (1/M)
  sum_i [1 - k(y_t^i, y_r^i)] ([gaussian.md](gaussian.md)); this option keeps the first term and replaces the
  partners' kernel with a square: (2/M) mean_i |d_i|^2 / (2 c h), d_i = y_t^i - y_r^i, h = D / bandwidth the
  Laplace kernel's length and c the group's mean |d_i|, held constant. At the typical distance c it pulls as hard
  as the Laplace term does near its peak, so it carries the chain of r-steps as fast, but the minimiser of a
  square is the conditional mean, the probability flow's target, not the median. In the groups where r(s, t) = s
  the term is left out: there the partner is the data point itself and the regression on it is the denoiser, the
  V-statistic's shrink of the Gaussian; those groups train on the unbiased MMD alone.
- `--r-spacing angle` (`IMMGenerator.loss(r_spacing="angle")`, `imm.r_from_st`). A regression on the conditional
  mean of the chained target contracts each link of the chain by the correlation of x_r and x_t: for data of std
  sigma_data, cos(atan eta(t) - atan eta(r)). The paper's r-steps are equal in eta (0.65 with k = 8), which is a
  long step in that angle near the data (eta 1.3 to 0.65: 0.943, 6% in one link) and a tiny one near T. Steps
  equal in atan(eta), 2^k of them as before, contract a whole chain by about (pi/2)^2 / (2 * 2^k): 0.5% with
  k = 8. With the cosine schedule atan(eta(t)) is pi t / 2, so the steps are equal in t.

With the mean partner on the paper's eta steps, 8 steps beat 2 on the checkerboard, but the Gaussian's samples
shrank (4% at 2 steps); a longer chain (k = 10) or a heavier partners' term shrank them more, a shorter one (k = 7)
did not help. Seed 0 of each (`python examples/gaussian.py --estimator v
-- OPTIONS` and `IMM_RUN_DIR=out/cb bash examples/run.sh OPTIONS`); Gaussian: the samples' std over the data's per
axis; checkerboard: SW over the floor as above; both pushforward at 1 / 2 / 4 / 8 steps:

| options (on top of the defaults) | Gaussian 1 | 2 | 4 | 8 | checkerboard 1 | 2 | 4 | 8 |
|---|---|---|---|---|---|---|---|---|
| `--partner mean --r-spacing eta` | 0.943, 0.951 | 0.960, 0.991 | 0.987, 0.992 | 1.001, 0.999 | 2.69 | 1.88 | 2.13 | 1.73 |
| `--partner mean --r-spacing eta --k 7` | 0.932, 0.945 | 0.967, 0.994 | 0.969, 1.006 | 1.004, 1.028 | - | - | - | - |
| `--partner mean --r-spacing eta --k 10` | 0.955, 0.864 | 0.963, 0.906 | 1.005, 0.958 | 1.014, 0.959 | 2.37 | 2.06 | 2.16 | 1.80 |
| `--partner mean --r-spacing eta --partner-weight 2` | 0.929, 0.917 | 0.950, 0.972 | 0.963, 0.977 | 0.978, 0.996 | - | - | - | - |
| the new defaults (`--partner mean --r-spacing angle`) | 1.005, 0.967 | 1.003, 0.992 | 1.010, 1.002 | 1.020, 1.014 | 2.67 | 1.89 | 1.79 | 1.64 |

The chained maps on the checkerboard, the new defaults, seed 0 (`python examples/map_error.py --ckpt out/cb --t
0.994 0.8 0.6 0.375 --s 0 0.2 0.375 0.6 0.8`; std ratio / SW ratio, as in the section above): every map to s >= 0.2
is within 1.3% of the right width, and t = 0.8 to s = 0.6, 2.8% wide with the paper's partners, is 1.001 / 1.06.
The maps to s = 0 are 1 to 4% narrow (t = 0.994: 0.960 / 4.89): the single step is where the fix costs.

| t \\ s | s = 0 | s = 0.2 | s = 0.375 | s = 0.6 | s = 0.8 |
|---|---|---|---|---|---|
| 0.994 | 0.960 / 4.89 | 0.987 / 2.23 | 0.998 / 1.65 | 0.994 / 1.49 | 1.001 / 0.87 |
| 0.8 | 0.959 / 4.60 | 0.997 / 1.54 | 1.001 / 1.29 | 1.001 / 1.06 |  |
| 0.6 | 0.974 / 3.23 | 1.004 / 1.26 | 1.003 / 1.23 |  |  |
| 0.375 | 0.989 / 2.18 | 1.003 / 1.21 |  |  |  |

The new defaults on four data sets, seeds 0, 1 and 2 (`bash examples/run.sh --data D --seed S`, each score
SW over that data set's floor as above, mean (range); the Gaussian: `python examples/gaussian.py --estimator v
--seeds 0 1 2`, the samples' std over the data's per axis, means), measured 2026-12-03 on the 2-core VM, two runs
at a time; the paper's partners and eta steps (the defaults before) for comparison where they were run:

| data, defaults | pushforward 1 | 2 | 4 | 8 | restart 2 / 4 / 8 |
|---|---|---|---|---|---|
| Gaussian, new (200,000 samples per seed, 2026-12-04) | 0.968, 0.932 | 0.987, 0.985 | 1.016, 1.015 | 1.020, 1.007 | 0.963, 0.942 / 0.977, 0.974 / 0.980, 0.970 |
| Gaussian, new (one shared draw of 20,000, 0.7% and 0.4% wide itself) | 0.977, 0.936 | 0.997, 0.990 | 1.025, 1.020 | 1.030, 1.012 | 0.969, 0.944 / 0.978, 0.985 / 0.982, 0.965 |
| Gaussian, before ([gaussian.md](gaussian.md), the shared draw) | 0.962, 0.944 | 0.964, 0.954 | 0.974, 0.967 | 0.976, 0.952 | 0.957, 0.940 / 0.959, 0.955 / 0.954, 0.928 |
| checkerboard, new | 2.71 (2.22-3.24) | 1.67 (1.50-1.89) | 1.72 (1.64-1.79) | 1.57 (1.46-1.64) | 1.79 / 1.93 / 1.88 |
| checkerboard, before (the "after" row below) | 2.24 (2.11-2.34) | 1.53 (1.49-1.55) | 1.83 (1.64-2.19) | 1.87 (1.72-2.01) | 1.49 / 1.64 / 1.65 |
| moons, new | 1.75 (1.41-2.32) | 1.00 (0.85-1.24) | 1.10 (0.92-1.39) | 0.89 (0.78-1.00) | 1.02 / 1.25 / 1.08 |
| spirals, new | 1.57 (1.42-1.73) | 1.23 (1.14-1.35) | 1.32 (1.27-1.35) | 1.16 (1.12-1.21) | 1.07 / 1.25 / 1.06 |
| spirals, before, seed 0 | 1.61 | 1.17 | 1.30 | 1.36 | - |
| 8gaussians, new | 2.18 (1.79-2.55) | 1.23 (1.17-1.31) | 1.38 (1.19-1.65) | 1.24 (1.09-1.49) | 1.30 / 1.37 / 1.24 |
| 8gaussians, before, seed 0 | 1.95 | 1.23 | 1.41 | 1.41 | - |

Against the targets of few-step sampling that improves with steps (means of 3 seeds): on the checkerboard, moons
and spirals, pushforward at 2, 4 and 8 steps scores below 1 step and 8 steps below 2 (1.57 against 1.67, 0.89
against 1.00, 1.16 against 1.23); on 8gaussians 8 steps are no better than 2 (1.24 against 1.23, seeds from 1.09
to 1.49). On the Gaussian 2 and 4 steps are within 1.6% of the data's width and no step count is worse than
1 step (6.8% narrow on the second axis), but 8 steps are 2.0% wide on the first (1.0201): on the line, not
safely within it. Until 2026-12-04 the study read them 1.2 to 3.0% wide from one noise draw that was itself
wide ([gaussian.md](gaussian.md): what is left is the paper's prior at T, 0.6%, and short maps from high t that
are wide by the same 0.2 to 0.7% in every seed; euler_fm maps remove the second, "The parameterisation" below).
Against the defaults
before, the checkerboard pays at 1 and 2 steps and with restart sampling, whose maps all go to the data (s = 0),
the maps that are now 1 to 4% narrow.

## The network's time features (2026-12-04)

The example networks embed each time as sinusoids of c_noise = 1000 t at 32 geometric frequencies from 1 down to
10^-4 (DDPM's). The top ones turn every 0.006 in t, finer than anything the maps of 2-D data need, and let a
small network's maps swing between nearby times: on the Gaussian ([gaussian.md](gaussian.md)) seed 1's map from
t = 0.564 reads 0.988 of the exact scale at s = 0.0015, 1.014 at s = 0.0105 and 1.029 at s = 0.03 (first
coordinate), where the exact maps barely change. `--time-frequency F` starts the frequencies at F instead; at 0.1
the same map reads 0.982 to 0.989 over those s, smoothly. The main job's defaults otherwise, seeds 0, 1, 2, each
cell the mean over the seeds, scored as above (`bash examples/run.sh --data D --seed S --time-frequency 0.1`,
2026-12-04, two runs at a time, training 308 to 488 s each):

| data | time features | pushforward 1 | 2 | 4 | 8 | restart 2 | 4 | 8 |
|---|---|---|---|---|---|---|---|---|
| checkerboard | DDPM's (1, the default) | 2.71 | 1.67 | 1.72 | 1.57 | 1.79 | 1.93 | 1.88 |
| checkerboard | 0.1 | 2.36 | 1.63 | 1.71 | 1.59 | 1.54 | 1.75 | 1.60 |
| 8gaussians | DDPM's | 2.18 | 1.23 | 1.38 | 1.24 | 1.30 | 1.37 | 1.24 |
| 8gaussians | 0.1 | 2.01 | 1.13 | 1.18 | 1.13 | 1.18 | 1.21 | 1.15 |
| moons | DDPM's | 1.75 | 1.00 | 1.10 | 0.89 | 1.02 | 1.25 | 1.08 |
| moons | 0.1 | 1.77 | 1.01 | 0.98 | 0.76 | 1.12 | 1.28 | 1.07 |
| spirals | DDPM's | 1.57 | 1.23 | 1.32 | 1.16 | 1.07 | 1.25 | 1.06 |
| spirals | 0.1 | 2.11 | 1.18 | 1.32 | 1.24 | 1.18 | 1.33 | 1.11 |

Smooth time features help the checkerboard (1 step and restart), 8gaussians (everywhere; 8 steps now tie 2
steps, 1.132 against 1.134) and moons (4 and 8 steps), and cost spirals a third of its single step and its 8 steps'
lead over 2. On the Gaussian they help 1 and 4 steps and not 8. An option with a measured reason, then, not a
default: the seeds' spread (up to 0.5 on the checkerboard's single step) is as large as most of the differences.

## The parameterisation: euler_fm maps for points (2026-12-04)

Every section above trained the paper's `simple_edm` maps, f_(s,t)(x_t) = c_skip(s, t) x_t + c_out(s, t) G. On the
Gaussian ([gaussian.md](gaussian.md)) those came out 1.6% wide at 4 steps and 2.0% at 8, from maps that are wide by
the same amount in every seed (t = 0.957 to s = 0.861: 1.006) and maps from mid t toward the data that differ by
seed (0.564 to 0.147: 0.99 to 1.04). `--param euler_fm` (`IMMGenerator(param="euler_fm")`, the paper's Appendix
C.5), f_(s,t)(x_t) = x_t - (t - s) sigma_d G, one Euler step of a learned velocity, with everything else as in "The
fix", trains every map that does not end at the data within 0.5% of its exact scale and keeps the Gaussian's
samples within 0.8% of its width at 2, 4 and 8 steps. Since 2026-12-04 it is the default for IMM on points with
the fm schedule; images (and the cosine schedule, where euler_fm does not apply) keep simple_edm, and `--param
simple_edm` trains the defaults before. What in simple_edm's form (its skip coefficient, or the kernel's
bandwidth 1 / |c_out|, up to 1.41x wider than euler_fm's at t = 0.5) widens its maps is not separated.

Seeds 0, 1, 2 of each (`bash examples/run.sh --data D --seed S`, the Gaussian `python examples/gaussian.py
--estimator v --seeds 0 1 2`; add `--param simple_edm` for the rows before), each cell the mean (range) over the
seeds, scored as above; measured 2026-12-04 on the 2-core VM, two runs at a time (training 264 to 305 s each);
the Gaussian: the samples' std over the data's per axis, means:

| data | maps | pushforward 1 | 2 | 4 | 8 | restart 2 / 4 / 8 |
|---|---|---|---|---|---|---|
| Gaussian | euler_fm | 0.988, 0.966 | 0.998, 0.995 | 1.003, 1.008 | 1.006, 1.004 | 0.985, 0.972 / 0.981, 0.974 / 0.983, 0.974 |
| Gaussian | simple_edm | 0.968, 0.932 | 0.987, 0.985 | 1.016, 1.015 | 1.020, 1.007 | 0.963, 0.942 / 0.977, 0.974 / 0.980, 0.970 |
| checkerboard | euler_fm | 2.20 (2.09-2.33) | 1.66 (1.56-1.78) | 1.67 (1.57-1.80) | 1.63 (1.51-1.77) | 1.55 / 1.69 / 1.83 |
| checkerboard | simple_edm | 2.71 (2.22-3.24) | 1.67 (1.50-1.89) | 1.72 (1.64-1.79) | 1.57 (1.46-1.64) | 1.79 / 1.93 / 1.88 |
| 8gaussians | euler_fm | 2.02 (1.81-2.15) | 1.19 (1.14-1.21) | 1.22 (1.15-1.30) | 1.12 (1.08-1.17) | 1.22 / 1.34 / 1.23 |
| 8gaussians | simple_edm | 2.18 (1.79-2.55) | 1.23 (1.17-1.31) | 1.38 (1.19-1.65) | 1.24 (1.09-1.49) | 1.30 / 1.37 / 1.24 |
| moons | euler_fm | 1.42 (1.33-1.55) | 1.06 (0.90-1.29) | 1.04 (0.94-1.18) | 0.86 (0.85-0.87) | 0.90 / 1.20 / 1.06 |
| moons | simple_edm | 1.75 (1.41-2.32) | 1.00 (0.85-1.24) | 1.10 (0.92-1.39) | 0.89 (0.78-1.00) | 1.02 / 1.25 / 1.08 |
| spirals | euler_fm | 1.60 (1.34-2.03) | 1.21 (1.09-1.37) | 1.14 (1.09-1.20) | 1.15 (1.07-1.22) | 1.10 / 1.12 / 0.99 |
| spirals | simple_edm | 1.57 (1.42-1.73) | 1.23 (1.14-1.35) | 1.32 (1.27-1.35) | 1.16 (1.12-1.21) | 1.07 / 1.25 / 1.06 |

Against the targets of few-step sampling that improves with steps (means of 3 seeds): on the Gaussian every step
count from 2 on is within 0.8% of the data's width and none is worse than the single step (1.2% and 3.4% narrow);
on all four 2-D sets pushforward at 2, 4 and 8 steps scores below 1 step and 8 steps below 2 (checkerboard 1.63
against 1.66, 8gaussians 1.12 against 1.19, moons 0.86 against 1.06, spirals 1.15 against 1.21). Against
simple_edm the single step gains on every set but spirals, 8gaussians gains at every step count, and the
checkerboard's 8 steps and moons' 2 steps lose 0.06 (within the seeds' spread). Single seeds still cross: spirals
seed 0 reads 1.09 at 2 steps and 1.16 at 8, the checkerboard's seed 2 1.56 and 1.77.

## How noisy the metric is

SW between two sets of 5,000 points drawn from the same distribution is far from 0 and moves from set to set.
Over {floor_sets} disjoint sets of 5,000 training points, the SW to the held-out points ranges from {floor_min:.4f}
to {floor_max:.4f} (mean {floor_mean:.4f}, standard deviation {floor_std:.4f}). The first set alone was the floor of
every table here before scores became means over {sets} sets: at {floor_first:.4f} it is low, and every ratio over
it read {first_inflation:.2f}x the ratio over the mean of the {floor_sets}. The floor of {sets} sets used now is
{floor_used:.4f}: ratios over it still read {used_inflation:.2f}x those over the mean of {floor_sets} sets. That
error is one factor for a whole table, so it leaves the comparisons between variants as they are; the noise of
each sample set does not, which is why every cell is a mean over {sets}.

## The runs

Each variant changes one setting of the old defaults (`{before}`). Cells: mean (range) over seeds where there
are several. "pushforward": the sampler's default grid (2 steps through eta = {points_eta:g}, EDM spacing beyond),
for every row, so the old defaults' 2-step cell is not the old main job's (that one is in the middle-time
table, t_1 = {paper_t:.3f}); "uniform grid": times spaced evenly; "restart": restart sampling on the default grid.

{table}

## The 2-step middle time

2-step pushforward through the middle time t_1 (fm: eta = t_1 / (1 - t_1)), on the old and the new training
defaults' runs; cells: mean (range) over the training seeds. Through t_1 = {points_t:.3f} the {sets} sets of
samples of one new-defaults run span {sample_spread:.2f} on average: one set alone moves a score as much as a
setting does.

{middle_table}

## Dispersion of the maps, old defaults (k = 10), seed 0

Rows: the time t of the input; columns: the target time s; std(f_(s,t)(x_t)) / std(x_s), averaged over the two
coordinates, 20,000 pairs.

{dispersion_before}

## Dispersion of the maps, new defaults (k = 8), seed 0

{dispersion_after}

## Samples, seed 0

Old defaults: ![before](few_step/samples_before.png)

New defaults: ![after](few_step/samples_after.png)
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="run folders (default out/few_step, out/few_step-smoke with --smoke)")
    parser.add_argument("--doc", help="the document (default docs/few_step.md, OUT/few_step.md with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="toy budgets: checks the pipeline, measures nothing")
    add_jobs_option(parser)
    args = parser.parse_args(argv)
    args.out = Path(args.out or ROOT / "out" / ("few_step-smoke" if args.smoke else "few_step"))
    args.doc = Path(args.doc or (args.out / "few_step.md" if args.smoke else ROOT / "docs" / "few_step.md"))
    return args


@cli
def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    study = runs(args.smoke)
    start = time.perf_counter()
    trained_now = any(logged_training(run, args.out) is None for run in study)
    results = [with_analysis(r, args.out) for r in run_all(study, args.out, jobs=args.jobs)]
    wall = wall_seconds(args.out, time.perf_counter() - start if trained_now else 0.0)
    floors = floor_sets(study[0].eval_samples)
    write_document(results, floors, args.out, args.doc, "python examples/few_step.py" + " --smoke" * args.smoke,
                   wall)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()

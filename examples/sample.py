"""Few-step sampling from a checkpoint of train.py: IMM (docs/math.md section 5) and the baselines.

    python examples/sample.py --ckpt DIR --steps 2 --n 5000 --out samples.npy
        [--sampler auto|pushforward|restart|euler|heun] [--grid auto|uniform|eta|edm] [--middle-eta E]
        [--cfg W] [--label C] [--seed S]

Samplers: pushforward (IMM's default) and restart (the multistep consistency sampler, ct's default) apply
f_{s,t}; euler (fm's default) and heun integrate a flow-matching model's dx/dt = v, heun with two network
evaluations per step (--steps counts steps, not evaluations).

Writes FILE.npy (points in the data's units, or images N x C x H x W in [0, 1]), FILE.png beside it, and
FILE.labels.npy for a class-conditional model. Sampling uses the EMA weights; the state stays in float64
between steps, only the network runs in the training precision.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

import checkpoint
import plots
from common import SIGMA_DATA, ExampleError, cli, imm_generator, resolve_device, velocity
from data import to_data
from imm_kernels import time_grid

# Which samplers fit which training method (train.py --method), the first being its default.
METHOD_SAMPLERS = {"imm": ("pushforward", "restart"), "ct": ("restart", "pushforward"), "fm": ("euler", "heun")}
SAMPLERS = ("auto", "pushforward", "restart", "euler", "heun")
GRIDS = ("auto", "uniform", "eta", "edm")
# eta(t_1) of the 2-step grid's middle point t_1, by data kind: for images the paper's (found on CIFAR-10; t_1 = 0.583
# on fm); for points the one found on the checkerboard (docs/few_step.md; t_1 = 0.375 on fm), where 1.4 is worse.
TWO_STEP_ETA = {"images": 1.4, "points": 0.6}


def class_labels(n: int, num_classes: int, label: int | None = None) -> torch.Tensor | None:
    """The labels to sample: None when unconditional, `label` for all, else every class equally often."""
    if num_classes == 0:
        return None
    return torch.full((n,), label, dtype=torch.long) if label is not None else torch.arange(n) % num_classes


def resolve_sampler(method: str, sampler: str, grid: str, steps: int) -> tuple[str, str]:
    """(sampler, grid) with "auto" made concrete: the method's default sampler; for the time grid, uniform
    for flow-matching ODE steps, else eta for 1-2 steps (IMM's two-step middle point) and edm beyond."""
    allowed = METHOD_SAMPLERS[method]
    sampler = allowed[0] if sampler == "auto" else sampler
    if sampler not in allowed:
        raise ExampleError(f"--sampler {sampler} does not fit a model trained with --method {method}; use one of "
                           f"{', '.join(allowed)}")
    if grid == "auto":
        grid = "uniform" if method == "fm" else "eta" if steps <= 2 else "edm"
    return sampler, grid


@torch.no_grad()
def generate(model, config: dict, sample_shape, n: int, labels: torch.Tensor | None, *, steps: int,
             sampler: str = "auto", grid: str = "auto", middle_eta: float | None = None, guidance: float = 1.0,
             generator: torch.Generator, device, batch: int = 4096) -> torch.Tensor:
    """n samples in model space, float64 on the CPU, generated `batch` at a time: IMMGenerator.sample for the
    IMM samplers (pushforward, restart), the flow-matching ODE for euler and heun."""
    sampler, grid = resolve_sampler(config["method"], sampler, grid, steps)
    if middle_eta is None:
        middle_eta = TWO_STEP_ETA["points" if len(sample_shape) == 1 else "images"]
    if sampler in ("pushforward", "restart"):
        return imm_generator(model, config).sample(
            n, sample_shape, steps=steps, sampler=sampler, grid=grid, middle_eta=middle_eta, labels=labels,
            guidance=guidance, generator=generator, device=device, batch=batch).cpu()
    times = time_grid(steps, grid, schedule=config["schedule"], T=config["T"], eps_t=config["eps_t"])
    chunks = []
    for start in range(0, n, batch):
        size = min(batch, n - start)
        chunk_labels = None if labels is None else labels[start:start + size].to(device)
        noise = SIGMA_DATA * torch.randn((size, *sample_shape), generator=generator, dtype=torch.float64)
        chunks.append(_integrate(model, config, noise.to(device), chunk_labels, times, sampler=sampler,
                                 guidance=guidance).cpu())
    return torch.cat(chunks)


def _integrate(model, config: dict, x: torch.Tensor, labels, times: torch.Tensor, *, sampler: str,
               guidance: float) -> torch.Tensor:
    """The flow-matching baseline's ODE dx/dt = v from times[0] = T to times[-1]: Euler steps, or Heun's (the
    Euler step's slope averaged with the slope where it lands), in x's float64."""

    def v(x, t):
        return velocity(model, x, torch.full((len(x),), float(t), dtype=torch.float64, device=x.device), labels,
                        config=config, guidance=guidance)

    for t, s in zip(times[:-1], times[1:]):
        if sampler == "euler":
            x = x + (s - t) * v(x, t)
        else:
            slope = v(x, t)
            x = x + (s - t) * 0.5 * (slope + v(x + (s - t) * slope, s))
    return x


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Few-step sampling from a checkpoint of train.py (IMM or a baseline).")
    parser.add_argument("--ckpt", required=True, help="a train.py output folder (or its checkpoint.pt)")
    parser.add_argument("--steps", type=int, default=2,
                        help="sampling steps: one network evaluation each, two for heun (default 2)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="auto",
                        help="auto (default): pushforward for imm, restart for ct, euler for fm")
    parser.add_argument("--grid", choices=GRIDS, default="auto",
                        help="auto (default): uniform for fm; else eta for 1-2 steps (see --middle-eta), "
                             "else edm (rho 7)")
    parser.add_argument("--middle-eta", type=float,
                        help=f"eta(t_1) of the eta grid's 2-step middle point t_1 (default: {TWO_STEP_ETA['points']} "
                             f"for points, {TWO_STEP_ETA['images']} for images)")
    parser.add_argument("--cfg", type=float, default=1.0,
                        help="classifier-free guidance scale w (class-conditional models; 1 = no guidance)")
    parser.add_argument("--label", type=int, help="sample this class only (default: all classes equally)")
    parser.add_argument("--n", type=int, default=5000, help="number of samples (default 5000)")
    parser.add_argument("--out", required=True, help="output FILE.npy; FILE.png is written beside it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4096, help="samples per network call")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.n < 1 or args.batch < 1:
        parser.error("--steps, --n and --batch must be >= 1")
    if not args.out.endswith(".npy"):
        parser.error(f"--out must name a .npy file; got {args.out!r}")
    if args.grid == "eta" and args.steps > 2:
        parser.error(f"--grid eta is defined for 1 or 2 steps; got --steps {args.steps}")
    if args.middle_eta is not None and not (math.isfinite(args.middle_eta) and args.middle_eta > 0):
        parser.error(f"--middle-eta must be a finite number > 0; got {args.middle_eta}")
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    state = checkpoint.load(args.ckpt)
    config, info = state["config"], state["data_info"]
    num_classes = info["num_classes"]
    if num_classes == 0 and (args.label is not None or args.cfg != 1.0):
        raise ExampleError("--label and --cfg need a class-conditional model; this one is unconditional")
    if args.label is not None and not 0 <= args.label < num_classes:
        raise ExampleError(f"--label must be in [0, {num_classes}); got {args.label}")
    device = resolve_device(args.device)
    model = checkpoint.build_model(state).to(device)
    labels = class_labels(args.n, num_classes, args.label)
    x = generate(model, config, tuple(info["sample_shape"]), args.n, labels, steps=args.steps, sampler=args.sampler,
                 grid=args.grid, middle_eta=args.middle_eta, guidance=args.cfg,
                 generator=torch.Generator().manual_seed(args.seed),
                 device=device, batch=args.batch)
    samples = to_data(x, info["shift"], info["scale"]).float().numpy()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, samples)
    if labels is not None:
        np.save(out.with_suffix(".labels.npy"), labels.numpy())
    sampler, _ = resolve_sampler(config["method"], args.sampler, args.grid, args.steps)
    title = f"{config['method'].upper()}, {args.steps} step{'s' * (args.steps > 1)} ({sampler}), step {state['step']}"
    plots.samples(info["kind"], {title: samples}, out.with_suffix(".png"))
    print(f"wrote {args.n} samples to {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

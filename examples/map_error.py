"""How far each trained map f_{s,t} carries the true marginal at time t from the true marginal at time s (points).

    python examples/map_error.py --ckpt DIR [DIR ...] [--t 0.994 0.8 0.6 0.375 0.2] [--s 0 0.1 0.2 0.375 0.6 0.8]

A pushforward sampler applies one map per step, each to the output of the one before, so a map that is off on its
own true input is off in every sampler that uses it. For each (t, s) with s < t this feeds the map N points of the
interpolant's exact t-marginal (training points and fresh noise) and prints two numbers: the standard deviation of
f_{s,t}(x_t) over that of the true x_s, averaged over the coordinates (above 1 the map widens the distribution), and
the sliced Wasserstein distance from f_{s,t}(x_t) to a set of true x_s over the distance from a second, independent
set of true x_s to the same set (1: as close as the true marginal's own sampling noise). The EMA weights are scored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import checkpoint
import data
import imm_kernels
import metrics
from common import SIGMA_DATA, ExampleError, cli, imm_generator

DEFAULT_T = [0.994, 0.8, 0.6, 0.375, 0.2]
DEFAULT_S = [0.0, 0.1, 0.2, 0.375, 0.6, 0.8]
PROJECTIONS = 64


@torch.no_grad()
def map_errors(folder: Path, times_t, times_s, n: int, seed: int = 1) -> dict:
    """{t: {s: (std ratio, SW ratio)}} over the pairs s < t of the two grids, as the module docstring says."""
    state = checkpoint.load(folder)
    config = state["config"]
    dataset = data.load(config["data"])
    if dataset.kind != "points":
        raise ExampleError(f"map_error.py measures point data; {folder} was trained on images")
    model = checkpoint.build_model(state)
    generator = torch.Generator().manual_seed(seed)

    def draw():
        x = dataset.train[torch.randint(len(dataset.train), (n,), generator=generator)].double()
        return x, SIGMA_DATA * torch.randn(x.shape, generator=generator, dtype=torch.float64)

    def full(value):
        return torch.full((n,), float(value), dtype=torch.float64)

    def marginal(pair, time):
        return imm_kernels.interpolate(*pair, full(time), schedule=config["schedule"])

    directions = torch.randn(PROJECTIONS, dataset.train.shape[1], generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    inputs, reference, independent = draw(), draw(), draw()
    targets = {}  # per s, shared by every row: true x_s, its sorted projections, and the floor
    for s in times_s:
        x_s = marginal(reference, s)
        projections = metrics.sorted_projections(x_s, directions)
        targets[s] = x_s, projections, metrics.sliced_wasserstein(marginal(independent, s), x_s, directions,
                                                                  projections)
    gen, table = imm_generator(model, config), {}
    for t in times_t:
        x_t = marginal(inputs, t)
        row = table.setdefault(t, {})
        for s in (s for s in times_s if s < t):
            x_s, projections, floor = targets[s]
            mapped = gen(x_t, full(s), full(t))
            row[s] = (float((mapped.std(0) / x_s.std(0)).mean()),
                      metrics.sliced_wasserstein(mapped, x_s, directions, projections) / floor)
    return table


def format_table(table: dict, times_s) -> str:
    lines = ["| t \\ s | " + " | ".join(f"s = {s:g}" for s in times_s) + " |",
             "|---|" + "---|" * len(times_s)]
    for t, row in table.items():
        cells = [f"{row[s][0]:.3f} / {row[s][1]:.2f}" if s in row else "" for s in times_s]
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", nargs="+", required=True, help="train.py output folders")
    parser.add_argument("--t", type=float, nargs="+", default=DEFAULT_T, help="input times t (rows)")
    parser.add_argument("--s", type=float, nargs="+", default=DEFAULT_S, help="target times s (columns)")
    parser.add_argument("--n", type=int, default=20_000, help="points per set")
    args = parser.parse_args(argv)
    if args.n < 2 or not all(0 <= time <= 1 for time in args.t + args.s):
        parser.error("need --n >= 2 and every time in [0, 1]")
    for folder in args.ckpt:
        print(f"{folder}: std(f_(s,t)(x_t)) / std(x_s) / SW(f_(s,t)(x_t), x_s) over SW(x_s', x_s)")
        print(format_table(map_errors(Path(folder), args.t, args.s, args.n), args.s))


if __name__ == "__main__":
    main()

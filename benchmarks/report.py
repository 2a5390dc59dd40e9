"""Markdown tables and a plot from pytest-benchmark JSON files written by `pytest benchmarks/
--benchmark-json RUN.json`:  python -m benchmarks.report RUN.json [MORE.json ...] [--plot RUN.png] [--merged ALL.json]

Per op, mode, device and dtype: one row per shape, the median time of each provider (on GPUs also of a CUDA-graph
replay: GPU time without the host's), and for the imm_kernels providers the speedup over the eager reference and
over torch.compile of it (same run), the achieved bandwidth as a share of the device copy bandwidth measured in
that run (from the graph replay where there is one), and peak extra memory over the input bytes. Then the
per-call costs at tiny shapes (benchmarks/bench_overhead.py): each op against its plain PyTorch formula."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load(path: str) -> tuple[list[dict], list[dict], dict]:
    """(timed results, per-call results, machine info) of one pytest-benchmark JSON. A provider timed under a
    kernel variant (a sweep) is named with it, e.g. imm_triton[IMM_TRITON_MMD=rows]."""
    with open(path) as f:
        run = json.load(f)
    infos = [b.get("extra_info", {}) for b in run["benchmarks"]]
    for info in infos:
        if info.get("variant") and "provider" in info:
            info["provider"] = f"{info['provider']}[{info['variant']}]"
    return ([i for i in infos if "median_ms" in i], [i for i in infos if i.get("kind") == "per_call"],
            run.get("machine_info", {}))


def shape_label(shape) -> str:
    return "x".join(str(n) for n in shape)


def tables(results: list[dict]) -> str:
    groups = defaultdict(list)
    for r in results:
        groups[(r["op"], r["mode"], r["device"], r["dtype"])].append(r)
    out = []
    for (op, mode, device, dtype), rows in sorted(groups.items()):
        providers = sorted({r["provider"] for r in rows}, key=lambda p: (not p.startswith("imm_"), p))
        ours = [p for p in providers if p.startswith("imm_")]
        by_shape = defaultdict(dict)
        for r in rows:
            by_shape[shape_label(r["shape"])][r["provider"]] = r
        first = rows[0]
        out.append(f"\n#### {op}, {mode.replace('_', '+')}, {device}, {dtype} ({first['machine']})\n")
        graphs = [p for p in providers if any(r["provider"] == p and r.get("graph_ms") for r in rows)]
        header = ["shape"] + [f"{p} ms" for p in providers] + [f"{p} graph ms" for p in graphs]
        # The loss head's baseline: the same backend's ops composed (composed_<backend> over imm_<backend> time).
        composed = [p for p in ours if p.replace("imm_", "composed_") in providers]
        for p in ours:
            header += [f"{p} vs eager", f"{p} vs compiled", f"{p} % of copy BW", f"{p} peak / inputs"]
        header += [f"{p} time / composed" for p in composed]
        if "torch_sum" in providers:  # the read-bandwidth yardstick: time over a plain sum of the same bytes
            header += [f"{p} / torch_sum time" for p in ours]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for shape, cells in by_shape.items():
            row = [shape] + [f"{cells[p]['median_ms']:.3g}" if p in cells else "-" for p in providers]
            row += [f"{cells[p]['graph_ms']:.3g}" if p in cells and cells[p].get("graph_ms") else "-" for p in graphs]
            for p in ours:
                mine = cells.get(p)
                if mine is None:
                    row += ["-"] * 4
                    continue
                for base in ("eager", "compiled"):
                    row.append(f"{cells[base]['median_ms'] / mine['median_ms']:.1f}x" if base in cells else "-")
                row.append(f"{mine['roofline_pct']:.0f}%")
                ratio = mine["peak_over_inputs"]
                row.append("-" if ratio is None else f"{ratio:.2f}")
            row += [f"{cells[p]['median_ms'] / cells[p.replace('imm_', 'composed_')]['median_ms']:.2f}"
                    if p in cells and p.replace("imm_", "composed_") in cells else "-" for p in composed]
            if "torch_sum" in providers:
                row += [f"{cells[p]['median_ms'] / cells['torch_sum']['median_ms']:.1f}" if p in cells and
                        "torch_sum" in cells else "-" for p in ours]
            out.append("| " + " | ".join(row) + " |")
        copy = first["copy_gbps"]
        out.append(f"\ncopy bandwidth measured in this run: {copy:.1f} GB/s; threads: {first['threads']}")
    return "\n".join(out)


def per_call_tables(results: list[dict]) -> str:
    """Per device and mode: microseconds per call of each op and provider, and ours over each baseline."""
    out = []
    groups = defaultdict(list)
    for r in results:
        groups[(r["device"], r["mode"])].append(r)
    for (device, mode), rows in sorted(groups.items()):
        out.append(f"\n#### per-call cost, {mode.replace('_', ' ')}, {device} ({rows[0]['machine']})\n")
        out.append("| op, shape | provider | us per call | graph replay us | ours / it |")
        out.append("|---|---|---|---|---|")
        for r in rows:
            times, graphs = r["per_call_us"], r.get("graph_us", {})
            ours = next(p for p in times if p.startswith("imm_"))
            for provider, us in times.items():
                graph = graphs.get(provider)
                ratio = "-" if provider.startswith("imm_") else f"{times[ours] / us:.2f}"
                out.append(f"| {r['op']} {'x'.join(map(str, r['shape']))} | {provider} | {us:.1f} | "
                           f"{'-' if graph is None else f'{graph:.1f}'} | {ratio} |")
        out.append(f"\nthreads: {rows[0]['threads']}; ours / it: the op's first imm_kernels provider's time over this "
                   "row's time")
    return "\n".join(out)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["op"], r["mode"], r["device"], r["dtype"]) for r in results})
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for row, key in zip(axes, panels):
        rows = [r for r in results if (r["op"], r["mode"], r["device"], r["dtype"]) == key]
        shapes = sorted({shape_label(r["shape"]) for r in rows})
        for provider in sorted({r["provider"] for r in rows}):
            mine = {shape_label(r["shape"]): r for r in rows if r["provider"] == provider}
            xs = [s for s in shapes if s in mine]
            row[0].plot(xs, [mine[s]["median_ms"] for s in xs], marker="o", label=provider)
            peaks = [(s, mine[s]["peak_extra_bytes"]) for s in xs if mine[s]["peak_extra_bytes"]]
            if peaks:
                row[1].plot([s for s, _ in peaks], [p / 2**20 for _, p in peaks], marker="o", label=provider)
        row[0].set_title(f"{' '.join(key)}: median time")
        row[0].set_ylabel("ms")
        row[1].set_title("peak extra memory")
        row[1].set_ylabel("MiB")
        for ax in row:
            if all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):  # log needs positive values
                ax.set_yscale("log")
            ax.tick_params(axis="x", labelsize=7)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN.json",
                        help="pytest-benchmark JSON (pytest benchmarks/ --benchmark-json RUN.json); several merge")
    parser.add_argument("--plot", help="write a PNG of time and memory per shape and provider here")
    parser.add_argument("--merged", help="write the runs' results, machine and variants, as one JSON here")
    args = parser.parse_args(argv)
    results, per_call, machine = [], [], {}
    for path in args.runs:
        found, found_per_call, machine = load(path)
        results += found
        per_call += found_per_call
    if not results and not per_call:
        raise SystemExit(f"{', '.join(args.runs)}: no imm_kernels benchmark results in them")
    print(f"machine: {machine.get('cpu', {}).get('brand_raw', machine.get('machine', '?'))}")
    print(tables(results))
    if per_call:
        print(per_call_tables(per_call))
    if args.plot and results:
        plot(results, args.plot)
        print(f"\nplot: {args.plot}")
    if args.merged:
        with open(args.merged, "w") as f:
            json.dump({"machine_info": machine, "results": results, "per_call": per_call}, f, indent=1)


if __name__ == "__main__":
    main()

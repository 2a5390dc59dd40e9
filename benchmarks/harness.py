"""What every benchmark shares: devices and sizes, honest timing (warm-up, medians, CUDA events, inputs
rotated out of L2; on GPUs each call timed eagerly and as a CUDA-graph replay, so kernel time and host time
are both visible), peak extra memory, the copy-bandwidth ceiling measured in the same run, and the
extra_info each result carries into pytest-benchmark's JSON."""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time
from functools import cache

import torch

#: IMM_BENCH_DEVICES=cuda keeps only the GPU cases (e.g. on a GPU host whose CPU numbers nobody wants).
DEVICES = [d for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
           if d in os.environ.get("IMM_BENCH_DEVICES", d).split(",")]
#: IMM_BENCH_SIZE=smoke runs tiny shapes and one repetition: the CI guard against rot, not a measurement.
SMOKE = os.environ.get("IMM_BENCH_SIZE", "full") == "smoke"


def native_providers(device: str) -> list[str]:
    """The imm_kernels backends timed on `device`, as providers "imm_<backend>": the C++ backend on CPUs, the
    CUDA and Triton backends on GPUs (the Triton interpreter on CPU tensors is a correctness tool, not a
    measurement). Listed whether or not they can run here: one that cannot fails its cases with the reason
    (e.g. the extension is not built, or not importable from this source tree), it is never left out."""
    return ["imm_cpu"] if device == "cpu" else ["imm_cuda", "imm_triton"]


def require_backend(provider: str, device: str) -> None:
    """Fails the case loudly, with what is missing and how to get it, when an imm_kernels provider cannot run."""
    import pytest

    import imm_kernels

    backend = provider.removeprefix("imm_")
    if backend not in imm_kernels.available_backends(device):
        from imm_kernels import _dispatch

        pytest.fail(f"{provider} cannot run on {device}: {_dispatch.unavailable_reason(backend, torch.device(device))}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def variant() -> str:
    """The kernel-variant settings in force (IMM_TRITON_* and IMM_CUDA_* variables; imm_kernels/_dispatch.py),
    "" for the defaults: part of every result, so that a sweep's runs stay apart."""
    return " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("IMM_TRITON_", "IMM_CUDA_")))


def machine(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads, torch {torch.__version__}"


def time_ms(run, inputs: list, device: str, *, repeats: int | None = None) -> float:
    """Median milliseconds of run(inputs[k]) cycling over the input sets (so GPU runs do not hit a warm L2),
    after a warm-up; CUDA events on GPUs, perf_counter on CPUs."""
    repeats = repeats or (1 if SMOKE else (30 if device == "cuda" else 7))
    run(inputs[0])  # warm-up: allocation, compilation, caches
    sync(device)
    times = []
    for k in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(inputs[k % len(inputs)])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run(inputs[k % len(inputs)])
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_replay_ms(run, inputs: list, device: str, *, repeats: int | None = None) -> tuple[float | None, str]:
    """(median milliseconds of a CUDA-graph replay of run(inputs[k]) over the input sets, ""), the GPU time
    without the host's; (None, why) where there is no GPU or the call cannot be captured."""
    if device != "cuda":
        return None, "no GPU"
    repeats = repeats or (1 if SMOKE else 30)
    graphs = []
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants
            for inputs_k in inputs:
                run(inputs_k)
        torch.cuda.current_stream().wait_stream(side)
        for inputs_k in inputs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run(inputs_k)
            graphs.append(graph)
    except Exception as error:  # noqa: BLE001  (a provider that cannot be captured is reported, not fatal)
        torch.cuda.synchronize()
        return None, f"{type(error).__name__}: {error}"[:300]
    times = []
    for k in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphs[k % len(graphs)].replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), ""


def per_call_us(calls: dict, device: str, *, rounds: int | None = None) -> dict:
    """Median microseconds per call of each fn in `calls` ({name: fn}), timed in interleaved rounds of many
    calls (so the machine's state is shared by all sides of a ratio); on GPUs synchronized at each round's end,
    so it is the host's cost per call where the kernels are tiny."""
    rounds = rounds or (2 if SMOKE else 15)
    count = 20 if SMOKE else 1000
    for fn in calls.values():  # warm-up
        for _ in range(count // 4):
            fn()
    sync(device)
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            for _ in range(count):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / count * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _unpooled_large_allocations() -> None:
    """Large CPU tensors in their own mmap, unmapped when freed: glibc otherwise raises its mmap threshold after
    the first frees and serves later tensors from memory it kept, so a call's temporaries would not show in the
    peak resident set below (M_MMAP_THRESHOLD = -3 fixes the threshold, at 1 MiB)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)
    except (OSError, AttributeError):
        pass


_unpooled_large_allocations()


def peak_extra_bytes(run, device: str) -> int | None:
    """Memory the call needs beyond what is allocated before it: the CUDA caching allocator's peak on GPUs,
    the process's peak resident set (reset through /proc/self/clear_refs) on Linux CPUs."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        before = _rss_bytes("VmRSS:")
        run()
        return _rss_bytes("VmHWM:") - before
    except OSError:
        return None


def reference_mean(summed_loss, groups: int, group_size: int, features: int, device) -> torch.Tensor:
    """The mean over groups of a float64 reference loss, and its backward, a few groups at a time so that large
    shapes fit in memory: summed_loss(chunk, rows) gives the summed loss of the groups in slice `chunk` (rows: their
    rows)."""
    per_chunk = max(1, 2**26 // (4 * group_size * group_size * features))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, groups, per_chunk):
        chunk = slice(start, min(groups, start + per_chunk))
        part = summed_loss(chunk, slice(chunk.start * group_size, chunk.stop * group_size)) / groups
        part.backward()
        total += part.detach()
    return total


@cache
def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device copy (bytes read + bytes written), measured once per run."""
    numel = (2**26 if device == "cuda" else 2**24) // (16 if SMOKE else 1)
    sources = [torch.randn(numel, device=device) for _ in range(2)]
    destination = torch.empty_like(sources[0])
    ms = time_ms(lambda s: destination.copy_(s), sources, device)
    return 2 * numel * 4 / (ms / 1e3)


def input_sets(make, device: str, bytes_per_set: int) -> list:
    """Enough independent input sets that cycling through them defeats the GPU's L2 (one set on CPUs)."""
    if device != "cuda":
        return [make()]
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return [make() for _ in range(max(1, min(4, -(-4 * l2 // bytes_per_set))))]


def record(benchmark, *, device: str, provider: str, op: str, mode: str, shape: tuple, dtype: torch.dtype,
           median_ms: float, min_bytes: int, peak_bytes: int | None, input_bytes: int,
           graph: tuple[float | None, str] = (None, "no GPU")) -> None:
    """Puts one result's derived numbers into pytest-benchmark's extra_info (the report reads them). The share of
    the copy bandwidth is from the graph replay where there is one (GPU time), else from the eager time."""
    ceiling = copy_bandwidth(device)
    graph_ms, graph_error = graph
    achieved = min_bytes / ((graph_ms or median_ms) / 1e3)
    benchmark.extra_info.update(
        op=op, mode=mode, device=device, provider=provider, variant=variant(), shape=list(shape),
        dtype=str(dtype).replace("torch.", ""),
        machine=machine(device), threads=torch.get_num_threads(), median_ms=median_ms, graph_ms=graph_ms,
        graph_error=graph_error, min_bytes=min_bytes, achieved_gbps=achieved / 1e9, copy_gbps=ceiling / 1e9,
        roofline_pct=100 * achieved / ceiling, peak_extra_bytes=peak_bytes,
        peak_over_inputs=None if peak_bytes is None else peak_bytes / input_bytes)

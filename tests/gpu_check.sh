#!/usr/bin/env bash
# The whole check on a machine with an NVIDIA GPU, from a clean checkout, offline, in time-boxed stages (about 9
# minutes on an H200 with the limits below): builds imm_kernels with the CUDA extension for this GPU's
# architecture into the current python (editable, no downloads); runs the tests that need the GPU first (CUDA
# graphs and host syncs, every launch layout, the fuzz test, then the rest of the GPU cases; no wheel build: CI
# checks that), a short GPU run of the trainer, the GPU benchmarks (each case timed eagerly and as a CUDA-graph
# replay), and the sweep of the kernel variants (tests, then benchmarks, per variant setting); and writes a
# markdown summary with the benchmark tables to $OUT/gpu_check.md (or ./gpu_check.md), plus the files to commit
# as docs/benchmarks/<card>-<date>.{json,md}, logs beside them.
# Needs: nvidia-smi, nvcc (PATH or CUDACXX), and in the python: torch (CUDA build), scikit-build-core,
# pybind11, pytest, pytest-benchmark, hypothesis, matplotlib, tqdm and cmake (triton and pytest-xdist are used
# where present).
# Usage: bash tests/gpu_check.sh [extra pytest arguments for the test stage]   (PYTHON=... picks the python;
# IMM_TESTS_TIMEOUT_S, IMM_TRAIN_TIMEOUT_S, IMM_BENCH_TIMEOUT_S and IMM_SWEEP_TIMEOUT_S bound the stages, in whole
# seconds, 0 for none; IMM_VARIANTS overrides the sweep's settings, space-separated NAME=VALUE, "" for none)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
REPORT_DIR=${OUT:-$ROOT}
mkdir -p "$REPORT_DIR"
# What comes back: the summary, the files to commit (<card>-<date>.{json,md}), the test log and an archive of
# every other log (a lent machine returns a handful of files); the rest is written under $WORK.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$REPORT_DIR/gpu_check.md"
BUILD_LOG="$REPORT_DIR/gpu_check_build.log"
TESTS_LOG="$REPORT_DIR/gpu_check_tests.log"

fail() {  # a summary that says what stopped the check, then exit 1
  printf '# imm_kernels GPU check: not run\n\n%s\n' "$1" >"$SUMMARY"
  echo "gpu_check: $1" >&2
  exit 1
}

# Results of an earlier check in the same folder must not pass for this one's.
rm -f "$REPORT_DIR"/gpu_check.md "$REPORT_DIR"/gpu_check_*.{log,xml,json,md,png,tar.gz} "$REPORT_DIR"/*-20??-??-??.{json,md}
for limit in IMM_TESTS_TIMEOUT_S IMM_TRAIN_TIMEOUT_S IMM_BENCH_TIMEOUT_S IMM_SWEEP_TIMEOUT_S; do
  case "${!limit:-1}" in '' | *[!0-9]*) fail "$limit must be a whole number of seconds; got '${!limit}'" ;; esac
done

# What the offline build and the tests need, all at once so one message lists everything missing.
missing=()
command -v nvidia-smi >/dev/null || missing+=("nvidia-smi (no NVIDIA driver?)")
NVCC=${CUDACXX:-$(command -v nvcc || true)}
[ -n "$NVCC" ] || missing+=("nvcc (put CUDA's bin folder on PATH or set CUDACXX)")
for module in torch scikit_build_core pybind11 pytest pytest_benchmark hypothesis numpy matplotlib tqdm; do
  "$PY" -c "import $module" 2>/dev/null || missing+=("python module $module")
done
command -v cmake >/dev/null || "$PY" -c "import cmake" 2>/dev/null || missing+=("cmake (>= 3.18)")
[ ${#missing[@]} -eq 0 ] || fail "missing: $(IFS=';'; echo "${missing[*]}")"
"$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null ||
  fail "torch in $PY sees no CUDA device (a CPU-only torch, or no usable driver)"

# The GPU's own architecture, machine code only (never 'native', which CMake would resolve at build time).
capability=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
[ -n "$capability" ] || capability=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
ARCH="${capability}-real"

echo "gpu_check: building imm_kernels for $ARCH (log: $BUILD_LOG)"
start=$(date +%s)
if ! CUDAARCHS="$ARCH" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
    -Ccmake.define.IMM_CUDA=ON >"$BUILD_LOG" 2>&1; then
  tail -n 30 "$BUILD_LOG" >&2
  fail "the build failed; see $BUILD_LOG"
fi
BUILD_SECONDS=$(($(date +%s) - start))
BACKENDS=$("$PY" -c "import imm_kernels; print(', '.join(imm_kernels.available_backends('cuda')))" 2>&1)
case "$BACKENDS" in *cuda*) ;; *) fail "built, but the cuda backend is unavailable: $BACKENDS" ;; esac

# The model's Triton half (every kernel compiled for this GPU and its resources read: host work only) runs beside
# the GPU stages; the summary prints it under the measured tables.
MODEL_KERNELS="$WORK/gpu_check_model_kernels.md"
timeout 400 nice -n 10 "$PY" -m benchmarks.model --only kernels --arch "$capability" >"$MODEL_KERNELS" 2>&1 &
MODEL_PID=$!

# Limits (seconds; 0 = none) that fit the whole check in about 9 minutes of an H200: a stage cut short still
# reports what finished.
TESTS_LIMIT=${IMM_TESTS_TIMEOUT_S:-170}  # the test stage
TRAIN_LIMIT=${IMM_TRAIN_TIMEOUT_S:-60}   # both trainer runs
BENCH_LIMIT=${IMM_BENCH_TIMEOUT_S:-170}  # all benchmark files together
SWEEP_LIMIT=${IMM_SWEEP_TIMEOUT_S:-110}  # the variants' tests and benchmarks
# Kernel variants the sweep runs (imm_kernels/_dispatch.py VARIANTS says what each means), one setting at a time
# on top of the defaults: the designs of the GPU performance work, timed in the same lease as the defaults.
VARIANTS=${IMM_VARIANTS-"IMM_TRITON_MMD=stream IMM_TRITON_COMBINE=wide IMM_CUDA_KERNELS=next"}
limited() {  # limited SECONDS COMMAND...: SIGINT at the limit, so pytest still writes its reports
  local seconds=$1
  shift
  if [ "$seconds" -gt 0 ]; then timeout -s INT -k 30 "$seconds" "$@"; else "$@"; fi
}
left_until() {  # left_until DEADLINE LIMIT: seconds to DEADLINE (0 when LIMIT is 0, i.e. none); fails under 10 s
  [ "$2" -gt 0 ] || { echo 0; return 0; }
  local left=$(($1 - $(date +%s)))
  echo "$left"
  [ "$left" -gt 10 ]
}

# pytest-xdist, where present, spreads the suite (mostly Triton compilation) over the host's cores.
test_args=()
if "$PY" -c "import xdist" 2>/dev/null; then
  test_args+=(-n "${IMM_TEST_WORKERS:-$(( $(nproc) > 16 ? 8 : ($(nproc) + 1) / 2 ))}")
fi
# The GPU cases, the files that matter most first, so that a time limit cuts off the least; CPU-only cases are
# CI's. test_cuda_build.py builds a wheel: CI's too.
GPU_TESTS=(tests/test_cuda_graphs.py tests/test_launch_layouts.py tests/test_fuzz.py tests/test_hardening.py
           tests/test_mmd.py tests/test_interpolant.py tests/test_compile.py tests/test_loss_head.py)
echo "gpu_check: test stage, GPU cases (log: $TESTS_LOG)"
: >"$TESTS_LOG"
TESTS_STATUS=0
tests_deadline=$(($(date +%s) + TESTS_LIMIT))
for file in "${GPU_TESTS[@]}"; do
  name=tests_$(basename "$file" .py)
  if ! left=$(left_until "$tests_deadline" "$TESTS_LIMIT"); then
    echo "gpu_check: $file skipped: IMM_TESTS_TIMEOUT_S spent" | tee -a "$TESTS_LOG" >&2
    TESTS_STATUS=1
    continue
  fi
  limited "$left" "$PY" -m pytest "$file" -k cuda -p no:cacheprovider -q -rfE ${test_args[@]+"${test_args[@]}"} \
    --junitxml="$WORK/gpu_check_$name.xml" "$@" >>"$TESTS_LOG" 2>&1 || TESTS_STATUS=1
done

# The trainer on the GPU: bf16 autocast, then fp16 with its GradScaler under torchrun (NCCL and DDP, on two
# GPUs where there are two), briefly.
TRAIN_LOG="$WORK/gpu_check_trainer.log"
echo "gpu_check: trainer (log: gpu_check_trainer.log)"
runs="$WORK/runs"
ranks=$(( $(nvidia-smi --list-gpus | wc -l) > 1 ? 2 : 1 ))
train_deadline=$(($(date +%s) + TRAIN_LIMIT))
{
  left=$(left_until "$train_deadline" "$TRAIN_LIMIT") &&
  limited "$left" "$PY" examples/train.py --data checkerboard --out "$runs/bf16" --iters 300 --precision bf16 \
    --device cuda &&
  left=$(left_until "$train_deadline" "$TRAIN_LIMIT") &&
  limited "$left" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$ranks" examples/train.py \
    --data digits --out "$runs/fp16" --iters 200 --batch 256 --group-size 4 --precision fp16 --device cuda
} >"$TRAIN_LOG" 2>&1
TRAIN_STATUS=$?
[ "$TRAIN_STATUS" -eq 0 ] || tail -n 20 "$TRAIN_LOG" >&2

# One pytest run (and JSON) per benchmark file, GPU cases only unless IMM_BENCH_DEVICES says otherwise.
export IMM_BENCH_DEVICES=${IMM_BENCH_DEVICES:-cuda}
BENCH_STATUS=0
bench_json=()
bench() {  # bench NAME LIMIT FILE [pytest arguments]: one benchmark file's run into $WORK/gpu_check_NAME.{json,xml,log}
  local name=$1 seconds=$2 file=$3
  shift 3
  limited "$seconds" "$PY" -m pytest "benchmarks/$file.py" -p no:cacheprovider -q -rfEs "$@" \
    --junitxml="$WORK/gpu_check_$name.xml" --benchmark-json="$WORK/gpu_check_$name.json" \
    >"$WORK/gpu_check_$name.log" 2>&1 || BENCH_STATUS=1
  [ -s "$WORK/gpu_check_$name.json" ] && bench_json+=("$WORK/gpu_check_$name.json")
}
bench_deadline=$(($(date +%s) + BENCH_LIMIT))
for name in bench_overhead bench_mmd bench_interpolant bench_train_step bench_loss_head; do  # per-call cost is quick
  if ! left=$(left_until "$bench_deadline" "$BENCH_LIMIT"); then
    echo "gpu_check: $name skipped: IMM_BENCH_TIMEOUT_S spent" >&2
    BENCH_STATUS=1
    continue
  fi
  echo "gpu_check: $name (log: gpu_check_logs.tar.gz)"
  bench "$name" "$left" "$name"
done

# The sweep: per variant setting, the GPU tests of the backend it changes, then its benchmarks (its cases only).
SWEEP_STATUS=0
sweep_deadline=$(($(date +%s) + SWEEP_LIMIT))
for setting in $VARIANTS; do
  case "$setting" in IMM_TRITON_*) provider=imm_triton; backend=triton ;; *) provider=imm_cuda; backend=cuda ;; esac
  tag=$(echo "$setting" | tr '=' '_' | tr 'A-Z' 'a-z')
  if ! left=$(left_until "$sweep_deadline" "$SWEEP_LIMIT"); then
    echo "gpu_check: variant $setting skipped: IMM_SWEEP_TIMEOUT_S spent" | tee -a "$TESTS_LOG" >&2
    SWEEP_STATUS=1
    continue
  fi
  echo "gpu_check: variant $setting"
  env "$setting" timeout -s INT -k 30 "$left" "$PY" -m pytest tests/test_launch_layouts.py tests/test_mmd.py \
    tests/test_interpolant.py tests/test_cuda_graphs.py -k "cuda-$backend" -x -p no:cacheprovider -q -rfE \
    --junitxml="$WORK/gpu_check_tests_$tag.xml" >>"$TESTS_LOG" 2>&1 || { SWEEP_STATUS=1; continue; }
  left=$(left_until "$sweep_deadline" "$SWEEP_LIMIT") || { SWEEP_STATUS=1; continue; }
  export "$setting"
  bench "sweep_${tag}_mmd" "$left" bench_mmd -k "$provider"
  left=$(left_until "$sweep_deadline" "$SWEEP_LIMIT") && bench "sweep_${tag}_interpolant" "$left" bench_interpolant \
    -k "$provider"
  unset "${setting%%=*}"
done

if [ ${#bench_json[@]} -gt 0 ]; then
  "$PY" -m benchmarks.report "${bench_json[@]}" --plot "$WORK/gpu_check_benchmarks.png" --merged "$WORK/merged.json" \
    >"$WORK/gpu_check_benchmarks.md" 2>&1 || BENCH_STATUS=1
fi

wait "$MODEL_PID" || echo "gpu_check: the model's kernel table failed (see the summary)" >&2

"$PY" - "$WORK" "$ARCH" "$BUILD_SECONDS" "$BACKENDS" "$NVCC" "$TESTS_STATUS" "$TRAIN_STATUS" "$BENCH_STATUS" \
  "$SWEEP_STATUS" "$VARIANTS" "$TESTS_LOG" "$MODEL_KERNELS" <<'EOF' >"$SUMMARY"
import json, platform, re, subprocess, sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

(report, arch, build_seconds, backends, nvcc, tests_status, train_status, bench_status, sweep_status, variants,
 tests_log, model_kernels) = sys.argv[1:]
report, tests_log, model_kernels = Path(report), Path(tests_log), Path(model_kernels)


def counts(*xmls: Path) -> str:
    xmls = [xml for xml in xmls if xml.exists()]
    if not xmls:
        return "no results (see the log)"
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in (s for xml in xmls for s in ET.parse(xml).getroot().iter("testsuite")):
        for key in total:
            total[key] += int(suite.get(key, 0))
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return f"{passed} passed, {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped"


def run(*command: str) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True).stdout.strip()
    except OSError as error:
        return f"({error})"


try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
gpu = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader").splitlines()[0]
name, driver, memory = (field.strip() for field in gpu.split(","))
nvcc_release = re.search(r"release [\d.]+, V[\d.]+", run(nvcc, "--version"))
ok = all(status == "0" for status in (tests_status, train_status, bench_status, sweep_status))
print(f"# imm_kernels GPU check: {'passed' if ok else 'FAILED'}\n")
print("| | |\n| --- | --- |")
print(f"| GPU | {name} ({memory}), built for {arch} |")
print(f"| driver | {driver} |")
print(f"| torch | {torch.__version__} (CUDA {torch.version.cuda}) |")
print(f"| triton | {triton_version} |")
print(f"| nvcc | {nvcc_release.group(0) if nvcc_release else nvcc} |")
print(f"| python | {platform.python_version()} |")
print(f"| build | {build_seconds} s; backends on cuda: {backends} |")
print(f"| tests | {counts(*sorted(report.glob('gpu_check_tests_test_*.xml')))} (log: gpu_check_tests.log) |")
print(f"| trainer | {'passed' if train_status == '0' else 'FAILED'} (bf16; fp16 + GradScaler under torchrun, NCCL "
      "and DDP; log: gpu_check_trainer.log) |")
print(f"| benchmarks | {counts(*sorted(report.glob('gpu_check_bench_*.xml')))} |")
for variant in variants.split():
    tag = variant.replace("=", "_").lower()
    print(f"| variant {variant} | tests: {counts(report / f'gpu_check_tests_{tag}.xml')}; benchmarks: "
          f"{counts(*sorted(report.glob(f'gpu_check_sweep_{tag}_*.xml')))} |")
failed = [line for log in [tests_log, *sorted(report.glob("gpu_check_*bench_*.log")),
                           *sorted(report.glob("gpu_check_sweep_*.log"))]
          if log.exists() for line in log.read_text().splitlines() if line.startswith(("FAILED", "ERROR"))]
if failed:
    print("\n## Failures\n")
    print("\n".join(f"- `{line}`" for line in failed[:60]))
tables = report / "gpu_check_benchmarks.md"  # the report's tables
if tables.exists():
    print("\n## Benchmarks\n")
    print(tables.read_text())
# The model (benchmarks/model.py): the fewest bytes per case at the copy bandwidth measured here, and the Triton
# kernels' registers, spills, vector widths and occupancy on this GPU.
from benchmarks.model import byte_table

merged = report / "merged.json"
copies = [r["copy_gbps"] for r in json.loads(merged.read_text())["results"]] if merged.exists() else []
print("\n## Model\n")
if copies:
    print(f"#### Bytes and floors at the copy bandwidth measured here, {max(copies) / 1e3:.2f} TB/s\n")
    print(byte_table(max(copies) * 1e9))
print(model_kernels.read_text() if model_kernels.exists() else "(no kernel table)")
EOF
# The files to commit: docs/benchmarks/<card>-<date>.{json,md} (the card's model in lower case, e.g. h200).
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | awk '{print tolower($NF)}' | tr -cd 'a-z0-9-')
stem="$REPORT_DIR/${card:-gpu}-$(date +%Y-%m-%d)"
cp "$SUMMARY" "$stem.md"
[ -s "$WORK/merged.json" ] && cp "$WORK/merged.json" "$stem.json"
[ -s "$WORK/gpu_check_benchmarks.png" ] && cp "$WORK/gpu_check_benchmarks.png" "$stem.png"
tar -czf "$REPORT_DIR/gpu_check_logs.tar.gz" -C "$WORK" --exclude runs . 2>/dev/null
cat "$SUMMARY"
[ "$TESTS_STATUS" -eq 0 ] && [ "$TRAIN_STATUS" -eq 0 ] && [ "$BENCH_STATUS" -eq 0 ] && [ "$SWEEP_STATUS" -eq 0 ]

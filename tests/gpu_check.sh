#!/usr/bin/env bash
# The whole check on a machine with an NVIDIA GPU, from a clean checkout, offline: builds imm_kernels with the
# CUDA extension for this GPU's architecture into the current python (editable, no downloads), runs the test
# suite (the cuda and triton backends join the parametrization by themselves) and the benchmarks, and writes a
# markdown summary to $OUT/gpu_check.md (or ./gpu_check.md), logs beside it.
# Needs: nvidia-smi, nvcc (PATH or CUDACXX), and in the python: torch (CUDA build), scikit-build-core,
# pybind11, pytest, hypothesis, and cmake (triton and pytest-benchmark are used where present).
# Usage: bash tests/gpu_check.sh [extra pytest arguments for the test suite]   (PYTHON=... picks the python)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
REPORT_DIR=${OUT:-$ROOT}
mkdir -p "$REPORT_DIR"
SUMMARY="$REPORT_DIR/gpu_check.md"
BUILD_LOG="$REPORT_DIR/gpu_check_build.log"
TESTS_LOG="$REPORT_DIR/gpu_check_tests.log"
BENCH_LOG="$REPORT_DIR/gpu_check_benchmarks.log"
BENCH_JSON="$REPORT_DIR/gpu_check_benchmarks.json"

fail() {  # a summary that says what stopped the check, then exit 1
  printf '# imm_kernels GPU check: not run\n\n%s\n' "$1" >"$SUMMARY"
  echo "gpu_check: $1" >&2
  exit 1
}

# What the offline build and the tests need, all at once so one message lists everything missing.
missing=()
command -v nvidia-smi >/dev/null || missing+=("nvidia-smi (no NVIDIA driver?)")
NVCC=${CUDACXX:-$(command -v nvcc || true)}
[ -n "$NVCC" ] || missing+=("nvcc (put CUDA's bin folder on PATH or set CUDACXX)")
for module in torch scikit_build_core pybind11 pytest hypothesis numpy; do
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

echo "gpu_check: test suite (log: $TESTS_LOG)"
"$PY" -m pytest tests -p no:cacheprovider -q -rfE --junitxml="$REPORT_DIR/gpu_check_tests.xml" "$@" >"$TESTS_LOG" 2>&1
TESTS_STATUS=$?

BENCH_STATUS=none
if compgen -G "benchmarks/bench_*.py" >/dev/null || compgen -G "benchmarks/test_*.py" >/dev/null; then
  echo "gpu_check: benchmarks (log: $BENCH_LOG)"
  bench_args=()
  "$PY" -c "import pytest_benchmark" 2>/dev/null && bench_args+=("--benchmark-json=$BENCH_JSON")
  "$PY" -m pytest benchmarks -p no:cacheprovider -q -rfE --junitxml="$REPORT_DIR/gpu_check_benchmarks.xml" \
    "${bench_args[@]}" >"$BENCH_LOG" 2>&1
  BENCH_STATUS=$?
fi

"$PY" - "$REPORT_DIR" "$ARCH" "$BUILD_SECONDS" "$BACKENDS" "$NVCC" "$TESTS_STATUS" "$BENCH_STATUS" <<'EOF' >"$SUMMARY"
import platform, re, subprocess, sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

report, arch, build_seconds, backends, nvcc, tests_status, bench_status = sys.argv[1:]
report = Path(report)


def counts(xml: Path) -> str:
    if not xml.exists():
        return "no results (see the log)"
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in ET.parse(xml).getroot().iter("testsuite"):
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
bench_json = report / "gpu_check_benchmarks.json"
ok = tests_status == "0" and bench_status in ("0", "none")
print(f"# imm_kernels GPU check: {'passed' if ok else 'FAILED'}\n")
print("| | |\n| --- | --- |")
print(f"| GPU | {name} ({memory}), built for {arch} |")
print(f"| driver | {driver} |")
print(f"| torch | {torch.__version__} (CUDA {torch.version.cuda}) |")
print(f"| triton | {triton_version} |")
print(f"| nvcc | {nvcc_release.group(0) if nvcc_release else nvcc} |")
print(f"| python | {platform.python_version()} |")
print(f"| build | {build_seconds} s; backends on cuda: {backends} |")
print(f"| tests | {counts(report / 'gpu_check_tests.xml')} (log: gpu_check_tests.log) |")
if bench_status == "none":
    print("| benchmarks | none in benchmarks/ |")
else:
    print(f"| benchmarks | {counts(report / 'gpu_check_benchmarks.xml')}; results: "
          f"{bench_json if bench_json.exists() else 'no JSON (pytest-benchmark missing?)'} |")
log = (report / "gpu_check_tests.log").read_text().splitlines()
failed = [line for line in log if line.startswith(("FAILED", "ERROR"))]
if failed:
    print("\n## Failures\n")
    print("\n".join(f"- `{line}`" for line in failed[:50]))
EOF
cat "$SUMMARY"
[ "$TESTS_STATUS" -eq 0 ] && { [ "$BENCH_STATUS" = none ] || [ "$BENCH_STATUS" -eq 0 ]; }

#!/usr/bin/env bash
# The whole test suite from a clean clone: sets up .venv, builds imm_kernels, runs tests/, then every
# benchmark once at smoke size (correctness checks included) and the report over that run, so the
# benchmarks and the report never rot. Extra arguments go to the tests/ run (e.g. tests/run.sh -k mmd).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/env.sh"
cd "$IMM_ROOT"
"$PY" -m pytest -p no:cacheprovider tests "$@"
smoke=$(mktemp -d)
IMM_BENCH_SIZE=smoke "$PY" -m pytest -p no:cacheprovider -q benchmarks --benchmark-json "$smoke/run.json"
"$PY" -m benchmarks.report "$smoke/run.json" --plot "$smoke/run.png" > "$smoke/report.md"
test -s "$smoke/run.png" && grep -q "imm_cpu" "$smoke/report.md" && echo "benchmark report: OK ($smoke/report.md)"

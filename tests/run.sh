#!/usr/bin/env bash
# The whole test suite from a clean clone: sets up .venv, builds imm_kernels, runs tests/ and the
# CI-sized benchmark smoke run. Extra arguments go to pytest (e.g. tests/run.sh -k mmd).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/env.sh"
cd "$IMM_ROOT"
"$PY" -m pytest -p no:cacheprovider tests "$@"

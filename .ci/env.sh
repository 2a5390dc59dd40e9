# Sourced by tests/run.sh and examples/run.sh: creates the virtual environment (.venv, or $IMM_VENV) on
# first use, installs the pinned toolchain and test tools, and builds imm_kernels into it (editable, so
# the C++ extension lands beside the sources). Needs python3 (3.10+), a C++17 compiler and OpenMP.
set -euo pipefail
IMM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMM_VENV=${IMM_VENV:-$IMM_ROOT/.venv}
if [ ! -x "$IMM_VENV/bin/python" ]; then
  python3 -m venv "$IMM_VENV"
fi
PY="$IMM_VENV/bin/python"
# torch 2.13.0 CPU and triton 3.7.1 (the version torch 2.13 pins) are pinned so a fresh machine never pulls a CUDA build.
"$PY" -m pip install -q --disable-pip-version-check -r "$IMM_ROOT/tests/requirements.txt" 2>&1 \
  | grep -v "is neither a file nor a directory" || true
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e "$IMM_ROOT" 2>&1 \
  | grep -v "is neither a file nor a directory" || true
"$PY" -c "import imm_kernels._C" # fail here, with the import error, if the build did not produce the extension
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

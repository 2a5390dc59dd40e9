# Sourced by tests/run.sh and examples/run.sh: creates the virtual environment (.venv, or $IMM_VENV) on
# first use, installs the pinned toolchain and test tools, and builds imm_kernels into it (editable, so
# the C++ extension lands beside the sources). Needs python3 (3.10+), a C++17 compiler and OpenMP.
set -euo pipefail
IMM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMM_VENV=${IMM_VENV:-$IMM_ROOT/.venv}
progress() { echo "env.sh: $*" >&2; }  # pip runs quietly: say what each slow step is doing

# One setup at a time per environment: two jobs reinstalling into one venv at once can leave a job without the
# extension ("No module named imm_kernels._C"). Closing the descriptor at the end releases the lock.
if command -v flock >/dev/null 2>&1; then
  exec {IMM_SETUP_LOCK}>"$IMM_VENV.lock"
  flock "$IMM_SETUP_LOCK"
fi

if [ ! -x "$IMM_VENV/bin/python" ]; then
  progress "creating the virtual environment $IMM_VENV"
  python3 -m venv "$IMM_VENV"
fi
PY="$IMM_VENV/bin/python"

pip_install() {  # pip's exit status, without this machine's notes about local index folders
  "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is neither a file nor a directory" >&2)
}

# torch 2.13.0 CPU and triton 3.7.1 (the version torch 2.13 pins) are pinned: a fresh machine never pulls a CUDA build.
progress "installing the pinned toolchain (tests/requirements.txt; the first run downloads torch and triton)"
pip_install -r "$IMM_ROOT/tests/requirements.txt"
if [ -f "$IMM_ROOT/examples/requirements.txt" ]; then
  progress "installing the examples' packages (examples/requirements.txt)"
  pip_install -r "$IMM_ROOT/examples/requirements.txt"
fi
progress "building imm_kernels and its C++ extension into $IMM_VENV (editable install)"
pip_install --no-build-isolation -e "$IMM_ROOT"
"$PY" -c "import imm_kernels._C"  # fail here, with the import error, if the build made no extension
if [ -n "${IMM_SETUP_LOCK:-}" ]; then exec {IMM_SETUP_LOCK}>&-; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

#!/usr/bin/env bash
# The main job, from a fresh machine: set up .venv, train IMM on the checkerboard on the CPU (under 5 minutes),
# sample at 1, 2, 4 and 8 steps, and print the metric table against the held-out floor: each score the mean over
# 4 disjoint sets of 5,000 samples, the floor over 4 sets of 5,000 training points (one set is too noisy to read).
# Output (replaced on every run): out/checkerboard/ (or $IMM_RUN_DIR). Extra arguments go to train.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/env.sh"
cd "$IMM_ROOT"
RUN_DIR=${IMM_RUN_DIR:-out/checkerboard}
SETS=4 SET_SIZE=5000
rm -rf "$RUN_DIR"

start=$(date +%s)
"$PY" examples/train.py --data checkerboard --out "$RUN_DIR" --eval-every -1 "$@"  # evaluated below instead
echo "training took $(( $(date +%s) - start )) s"

samples=()
for sampler in pushforward restart; do
  for steps in 1 2 4 8; do
    [ "$sampler" = restart ] && [ "$steps" = 1 ] && continue  # one step is the same map for both samplers
    file="$RUN_DIR/${steps}_step_${sampler}.npy"
    "$PY" examples/sample.py --ckpt "$RUN_DIR" --steps "$steps" --sampler "$sampler" --n $((SETS * SET_SIZE)) \
      --out "$file"
    samples+=("$file")
  done
done
echo
# on every core: the 1-thread budget is the training's
OMP_NUM_THREADS=$(nproc) "$PY" examples/evaluate.py --ckpt "$RUN_DIR" --samples "${samples[@]}" --n "$SET_SIZE" \
  --sets "$SETS"
echo
echo "PNGs: $RUN_DIR/*_step_*.png (samples), $RUN_DIR/loss.png (loss curve); log: $RUN_DIR/log.jsonl;"
echo "      metrics: $RUN_DIR/metrics.json"

#!/usr/bin/env bash
# The prepared check for a lent GPU (see docs/benchmarks.md, "GPU check"). Runs from the checkout with no
# install and no network: laco from src/ (PYTHONPATH), the device image's torch/transformers/accelerate/peft.
# Writes summary.md, summary.json, gpu_check.tar.gz and bench_*.md into --out (default $OUT).
#   bash scripts/gpu_check.sh              # on the GPU machine (about 5-7 minutes, budget 450 s)
#   bash scripts/gpu_check.sh --dry-run    # anywhere: the plan, run on the CPU at tiny shapes
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m laco gpu-check "$@"

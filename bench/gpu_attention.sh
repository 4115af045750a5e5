#!/usr/bin/env bash
# Varlen flash attention on a GPU, in one command (for a session with a GPU), under 8 minutes on
# an H100:
#   bench/gpu_attention.sh            # from the repository root, after `make test` created .venv
# Correctness on the device (both backwards, TMA and pointer forwards), then TFLOP/s of our
# variants (TMA on/off, deterministic on/off) beside torch SDPA and a measured bf16 matmul peak,
# then a block-config sweep within the time left. Writes bench/results/gpu_attention.md (a
# table ready for bench/RESULTS.md). See bench/gpu_attention.py for what each part checks.
#   FULL=1       every length 4k..128k (longer than 8 minutes)
#   DRY_RUN=1    everything on CPU through the Triton interpreter at tiny sizes (checks the script)
#   TIME_BUDGET_S=450   seconds after which the config sweep stops
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ "${DRY_RUN:-0}" = "1" ]; then
  export TRITON_INTERPRET=1 SPELL_KERNELS=triton
else
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
fi
PYTHONPATH=. exec "$PY" bench/gpu_attention.py

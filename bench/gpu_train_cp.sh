#!/usr/bin/env bash
# Context-parallel and data-parallel training on GPUs (issue 7): NCCL ranks, one per GPU, torchrun.
#
#   bench/gpu_train_cp.sh                  # every GPU of this machine
#   NGPU=8 bench/gpu_train_cp.sh           # the 8-GPU plan
#   QUICK=1 bench/gpu_train_cp.sh          # small shapes: correctness and wiring in a few minutes
#
# 1. One optimizer step, CP = NGPU and DP = NGPU, against one GPU on the same trajectories
#    (bench/train_step_bench.py): step time, ratio, loss and weights agreement. Llama-shaped
#    model in bf16 (no autocast: the weights themselves are bf16), 4 groups x 4 responses.
# 2. CP at long context, no single-GPU reference (one GPU could not hold it): the step time.
# 3. End to end: `torchrun -m spell_core.run --ctx 128k --cp NGPU`, two self-play steps with the
#    embedded model, then a resume on the same ranks (and the checkpoint loads on 1 process).
# Results: $OUT/*.json and $OUT/run/metrics.jsonl. Targets: CP step / single-GPU step (plain
# packing) <= 1 / (0.85 NGPU) at 32k; loss rel diff ~1e-3 (bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
OUT=${OUT:-bench/results/gpu_train_cp}
mkdir -p "$OUT"
if [ "$NGPU" -lt 2 ]; then
  echo "gpu_train_cp.sh needs at least 2 GPUs (found $NGPU): CP and DP ranks are one per GPU" >&2
  exit 2
fi
if [ -n "${QUICK:-}" ]; then
  SHAPE=(--layers 4 --hidden 1024 --heads 16 --kv-heads 4 --vocab 32000 --prompt 4096 --response 256)
  LONG=(--layers 4 --hidden 1024 --heads 16 --kv-heads 4 --vocab 32000 --prompt 32768 --response 512)
  CTX=32k
else
  SHAPE=(--layers 8 --hidden 4096 --heads 32 --kv-heads 8 --vocab 32000 --prompt 32768 --response 1024)
  LONG=(--layers 8 --hidden 4096 --heads 32 --kv-heads 8 --vocab 32000 --prompt 131072 --response 2048)
  CTX=128k
fi
TR=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU")

echo "== 1. one step, CP=$NGPU and DP=$NGPU vs one GPU: ${SHAPE[*]}"
"${TR[@]}" bench/train_step_bench.py --layout cp "${SHAPE[@]}" --dtype bfloat16 --json "$OUT/cp$NGPU.json"
"${TR[@]}" bench/train_step_bench.py --layout dp "${SHAPE[@]}" --dtype bfloat16 --json "$OUT/dp$NGPU.json"

echo "== 2. CP=$NGPU at long context: ${LONG[*]}"
"${TR[@]}" bench/train_step_bench.py --layout cp "${LONG[@]}" --dtype bfloat16 --groups 1 --no-reference \
  --json "$OUT/cp${NGPU}_long.json"

echo "== 3. self-play end to end: --ctx $CTX --cp $NGPU, 2 steps, then resume for a third"
"${TR[@]}" -m spell_core.run --ctx "$CTX" --cp "$NGPU" --steps 2 --out "$OUT/run" --no-progress
"${TR[@]}" -m spell_core.run --ctx "$CTX" --cp "$NGPU" --steps 3 --out "$OUT/run" --resume --no-progress
"$PY" - "$OUT/run" <<'PY'
import sys
import torch
from spell_core.training import train_state
from spell_core.models.model import CausalLM, config_from_folder
latest = train_state.find_latest(sys.argv[1])
with torch.device("meta"):
    model = CausalLM(config_from_folder(latest))
model = model.to_empty(device="cpu")
step, _ = train_state.load(latest, model)
print(f"checkpoint {latest} (saved by {sys.argv[1]}'s ranks) loads on 1 process: step {step}")
PY
echo "results in $OUT"

#!/usr/bin/env bash
# Everything this engine does on a GPU, in one command, on a bare lent machine (one H100, under
# 11 minutes), with the image's own python3 (torch, Triton, transformers) and no install step:
#   OUT=/some/folder bench/gpu_first_contact.sh     # from anywhere; OUT defaults to bench/results/first_contact
# Stages (bench/first_contact.py STAGE), each its own process under `timeout`, each appending
# PASS / FAIL / TIMEOUT, its key numbers and the tail of its log to $OUT/summary.md as soon as it
# ends (full logs in $OUT/logs/); a failed stage never stops the next:
#   env, kernels, run, attention, logprob, sampler, moe   (see bench/first_contact.py)
#   PY=python3        the interpreter (the repository is put on PYTHONPATH: kernels/ and the root)
#   DRY_RUN=1         every stage on CPU at tiny shapes (tests/core/test_gpu_first_contact.py)
#   STAGES="env run"  only these stages;  STAGE_TIMEOUT_S=N  every stage's limit (default: per stage, below)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
OUT=${OUT:-$ROOT/bench/results/first_contact}
mkdir -p "$OUT/logs"
export PYTHONPATH="$ROOT/kernels:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export WORK=${WORK:-$(mktemp -d)}
if [ "${DRY_RUN:-0}" = "1" ]; then
  export TRITON_INTERPRET=1 SPELL_KERNELS=triton
  LIMITS="env=120 kernels=300 run=300 attention=120 logprob=120 sampler=120 moe=240"
else
  LIMITS="env=30 kernels=120 run=120 attention=100 logprob=80 sampler=80 moe=120"  # 650 s at most
fi
STAGES=${STAGES:-env kernels run attention logprob sampler moe}
SUMMARY="$OUT/summary.md"
{
  echo "# GPU first contact ($(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname))"
  echo
  echo "Command: \`bench/gpu_first_contact.sh\`$([ "${DRY_RUN:-0}" = 1 ] && echo ' (DRY_RUN=1: CPU, tiny shapes)')"
  if [ "${DRY_RUN:-0}" != "1" ]; then
    echo; echo '```'; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3; echo '```'
  fi
} > "$SUMMARY"
start_all=$(date +%s)
failed=0
for stage in $STAGES; do
  limit=${STAGE_TIMEOUT_S:-$(for kv in $LIMITS; do [ "${kv%%=*}" = "$stage" ] && echo "${kv#*=}"; done)}
  log="$OUT/logs/$stage.log"
  start=$(date +%s)
  (cd "$ROOT" && timeout -k 10 "${limit:-120}" "$PY" bench/first_contact.py "$stage") > "$log" 2>&1
  rc=$?
  seconds=$(( $(date +%s) - start ))
  if [ $rc -eq 0 ]; then verdict=PASS; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict=TIMEOUT; else verdict=FAIL; fi
  [ $verdict = PASS ] || failed=$((failed + 1))
  {
    echo
    echo "## $stage: $verdict ($seconds s of ${limit:-120} s, exit $rc)"
    echo
    grep '^KEY ' "$log" | sed 's/^KEY /- /'
    echo
    echo '```'
    grep -v '^KEY ' "$log" | tail -n 15
    echo '```'
  } >> "$SUMMARY"
  echo "$stage: $verdict ($seconds s)"
done
echo >> "$SUMMARY"
echo "$failed stage(s) not passed; $(( $(date +%s) - start_all )) s in all" | tee -a "$SUMMARY"
[ $failed -eq 0 ]

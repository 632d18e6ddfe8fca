#!/usr/bin/env bash
# The GPU run in two stages, in order of value per minute (issue 22). Each is one device call, useful alone;
# README "On a GPU" is the runbook (calls, carried parts, sizes, times, the lease's budget).
#
#   bash scripts/gpu_bench.sh --stage 1 --out DIR     # no wheels: torch + triton of the GPU image
#   bash scripts/gpu_bench.sh --stage 2 --out DIR     # with DALI, WebDataset, Hydra (wheels: scripts/wheel_parts.sh)
#   bash scripts/gpu_bench.sh --cpu --stage 1 --out DIR   # the dress rehearsal: every step, CPU stand-ins, toy sizes
#
# Stage 1 (at most STAGE1_BUDGET s):
#   compat   CPU-side smoke on this torch/triton/torchvision: versions in pyproject's supported range, the APIs
#            used, a tiny PIRL step on the CPU (python -m pirl_fast.bench.compat)
#   tests    pytest -m gpu on the kernel tests (compiled Triton on CUDA tensors), each test under a time limit
#   membank  the fused loss vs naive at B=256, K=32,000: CUDA-event times, the gather kernel alone, its bytes,
#            and its fraction of this card's measured copy bandwidth
#   compute  the PIRL ResNet-50 step on synthetic data, bf16, channels-last (bench compute): the ceiling
#   compile  the same with torch.compile, only with --compile and only if its limit still fits the budget
# Stage 2 (at most STAGE2_BUDGET s): tests (DALI mixed graph, no host syncs), shards (generated under /tmp),
#   loader (DALI on the GPU, hw_decoder_load swept, beside the CPU backends), step (synthetic vs dali through the
#   trainer: samples/s, data-wait share).
#
# Output, in DIR (at most 5 files; the device tool returns 8): stageN.log (everything printed), stageN.jsonl (every
# row the moment it is measured, each bench's header with versions, GPU and clocks; one row per step with its
# exit status), stageN_tests.log, stageN_targets.json. A step that fails or runs out of time is a row saying so
# and the next step runs; the verdict (python -m pirl_fast.bench.targets) is written by an exit trap, so a cut
# run still has one. Scratch (shards, caches) goes under /tmp, never DIR.
#
# Options: --limit STEP=SECONDS (repeatable) changes a step's time limit; --budget SECONDS the stage's;
# --compile adds stage 1's compile step; --only STEP,STEP runs only those (e.g. --compile --only compile). Python: $PIRL_PYTHON, else .venv/bin/python, else python3.
# PIRL_TEST_TIMEOUT (default 60 s; tests/conftest.py) bounds each test. PIRL_BENCH_INJECT fails chosen rows on
# purpose (pirl_fast/bench/record.py; the dress rehearsal's).
set -uo pipefail
STAGE1_BUDGET=200  # seconds; README "On a GPU" adds these up with the lease's other costs
STAGE2_BUDGET=180
VERDICT_RESERVE=15  # seconds kept for the verdict at the end
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mode=gpu stage="" out="" budget="" compile=0 only=""
declare -A limit_override=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu; shift ;;
    --stage) stage="${2:?--stage needs 1 or 2}"; shift 2 ;;
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    --budget) budget="${2:?--budget needs seconds}"; shift 2 ;;
    --limit) limit_override["${2%%=*}"]="${2#*=}"; shift 2 ;;
    --compile) compile=1; shift ;;
    --only) only=",${2:?--only needs step names, e.g. compile},"; shift 2 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "gpu_bench.sh: unknown argument $1 (--stage 1|2, --out DIR, --cpu, --budget S, --limit STEP=S, --compile)" >&2
       exit 2 ;;
  esac
done
case "$stage" in 1|2) ;; *) echo "gpu_bench.sh: --stage 1 or --stage 2 is required (README \"On a GPU\")" >&2; exit 2 ;; esac
[ -n "$out" ] || { echo "gpu_bench.sh: --out DIR is required (on the device: --out \$OUT)" >&2; exit 2; }
scale=1; [ "$mode" = cpu ] && scale=3  # the dress rehearsal runs on small shared CPUs: 3x every limit
[ -n "$budget" ] || { [ "$stage" = 1 ] && budget=$(( STAGE1_BUDGET * scale )) || budget=$(( STAGE2_BUDGET * scale )); }
py="${PIRL_PYTHON:-}"
[ -z "$py" ] && [ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python"
py="${py:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIRL_TEST_TIMEOUT="${PIRL_TEST_TIMEOUT:-60}"
if [ "$mode" = gpu ] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_bench.sh: no CUDA device visible to $py; on a CPU-only machine: bash scripts/gpu_bench.sh --cpu --stage $stage --out DIR" >&2
  exit 2
fi
scratch="$(mktemp -d /tmp/gpu_bench.XXXXXX)"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache}" TORCHINDUCTOR_CACHE_DIR="$scratch/inductor"

mkdir -p "$out"
log="$out/stage$stage.log" rows="$out/stage$stage.jsonl" tests_log="$out/stage${stage}_tests.log"
: >"$log"
say() { echo "$*" | tee -a "$log"; }
start=$(date +%s)
finish() {  # the exit trap: the verdict, whatever happened before
  local rc=$?
  trap - EXIT INT TERM
  say "== verdict (stage $stage, after $(( $(date +%s) - start ))s)"
  timeout 60 "$py" -m pirl_fast.bench.targets "$out" --stage "$stage" $( [ "$mode" = gpu ] && echo --gpu ) 2>&1 | tee -a "$log"
  rm -rf "$scratch"
  exit "$rc"
}
trap finish EXIT
trap 'say "== stopped by a signal"; exit 143' INT TERM

row() {  # row STEP STATUS RC SECONDS: the step's own line in stageN.jsonl
  printf '{"bench": "stage%s", "kind": "row", "step": "%s", "status": "%s", "rc": %s, "seconds": %s}\n' \
    "$stage" "$1" "$2" "$3" "$4" >>"$rows"
}
# step NAME LIMIT CMD...: CMD under min(LIMIT, budget left - VERDICT_RESERVE); never aborts the script. At its
# limit it gets SIGTERM, then SIGKILL 5 s later: the rows it wrote stay, the next step starts at once.
step() {
  local name="$1" limit="${limit_override[$1]:-$(( $2 * scale ))}"; shift 2
  if [ -n "$only" ] && [[ "$only" != *",$name,"* ]]; then say "== $name: not asked for (--only)"; return 0; fi
  local left=$(( budget - VERDICT_RESERVE - ($(date +%s) - start) ))
  if [ "$left" -lt 5 ]; then say "== $name: skipped, the ${budget}s budget is spent"; row "$name" skipped null 0; return 0; fi
  if [ "$left" -lt "$limit" ] && [ -n "${optional:-}" ]; then
    say "== $name: skipped, its ${limit}s do not fit the ${left}s left"; row "$name" skipped null 0; return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "== $name (at most ${limit}s): $*"
  local t0; t0=$(date +%s)
  timeout --signal=TERM --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  local rc=$? status=ok
  [ "$rc" != 0 ] && status=failed
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && status="time limit"
  say "== $name: $status (exit $rc) after $(( $(date +%s) - t0 ))s"
  row "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))"
}
bench=("$py" -m pirl_fast.bench)
say "gpu_bench.sh stage $stage ($mode) $(date -u +%FT%TZ) -> $out; python: $py; budget ${budget}s"
timeout 30 "$py" -c "import json, torch; from pirl_fast.bench.record import environment as e; print('environment:', json.dumps(e()))" \
  2>&1 | tee -a "$log"  # versions, GPU, driver, clocks: in every file of the call (the .jsonl headers too)

pytest_gpu() {  # the GPU tests of the given files; the exit status is pytest's (pipefail), the log its summary
  set -o pipefail
  "$py" -m pytest -q -m gpu -rfEs -p no:cacheprovider "$@" 2>&1 | tee -a "$tests_log"
}
export -f pytest_gpu
export py tests_log
if [ "$stage" = 1 ]; then
  if [ "$mode" = gpu ]; then
    membank=(--batch 256 --negatives 32000 --dtypes float32 bfloat16 --repeats 10)
    compute=()
  else
    membank=(--batch 4 --negatives 256 --num-samples 1000 --dim 16 --repeats 1 --dtypes float32 bfloat16
             --copy-mib 4)
    compute=(--batch 2 --steps 1 --warmup 0 --bank-rows 64 --negatives 16 --image-size 32 --patch-size 8)
  fi
  step compat 25 "$py" -m pirl_fast.bench.compat --jsonl "$rows"
  step tests 60 bash -c 'pytest_gpu "$@"' pytest_gpu tests/test_bank_kernels.py tests/test_bank_loss.py
  step membank 50 "${bench[@]}" membank "${membank[@]}" --jsonl "$rows"
  step compute 45 "${bench[@]}" compute "${compute[@]}" --compile off --jsonl "$rows"
  if [ "$compile" = 1 ]; then
    optional=1 step compile 150 "${bench[@]}" compute "${compute[@]}" --compile on --jsonl "$rows"
  else
    say "== compile: not asked for (--compile; a cold inductor compile of two trunk passes takes minutes)"
  fi
else
  if [ "$mode" = gpu ]; then
    images=2048; loader=(--batch-size 256 --batches 8 --warmup 3 --rounds 2 --hw-decoder-loads 0 0.65 1)
    steps=(--steps 30 --warmup 8)
  else
    images=8; loader=(--batch-size 4 --workers 1 --batches 1 --warmup 1 --rounds 1)
    steps=(--batch 4 --steps 1 --warmup 1 --workers 1 --bank-rows 64 --bank-repeats 1
           --data image_size=32 patch_crop_size=30 patch_size=8)
  fi
  shards="$scratch/shards"
  step tests 40 bash -c 'pytest_gpu "$@"' pytest_gpu tests/test_loaders.py tests/test_host_sync.py
  step shards 25 "$py" -c "from pathlib import Path; from pirl_fast.bench.loader import make_bench_shards as m; m(Path('$shards'), $images)"
  step loader 55 "${bench[@]}" loader --shards "$shards/shards" "${loader[@]}" --jsonl "$rows"
  step step 45 "${bench[@]}" step --backends synthetic,dali --shards "$shards/shards" "${steps[@]}" --jsonl "$rows"
fi

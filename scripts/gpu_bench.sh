#!/usr/bin/env bash
# The one prepared GPU run (issue 12): everything the GPU path must measure, in at most 8 minutes on
# one H200, then a one-line verdict per target (met / not met / unmeasured).
#
#   bash scripts/gpu_bench.sh                     # GPU: JSON under benchmarks/<date>-<gpu>/
#   bash scripts/gpu_bench.sh --out DIR           # ... under DIR instead (e.g. the device tool's $OUT)
#   bash scripts/gpu_bench.sh --cpu-smoke --out DIR   # CPU-only, toy sizes, seconds: tests/test_gpu_bench.py
#
# Stages (each under its own time limit, within an 8-minute budget; one that fails or runs out of
# time leaves its targets "unmeasured" and the run goes on):
#   1. the GPU tests: pytest -m gpu (compiled Triton kernels on CUDA tensors, the DALI mixed graph,
#      no host syncs in a step under set_sync_debug_mode)                            -> gpu_tests.log
#   2. bench membank: naive vs two-pass vs fused, fp32 and bf16, B=256, K=32,000, GB/s -> membank.json
#   3. bench loader: DALI GPU samples/s, hw_decoder_load swept 0 .. 1, beside the CPU backends
#                                                                                     -> loader.json
#   4. bench step: ResNet-50, 224/255/64 px, batch 256, bf16, channels-last, ImageNet-sized bank,
#      synthetic vs dali                                                              -> step.json
#   5. the same with trainer.compile                                                 -> step_compile.json
#   6. python -m pirl_fast.bench.targets: the verdicts                    -> targets.json + one line
# Everything printed also goes to run.log. At most 8 files come back (the device tool's limit).
#
# Python: $PIRL_PYTHON, else .venv/bin/python, else python3. The project runs from this checkout
# (PYTHONPATH), nothing is installed. It needs torch and triton (the GPU image has them) and, for
# stages 1 and 3-5, nvidia-dali-cuda130, webdataset, hydra-core (omegaconf, antlr4-python3-runtime):
# on a machine without them, carry them as wheels (DEVELOPERS.md: pack_wheels.sh, one part per call); the script says
# which are missing and marks what needs them unmeasured.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mode=gpu
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) mode=cpu; shift ;;
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu_bench.sh: unknown argument $1 (--cpu-smoke, --out DIR, --help)" >&2; exit 2 ;;
  esac
done
py="${PIRL_PYTHON:-}"
[ -z "$py" ] && [ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python"
py="${py:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$mode" = gpu ] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_bench.sh: no CUDA device visible to $py; on a CPU-only machine run: bash scripts/gpu_bench.sh --cpu-smoke --out DIR" >&2
  exit 2
fi
if [ -z "$out" ]; then
  gpu="$("$py" -c "import re, torch; n = torch.cuda.get_device_name(0).lower().replace('nvidia', ''); print(re.sub('[^a-z0-9]+', '-', n).strip('-'))")"
  out="$root/benchmarks/$(date +%F)-$gpu"
fi
mkdir -p "$out"
log="$out/run.log"
: >"$log"
say() { echo "$*" | tee -a "$log"; }

budget=470  # seconds for stages 1-5: 8 minutes less the verdict and start-up
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
# stage NAME LIMIT CMD...: run CMD under min(LIMIT, budget left), output to run.log; never aborts the script
stage() {
  local name="$1" limit="$2"; shift 2
  local remaining; remaining=$(left)
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  if [ "$limit" -lt 10 ]; then say "== $name: skipped, the 8-minute budget is spent"; return 0; fi
  say "== $name (at most ${limit}s): $*"
  local t0=$(date +%s) rc
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  say "== $name: exit $rc after $(( $(date +%s) - t0 ))s$( [ "$rc" = 124 ] && echo ' (time limit)')"
}

missing=""
for pair in nvidia.dali:nvidia-dali-cuda130 webdataset:webdataset hydra:hydra-core triton:triton; do
  "$py" -c "import ${pair%%:*}" 2>/dev/null || missing="$missing ${pair#*:}"
done
missing="${missing# }"
say "gpu_bench.sh ($mode) $(date -u +%FT%TZ) -> $out; python: $py; missing: ${missing:-none}"
"$py" -c "from pirl_fast.bench.output import machine_description as m; print('machine:', m())" 2>&1 | tee -a "$log"
has() { [[ " $missing " != *" $1 "* ]]; }

bench=("$py" -m pirl_fast.bench)
shards="$out/.shards"  # generated once for the loader and step stages, removed at the end
if [ "$mode" = gpu ]; then
  tests=(tests)
  membank=(--batch 256 --negatives 32000 --dtypes float32 bfloat16 --repeats 10)
  images=2048; loader=(--batch-size 256 --batches 10 --warmup 3 --rounds 3 --hw-decoder-loads 0 0.5 0.65 0.8 1)
  step=()
else  # toy sizes; the GPU tests are collected (and skip) from one file, to prove the invocation
  tests=(tests/test_host_sync.py)
  membank=(--batch 4 --negatives 256 --num-samples 1000 --dim 16 --repeats 1 --dtypes float32 --losses nce)
  images=8; loader=(--batch-size 4 --workers 1 --batches 1 --warmup 1 --rounds 1)
  step=(--batch 4 --steps 1 --warmup 1 --workers 1 --bank-rows 64 --bank-repeats 1
        --data image_size=32 patch_crop_size=30 patch_size=8)
fi

stage "gpu tests" 150 bash -c "\"\$0\" -m pytest -q -m gpu -rfEs -p no:cacheprovider \"\$@\" 2>&1 | tee \"$out/gpu_tests.log\"" \
  "$py" "${tests[@]}"
stage "bench membank" 90 "${bench[@]}" membank "${membank[@]}" --json "$out/membank.json"
if has webdataset && has nvidia-dali-cuda130; then
  stage "sample shards" 60 "$py" -c "from pathlib import Path; from pirl_fast.bench.loader import make_bench_shards as m; m(Path('$shards'), $images)"
  stage "bench loader" 150 "${bench[@]}" loader --shards "$shards/shards" "${loader[@]}" --json "$out/loader.json"
  backends=synthetic,dali
else
  say "== bench loader: skipped (needs nvidia-dali-cuda130 and webdataset)"
  backends=synthetic
fi
if has hydra-core; then
  steps=("${bench[@]}" step --backends "$backends" "${step[@]}")
  [ -d "$shards/shards" ] && steps+=(--shards "$shards/shards")
  stage "bench step" 120 "${steps[@]}" --json "$out/step.json"
  if [ "$mode" = gpu ]; then
    stage "bench step --compile" 300 "${steps[@]}" --compile --json "$out/step_compile.json"
  else
    say "== bench step --compile: not in the CPU smoke run (minutes of compile)"
  fi
else
  say "== bench step: skipped (needs hydra-core)"
fi
rm -rf "$shards"
"$py" -m pirl_fast.bench.targets "$out" $( [ "$mode" = gpu ] && echo --gpu ) 2>&1 | tee -a "$log"

#!/usr/bin/env bash
# The main job end to end on a small built-in sample, on whatever machine this is (CPU is fine,
# about 2.5 minutes on 2 cores after the first set-up):
#   sample ImageFolders (generated) -> shards -> verify -> PIRL pre-training on the main data path
#   (DALI: its GPU graph on CUDA, its CPU graph here; torch only where DALI is missing, said so) ->
#   kNN evaluation (trained vs the same network untrained) -> export to torchvision.
# Re-running it starts the training run afresh (its folder is the demo's own).
# Everything goes under ${DEMO_DIR:-demo/}; STEPS=N trains longer (scripts/learn_check.sh is
# the longer, pass/fail version of steps 4-5).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
py="${PIRL_VENV:-$root/.venv}/bin/python"
out="${DEMO_DIR:-demo}"
steps="${STEPS:-200}"
mkdir -p "$out"

echo "== 1/6 a sample dataset root (generated, no download): images/train 8 x 40, images/val 8 x 20"
"$py" -m pirl_fast.sample_data "$out/images/train" --classes 8 --per-class 40 --seed 0
"$py" -m pirl_fast.sample_data "$out/images/val" --classes 8 --per-class 20 --seed 1

echo "== 2/6 shard it: images/{train,val} -> shards/{train,val}"
"$py" -m pirl_fast.shard "$out/images" "$out/shards" --samples-per-shard 64 --workers 2 --seed 0 --overwrite

echo "== 3/6 verify the shards (both splits)"
"$py" -m pirl_fast.shard --verify "$out/shards"

echo "== 4/6 PIRL pre-training: experiment=smoke (ResNet-18, 64 px, batch 32, loss=infonce), $steps steps"
# experiment=smoke uses loss=infonce: on 320 samples the reference NCE's noise ratio K/N = 256/320
# is far from its large-dataset regime (see README, "Loss"); the paper's recipe keeps loss=nce.
# 320 samples / batch 32 = 10 steps per epoch: the cosine LR ends at step $steps.
rm -rf "$out/run"
"$py" -m pirl_fast.train experiment=smoke data.shards="$out/shards" trainer.epochs=$(( (steps + 9) / 10 )) \
  trainer.max_steps="$steps" trainer.log_every=10 hydra.run.dir="$out/run"

echo "== 5/6 kNN top-1 (k=200) on shards/val: trained, then the same network at its initial weights"
"$py" -m pirl_fast.eval knn "$out/run" --workers 2
"$py" -m pirl_fast.eval knn "$out/run" --workers 2 --random-init

echo "== 6/6 export the trunk for torchvision"
"$py" -m pirl_fast.eval export "$out/run"

"$py" - "$out/run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
summary = json.loads((run / "summary.json").read_text())
trained = json.loads((run / "knn.json").read_text())["top1"] * 100
untrained = json.loads((run / "knn_random_init.json").read_text())["top1"] * 100
backend = summary["backend"] + (" (its CPU graph)" if summary["backend"] == "dali" and summary["device"] == "cpu"
                                else " (GPU graph)" if summary["backend"] == "dali" else "")
print(f"\nreport: {summary['step']} steps on data.backend={backend} at {summary['samples_per_s']:.1f} samples/s "
      f"(data wait {summary['data_wait_share']:.0%}); kNN top-1 trained {trained:.1f}% vs untrained "
      f"{untrained:.1f}% ({trained - untrained:+.1f} points). Run directory: {run}")
PY

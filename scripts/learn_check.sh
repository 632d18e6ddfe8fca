#!/usr/bin/env bash
# Does it learn? A smoke-scale PIRL pre-training on generated sample data, then the weighted kNN
# (k=200, tau=0.07) of the trained ResNet-18 against the same network untrained: the exact weights
# the run started from (`eval knn --random-init` with the run's trainer.seed rebuilds them bit for
# bit). Prints both numbers and exits 1 unless training gained at least MARGIN points of top-1.
# Two more random initialisations (seeds 1, 2) are printed for scale: on these colour-coded sample
# classes an untrained ResNet-18 already scores far above chance, and its kNN varies by ~10 points
# from seed to seed; the verdict line also says whether the trained network beats all three.
#
#   bash scripts/learn_check.sh                      # ~5 min on 2 idle CPU cores
#   STEPS=600 MARGIN=10 bash scripts/learn_check.sh  # longer run, stricter bar
#
# Data: 8 classes x 40 training images (seed 0) and 8 x 50 validation images (seed 1) from
# `python -m pirl_fast.sample_data` (texture family + palette per class), sharded once and reused.
# Training: experiment=smoke (ResNet-18, 64 px images, 16 px patches, K=256 negatives, the paper's
# augmentation) with a batch of 32 and a cosine LR that ends at the last step. The loss is the
# softmax form (loss=infonce, the reference's MLP-head loss): with 320 samples the NCE's (the paper's
# loss) large-dataset approximation breaks down (noise ratio K/N = 0.8; its image term climbed to
# 250-640 in our runs).
# Everything goes under ${LEARN_DIR:-runs/learn_check}; the run directory is recreated each time.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PIRL_VENV:-$root/.venv}/bin/python"
[ -x "$py" ] || bash "$root/scripts/setup_env.sh"
dir="${LEARN_DIR:-runs/learn_check}"
steps="${STEPS:-300}"      # 30 epochs of 320 images at batch 32
batch="${BATCH:-32}"
lr="${LR:-0.03}"           # per batch of $batch (optim.reference_batch=$batch): the paper's 0.12/1024 is far too small here
margin="${MARGIN:-5}"      # top-1 points above the best random init
workers="${WORKERS:-2}"

echo "== 1/4 sample data and shards (kept between runs) in $dir"
for split in train val; do
  if [ ! -f "$dir/shards_$split/manifest.json" ]; then
    if [ "$split" = train ]; then per=40; seed=0; else per=50; seed=1; fi
    rm -rf "$dir/images_$split" "$dir/shards_$split"
    "$py" -m pirl_fast.sample_data "$dir/images_$split" --classes 8 --per-class "$per" --seed "$seed"
    "$py" -m pirl_fast.shard "$dir/images_$split" "$dir/shards_$split" --samples-per-shard 64 --max-side 160 \
      --workers "$workers" --seed 0
  fi
done

echo "== 2/4 PIRL pre-training: $steps steps of $batch"
rm -rf "$dir/run"
epochs=$(( (steps + (320 + batch - 1) / batch - 1) / ((320 + batch - 1) / batch) ))  # the cosine LR ends at $steps
"$py" -m pirl_fast.train experiment=smoke data.shards="$dir/shards_train" data.batch_size="$batch" \
  data.workers="$workers" loss=infonce optim.lr="$lr" optim.reference_batch="$batch" \
  trainer.epochs="$epochs" trainer.max_steps="$steps" trainer.ckpt_every=0 trainer.ckpt_epoch_end=false \
  trainer.log_every=10 resume=none hydra.run.dir="$dir/run"

echo "== 3/4 kNN: trained; untrained (the run's own initial weights, then seeds 1 and 2)"
knn=("$py" -m pirl_fast.eval knn "$dir/run" --val-shards "$dir/shards_val" --workers "$workers")
"${knn[@]}"
"${knn[@]}" --random-init   # seed = the run's trainer.seed (0): the weights training started from
for seed in 1 2; do
  "${knn[@]}" --random-init --seed "$seed"   # -> knn_random_init_seed$seed.json beside the others
done

echo "== 4/4 verdict"
"$py" - "$dir/run" "$margin" <<'EOF'
import json, sys
from pathlib import Path
run, margin = Path(sys.argv[1]), float(sys.argv[2])
top1 = lambda path: json.loads(path.read_text())["top1"] * 100
trained, own = top1(run / "knn.json"), top1(run / "knn_random_init.json")
others = [top1(run / f"knn_random_init_seed{s}.json") for s in (1, 2)]
print(f"kNN top-1 (k=200), trained:                 {trained:.2f}%")
print(f"kNN top-1 (k=200), same network untrained:  {own:.2f}%   (other random inits: "
      f"{others[0]:.2f}%, {others[1]:.2f}%)")
best = max([own, *others])
print(f"training gained {trained - own:+.2f} points; {'above' if trained > best else 'NOT above'} the best of the "
      f"three random inits ({best:.2f}%)")
if trained >= own + margin:
    print(f"PASS: the trained network beats its own initialisation by >= {margin:g} points")
else:
    print(f"FAIL: needs >= +{margin:g} points over its initialisation. Try more steps (STEPS=...) and check "
          f"the loss in {run}/metrics.jsonl")
    sys.exit(1)
EOF

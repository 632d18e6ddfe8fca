#!/usr/bin/env bash
# The main job end to end on a small sample, on whatever machine this is (CPU is fine: 1 min 8 s
# on 2 idle cores after the first set-up, with Fashion-MNIST, 2026-11-30):
#   sample ImageFolders -> shards -> verify -> PIRL pre-training on the main data path (DALI: its
#   GPU graph on CUDA, its CPU graph here; torch only where DALI is missing, said so) -> kNN
#   evaluation (trained vs the same network untrained) -> export to torchvision.
# The sample is real photographs when Fashion-MNIST is installed (`sudo apt-get install
# dataset-fashion-mnist`, or FMNIST_DIR=folder of its IDX files): 1,000 training and 500 test
# images, experiment=fmnist; otherwise generated images (no download), experiment=smoke. The first
# line says which. Re-running it starts the training run afresh (its folder is the demo's own).
# Everything goes under ${DEMO_DIR:-demo/}; STEPS=N trains longer (scripts/learn_check.sh is the
# longer, pass/fail version of steps 4-5).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
py="${PIRL_VENV:-$root/.venv}/bin/python"
out="${DEMO_DIR:-demo}"
steps="${STEPS:-200}"
fmnist="${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}"
mkdir -p "$out"

if [ -f "$fmnist/train-images-idx3-ubyte.gz" ] || [ -f "$fmnist/train-images-idx3-ubyte" ]; then
  echo "== dataset: Fashion-MNIST (real photographs, 28 px) from $fmnist"
  echo "== 1/6 a sample dataset root: images/train 1000 and images/val 500 test images (class-balanced)"
  data_dir="$out/fmnist"  # beside, not over, the generated sample the README's first hour uses
  "$py" -m pirl_fast.idx_folder "$fmnist" "$data_dir/images/train" --split train --limit 1000 --overwrite
  "$py" -m pirl_fast.idx_folder "$fmnist" "$data_dir/images/val" --split t10k --limit 500 --overwrite
  dataset="Fashion-MNIST"
  recipe=(experiment=fmnist data.backend=auto)  # the main path (DALI) here; the benchmark recipe uses torch
  epochs=$(( (steps * 32 + 999) / 1000 ))
else
  echo "== dataset: generated sample images (Fashion-MNIST is not installed in $fmnist)"
  echo "== 1/6 a sample dataset root (generated, no download): images/train 8 x 40, images/val 8 x 20"
  data_dir="$out"  # demo/images and demo/shards: the README's first hour starts from these
  rm -rf "$out/images"  # regenerated identically below; an older demo may have put other images here
  "$py" -m pirl_fast.sample_data "$out/images/train" --classes 8 --per-class 40 --seed 0
  "$py" -m pirl_fast.sample_data "$out/images/val" --classes 8 --per-class 20 --seed 1
  # experiment=smoke uses loss=infonce: on 320 samples the reference NCE's noise ratio K/N = 256/320
  # is far from its large-dataset regime (see README, "Loss"); the paper's recipe keeps loss=nce.
  dataset="generated sample images"
  recipe=(experiment=smoke)
  epochs=$(( (steps + 9) / 10 ))
fi

echo "== 2/6 shard it: images/{train,val} -> shards/{train,val}"
"$py" -m pirl_fast.shard "$data_dir/images" "$data_dir/shards" --samples-per-shard 64 --workers 2 --seed 0 --overwrite

echo "== 3/6 verify the shards (both splits)"
"$py" -m pirl_fast.shard --verify "$data_dir/shards"

echo "== 4/6 PIRL pre-training: ${recipe[0]} (ResNet-18), $steps steps of 32"
rm -rf "$out/run"
"$py" -m pirl_fast.train "${recipe[@]}" data.shards="$data_dir/shards" data.batch_size=32 \
  trainer.epochs="$epochs" trainer.max_steps="$steps" trainer.log_every=10 trainer.ckpt_every=0 \
  hydra.run.dir="$out/run"

echo "== 5/6 kNN top-1 (k=200) on shards/val: trained, then the same network at its initial weights"
"$py" -m pirl_fast.eval knn "$out/run" --workers 2
"$py" -m pirl_fast.eval knn "$out/run" --workers 2 --random-init

echo "== 6/6 export the trunk for torchvision"
"$py" -m pirl_fast.eval export "$out/run"

echo "== report ($dataset)"
"$py" -m pirl_fast.report "$out/run"

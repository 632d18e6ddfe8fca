#!/usr/bin/env bash
# The main job end to end on a small built-in sample, on whatever machine this is (CPU is fine):
# make a sample ImageFolder, shard it, verify the shards, ...
# Everything goes under ${DEMO_DIR:-demo/} in the repository.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
py="${PIRL_VENV:-$root/.venv}/bin/python"
out="${DEMO_DIR:-demo}"
mkdir -p "$out"

echo "== 1/3 a sample ImageFolder (generated, no download)"
"$py" -m pirl_fast.sample_data "$out/images" --classes 8 --per-class 40 --seed 0

echo "== 2/3 shard it"
"$py" -m pirl_fast.shard "$out/images" "$out/shards" --samples-per-shard 64 --workers 2 --seed 0 --overwrite

echo "== 3/3 verify the shards"
"$py" -m pirl_fast.shard --verify "$out/shards"

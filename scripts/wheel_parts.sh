#!/usr/bin/env bash
# The wheels stage 2 of the GPU run needs (DALI, WebDataset, Hydra), in as few transfers as the device tool allows
# (issue 22; README "On a GPU"). Three commands:
#
#   bash scripts/wheel_parts.sh pack [--from DIR] [--part-mib N] [--rate-mib-s R]   # here, at the repository root
#   bash scripts/wheel_parts.sh receive .whl/part-NN     # there, in the call that carried the part
#   bash scripts/wheel_parts.sh install                  # there, once every part was received; prints PYTHONPATH
#
# pack: downloads (pip download, or takes the wheels in --from DIR) only what DALI, the trainer's config and the
# torch loader import at run time on the GPU image, which has torch, triton, torchvision, numpy, pillow, packaging,
# six, pyyaml and typing-extensions already:
#   nvidia-dali-cuda130, nvidia-nvimgcodec-cu13 and the codec libraries it loads (nvjpeg, nvjpeg2k, nvtiff),
#   astunparse, gast, optree (imported by DALI's Python side), webdataset, braceexpand, hydra-core, omegaconf,
#   antlr4-python3-runtime (built here: it exists only as a source release).
# Left out, because a run of the PIRL pipeline with DALI's torch plugin loads none of them (measured from
# sys.modules and /proc/self/maps, 2026-12-06): nvidia-libnvcomp-cu13, libcst, makefun, nvtx (DALI's metadata
# requires them; pip install --no-deps does not). It tars them and splits the tar into parts of --part-mib
# (default: 64 MiB less the working tree that travels with every call, less 1 MiB), writes .whl/SHA256SUMS (sha256
# and size of every part) and prints each part's estimated transfer time at --rate-mib-s (an assumption until a
# transfer is timed: README "On a GPU" says how).
# receive: checks the part's size and sha256 against .whl/SHA256SUMS (carried beside it) and copies it to
# $PARTS_DIR (default /tmp/parts, which survives between the calls of one warm machine); exit 1 on a mismatch.
# install: checks that every part listed is in $PARTS_DIR and intact, unpacks, installs with
# pip install --no-index --no-deps --target $SITE_DIR (default /tmp/site) and prints the export line.
set -euo pipefail
parts_dir="${PARTS_DIR:-/tmp/parts}" site_dir="${SITE_DIR:-/tmp/site}" whl=.whl
mib=$((1024 * 1024))
die() { echo "wheel_parts.sh: $*" >&2; exit "${2:-1}"; }
py="${PIRL_PYTHON:-python3}"

pack() {
  local from="" part_mib="" rate=2
  while [ $# -gt 0 ]; do
    case "$1" in
      --from) from="${2:?--from needs a folder of wheels}"; shift 2 ;;
      --part-mib) part_mib="${2:?--part-mib needs a number}"; shift 2 ;;
      --rate-mib-s) rate="${2:?--rate-mib-s needs a number}"; shift 2 ;;
      *) die "pack: unknown argument $1 (--from DIR, --part-mib N, --rate-mib-s R)" 2 ;;
    esac
  done
  git rev-parse --show-toplevel >/dev/null 2>&1 || die "pack: run it at the repository root" 2
  local exclude; exclude="$(git rev-parse --git-common-dir)/info/exclude"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"  # never committed, never travels unasked
  if [ -z "$part_mib" ]; then  # what travels anyway: tracked and untracked-not-ignored files
    local tree; tree=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
    part_mib=$(( (64 * mib - tree) / mib - 1 ))
    echo "the working tree that travels: $(( tree / 1024 )) KiB -> parts of $part_mib MiB"
  fi
  rm -rf "$whl" && mkdir -p "$whl/wheels"
  if [ -n "$from" ]; then
    cp "$from"/*.whl "$whl/wheels/"
  else
    local plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
                --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
      -d "$whl/wheels" nvidia-dali-cuda130==2.4.0 'nvidia-nvimgcodec-cu13>=0.9,<0.10' nvidia-nvjpeg \
      nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13 astunparse gast optree webdataset braceexpand hydra-core==1.3.8 \
      omegaconf==2.3.1
    "$py" -m pip wheel -q --no-deps -w "$whl/wheels" antlr4-python3-runtime==4.9.3
  fi
  tar -cf "$whl/wheels.tar" -C "$whl" wheels && rm -rf "$whl/wheels"
  split -b "$(( part_mib * mib ))" -d "$whl/wheels.tar" "$whl/part-" && rm "$whl/wheels.tar"
  (cd "$whl" && for p in part-*; do echo "$(sha256sum "$p" | cut -d' ' -f1)  $p  $(stat -c %s "$p")"; done) \
    >"$whl/SHA256SUMS"
  local n; n=$(wc -l <"$whl/SHA256SUMS")
  awk -v rate="$rate" -v n="$n" '{printf "%s  %6.1f MiB  ~%.0f s at %s MiB/s (assumed)\n", $2, $3/1048576, $3/1048576/rate, rate;
       total += $3} END {printf "%d parts, %.1f MiB, ~%.0f s of transfers at %s MiB/s\n", n, total/1048576, total/1048576/rate, rate}' \
    "$whl/SHA256SUMS"
}

check() {  # check FILE: its size and sha256 are those SHA256SUMS lists for its name
  local file="$1" sums="$2" name; name=$(basename "$file")
  local line; line=$(awk -v n="$name" '$2 == n' "$sums")
  [ -n "$line" ] || die "$name is not listed in $sums"
  [ -f "$file" ] || die "$name: missing (carry it, then: bash scripts/wheel_parts.sh receive .whl/$name)"
  local size; size=$(stat -c %s "$file")
  [ "$size" = "$(echo "$line" | awk '{print $3}')" ] || die "$name: $size bytes, expected $(echo "$line" | awk '{print $3}') (a cut transfer: carry it again)"
  [ "$(sha256sum "$file" | cut -d' ' -f1)" = "$(echo "$line" | awk '{print $1}')" ] || die "$name: sha256 differs from $sums (carry it again)"
}

receive() {
  local part="${1:?receive needs a part, e.g. .whl/part-00}" sums; sums="$(dirname "$part")/SHA256SUMS"
  [ -f "$sums" ] || die "receive: $sums is missing: carry it beside the part" 2
  local t0; t0=$(date +%s%N)
  check "$part" "$sums"
  mkdir -p "$parts_dir" && cp "$sums" "$parts_dir/SHA256SUMS" && cp "$part" "$parts_dir/"
  echo "received $(basename "$part") ($(( $(stat -c %s "$part") / mib )) MiB, sha256 ok) in $(( ($(date +%s%N) - t0) / 1000000 )) ms;" \
       "in $parts_dir: $(cd "$parts_dir" && ls part-* | wc -l) of $(wc -l <"$sums")"
}

install() {
  local sums="$parts_dir/SHA256SUMS"
  [ -f "$sums" ] || die "install: no part received yet ($sums missing)"
  local name
  for name in $(awk '{print $2}' "$sums"); do check "$parts_dir/$name" "$sums"; done
  rm -rf "$parts_dir/unpacked" && mkdir -p "$parts_dir/unpacked"
  cat $(awk -v d="$parts_dir" '{print d "/" $2}' "$sums") | tar -x -C "$parts_dir/unpacked"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site_dir" \
    "$parts_dir"/unpacked/wheels/*.whl
  echo "installed $(ls "$parts_dir"/unpacked/wheels/*.whl | wc -l) wheels in $site_dir; now: export PYTHONPATH=$site_dir:\$PWD"
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  receive) shift; receive "$@" ;;
  install) shift; install "$@" ;;
  *) die "usage: bash scripts/wheel_parts.sh pack [--from DIR] [--part-mib N] [--rate-mib-s R] | receive .whl/part-NN | install" 2 ;;
esac

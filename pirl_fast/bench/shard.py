"""Sharder throughput (images/s, MB/s) with 1..W workers, beside a plain tar of the same files.

The plain tar (Python tarfile, same files, same shard size, no decoding) is the I/O ceiling:
the sharder reads the same bytes and writes about the same bytes, plus a full decode of every
image and a re-encode of the ones that need it. `vs_plain_tar` is the sharder's rate divided by
the plain tar's (1.0 = as fast as copying).

With no arguments it generates its own ImageFolder of --images images in a temp directory
(pirl_fast.sample_data: 96-400 px, a mix of baseline/progressive/greyscale/CMYK JPEGs and PNGs,
so roughly 65-75% are copied byte for byte and the rest re-encoded). --src times a real
ImageFolder instead (ImageNet's images are larger: expect lower images/s, higher MB/s). Input
files are read once before timing, so every row starts from the page cache.

MB_per_s counts input bytes read per second.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from pirl_fast.runtime.progress import progress
from pirl_fast.shard.cli import Options, plan_shards, run_shard, scan_source
from pirl_fast.shard.sample_data import write_sample_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=2000,
                        help="images to generate when --src is not given (default 2000, ~1 min to generate)")
    parser.add_argument("--src", metavar="DIR", help="time this ImageFolder instead of generated images")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to time (default 1,2)")
    parser.add_argument("--samples-per-shard", type=int, default=250,
                        help="inputs per shard (default 250: several shards per worker even at 2000 images)")
    parser.add_argument("--max-side", type=int, default=Options("", "").max_side,
                        help="the sharder's --max-side (default as the sharder)")
    parser.add_argument("--workdir", metavar="DIR", help="where to put data and outputs (default: a temp dir, removed)")


def plain_tar(src: Path, dst: Path, seed: int, samples_per_shard: int) -> int:
    """Tar the input files as they are into shards of the sharder's plan; returns bytes written."""
    _, inputs, _ = scan_source(src)
    dst.mkdir(parents=True, exist_ok=True)
    total = 0
    for k, shard in enumerate(plan_shards(inputs, seed, samples_per_shard)):
        path = dst / f"plain-{k:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for item in shard:
                tar.add(src / item.path, arcname=f"{item.key}.{item.path.rsplit('.', 1)[-1]}")
        total += path.stat().st_size
    return total


def _row(method: str, workers: int, images: int, in_bytes: int, out_bytes: int, seconds: float) -> dict:
    return {"method": method, "workers": workers, "images": images, "seconds": round(seconds, 3),
            "images_per_s": images / seconds, "MB_per_s": in_bytes / 1e6 / seconds, "out_MB": out_bytes / 1e6}


def run(args: argparse.Namespace) -> list[dict]:
    workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    if not workers or min(workers) < 1:
        raise SystemExit(f"--workers must list counts >= 1, got {args.workers!r}")
    own_dir = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="pirl_bench_shard_")) if own_dir else Path(args.workdir)
    try:
        if args.src:
            src = Path(args.src)
        else:
            src = work / "images"
            classes = 10
            per_class = max(1, -(-args.images // classes))
            print(f"generating {classes} x {per_class} images in {src} ...", flush=True)
            write_sample_folder(src, classes=classes, per_class=per_class, seed=0)
        files = [p for p in src.rglob("*") if p.is_file()]
        in_bytes = sum(len(p.read_bytes()) for p in files)  # also warms the page cache for every row

        rows = []
        t0 = time.perf_counter()
        out = plain_tar(src, work / "plain", seed=0, samples_per_shard=args.samples_per_shard)
        ceiling = _row("plain tar (tarfile, no decode)", 1, len(files), in_bytes, out, time.perf_counter() - t0)
        rows.append(ceiling)
        for w in progress(workers, desc="shard bench", unit="run"):
            dst = work / f"shards_w{w}"
            opts = Options(src=str(src), dst=str(dst), samples_per_shard=args.samples_per_shard,
                           max_side=args.max_side, seed=0, workers=w)
            summary = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(summary):
                manifest = run_shard(opts, overwrite=True, progress=False)
            seconds = time.perf_counter() - t0  # includes scanning SRC and starting the worker processes
            out = sum(s["bytes"] for s in manifest["shards"])
            rows.append(_row("pirl_fast.shard", w, len(files), in_bytes, out, seconds))
            shutil.rmtree(dst)
        for r in rows:
            r["vs_plain_tar"] = r["images_per_s"] / ceiling["images_per_s"]
        return rows
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)

"""python -m pirl_fast.shard SRC DST [options]   |   python -m pirl_fast.shard --verify DST

Turns an ImageFolder (SRC/<class>/**/<image>, classes = sorted sub-folder names) into
WebDataset shards that DALI reads on the GPU without ever meeting a bad image:

    DST/shard-000000.tar ...   samples KEY.jpg, KEY.cls, KEY.idx, KEY.lbl (see shard_format.py)
    DST/shard-000000.idx ...   DALI index files (v1.2), so readers need not scan the tars
    DST/manifest.json          written last: counts, classes, shard hashes, skipped inputs, options

Inputs are sorted, shuffled globally with --seed (DALI only shuffles within a small buffer),
cut into shards of --samples-per-shard inputs, and given global indices 0..N-1 in that order.
Every image is decoded first; clean baseline RGB JPEGs are copied byte for byte, the rest
normalised (see images.py); unusable files are skipped and listed in the manifest.

Crash safety: a shard gets its final name only when complete (temp file, fsync, rename), and
shards are finished in order, recorded in DST/.progress.jsonl; --resume keeps the finished
prefix that still matches the plan (re-hashing it) and redoes the rest.

Exit codes: 0 done, 1 --verify found problems, 2 bad SRC/DST or arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pirl_fast.images import UnusableImage, normalise_image
from pirl_fast.atomic import fsync_dir, write_json
from pirl_fast.manifest import MANIFEST_NAME, ShardError, manifest_dict
from pirl_fast.shard_format import IndexEntry, ShardWriter, index_text, sample_key, sha256_file, shift_indices

# Journal of an unfinished run: one JSON line per finished shard, appended and fsynced in shard
# order (a line torn by a crash is ignored); removed once the manifest is written.
PROGRESS_NAME = ".progress.jsonl"


class SourceError(Exception):
    """SRC or DST is unusable as given (exit code 2); the message says what to do."""


@dataclass(frozen=True)
class Input:
    relpath: str  # relative to SRC, "/"-separated
    label: int
    key: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Options:
    src: str
    dst: str
    samples_per_shard: int = 1000  # ~100 MB at ImageNet's ~110 KB/image: big sequential reads, many shards per rank
    max_side: int = 1024  # longer-side cap; ImageNet's median is ~500 px, so only the rare huge ones shrink
    quality: int = 95  # for re-encoded images only; high because they are decoded again for training
    seed: int = 0
    workers: int = 1  # 1 = in this process (tests); the CLI defaults to the number of CPU cores

    def content(self) -> dict:
        """The options that decide the shards' bytes (recorded in the manifest)."""
        return {"src": self.src, "seed": self.seed, "samples_per_shard": self.samples_per_shard,
                "max_side": self.max_side, "quality": self.quality}


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def scan_source(src: Path) -> tuple[list[str], list[Input], list[dict]]:
    """(classes, inputs sorted by path, skip records for loose files and unreadable folders)."""
    if not src.is_dir():
        raise SourceError(f"SRC {src} does not exist or is not a directory: give an ImageFolder (SRC/<class>/<image>)")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SourceError(f"SRC {src} has no class folders: expected SRC/<class>/<image> (ImageFolder layout)")
    loose = [{"path": p.name, "reason": "not inside a class folder"} for p in sorted(src.iterdir()) if p.is_file()]
    inputs = []
    unreadable: list[dict] = []  # folders os.walk cannot list: their files are unknown, so say so

    def walk_error(e: OSError) -> None:
        unreadable.append({"path": Path(e.filename).relative_to(src).as_posix(),
                           "reason": f"unreadable folder: {e.strerror or e}"})

    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(src / name, onerror=walk_error):
            dirnames.sort()
            for fname in filenames:
                path = Path(dirpath) / fname
                rel = path.relative_to(src).as_posix()
                try:
                    st = path.stat()
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:  # e.g. a dangling symlink: kept as an input, skipped with its reason later
                    size, mtime = -1, 0
                inputs.append(Input(rel, label, sample_key(rel), size, mtime))
    if not inputs:
        raise SourceError(f"SRC {src} has class folders {classes[:5]}... but no files in them")
    inputs.sort(key=lambda i: i.relpath)
    keys = {}
    for i in inputs:
        if i.key in keys:  # needs a 40-bit hash collision on top of identical cleaned paths
            raise SourceError(f"inputs {keys[i.key]} and {i.relpath} map to the same sample key {i.key}; rename one")
        keys[i.key] = i.relpath
    return classes, inputs, loose + unreadable


def plan_shards(inputs: list[Input], seed: int, samples_per_shard: int) -> list[list[Input]]:
    """Shuffle the (sorted) inputs with `seed` and cut them into shards, in global index order."""
    order = list(inputs)
    random.Random(seed).shuffle(order)  # random.Random's shuffle is stable across Python versions
    return [order[i:i + samples_per_shard] for i in range(0, len(order), samples_per_shard)]


def inputs_fingerprint(name: str, inputs: list[Input], opts: Options) -> str:
    """Hash of what decides a shard's bytes: its inputs (path, label, size, mtime) and the options."""
    payload = [name, opts.max_side, opts.quality, [(i.relpath, i.label, i.size, i.mtime_ns) for i in inputs]]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


# ---------------------------------------------------------------- worker: one shard per task

def write_shard(task: tuple[str, str, list[Input], int, int]) -> tuple[list[IndexEntry], list[dict], int]:
    """Worker: decode/normalise the inputs and write them to the temp tar `tmp_path`.

    Indices in KEY.idx are shard-local (0..n-1); the main process shifts them once the shard's
    first global index is known. Returns (index entries, skip records, images copied as-is).
    """
    src, tmp_path, inputs, max_side, quality = task
    skipped, copied = [], 0
    with open(tmp_path, "wb") as f:
        writer = ShardWriter(f)
        for item in inputs:
            try:
                data = (Path(src) / item.relpath).read_bytes()
                image = normalise_image(data, max_side=max_side, quality=quality)
            except OSError as e:
                skipped.append({"path": item.relpath, "reason": f"unreadable: {e.strerror or e}"})
                continue
            except UnusableImage as e:
                skipped.append({"path": item.relpath, "reason": str(e)})
                continue
            copied += image.copied
            writer.add(item.key, image.jpeg, item.label, len(writer.entries))
        writer.close()
    return writer.entries, skipped, copied


# ---------------------------------------------------------------- main process

def _our_files(dst: Path) -> list[Path]:
    if not dst.is_dir():
        return []
    return sorted(p for p in dst.iterdir() if p.name in (MANIFEST_NAME, PROGRESS_NAME)
                  or (p.name.startswith("shard-") and p.suffix in (".tar", ".idx"))
                  or (p.name.startswith((".shard-", f".{MANIFEST_NAME}.")) and p.name.endswith(".tmp")))


def _load_records(dst: Path) -> tuple[str | None, list[dict], list[dict]]:
    """(plan hash, finished shard records, skip records) from the manifest, else from the journal."""
    try:
        raw = json.loads((dst / MANIFEST_NAME).read_text())
        return raw.get("plan_sha256"), list(raw["shards"]), list(raw.get("skipped", []))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    records, skipped = [], []
    try:
        lines = (dst / PROGRESS_NAME).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            break  # torn by a crash mid-append: everything after it is unknown
        skipped += record.pop("skipped", [])
        records.append(record)
    return None, records, skipped


def _append_record(dst: Path, record: dict, skipped: list[dict]) -> None:
    with open(dst / PROGRESS_NAME, "a") as f:
        f.write(json.dumps({**record, "skipped": skipped}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _finished_prefix(dst: Path, records: list[dict], fingerprints: list[str]) -> list[dict]:
    """The records of shards 0..k-1 that match the plan and whose files hash as recorded."""
    kept = []
    by_name = {r.get("name"): r for r in records}
    for k, fp in enumerate(fingerprints):
        r = by_name.get(shard_name(k))
        if r is None or r.get("inputs_sha256") != fp:
            break
        if r["samples"] and not ((dst / r["name"]).is_file() and (dst / r["index_name"]).is_file()
                                 and (dst / r["name"]).stat().st_size == r["bytes"]
                                 and sha256_file(str(dst / r["name"])) == r["sha256"]):
            break
        kept.append(r)
    return kept


def _finish_shard(dst: Path, k: int, entries: list[IndexEntry], base: int) -> dict:
    """Shift indices, fsync, hash, write the index file, then rename both to their final names."""
    name, index_name = shard_name(k), shard_name(k).replace(".tar", ".idx")
    tmp_tar, tmp_idx = dst / f".{name}.tmp", dst / f".{index_name}.tmp"
    if not entries:  # every input of this shard was unusable: no files, DALI cannot read an empty shard
        tmp_tar.unlink(missing_ok=True)
        return {"name": name, "index_name": index_name, "samples": 0, "bytes": 0, "sha256": ""}
    shift_indices(str(tmp_tar), entries, base)
    with open(tmp_tar, "rb+") as f:
        os.fsync(f.fileno())
    with open(tmp_idx, "w") as f:
        f.write(index_text(entries))
        f.flush()
        os.fsync(f.fileno())
    digest, size = sha256_file(str(tmp_tar)), tmp_tar.stat().st_size
    os.replace(tmp_idx, dst / index_name)  # index first: a final-named tar always has its index
    os.replace(tmp_tar, dst / name)
    fsync_dir(dst)
    return {"name": name, "index_name": index_name, "samples": len(entries), "bytes": size, "sha256": digest}


def run_shard(opts: Options, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Shard opts.src into opts.dst; returns the manifest dict. Raises SourceError for bad SRC/DST.

    resume/overwrite: as the CLI flags. progress: show the tqdm bar (when stderr is a terminal).
    """
    start = time.perf_counter()
    src, dst = Path(opts.src), Path(opts.dst)
    if opts.samples_per_shard < 1 or opts.workers < 1 or not 1 <= opts.quality <= 100 or opts.max_side < 0:
        raise SourceError("need --samples-per-shard >= 1, --workers >= 1, 1 <= --quality <= 100, --max-side >= 0")
    if dst.exists() and not dst.is_dir():
        raise SourceError(f"DST {dst} exists and is not a directory: give a new or shard directory")
    if dst.resolve().is_relative_to(src.resolve()):
        raise SourceError(f"DST {dst} lies inside SRC {src}: its shards would be read as inputs; put it elsewhere")
    classes, inputs, loose = scan_source(src)
    plan = plan_shards(inputs, opts.seed, opts.samples_per_shard)
    fingerprints = [inputs_fingerprint(shard_name(k), shard, opts) for k, shard in enumerate(plan)]
    plan_sha = hashlib.sha256(json.dumps([opts.seed, classes, fingerprints]).encode()).hexdigest()

    existing = _our_files(dst)
    if existing and overwrite:
        for p in existing:
            p.unlink()
        existing = []
    old_plan, records, old_skipped = _load_records(dst) if existing else (None, [], [])
    if existing and not resume:
        if old_plan == plan_sha and (dst / MANIFEST_NAME).is_file():
            print(f"{dst} already holds these shards (same inputs and options): nothing to do; "
                  f"check them with --verify", file=sys.stderr)
            return json.loads((dst / MANIFEST_NAME).read_text())
        raise SourceError(f"DST {dst} already holds shards from another run ({len(existing)} files, e.g. "
                          f"{existing[0].name}): pass --resume to finish it or --overwrite to replace it")
    dst.mkdir(parents=True, exist_ok=True)
    kept = _finished_prefix(dst, records, fingerprints) if resume else []
    kept_names = {r["name"] for r in kept} | {r["index_name"] for r in kept}
    for p in _our_files(dst):  # temp files, stale shards beyond the kept prefix, old manifest and journal
        if p.name not in kept_names:
            p.unlink()

    finished = [dict(r) for r in kept]
    skipped_by_shard = {r["name"]: [s for s in old_skipped if s.get("shard") == r["name"]] for r in kept}
    for r in finished:  # a fresh journal that starts with the kept prefix
        _append_record(dst, r, skipped_by_shard[r["name"]])
    base = sum(r["samples"] for r in kept)
    copied = 0
    todo = [(k, plan[k]) for k in range(len(kept), len(plan))]
    tasks = [(str(src), str(dst / f".{shard_name(k)}.tmp"), shard, opts.max_side, opts.quality) for k, shard in todo]
    bar = tqdm(total=len(inputs), initial=sum(len(plan[k]) for k in range(len(kept))), unit="img",
               desc=f"sharding {src.name}", disable=None if progress else True, smoothing=0.1)
    pool = multiprocessing.get_context("spawn").Pool(opts.workers) if opts.workers > 1 and len(tasks) > 1 else None
    try:
        results = pool.imap_unordered(_numbered, enumerate(tasks)) if pool else map(_numbered, enumerate(tasks))
        done: dict[int, tuple] = {}
        next_k = len(kept)
        for t, result in results:
            done[t + len(kept)] = result
            bar.update(len(tasks[t][2]))
            while next_k in done:  # finish shards in order: shard k's first index needs 0..k-1's counts
                entries, skipped, n_copied = done.pop(next_k)
                record = _finish_shard(dst, next_k, entries, base)
                record.update(first_index=base, inputs=len(plan[next_k]), inputs_sha256=fingerprints[next_k])
                base += record["samples"]
                copied += n_copied
                finished.append(record)
                skipped_by_shard[record["name"]] = [{**s, "shard": record["name"]} for s in skipped]
                _append_record(dst, record, skipped_by_shard[record["name"]])
                next_k += 1
    finally:
        bar.close()
        if pool:
            pool.terminate()
            pool.join()

    skipped_all = loose + sum((skipped_by_shard[r["name"]] for r in finished), [])
    manifest = manifest_dict(num_samples=base, classes=classes, shards=[r for r in finished if r["samples"]],
                             skipped=skipped_all, options=opts.content())
    manifest["plan_sha256"] = plan_sha
    write_json(dst / MANIFEST_NAME, manifest)
    (dst / PROGRESS_NAME).unlink(missing_ok=True)

    elapsed = time.perf_counter() - start
    written = base - sum(r["samples"] for r in kept)
    total_bytes = sum(r["bytes"] for r in finished)
    print(f"wrote {written} images ({copied} copied as-is, {written - copied} re-encoded), "
          f"skipped {len(skipped_all)}, {len(manifest['shards'])} shards ({len(kept)} kept from before), "
          f"{total_bytes / 1e6:.1f} MB, in {elapsed:.1f} s ({written / max(elapsed, 1e-9):.0f} img/s) -> {dst}")
    return manifest


def _numbered(item: tuple[int, tuple]) -> tuple[int, tuple]:
    t, task = item
    return t, write_shard(task)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pirl_fast.shard", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Options("", "")
    p.add_argument("src", nargs="?", help="ImageFolder to shard: SRC/<class>/<image files>")
    p.add_argument("dst", nargs="?", help="output directory for the shards (created)")
    p.add_argument("--verify", metavar="DST", help="check a finished shard directory instead of sharding")
    cores = os.cpu_count() or 1
    p.add_argument("--workers", type=int, default=cores, help="worker processes, each writing one shard at a time "
                   f"(default: the number of CPU cores, {cores} here; the output does not depend on it)")
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard,
                   help=f"inputs per shard (default {d.samples_per_shard}, ~100 MB of ImageNet)")
    p.add_argument("--max-side", type=int, default=d.max_side, metavar="PX",
                   help=f"downscale images whose longer side exceeds PX (default {d.max_side}; 0 = never)")
    p.add_argument("--quality", type=int, default=d.quality,
                   help=f"JPEG quality of re-encoded images (default {d.quality}; copied JPEGs keep theirs)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"global shuffle seed (default {d.seed})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="finish an interrupted run in DST, keeping its complete shards that match the plan")
    g.add_argument("--overwrite", action="store_true", help="replace the shards already in DST")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify:
        if args.src or args.dst:
            parser.error("--verify DST takes no SRC/DST arguments")
        from pirl_fast.shard_verify import verify_shards
        problems = verify_shards(args.verify)
        return 1 if problems else 0
    if not (args.src and args.dst):
        parser.error("give SRC and DST (or --verify DST)")
    opts = Options(src=str(Path(args.src).resolve()), dst=args.dst, samples_per_shard=args.samples_per_shard,
                   max_side=args.max_side, quality=args.quality, seed=args.seed, workers=args.workers)
    try:
        run_shard(opts, resume=args.resume, overwrite=args.overwrite)
    except (SourceError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m pirl_fast.shard SRC DST [options]   |   python -m pirl_fast.shard --verify DST

Turns an ImageFolder (SRC/<class>/**/<image>, classes = sorted sub-folder names) into
WebDataset shards that DALI reads on the GPU without ever meeting a bad image:

    DST/shard-000000.tar ...   samples KEY.jpg, KEY.cls, KEY.idx, KEY.lbl (see shard_format.py)
    DST/shard-000000.idx ...   DALI index files (v1.2), so readers need not scan the tars
    DST/manifest.json          written last: counts, classes, shard hashes, skipped inputs, options

A dataset root is sharded split by split, every split with train's class list:

    python -m pirl_fast.shard /imagenet shards/in1k    # /imagenet/{train,val}/ -> shards/in1k/{train,val}/

SRC is taken for a dataset root when all its sub-folders are named train, val, validation or test
(any case) and hold class folders (or labels); a class that train lacks is an error. Split names
mixed with other folders (classes cat, dog, test; or a devkit/ beside train/ and val/) are refused
(exit 2) until --layout imagefolder|splits says which SRC is. A split whose images lie flat
(ImageNet's val/ as downloaded) takes classes from a labels file: --labels [SPLIT=]FILE, or
Kaggle's LOC_val_solution.csv in val/ or in SRC, found by itself. Labels files: a CSV of file
name,class name (header optional; names with or without extension), Kaggle's LOC_val_solution.csv,
or the devkit's ILSVRC2012_validation_ground_truth.txt with its meta.mat beside it (needs scipy).
An image without a label is an error; a label without an image is reported and recorded. Details:
shard_source.py (layouts) and labels_file.py (formats).

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
from dataclasses import dataclass, replace
from pathlib import Path

from pirl_fast.images import UnusableImage, normalise_image
from pirl_fast.atomic import fsync_dir, write_json
from pirl_fast.cpus import cpus_per_rank
from pirl_fast.manifest import MANIFEST_NAME, ShardError, load_manifest, manifest_dict
from pirl_fast.progress import progress as progress_bar
# sample_key and scan_source are used through this module by the tests and pirl_fast.bench.shard.
from pirl_fast.shard_format import (IndexEntry, ShardWriter, index_text, sample_key,  # noqa: F401
                                    sha256_file, shift_indices)
from pirl_fast.shard_source import LAYOUTS, Input, Source, SourceError, Split, read_source, scan_source  # noqa: F401
from pirl_fast.splits import EVAL_SPLITS, SPLIT_NAMES, resolve_shards, split_folders

# Journal of an unfinished run: one JSON line per finished shard, appended and fsynced in shard
# order (a line torn by a crash is ignored); removed once the manifest is written.
PROGRESS_NAME = ".progress.jsonl"


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
                data = (Path(src) / item.path).read_bytes()
                image = normalise_image(data, max_side=max_side, quality=quality)
            except OSError as e:
                skipped.append({"path": item.path, "reason": f"unreadable: {e.strerror or e}"})
                continue
            except UnusableImage as e:
                skipped.append({"path": item.path, "reason": str(e)})
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


@dataclass
class Plan:
    """One shard folder to write: its inputs cut into shards, their fingerprints, the plan's hash."""
    opts: Options
    split: Split
    shards: list[list[Input]]
    fingerprints: list[str]
    sha: str


def make_plan(opts: Options, split: Split) -> Plan:
    shards = plan_shards(split.inputs, opts.seed, opts.samples_per_shard)
    fingerprints = [inputs_fingerprint(shard_name(k), shard, opts) for k, shard in enumerate(shards)]
    sha = hashlib.sha256(json.dumps([opts.seed, split.classes, fingerprints]).encode()).hexdigest()
    return Plan(opts, split, shards, fingerprints, sha)


def _check_paths(opts: Options) -> None:
    src, dst = Path(opts.src), Path(opts.dst)
    if opts.samples_per_shard < 1 or opts.workers < 1 or not 1 <= opts.quality <= 100 or opts.max_side < 0:
        raise SourceError("need --samples-per-shard >= 1, --workers >= 1, 1 <= --quality <= 100, --max-side >= 0")
    if dst.exists() and not dst.is_dir():
        raise SourceError(f"DST {dst} exists and is not a directory: give a new or shard directory")
    if dst.resolve().is_relative_to(src.resolve()):
        raise SourceError(f"DST {dst} lies inside SRC {src}: its shards would be read as inputs; put it elsewhere")


def holds_plan(plan: Plan, resume: bool, overwrite: bool) -> bool:
    """True when the plan's DST already holds exactly these shards, finished: nothing to do.

    Raises SourceError when it holds other shards and neither --resume nor --overwrite says what
    to do. Writes nothing, so every split of a dataset root is checked before any is written."""
    dst = Path(plan.opts.dst)
    if dst.exists() and not dst.is_dir():
        raise SourceError(f"DST {dst} exists and is not a directory: give a new or shard directory")
    existing = _our_files(dst)
    if not existing or resume or overwrite:
        return False
    if _load_records(dst)[0] == plan.sha and (dst / MANIFEST_NAME).is_file():
        return True
    raise SourceError(f"DST {dst} already holds shards from another run ({len(existing)} files, e.g. "
                      f"{existing[0].name}): pass --resume to finish it or --overwrite to replace it")


def _nothing_to_do(dst: Path) -> dict:
    print(f"{dst} already holds these shards (same inputs and options): nothing to do; "
          f"check them with --verify", file=sys.stderr)
    return json.loads((dst / MANIFEST_NAME).read_text())


def _remove_ours(folder: Path) -> None:
    """Delete the sharder's files in `folder`, and the folder if that leaves it empty."""
    for p in _our_files(folder):
        p.unlink()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def run_shard(opts: Options, resume: bool = False, overwrite: bool = False, progress: bool = True,
              source: Split | None = None) -> dict:
    """Shard one folder, opts.src, into opts.dst; returns the manifest dict. Raises SourceError for
    bad SRC/DST. source: what read_source found (default: SRC read as an ImageFolder or flat folder).

    resume/overwrite: as the CLI flags. progress: report progress (a bar on a terminal, plain lines otherwise:
    pirl_fast/progress.py).
    """
    _check_paths(opts)
    dst = Path(opts.dst)
    split = source or read_source(opts.src, layout="imagefolder").splits[0]
    plan = make_plan(opts, split)
    roots = [p for p in split_folders(dst).values() if _our_files(p)] if dst.is_dir() else []
    if roots and not overwrite:
        raise SourceError(f"DST {dst} holds a dataset root's shards ({', '.join(p.name for p in roots)}/): pass "
                          "--overwrite to replace them with one shard folder, or choose another DST")
    if holds_plan(plan, resume, overwrite):
        return _nothing_to_do(dst)
    for folder in roots:
        _remove_ours(folder)
    return write_plan(plan, resume, overwrite, progress)


def write_plan(plan: Plan, resume: bool, overwrite: bool, progress: bool) -> dict:
    """Write the plan's shards and manifest (keeping a matching finished prefix with resume)."""
    start = time.perf_counter()
    opts, split, fingerprints = plan.opts, plan.split, plan.fingerprints
    src, dst, inputs, classes, plan_sha = Path(opts.src), Path(opts.dst), split.inputs, split.classes, plan.sha
    existing = _our_files(dst)
    if existing and overwrite:
        for p in existing:
            p.unlink()
        existing = []
    _, records, old_skipped = _load_records(dst) if existing else (None, [], [])
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
    shards = plan.shards
    todo = [(k, shards[k]) for k in range(len(kept), len(shards))]
    tasks = [(str(src), str(dst / f".{shard_name(k)}.tmp"), shard, opts.max_side, opts.quality) for k, shard in todo]
    desc = f"sharding {src.name}" + (f"/{split.name}" if split.name else "")
    bar = progress_bar(total=len(inputs), initial=sum(len(shards[k]) for k in range(len(kept))), unit="img",
                       desc=desc, enabled=progress)
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
                record.update(first_index=base, inputs=len(shards[next_k]), inputs_sha256=fingerprints[next_k])
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

    skipped_all = split.skipped + sum((skipped_by_shard[r["name"]] for r in finished), [])
    options = {**opts.content(), **({"split": split.name} if split.name else {})}
    manifest = manifest_dict(num_samples=base, classes=classes, shards=[r for r in finished if r["samples"]],
                             skipped=skipped_all, options=options)
    if split.labels:
        manifest["labels"] = split.labels
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


def run_splits(opts: Options, source: Source, resume: bool = False, overwrite: bool = False,
               progress: bool = True) -> dict[str, dict]:
    """Shard every split of the dataset root `source` (opts.src) into opts.dst/<split>/; returns
    {split: manifest}. Every split's DST is checked before any is written."""
    _check_paths(opts)
    dst = Path(opts.dst)
    plans = [make_plan(replace(opts, dst=str(dst / split.name)), split) for split in source.splits]
    own = _our_files(dst)
    if own and not overwrite:
        raise SourceError(f"DST {dst} is a shard folder itself ({len(own)} files, e.g. {own[0].name}); a dataset "
                          "root's shards go into DST/<split>/: pass --overwrite to replace it, or choose another DST")
    done = {plan.split.name: holds_plan(plan, resume, overwrite) for plan in plans}
    for p in own:
        p.unlink()
    manifests = {}
    for plan in plans:
        name = plan.split.name
        manifests[name] = _nothing_to_do(Path(plan.opts.dst)) if done[name] else write_plan(plan, resume, overwrite,
                                                                                          progress)
    print_summary(source, dst, manifests)
    return manifests


def print_summary(source: Source, dst: Path, manifests: dict[str, dict]) -> None:
    """Per split: images, classes present, skipped inputs, where; then what to run next."""
    classes = source.splits[0].classes
    print(f"dataset root {source.root} -> {dst}: class ids from train's {len(classes)} classes, the same in "
          "every split")
    for split in source.splits:
        m = manifests[split.name]
        gone = {s["path"] for s in m["skipped"]}
        present = len({i.label for i in split.inputs if i.path not in gone})
        labels = m.get("labels")
        via = f", labels from {labels['file']} ({labels['format']})" if labels else ""
        print(f"  {split.name:<10} {m['num_samples']:>9} images {present:>6} classes {len(m['skipped']):>6} skipped"
              f"  -> {dst / split.name}{via}")
        if labels and labels["without_image"]:
            print(f"  {'':<10} note: {labels['without_image']} label(s) name an image that is not there (e.g. "
                  f"{', '.join(labels['without_image_examples'][:3])}); recorded in its manifest.json")
    for what in source.left_out:
        print(f"  left out: {what}")
    names = [s.name for s in source.splits]
    val = next((n for n in EVAL_SPLITS if n in names or (dst / n / MANIFEST_NAME).is_file()), None)
    print(f"next: python -m pirl_fast.train data.shards={dst} (trains on {dst / 'train'}); python -m pirl_fast.eval "
          f"knn RUN_DIR " + (f"(measures on {dst / val})" if val else "--val-shards DIR (no val split here)"))


def _numbered(item: tuple[int, tuple]) -> tuple[int, tuple]:
    t, task = item
    return t, write_shard(task)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pirl_fast.shard", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Options("", "")
    p.add_argument("src", nargs="?", help="an ImageFolder (SRC/<class>/<images>), a dataset root (SRC/train/<class>/"
                   "<images>, SRC/val/..., each split an ImageFolder or flat with labels) or a flat folder (--labels)")
    p.add_argument("dst", nargs="?", help="output directory for the shards (created); a dataset root's splits go "
                   "into DST/train/, DST/val/, ...")
    p.add_argument("--verify", metavar="DST", help="check a finished shard directory (every split of a dataset "
                   "root's) instead of sharding")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="auto (default): SRC is a dataset root when all its sub-folders are named train, val, "
                   "validation or test and hold class folders or labels; other mixes with a split name are refused. "
                   "imagefolder: SRC's sub-folders are classes, whatever their names. splits: SRC's split-named "
                   "sub-folders are splits, other sub-folders are left out")
    p.add_argument("--labels", action="append", default=[], metavar="[SPLIT=]FILE",
                   help="labels of a flat folder of images: CSV of file name,class name (header optional), Kaggle's "
                   "LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt (needs meta.mat "
                   "beside it and scipy). In a dataset root: SPLIT=FILE, or FILE for its only flat split. "
                   "LOC_val_solution.csv beside the images or in SRC is found without it")
    p.add_argument("--splits", metavar="A,B", default=None,
                   help="dataset root: shard only these splits (e.g. train,val); train's classes are used all the same")
    p.add_argument("--classes", metavar="SHARDS", default=None,
                   help="single folder: take the class list (label ids) from these train shards (a shard folder or "
                   "a dataset root's); every class of SRC must be in it")
    cores = cpus_per_rank()
    p.add_argument("--workers", type=int, default=cores, help="worker processes, each writing one shard at a time "
                   f"(default: the CPU cores this process may use, {cores} here; the output does not depend on it)")
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
        _check_paths(opts)  # before scanning: a wrong DST should not wait for a scan of ImageNet
        classes = load_manifest(resolve_shards(args.classes).dir).classes if args.classes else None
        splits = [n.strip().lower() for n in args.splits.split(",") if n.strip()] if args.splits else None
        if splits and not set(splits) <= set(SPLIT_NAMES):
            raise SourceError(f"--splits {args.splits}: split names are {', '.join(SPLIT_NAMES)}")
        source = read_source(opts.src, args.layout, args.labels, splits, classes)
        if source.layout == "splits":
            run_splits(opts, source, resume=args.resume, overwrite=args.overwrite)
        else:
            manifest = run_shard(opts, resume=args.resume, overwrite=args.overwrite, source=source.splits[0])
            if source.layout == "flat" and classes is None:
                print(f"note: class ids are the {len(manifest['classes'])} sorted class names of "
                      f"{manifest['labels']['file']}; to use train's, pass --classes TRAIN_SHARDS")
            if manifest.get("labels", {}).get("without_image"):
                labels = manifest["labels"]
                print(f"note: {labels['without_image']} label(s) of {labels['file']} name an image that is not "
                      f"there (e.g. {', '.join(labels['without_image_examples'][:3])}); recorded in manifest.json")
    except (SourceError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m pirl_fast.shard SRC DST [options]   |   python -m pirl_fast.shard --verify DST

Turns an ImageFolder (SRC/<class>/**/<image>, classes = sorted sub-folder names) into
WebDataset shards that DALI reads on the GPU without ever meeting a bad image:

    DST/shard-000000.tar ...   samples KEY.jpg, KEY.cls, KEY.idx, KEY.lbl, KEY.crc (see shards/README.md)
    DST/shard-000000.idx ...   DALI index files (v1.2), so readers need not scan the tars
    DST/manifest.json          written last: counts, classes, shard hashes, skipped inputs, options

A dataset root is sharded split by split, every split with train's class list:

    python -m pirl_fast.shard /imagenet shards/in1k    # /imagenet/{train,val}/ -> shards/in1k/{train,val}/

SRC is taken for a dataset root when all its sub-folders are named train, val, validation or test
(any case) and hold class folders (or labels); a class that train lacks is an error. Split names
mixed with other folders (classes cat, dog, test; or a devkit/ beside train/ and val/) are refused
(exit 2) until --layout imagefolder|splits says which SRC is. A split whose images lie flat
(ImageNet's val/ as downloaded) takes classes from a labels file (--labels below). An image without
a label is an error; a label without an image is reported and recorded. Details: shards/README.md.

Multi-label data (VOC07, COCO: an image holds a person and a dog) is one image tree of any layout
with a labels file of path -> classes, sharded split by split:

    python -m pirl_fast.shard voc/trainval shards/voc/train --labels trainval.json --multi-label
    python -m pirl_fast.shard voc/test shards/voc/test --labels test.json --multi-label --classes shards/voc/train

Each sample then carries KEY.mlb (one int8 per class: 1 present, 0 absent, -1 difficult) and -1
as its single label; `eval svm` reports mAP on such shards. Formats: multi_labels.py.

Inputs are sorted, shuffled globally with --seed (DALI only shuffles within a small buffer),
cut into shards of --samples-per-shard inputs, and given global indices 0..N-1 in that order.
Every image is decoded first; clean baseline RGB JPEGs are copied byte for byte, the rest
normalised (see shards/README.md); unusable files are skipped and listed in the manifest.

Crash safety: a shard gets its final name only when complete (temp file, fsync, rename), and
shards are finished in order, recorded in DST/.progress.jsonl; --resume keeps the finished
prefix that still matches the plan (re-hashing it) and redoes the rest. Right before
manifest.json is written, every shard is re-checked against what this run recorded (size,
sample count, index file, first and last indices): a manifest never lists shards it does not match.

One sharder per destination: a run holds an exclusive lock (flock on DST/.pirl_fast-shard.lock,
and on each DST/<split>/ it writes) from start to end, --resume included. A second run on the
same DST, or on a split of it, is refused at once (exit 2), naming the holder's pid, host, start
time and command. The kernel drops the lock when the holder dies, however it dies. On NFS and
Lustre it excludes other hosts only where the mount supports locks (shards/README.md); where flock
fails the run is refused, and --no-lock is the way round for whoever is sure.

Faults: a worker that dies (the OOM killer's SIGKILL) stops the run at once, naming it; a full or
read-only DST gives a message ("no space left on device: need about N MB in DIR, have M"), not a
traceback, and free space is checked after every shard against what the rest will need; Ctrl-C
and SIGTERM stop the workers. Each time the finished shards are kept and the run's temp files
removed: re-run with --resume. Only regular files of at most --max-bytes are read; FIFOs,
devices (a link to /dev/zero) and larger files are skipped and listed, with the reason.

Exit codes: 0 done; 1 --verify found problems; 2 bad SRC/DST or arguments, DST locked by another
sharder, full or read-only, a dead worker, nothing usable in SRC; 128+N stopped by signal N
(130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from dataclasses import replace
from pathlib import Path

from pirl_fast.runtime.cpus import cpus_per_rank
from pirl_fast.runtime.machine import gpu_visible

# sample_key, scan_source, Options and plan_shards are used through this module by the tests and pirl_fast.bench.shard.
from pirl_fast.shard.format import MANIFEST_NAME, ShardError, load_manifest, sample_key  # noqa: F401
from pirl_fast.shard.lock import LockError, hold
from pirl_fast.shard.plan import Options, Plan, make_plan, plan_header, plan_shards  # noqa: F401
from pirl_fast.shard.source import LAYOUTS, Source, SourceError, Split, read_source, scan_source  # noqa: F401
from pirl_fast.shard.splits import EVAL_SPLITS, SPLIT_NAMES, resolve_shards, split_folders
from pirl_fast.shard.state import our_files, read_found, refusal
from pirl_fast.shard.write import os_error_message, write_plan


def _check_paths(opts: Options) -> None:
    src, dst = Path(opts.src), Path(opts.dst)
    if (opts.samples_per_shard < 1 or opts.workers < 1 or not 1 <= opts.quality <= 100 or opts.max_side < 0
            or opts.max_bytes < 1):
        raise SourceError("need --samples-per-shard >= 1, --workers >= 1, 1 <= --quality <= 100, --max-side >= 0, "
                          "--max-bytes >= 1")
    if dst.exists() and not dst.is_dir():
        raise SourceError(f"DST {dst} exists and is not a directory: give a new or shard directory")
    if dst.resolve().is_relative_to(src.resolve()):
        raise SourceError(f"DST {dst} lies inside SRC {src}: its shards would be read as inputs; put it elsewhere")


def holds_plan(plan: Plan, resume: bool, overwrite: bool) -> bool:
    """True when the plan's DST already holds exactly these shards, finished: nothing to do.

    Raises SourceError when it holds other shards and neither --resume nor --overwrite says what
    to do, saying what they are (an unfinished run of this plan, or which options differ). Writes
    nothing, so every split of a dataset root is checked before any is written."""
    dst = Path(plan.opts.dst)
    if dst.exists() and not dst.is_dir():
        raise SourceError(f"DST {dst} exists and is not a directory: give a new or shard directory")
    existing = our_files(dst)
    if not existing or resume or overwrite:
        return False
    found = read_found(dst)
    if found.manifest is not None and found.plan_sha == plan.sha:
        return True
    raise SourceError(refusal(dst, found, plan_header(plan), plan.fingerprints, existing))


def _nothing_to_do(dst: Path) -> dict:
    print(f"{dst} already holds these shards (same inputs and options): nothing to do; "
          f"check them with --verify", file=sys.stderr)
    return json.loads((dst / MANIFEST_NAME).read_text())


def run_shard(opts: Options, resume: bool = False, overwrite: bool = False, progress: bool = True,
              source: Split | None = None) -> dict:
    """Shard one folder, opts.src, into opts.dst; returns the manifest dict. Raises SourceError for
    bad SRC/DST, LockError while another sharder writes DST. source: what read_source found
    (default: SRC read as an ImageFolder or flat folder).

    resume/overwrite: as the CLI flags. progress: report progress (a bar on a terminal, plain lines otherwise:
    pirl_fast/runtime/progress.py).
    """
    _check_paths(opts)
    dst = Path(opts.dst)
    with hold([dst], opts.lock):
        folders = list(split_folders(dst).values())  # a dataset root's splits, replaced by --overwrite
        with hold(folders, opts.lock):
            split = source or read_source(opts.src, layout="imagefolder").splits[0]
            plan = make_plan(opts, split)
            roots = [p for p in folders if our_files(p)]
            if roots and not overwrite:
                raise SourceError(f"DST {dst} holds a dataset root's shards ({', '.join(p.name for p in roots)}/): "
                                  "pass --overwrite to replace them with one shard folder, or choose another DST")
            if holds_plan(plan, resume, overwrite):
                return _nothing_to_do(dst)
            for folder in roots:
                for p in our_files(folder):
                    p.unlink()
            manifest = write_plan(plan, resume, overwrite, progress)
        for folder in roots:  # emptied, and no longer locked by this run
            with contextlib.suppress(OSError):
                folder.rmdir()
    return manifest


def run_splits(opts: Options, source: Source, resume: bool = False, overwrite: bool = False,
               progress: bool = True) -> dict[str, dict]:
    """Shard every split of the dataset root `source` (opts.src) into opts.dst/<split>/; returns
    {split: manifest}. Every split's DST is checked before any is written."""
    _check_paths(opts)
    dst = Path(opts.dst)
    plans = [make_plan(replace(opts, dst=str(dst / split.name)), split) for split in source.splits]
    with hold([dst, *(p.opts.dst for p in plans)], opts.lock):
        own = our_files(dst)
        if own and not overwrite:
            raise SourceError(f"DST {dst} is a shard folder itself ({len(own)} files, e.g. {own[0].name}); a dataset "
                              "root's shards go into DST/<split>/: pass --overwrite to replace it, or choose another "
                              "DST")
        done = {plan.split.name: holds_plan(plan, resume, overwrite) for plan in plans}
        for p in own:
            p.unlink()
        manifests = {}
        for plan in plans:
            name = plan.split.name
            manifests[name] = (_nothing_to_do(Path(plan.opts.dst)) if done[name]
                               else write_plan(plan, resume, overwrite, progress))
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
    # Without a GPU the default recipe (ResNet-50, batch 256; about 39 GB by train/preflight.py) cannot run here.
    experiment = "" if gpu_visible() else "experiment=smoke "
    print(f"next: python -m pirl_fast.train {experiment}data.shards={dst} (trains on {dst / 'train'}); "
          "python -m pirl_fast.eval "
          f"knn RUN_DIR " + (f"(measures on {dst / val})" if val else "--val-shards DIR (no val split here)"))


def _size(text: str) -> int:
    """--max-bytes: a byte count, or with a binary suffix K, M, G (256M = 256 * 2**20)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        return int(t[:len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a byte count such as 268435456, 256M or 1G") from None


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
    p.add_argument("--multi-label", action="store_true",
                   help="SRC is one image tree (any folders) labelled by --labels FILE with several classes per "
                   "image: a JSON of path -> [class, ...] (or {\"present\": [...], \"difficult\": [...]}) or a CSV "
                   "of path,classes[,difficult classes], paths relative to SRC; class ids are the file's sorted "
                   "class names, or --classes SHARDS'")
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
    p.add_argument("--max-bytes", type=_size, default=d.max_bytes, metavar="N",
                   help=f"skip input files larger than N bytes without reading them (default {d.max_bytes >> 20}M: "
                   "the raw size of an 8-bit RGB image at Pillow's decompression-bomb limit, far above any "
                   "compressed photo; suffixes K, M, G). Only regular files are read: FIFOs, devices and links to "
                   "them are skipped and listed")
    p.add_argument("--no-lock", action="store_true",
                   help="do not lock DST: only where its filesystem cannot lock (see above) and you are sure no "
                   "other sharder writes there")
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
        from pirl_fast.shard.verify import verify_shards
        problems = verify_shards(args.verify)
        return 1 if problems else 0
    if not (args.src and args.dst):
        parser.error("give SRC and DST (or --verify DST)")
    opts = Options(src=str(Path(args.src).resolve()), dst=args.dst, samples_per_shard=args.samples_per_shard,
                   max_side=args.max_side, quality=args.quality, seed=args.seed, max_bytes=args.max_bytes,
                   workers=args.workers, lock=not args.no_lock)
    previous = signal.signal(signal.SIGTERM, _terminated)  # as Ctrl-C: workers stopped, temp files removed
    try:
        _check_paths(opts)  # before scanning: a wrong DST should not wait for a scan of ImageNet
        with hold([opts.dst], opts.lock):  # before the scan too: a second sharder is refused at once
            _shard(args, opts)
    except (SourceError, ShardError, LockError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # DST read-only, full, not ours to write; SRC unreadable
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        print(f"interrupted ({signal.Signals(signum).name}): finished shards are kept and temp files removed; "
              "re-run the same command with --resume to finish", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _terminated(signum: int, frame) -> None:
    raise KeyboardInterrupt(signum)


def _shard(args: argparse.Namespace, opts: Options) -> None:
    classes = load_manifest(resolve_shards(args.classes).dir).classes if args.classes else None
    splits = [n.strip().lower() for n in args.splits.split(",") if n.strip()] if args.splits else None
    if splits and not set(splits) <= set(SPLIT_NAMES):
        raise SourceError(f"--splits {args.splits}: split names are {', '.join(SPLIT_NAMES)}")
    source = read_source(opts.src, args.layout, args.labels, splits, classes, args.multi_label)
    if source.layout == "splits":
        run_splits(opts, source, resume=args.resume, overwrite=args.overwrite)
        return
    manifest = run_shard(opts, resume=args.resume, overwrite=args.overwrite, source=source.splits[0])
    if source.layout in ("flat", "multi") and classes is None:
        print(f"note: class ids are the {len(manifest['classes'])} sorted class names of "
              f"{manifest['labels']['file']}; to use train's, pass --classes TRAIN_SHARDS")
    if manifest.get("labels", {}).get("without_image"):
        labels = manifest["labels"]
        print(f"note: {labels['without_image']} label(s) of {labels['file']} name an image that is not "
              f"there (e.g. {', '.join(labels['without_image_examples'][:3])}); recorded in manifest.json")

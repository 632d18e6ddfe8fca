"""`python -m pirl_fast.shard --verify DST`: re-check a finished shard directory end to end.

Checks, shard by shard: size and sha256 against the manifest; the index file equals the one
rebuilt from the tar's own member offsets; every sample has exactly jpg, cls, idx, lbl in that
order (then crc, matching the jpg bytes, in shards written with checksums); cls and lbl
agree and name a class (multi-label shards: both -1, and mlb holds one 1/0/-1 per class); idx
runs on from the previous shard; every JPEG decodes fully as a baseline RGB JPEG. Globally: the
indices are exactly 0..N-1. Prints one line per problem (naming the shard and key) and returns
the list; empty means all good.

A dataset root's shards (DST/train/, DST/val/, ...) are verified split by split, and their class
lists must be identical (train's, as the sharder writes them).
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

from PIL import Image

from pirl_fast.shard.format import (
    MANIFEST_NAME,
    IndexEntry,
    ShardError,
    checksum_problem,
    decode_int64,
    index_text,
    iter_samples,
    load_manifest,
    multi_hot_problem,
    sha256_file,
)
from pirl_fast.shard.splits import split_folders


def _check_jpeg(data: bytes) -> str | None:
    """None if `data` is a fully decodable baseline RGB JPEG, else what is wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            img.load()
    except Exception as e:  # noqa: BLE001 -- any decoder failure is a finding, not a crash
        return f"does not decode ({type(e).__name__}: {e})"
    if img.format != "JPEG" or img.mode != "RGB":
        return f"is {img.format} mode {img.mode}, expected JPEG mode RGB"
    if img.info.get("progressive") or img.info.get("progression"):
        return "is a progressive JPEG, expected baseline"
    return None


def verify_shards(shard_dir: str | Path, decode: bool = True) -> list[str]:
    """All problems found in `shard_dir`, or in every split of a dataset root's shards (see the
    module docstring); prints a summary line per shard folder."""
    try:
        splits = {} if (Path(shard_dir) / MANIFEST_NAME).is_file() else split_folders(shard_dir)
    except ShardError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return [str(e)]
    if not splits:
        return _verify_one(shard_dir, decode)
    problems: list[str] = []
    classes: dict[str, list[str]] = {}
    for name, folder in splits.items():
        problems += [f"{name}: {p}" for p in _verify_one(folder, decode)]
        try:
            classes[name] = load_manifest(folder).classes
        except ShardError:
            pass  # already reported
    if len({tuple(c) for c in classes.values()}) > 1:
        counts = ", ".join(f"{n}: {len(c)} classes" for n, c in classes.items())
        problems.append(f"{shard_dir}: the splits' class lists differ ({counts}), so a label id means different "
                        "classes in different splits: re-shard the dataset root in one command")
        print(f"FAIL: {problems[-1]}", file=sys.stderr)
    status = f"{len(problems)} problem(s)" if problems else "OK"
    print(f"verify {shard_dir}: dataset root with the splits {', '.join(splits)}: {status}")
    return problems


def _verify_one(shard_dir: str | Path, decode: bool) -> list[str]:
    try:
        manifest = load_manifest(shard_dir)
    except ShardError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return [str(e)]
    problems: list[str] = []

    def problem(msg: str) -> None:
        problems.append(msg)
        print(f"FAIL: {msg}", file=sys.stderr)

    seen = 0
    next_index = 0
    for info, tar_path, idx_path in zip(manifest.shards, manifest.tar_paths(), manifest.index_paths()):
        size = Path(tar_path).stat().st_size
        if size != info.bytes:
            problem(f"{info.name}: {size} bytes, manifest says {info.bytes}")
        if sha256_file(tar_path) != info.sha256:
            problem(f"{info.name}: sha256 differs from the manifest (corrupted or replaced); re-run the sharder")
        entries: list[IndexEntry] = []
        count = 0
        try:
            with open(tar_path, "rb") as f:
                for key, data, where in iter_samples(f):
                    count += 1
                    if list(data) != manifest.members:
                        problem(f"{info.name}: sample {key} has members {list(data)}, expected {manifest.members}")
                        continue
                    entries.append(IndexEntry(key, [(ext, *where[ext], f"{key}.{ext}") for ext in manifest.members]))
                    if manifest.has_checksums and (why := checksum_problem(data["jpg"], data["crc"])):
                        problem(f"{info.name}: sample {key}: jpg {why}")
                    try:
                        label, lbl, index = int(data["cls"]), decode_int64(data["lbl"]), decode_int64(data["idx"])
                    except ValueError as e:
                        problem(f"{info.name}: sample {key}: bad cls/lbl/idx ({e})")
                        continue
                    if manifest.multi_label:
                        if why := multi_hot_problem(data["mlb"], label, lbl, len(manifest.classes)):
                            problem(f"{info.name}: sample {key}: {why}")
                    elif label != lbl or not 0 <= label < len(manifest.classes):
                        problem(f"{info.name}: sample {key}: cls {label} / lbl {lbl}, expected equal and "
                                f"< {len(manifest.classes)} classes")
                    if index != next_index:
                        problem(f"{info.name}: sample {key}: idx {index}, expected {next_index}")
                    next_index = index + 1
                    if decode and (why := _check_jpeg(data["jpg"])):
                        problem(f"{info.name}: sample {key}: jpg {why}")
        except Exception as e:  # noqa: BLE001 -- a tar that cannot be read at all is one finding
            problem(f"{info.name}: cannot be read as a tar ({type(e).__name__}: {e})")
            continue
        if count != info.samples:
            problem(f"{info.name}: holds {count} samples, manifest says {info.samples}")
        try:
            on_disk = Path(idx_path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            problem(f"{info.index_name}: unreadable ({e})")
            continue
        if on_disk != index_text(entries):
            problem(f"{info.index_name}: does not match the member offsets in {info.name}; re-run the sharder")
        seen += count
    if seen != manifest.num_samples or next_index != manifest.num_samples:
        problem(f"{manifest.root}: {seen} samples with indices up to {next_index - 1}, "
                f"manifest says {manifest.num_samples} (indices 0..{manifest.num_samples - 1})")
    status = f"{len(problems)} problem(s)" if problems else "OK"
    print(f"verify {manifest.root}: {len(manifest.shards)} shards, {seen} samples, {len(manifest.classes)} classes, "
          f"{len(manifest.skipped)} skipped at sharding time: {status}")
    return problems

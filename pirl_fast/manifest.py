"""The shard directory's table of contents: `manifest.json`, written last by `pirl_fast.shard`.

Loaders and the trainer read a shard directory only through `load_manifest`, which checks that
what the manifest lists is really there, so a half-written or hand-edited directory fails at
start-up with the fix in the message instead of deep inside a DALI pipeline.

manifest.json (format "pirl_fast-shards", version 1):
    {
      "format": "pirl_fast-shards", "version": 1,
      "num_samples": N,                       # global sample indices are 0..N-1 (memory-bank rows)
      "classes": ["cat", "dog", ...],         # class names in label order (label = position)
      "sample_members": ["jpg", "cls", "idx", "lbl"],   # + "crc" when every sample has a checksum member
      "shards": [{"name": "shard-000000.tar", "index_name": "shard-000000.idx",
                  "samples": n0, "bytes": ..., "sha256": "...",
                  "first_index": 0,           # shard k holds indices first_index..first_index+samples-1
                  "inputs": m0,               # input files planned for this shard (samples + skipped)
                  "inputs_sha256": "..."},    # fingerprint of those inputs and options (for --resume)
                 ...],
      "skipped": [{"path": "dog/x.jpg", "reason": "...", "shard": "shard-000000.tar"}, ...],
      "options": {"src": ..., "seed": ..., "samples_per_shard": ..., "max_side": ..., "quality": ...,
                  "split": "val"},            # split: only in a dataset root's shards (DST/<split>/)
      "labels": {"file": ..., "format": "kaggle", "rows": ..., "header": null, "labelled_images": ...,
                 "without_image": n, "without_image_examples": [...]},   # only for a flat folder
      "plan_sha256": "..."                    # fingerprint of all inputs and options (a re-run of the
    }                                         # same plan is a no-op; a different one is refused)

A dataset root's shards are one such directory per split (DST/train/, DST/val/, ...), all with the
same `classes`; splits.py says which of them a path means.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "pirl_fast-shards"
FORMAT_VERSION = 1
SAMPLE_MEMBERS = ["jpg", "cls", "idx", "lbl"]  # member order inside every sample (the team contract)
CHECKSUM_MEMBERS = [*SAMPLE_MEMBERS, "crc"]  # the same, with the per-sample CRC-32 of the jpg (shard_format.py)
OPTIONAL_MEMBERS = ("crc", "mlb")  # after the four, in this order: checksum, multi-hot labels (shards/README.md)

_FIX = "run `python -m pirl_fast.shard SRC {dir}` to (re)make it, or `--resume` to finish an interrupted run"


class ShardError(Exception):
    """A shard directory is missing, incomplete or inconsistent (the message names the fix)."""


@dataclass
class ShardInfo:
    name: str        # tar file name, relative to the manifest's directory
    index_name: str  # DALI index file name (v1.2 text format), same directory
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    root: Path                # the shard directory
    num_samples: int
    classes: list[str]        # label order
    shards: list[ShardInfo]
    skipped: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    members: list[str] = field(default_factory=lambda: list(SAMPLE_MEMBERS))  # per sample, in tar order

    @property
    def has_checksums(self) -> bool:
        """Every sample carries a crc member (shards written before it existed do not)."""
        return "crc" in self.members

    def tar_paths(self) -> list[str]:
        """Absolute paths of the tar files, in shard (= global index) order."""
        return [str(self.root / s.name) for s in self.shards]

    def index_paths(self) -> list[str]:
        """Absolute paths of the DALI index files, parallel to `tar_paths()`."""
        return [str(self.root / s.index_name) for s in self.shards]


def load_manifest(shard_dir: str | os.PathLike) -> Manifest:
    """Read `shard_dir/manifest.json` and check that every listed tar and index file exists.

    Raises ShardError naming the path and the fix for a missing directory or manifest, a
    malformed manifest, a sample count that does not add up, or a missing shard/index file.
    """
    root = Path(shard_dir).resolve()
    fix = _FIX.format(dir=shard_dir)
    if not root.is_dir():
        raise ShardError(f"shard directory {root} does not exist: {fix}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"{path} is missing (not a finished shard directory): {fix}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path} cannot be read as JSON ({e}): {fix}") from e
    try:
        if raw.get("format") != FORMAT_NAME or raw.get("version") != FORMAT_VERSION:
            raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}, "
                             f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}")
        shards = [ShardInfo(name=str(s["name"]), index_name=str(s["index_name"]), samples=int(s["samples"]),
                            bytes=int(s["bytes"]), sha256=str(s["sha256"])) for s in raw["shards"]]
        manifest = Manifest(root=root, num_samples=int(raw["num_samples"]), classes=[str(c) for c in raw["classes"]],
                            shards=shards, skipped=list(raw.get("skipped", [])), options=dict(raw.get("options", {})),
                            members=[str(m) for m in raw.get("sample_members", SAMPLE_MEMBERS)])
        extra = manifest.members[len(SAMPLE_MEMBERS):]
        if manifest.members[:len(SAMPLE_MEMBERS)] != SAMPLE_MEMBERS or extra != [
                m for m in OPTIONAL_MEMBERS if m in extra]:
            raise ValueError(f"sample_members {manifest.members}: expected {SAMPLE_MEMBERS} followed by any of "
                             f"{list(OPTIONAL_MEMBERS)}, in that order")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ShardError(f"{path} is malformed ({type(e).__name__}: {e}): {fix}") from e
    total = sum(s.samples for s in manifest.shards)
    if total != manifest.num_samples:
        raise ShardError(f"{path} is inconsistent: num_samples is {manifest.num_samples} but its shards hold "
                         f"{total}: {fix}")
    for s in manifest.shards:
        for name in (s.name, s.index_name):
            if not (root / name).is_file():
                raise ShardError(f"{root / name} is listed in {path} but missing: {fix}")
    return manifest


def manifest_dict(*, num_samples: int, classes: list[str], shards: list[dict], skipped: list[dict],
                  options: dict[str, Any], members: list[str] = SAMPLE_MEMBERS) -> dict[str, Any]:
    """The manifest as written to disk (`shards` entries are ShardInfo fields plus resume bookkeeping);
    `members`: CHECKSUM_MEMBERS for shards written with ShardWriter(checksums=True)."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "num_samples": num_samples,
        "classes": classes,
        "sample_members": list(members),
        "shards": shards,
        "skipped": skipped,
        "options": options,
    }


def shard_entry(info: ShardInfo, **extra: Any) -> dict[str, Any]:
    return {**asdict(info), **extra}

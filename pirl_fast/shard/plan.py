"""What a sharder run will write: its options, the global shuffle, each shard's inputs and fingerprints.

A plan is a pure function of SRC's inputs (path, label, size, mtime) and the options that decide
the shards' bytes: the same plan always gives byte-identical shards, whatever --workers is. Its
fingerprints let --resume keep finished shards that still match, and let a refusal say whether DST
holds this plan (unfinished: --resume) or another one (and what differs).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from pirl_fast.shard.source import Input, Split
from pirl_fast.shard.state import shard_name


@dataclass(frozen=True)
class Options:
    src: str
    dst: str
    samples_per_shard: int = 1000  # ~100 MB at ImageNet's ~110 KB/image: big sequential reads, many shards per rank
    max_side: int = 1024  # longer-side cap; ImageNet's median is ~500 px, so only the rare huge ones shrink
    quality: int = 95  # for re-encoded images only; high because they are decoded again for training
    seed: int = 0
    # Inputs larger than this are skipped unread. 2**28 B = 256 MiB is the raw size of an 8-bit RGB
    # image at Pillow's decompression-bomb threshold (MAX_IMAGE_PIXELS = 2**30 // 4 // 3 = 89,478,485
    # pixels, 3 bytes each): a compressed photo Pillow decodes without complaint is far smaller, while
    # a link to /dev/zero or a stray video named .jpg is caught before a byte of it is read.
    max_bytes: int = 1 << 28
    workers: int = 1  # 1 = in this process (tests); the CLI defaults to the number of CPU cores
    lock: bool = True  # hold the destination lock (lock.py); False = --no-lock

    def content(self) -> dict:
        """The options that decide the shards' bytes (recorded in the manifest)."""
        return {"src": self.src, "seed": self.seed, "samples_per_shard": self.samples_per_shard,
                "max_side": self.max_side, "quality": self.quality, "max_bytes": self.max_bytes}


def plan_shards(inputs: list[Input], seed: int, samples_per_shard: int) -> list[list[Input]]:
    """Shuffle the (sorted) inputs with `seed` and cut them into shards, in global index order."""
    order = list(inputs)
    random.Random(seed).shuffle(order)  # random.Random's shuffle is stable across Python versions
    return [order[i:i + samples_per_shard] for i in range(0, len(order), samples_per_shard)]


def inputs_fingerprint(name: str, inputs: list[Input], opts: Options) -> str:
    """Hash of what decides a shard's bytes: its inputs (path, label or targets, size, mtime) and the options."""
    payload = [name, opts.max_side, opts.quality, [(i.relpath, i.label, i.size, i.mtime_ns) for i in inputs]]
    if any(i.targets for i in inputs):  # multi-label: the KEY.mlb bytes too (hex: JSON has no bytes)
        payload.append([i.targets.hex() for i in inputs])
    oversized = [i.relpath for i in inputs if i.size > opts.max_bytes]
    if oversized:  # --max-bytes decides these bytes only through the inputs it skips
        payload.append(oversized)
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


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
    # The member list is part of the plan: --resume never mixes shards with and without KEY.crc (or KEY.mlb).
    sha = hashlib.sha256(json.dumps([opts.seed, split.classes, fingerprints, split.members]).encode()).hexdigest()
    return Plan(opts, split, shards, fingerprints, sha)


def plan_header(plan: Plan) -> dict:
    """The plan as the journal's first line records it (state.py): what a refusal compares."""
    return {"plan_sha256": plan.sha, "options": plan_options(plan), "inputs": len(plan.split.inputs),
            "classes": plan.split.classes}


def plan_options(plan: Plan) -> dict:
    return {**plan.opts.content(), **({"split": plan.split.name} if plan.split.name else {})}

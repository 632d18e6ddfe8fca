"""What a shard folder holds between sharder runs, and whether its shards still match their records.

Files of `python -m pirl_fast.shard` in DST (nothing else there is ever touched or removed):

    shard-NNNNNN.tar, shard-NNNNNN.idx   finished shards (final names only once complete)
    .shard-NNNNNN.tar.tmp, .idx.tmp      a shard being written (the run's temp-name pattern)
    .manifest.json.*.tmp                 the manifest being written (atomic.py)
    .progress.jsonl                      the journal of an unfinished run (see below)
    manifest.json                        written last: the folder is finished

The journal's first line describes the plan ({"plan": {"plan_sha256", "options", "inputs",
"classes"}}); then one line per finished shard, in shard order ({name, samples, bytes, sha256,
first_index, inputs, inputs_sha256, skipped}). It says what an interrupted run was, so a refusal
can tell "an unfinished run of this same plan: --resume" from "a different plan: here is what
differs", and --resume knows which finished shards to keep.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pirl_fast.shard.format import MANIFEST_NAME, TAR_BLOCK, decode_int64, member_name_at, parse_index, sha256_file

# Journal of an unfinished run; removed once the manifest is written.
PROGRESS_NAME = ".progress.jsonl"
# Option names as the command line spells them, for messages.
FLAGS = {"src": "SRC", "seed": "--seed", "samples_per_shard": "--samples-per-shard", "max_side": "--max-side",
         "quality": "--quality", "max_bytes": "--max-bytes", "split": "split"}


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def our_files(dst: Path) -> list[Path]:
    """The sharder's files in `dst` (see the module doc), sorted."""
    if not dst.is_dir():
        return []
    return sorted(p for p in dst.iterdir() if p.name in (MANIFEST_NAME, PROGRESS_NAME)
                  or (p.name.startswith("shard-") and p.suffix in (".tar", ".idx"))
                  or is_temp(p))


def is_temp(p: Path) -> bool:
    """One of the sharder's temp files (`.shard-*.tmp`, `.manifest.json.*.tmp`): only these are swept."""
    return p.name.startswith((".shard-", f".{MANIFEST_NAME}.")) and p.name.endswith(".tmp")


def remove_temp_files(dst: Path) -> None:
    """Delete the sharder's temp files in `dst` (left by a killed or failed run)."""
    with contextlib.suppress(OSError):  # a filesystem gone read-only: the next --resume or --overwrite sweeps them
        for p in our_files(dst):
            if is_temp(p):
                p.unlink(missing_ok=True)


@dataclass
class Found:
    """What DST says about the run that wrote it."""
    manifest: dict | None = None  # manifest.json, when it reads as JSON
    plan: dict | None = None  # the journal's plan line (None: no journal, or one from before plan lines)
    records: list[dict] = field(default_factory=list)  # finished shards, in shard order
    skipped: list[dict] = field(default_factory=list)

    @property
    def plan_sha(self) -> str | None:
        return (self.manifest or self.plan or {}).get("plan_sha256")


def read_found(dst: Path) -> Found:
    """The manifest's plan and records if it reads, else the journal's (a line torn by a crash ends it)."""
    try:
        raw = json.loads((dst / MANIFEST_NAME).read_text())
        return Found(raw, None, list(raw["shards"]), list(raw.get("skipped", [])))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = Found()
    try:
        lines = (dst / PROGRESS_NAME).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            break  # torn by a crash mid-append: everything after it is unknown
        if "plan" in record:
            found.plan = record["plan"]
            continue
        found.skipped += record.pop("skipped", [])
        found.records.append(record)
    return found


def start_journal(dst: Path, plan: dict) -> None:
    _append(dst, {"plan": plan})


def append_record(dst: Path, record: dict, skipped: list[dict]) -> None:
    _append(dst, {**record, "skipped": skipped})


def _append(dst: Path, line: dict) -> None:
    with open(dst / PROGRESS_NAME, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------ do the files match the records?

def shard_problem(dst: Path, record: dict) -> str | None:
    """What is wrong with a finished shard's files against its record, or None. Cheap (no hashing):
    the tar's size; the index file's sample count; every member inside the tar; the first and last
    samples' tar headers named as the index says, their KEY.idx values first_index and
    first_index + samples - 1 (what a second writer shifting indices breaks)."""
    tar, idx = dst / record["name"], dst / record["index_name"]
    try:
        size = tar.stat().st_size
        if size != record["bytes"]:
            return f"{tar.name} is {size} bytes, its record says {record['bytes']}"
        entries = parse_index(idx.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{record['name']} or its index {record['index_name']}: {e}"
    if len(entries) != record["samples"]:
        return f"{idx.name} lists {len(entries)} samples, the record says {record['samples']}"
    if any(offset + n > size for e in entries for _, offset, n, _ in e.members):
        return f"{idx.name} points past the end of {tar.name} ({size} bytes)"
    first = record.get("first_index")
    with open(tar, "rb") as f:
        for k in {0, len(entries) - 1}:
            for ext, offset, _size, name in entries[k].members:
                header_name = member_name_at(f, offset)
                if header_name != name:
                    return f"{tar.name}: the tar member at offset {offset - TAR_BLOCK} is {header_name!r}, " \
                           f"{idx.name} says {name!r}"
                if ext == "idx" and first is not None:
                    f.seek(offset)
                    value = decode_int64(f.read(8))
                    if value != first + k:
                        return f"{tar.name}: sample {name[:-4]} has index {value}, expected {first + k}"
    return None


def finished_prefix(dst: Path, records: list[dict], fingerprints: list[str]) -> list[dict]:
    """The records of shards 0..k-1 that match the plan and whose files hash and index as recorded."""
    kept = []
    by_name = {r.get("name"): r for r in records}
    for k, fp in enumerate(fingerprints):
        r = by_name.get(shard_name(k))
        if r is None or r.get("inputs_sha256") != fp:
            break
        if r["samples"] and (shard_problem(dst, r) or sha256_file(str(dst / r["name"])) != r["sha256"]):
            break
        kept.append(r)
    return kept


def matching_prefix(records: list[dict], fingerprints: list[str]) -> int:
    """How many shards 0..k-1 of `records` were planned from the same inputs as `fingerprints` (no I/O)."""
    k = 0
    while k < min(len(records), len(fingerprints)) and records[k].get("inputs_sha256") == fingerprints[k]:
        k += 1
    return k


# ------------------------------------------------------------------------ what to tell a user

def _plan_of_manifest(manifest: dict) -> dict:
    """A finished manifest in the journal's plan shape: every input became a sample or a skip with a shard."""
    inputs = manifest.get("num_samples", 0) + sum(1 for s in manifest.get("skipped", []) if "shard" in s)
    return {"options": manifest.get("options", {}), "inputs": inputs, "classes": manifest.get("classes", [])}


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two plans (journal plan shape), as the user would name it."""
    diffs = []
    old_opts, new_opts = old.get("options", {}), new.get("options", {})
    for key in new_opts:
        if key in old_opts and old_opts[key] != new_opts[key]:
            diffs.append(f"{FLAGS.get(key, key)} {old_opts[key]} there, {new_opts[key]} now")
    if old.get("classes") != new.get("classes"):
        diffs.append(f"{len(old.get('classes', []))} classes there, {len(new.get('classes', []))} now"
                     if len(old.get("classes", [])) != len(new.get("classes", [])) else "the class list differs")
    if old.get("inputs") != new.get("inputs"):
        diffs.append(f"{old.get('inputs')} input files there, {new.get('inputs')} now")
    return diffs or ["same options and file count, but input files changed since (size or modification time)"]


def refusal(dst: Path, found: Found, plan: dict, fingerprints: list[str], files: list[Path]) -> str:
    """Why DST cannot be written without --resume or --overwrite: what it holds, and which flag fits."""
    if found.manifest is not None:
        diffs = "; ".join(differences(_plan_of_manifest(found.manifest), plan))
        return (f"DST {dst} holds the finished shards of a different plan ({diffs}): pass --overwrite to replace "
                "them, or choose another DST")
    n_done, keep = len(found.records), matching_prefix(found.records, fingerprints)
    if found.plan is not None and found.plan.get("plan_sha256") == plan["plan_sha256"]:
        return (f"DST {dst} holds an unfinished run of this same plan (interrupted after {n_done} of "
                f"{len(fingerprints)} shards): pass --resume to finish it (keeps the finished shards), or "
                "--overwrite to start again")
    if found.plan is not None:
        return (f"DST {dst} holds an unfinished run of a different plan ({'; '.join(differences(found.plan, plan))}; "
                f"{keep} of its {n_done} finished shards match this one): pass --overwrite to replace it, or choose "
                f"another DST (--resume would keep those {keep} and redo the rest)")
    return (f"DST {dst} holds {len(files)} sharder files (e.g. {files[0].name}) but no manifest.json or journal "
            f"saying which plan they belong to{f' ({keep} finished shards match this plan)' if keep else ''}: pass "
            "--overwrite to replace them, or --resume to keep what still matches, or choose another DST")

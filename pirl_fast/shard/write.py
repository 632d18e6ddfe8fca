"""Writing one shard folder: workers fill temp tars, the main process finishes them in order.

    worker (write_shard)          read each input (regular files of at most --max-bytes only),
                                  decode/normalise it, append it to .shard-NNNNNN.tar.tmp with
                                  shard-local indices 0..n-1
    main process (finish_shard)   in shard order: shift the indices by the shard's first global
                                  index, fsync, hash, write the index file, rename both into place,
                                  append the shard to the journal (state.py)
    last                          re-check every shard against its record, then manifest.json

What stops a run (a dead worker: pool.WorkerDied; a full or read-only DST; Ctrl-C, SIGTERM), what
it leaves for --resume, and the free-space check: shards/README.md ("Crash safety").
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from pirl_fast.runtime.atomic import NoSpaceError, atomic_write, fsync_dir, no_space_message, require_free_space
from pirl_fast.runtime.progress import progress as progress_bar
from pirl_fast.shard.format import (
    MANIFEST_NAME,
    IndexEntry,
    ShardWriter,
    index_text,
    manifest_dict,
    sha256_file,
    shift_indices,
)
from pirl_fast.shard.images import UnusableImage, normalise_image
from pirl_fast.shard.plan import Plan, plan_header, plan_options
from pirl_fast.shard.pool import WorkerDied, run_tasks
from pirl_fast.shard.source import Input, SourceError, Split, read_input
from pirl_fast.shard.state import (
    PROGRESS_NAME,
    Found,
    append_record,
    finished_prefix,
    our_files,
    read_found,
    remove_temp_files,
    shard_name,
    shard_problem,
    start_journal,
)

SHOW_SKIPPED = 10  # skipped inputs listed in the output (all of them are in the manifest)


def write_shard(task: tuple[str, str, list[Input], int, int, int]) -> tuple[list[IndexEntry], list[dict], int]:
    """Worker: decode/normalise the inputs and write them to the temp tar `tmp_path`.

    Indices in KEY.idx are shard-local (0..n-1); the main process shifts them once the shard's
    first global index is known. Returns (index entries, skip records, images copied as-is).
    """
    src, tmp_path, inputs, max_side, quality, max_bytes = task
    skipped, copied = [], 0
    with open(tmp_path, "wb") as f:
        writer = ShardWriter(f, checksums=True)  # KEY.crc: DALI-side corruption check (pirl_fast/shard/corrupt.py)
        for item in inputs:
            try:
                data = read_input(Path(src) / item.path, max_bytes)
                image = normalise_image(data, max_side=max_side, quality=quality)
            except OSError as e:
                skipped.append({"path": item.path, "reason": f"unreadable: {e.strerror or e}"})
                continue
            except UnusableImage as e:
                skipped.append({"path": item.path, "reason": str(e)})
                continue
            copied += image.copied
            writer.add(item.key, image.jpeg, item.label, len(writer.entries), item.targets)
        writer.close()
    return writer.entries, skipped, copied


# ---------------------------------------------------------------- main process

def finish_shard(dst: Path, k: int, entries: list[IndexEntry], base: int) -> dict:
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
class _Done:
    """What a run has finished so far, in shard order."""
    records: list[dict]  # finished shards' records (journal and manifest entries)
    skipped: dict[str, list[dict]]  # shard name -> its inputs' skip records
    identity: dict[str, tuple[int, int]]  # shard name -> (inode, mtime_ns) of the tar when it was hashed
    samples: int = 0  # samples in the finished shards = the next shard's first index
    copied: int = 0  # images copied byte for byte (this run)


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _clear(plan: Plan, resume: bool, overwrite: bool) -> _Done:
    """Empty DST of the sharder's files but a matching finished prefix (--resume); start the journal."""
    dst = Path(plan.opts.dst)
    found = read_found(dst) if resume and not overwrite else Found()  # --overwrite: nothing is kept
    dst.mkdir(parents=True, exist_ok=True)
    kept = finished_prefix(dst, found.records, plan.fingerprints)
    kept_names = {r["name"] for r in kept} | {r["index_name"] for r in kept}
    for p in our_files(dst):  # temp files, stale shards beyond the kept prefix, old manifest and journal
        if p.name not in kept_names:
            p.unlink()
    start_journal(dst, plan_header(plan))
    done = _Done([], {}, {})
    for r in kept:
        _add(done, dst, dict(r), [s for s in found.skipped if s.get("shard") == r["name"]])
    return done


def _add(done: _Done, dst: Path, record: dict, skipped: list[dict]) -> None:
    done.records.append(record)
    done.skipped[record["name"]] = skipped
    done.samples += record["samples"]
    if record["samples"]:
        done.identity[record["name"]] = _identity(dst / record["name"])
    append_record(dst, record, skipped)


def _space_needed(plan: Plan, done: _Done, input_bytes: list[int]) -> tuple[int, bool]:
    """(bytes the unfinished shards still need in DST, whether that is measured). Inputs are shuffled
    globally, so every shard is a random sample of SRC: the output/input ratio of the finished ones
    holds for the rest. With none finished yet: the input sizes plus tar headers, a rough guess
    (copied JPEGs keep their size, downscaled and re-encoded images shrink)."""
    k = len(done.records)
    todo_in = sum(input_bytes[k:])
    finished_in = sum(input_bytes[:k])
    written = sum(r["bytes"] for r in done.records)
    in_flight = sum(p.stat().st_size for p in our_files(Path(plan.opts.dst)) if p.name.startswith(".shard-"))
    if finished_in and written:
        return max(0, round(todo_in * written / finished_in) - in_flight), True
    # per member: a 512-byte header and on average half a block of padding
    tar_overhead = len(plan.split.members) * 2 * 512
    return todo_in + tar_overhead * sum(len(s) for s in plan.shards[k:]) - in_flight, False


def write_plan(plan: Plan, resume: bool, overwrite: bool, progress: bool) -> dict:
    """Write the plan's shards and manifest (keeping a matching finished prefix with resume)."""
    start = time.perf_counter()
    opts, split, shards = plan.opts, plan.split, plan.shards
    src, dst = Path(opts.src), Path(opts.dst)
    done = _clear(plan, resume, overwrite)
    n_kept, kept_samples = len(done.records), done.samples
    input_bytes = [sum(max(i.size, 0) for i in shard) for shard in shards]
    try:
        need, measured = _space_needed(plan, done, input_bytes)
        if measured:  # --resume: the kept shards tell how big the rest will be
            require_free_space(dst, need)
        elif need > shutil.disk_usage(dst).free:
            print(f"warning: this may not fit: {no_space_message(dst, need)} (estimated from the input sizes; "
                  "images over --max-side shrink); checked again after each shard", file=sys.stderr)
        _write_shards(plan, done, input_bytes, progress)
    except (WorkerDied, OSError) as e:
        remove_temp_files(dst)
        raise SourceError(_failure(e, plan, done, input_bytes)) from e
    except BaseException:
        remove_temp_files(dst)
        raise

    skipped_all = split.skipped + sum((done.skipped[r["name"]] for r in done.records), [])
    if done.samples == 0:
        (dst / PROGRESS_NAME).unlink(missing_ok=True)
        examples = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped_all[:3])
        more = " ..." if len(skipped_all) > 3 else ""
        raise SourceError(f"nothing usable in {src}{'/' + split.name if split.name else ''}: all "
                          f"{len(split.inputs)} input file(s) were skipped ({examples}{more}); no shards were written")
    manifest = manifest_dict(num_samples=done.samples, classes=split.classes,
                             shards=[r for r in done.records if r["samples"]], skipped=skipped_all,
                             options=plan_options(plan), members=split.members)
    if split.label_kind != "single":
        manifest["label_kind"] = split.label_kind
    if split.labels:
        manifest["labels"] = split.labels
    manifest["plan_sha256"] = plan.sha
    with atomic_write(dst / MANIFEST_NAME, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        _check_written(dst, done)  # last thing before the rename: raising here leaves no manifest
    (dst / PROGRESS_NAME).unlink(missing_ok=True)

    elapsed = time.perf_counter() - start
    written = done.samples - kept_samples
    total_bytes = sum(r["bytes"] for r in done.records)
    print(f"wrote {written} images ({done.copied} copied as-is, {written - done.copied} re-encoded), "
          f"skipped {len(skipped_all)}, {len(manifest['shards'])} shards ({n_kept} kept from before), "
          f"{total_bytes / 1e6:.1f} MB, in {elapsed:.1f} s ({written / max(elapsed, 1e-9):.0f} img/s) -> {dst}")
    for s in skipped_all[:SHOW_SKIPPED]:
        print(f"  skipped {s['path']}: {s['reason']}")
    if len(skipped_all) > SHOW_SKIPPED:
        print(f"  ... and {len(skipped_all) - SHOW_SKIPPED} more, listed in {dst / MANIFEST_NAME}")
    _warn_empty_classes(split, skipped_all)
    return manifest


def _write_shards(plan: Plan, done: _Done, input_bytes: list[int], progress: bool) -> None:
    """Run the workers on the shards after the finished prefix; finish each shard in order."""
    opts, shards = plan.opts, plan.shards
    src, dst, first = Path(opts.src), Path(opts.dst), len(done.records)
    todo = list(range(first, len(shards)))
    tasks = [(str(src), str(dst / f".{shard_name(k)}.tmp"), shards[k], opts.max_side, opts.quality, opts.max_bytes)
             for k in todo]
    desc = f"sharding {src.name}" + (f"/{plan.split.name}" if plan.split.name else "")
    bar = progress_bar(total=len(plan.split.inputs), initial=sum(len(shards[k]) for k in range(first)), unit="img",
                       desc=desc, enabled=progress)
    if opts.workers > 1 and len(tasks) > 1:
        results = run_tasks(write_shard, tasks, opts.workers, describe=lambda t: f"{dst / shard_name(todo[t])}")
    else:
        results = ((t, write_shard(task)) for t, task in enumerate(tasks))
    with bar, closing(results):  # closing: the workers stop at once when this raises
        finished: dict[int, tuple] = {}
        for t, result in results:
            finished[todo[t]] = result
            bar.update(len(tasks[t][2]))
            while (k := len(done.records)) in finished:  # in order: shard k's first index needs 0..k-1's counts
                entries, skipped, n_copied = finished.pop(k)
                record = finish_shard(dst, k, entries, done.samples)
                record.update(first_index=done.samples, inputs=len(shards[k]), inputs_sha256=plan.fingerprints[k])
                done.copied += n_copied
                _add(done, dst, record, [{**s, "shard": record["name"]} for s in skipped])
                need, measured = _space_needed(plan, done, input_bytes)
                if measured and len(done.records) < len(shards):
                    require_free_space(dst, need)


def _failure(e: BaseException, plan: Plan, done: _Done, input_bytes: list[int]) -> str:
    """The message for a run stopped by a dead worker or an OS error, with what was kept and what to do."""
    dst = Path(plan.opts.dst)
    kept = (f"{len(done.records)} of {len(plan.shards)} shards are finished and kept (temp files removed)"
            if done.records else "no shard was finished")
    if isinstance(e, WorkerDied):
        return f"{e}. {kept}: re-run the same command with --resume to finish"
    if isinstance(e, NoSpaceError):
        return f"{e}. {kept}: free space (or choose another DST), then re-run with --resume"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        need = _space_needed(plan, done, input_bytes)[0]
        return (f"{no_space_message(dst, need)} (writing {e.filename or dst}: {e.strerror}). {kept}: free space "
                "(or choose another DST), then re-run with --resume")
    return f"{os_error_message(e)}. {kept}: fix that, then re-run with --resume"


def os_error_message(e: OSError) -> str:
    """An OSError as one line naming the file and what it means for the user."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.EROFS:
        return f"cannot write{where}: read-only file system: choose a DST on a writable filesystem"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"cannot access{where}: permission denied"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device writing{where} ({e.strerror}): free space or choose another DST"
    return f"{e.strerror or e}:{where}" if where else str(e)


def _check_written(dst: Path, done: _Done) -> None:
    """Right before the manifest: every shard it will list is still the file this run recorded
    (same inode and mtime as when hashed, size, index count, first and last indices). A second
    writer, a replaced file or a failing disk stops the run here, never under a manifest."""
    problems = []
    for r in done.records:
        if not r["samples"]:
            continue
        why = shard_problem(dst, r)
        if why is None and _identity(dst / r["name"]) != done.identity[r["name"]]:
            why = f"{r['name']} was replaced or modified after this run hashed it"
        if why:
            problems.append(why)
    if problems:
        raise SourceError(f"{dst}: {len(problems)} shard(s) no longer match what this run wrote ("
                          f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}). Another process is "
                          "writing DST, or the disk is failing: manifest.json was not written. Re-run with --resume "
                          "to redo what does not match")


def _warn_empty_classes(split: Split, skipped: list[dict]) -> None:
    gone = {s["path"] for s in skipped}
    kept = [i for i in split.inputs if i.path not in gone]
    usable = ({k for i in kept for k, v in enumerate(i.targets) if v} if split.label_kind == "multi"
              else {i.label for i in kept})
    own = split.own_classes if split.own_classes is not None else split.classes
    empty = [c for c in own if split.classes.index(c) not in usable]
    if empty:
        where = f" of {split.name}" if split.name else ""
        print(f"warning: {len(empty)} class(es){where} have no usable image, so no samples: "
              f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}. They keep their label ids (class ids stay "
              "stable); add images to them, or remove the folders and re-shard, if that is not intended",
              file=sys.stderr)

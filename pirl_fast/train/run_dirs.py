"""Which directory a training run writes to, and whether it continues the run already there.

The rules, for users: README.md, "The run directory". A run is its data (the shard manifest's
content; with data.backend=synthetic, its sample count) and its resolved config less
HARMLESS_CHANGES and IGNORED. Rank 0 records that identity in RUN_DIR/run.json before any checkpoint
exists, and `resume=auto` continues a directory's run only when the identities match. The default
series runs/${name}, runs/${name}-2, ... is searched in order (`choose`); a directory named
explicitly is used as given, and refused when it holds another run (`_explicit`: continuing it would
mix two runs, and pruning would delete the other run's checkpoints). A directory written before
run.json existed is identified by its newest checkpoint's config (or config.yaml), data.shards by path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from functools import partial
from itertools import count
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pirl_fast.runtime.atomic import atomic_write
from pirl_fast.train import checkpoint
from pirl_fast.train.config import Config, ConfigError, to_yaml

IDENTITY_NAME = "run.json"
# What the trainer puts in every checkpoint (loop.py `save_checkpoint`); one missing any of these is
# treated as corrupt, so that load_latest falls back past it.
TRAINING_KEYS = ("step", "epoch", "batches_in_epoch", "model", "optimizer", "criterion", "bank", "rng", "config_yaml",
                 "world_size", "num_samples")
load_training = partial(checkpoint.load, required=TRAINING_KEYS)  # path -> the checkpoint's dict, or CheckpointError
# Keys that may differ between runs and on resume without changing what is computed (not warned about).
HARMLESS_CHANGES = {"resume", "run_dir", "trainer.max_steps", "trainer.progress", "trainer.log_every",
                    "trainer.ckpt_every", "trainer.ckpt_epoch_end", "trainer.keep_checkpoints", "trainer.compile",
                    "trainer.sync_timing", "trainer.timing_warmup_steps", "trainer.knn_every", "trainer.force",
                    "data.workers", "data.prefetch", "data.hw_decoder_load", "data.device_memory_padding",
                    "data.host_memory_padding",
                    "data.preallocate_width_hint", "data.preallocate_height_hint"}
# Keys that name or place a run rather than change what it computes (beside HARMLESS_CHANGES).
# data.shards stays in the settings, for messages and for directories without a fingerprint; where both
# sides have one, the fingerprint decides (`differences`).
IGNORED = {"name", "num_samples"}
# data.backend=auto is dali or torch depending on the machine (a requeue may land where DALI is missing),
# and a run.json-less directory records what auto chose: auto matches either.
AUTO_BACKEND = "auto"


@dataclass(frozen=True)
class RunChoice:
    run_dir: Path
    checkpoint: Path | None  # to resume from; None: a fresh start
    note: str | None = None  # a line for the log when the choice needs explaining
    # "new": a fresh run there; "continued": the same run found there; "numbered": NAME-K; "given": resume=PATH
    kind: str = "new"

    def start_line(self) -> str:
        """Where this run's outputs go and why, for the first line a run prints."""
        if self.kind == "numbered" and self.note:
            return self.note
        if self.kind == "given":
            return f"run directory {shown(self.run_dir)}: continuing from resume={shown(self.checkpoint)}"
        if self.kind == "continued":
            return (f"run directory {shown(self.run_dir)}: continuing the run it holds (same data and settings) from "
                    f"{shown(self.checkpoint)}" if self.checkpoint else
                    f"run directory {shown(self.run_dir)}: the run it holds (same data and settings) left no "
                    "checkpoint, so it starts from step 0")
        return f"run directory {shown(self.run_dir)}: a new run"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def settings_of(config_yaml: str) -> dict[str, Any]:
    """The keys of a resolved config (YAML text) that make a run what it is, flattened."""
    flat = flatten(OmegaConf.to_container(OmegaConf.create(config_yaml)))
    return {k: v for k, v in flat.items() if k not in HARMLESS_CHANGES and k not in IGNORED}


def config_changes(saved_yaml: str, new_yaml: str) -> list[str]:
    """`key: old -> new` for every setting (`settings_of`) that differs between two resolved configs."""
    before, now = settings_of(saved_yaml), settings_of(new_yaml)
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(before.keys() | now.keys())
            if before.get(k) != now.get(k)]


def data_identity(cfg: Config) -> dict[str, Any]:
    """{"fingerprint", "num_samples", "shards"} of the data the run trains on (reads the manifest:
    a missing shard folder fails here, with the fix)."""
    if cfg.data.backend == "synthetic":
        n = cfg.data.synthetic_samples
        return {"fingerprint": f"synthetic:{n}", "num_samples": n, "shards": "synthetic"}
    from pirl_fast.shard.format import load_manifest
    from pirl_fast.shard.splits import resolve_shards

    manifest = load_manifest(resolve_shards(cfg.data.shards, "train").dir)
    digest = hashlib.sha256(json.dumps([manifest.num_samples, manifest.classes,
                                        [[s.samples, s.bytes, s.sha256] for s in manifest.shards]]).encode())
    return {"fingerprint": digest.hexdigest(), "num_samples": manifest.num_samples, "shards": str(manifest.root)}


def run_identity(cfg: Config) -> dict[str, Any]:
    """What run.json records: the data's identity and the settings that matter."""
    return {"data": data_identity(cfg), "settings": settings_of(to_yaml(cfg))}


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    """The identity of the run in `run_dir`, or None when it holds no run (absent, empty, or only
    files a run leaves before it starts)."""
    recorded = run_dir / IDENTITY_NAME
    if recorded.is_file():
        try:
            return json.loads(recorded.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{recorded} cannot be read ({e}): it records which run {run_dir} holds; restore it, "
                              "or delete it if the directory holds nothing worth keeping") from e
    if checkpoint.list_checkpoints(run_dir):  # a run from before run.json: its newest checkpoint's config
        latest = checkpoint.load_latest(run_dir, load_training)
        return {"data": None, "settings": settings_of(latest[1]["config_yaml"]),
                "num_samples": latest[1]["num_samples"]}
    if (run_dir / "config.yaml").is_file():
        return {"data": None, "settings": settings_of((run_dir / "config.yaml").read_text())}
    return None


def differences(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between the run `found` in a directory and the one `wanted`, for people.

    A key only one side has is not compared: a config key added to the code since the run started
    must not turn the same command into a new run (a requeued job after an upgrade)."""
    out = []
    fingerprints = found.get("data") is not None and wanted.get("data") is not None
    if fingerprints and found["data"]["fingerprint"] != wanted["data"]["fingerprint"]:
        before, now = found["data"], wanted["data"]
        out.append(f"the data ({shown(before['shards'])}, {before['num_samples']} samples -> {shown(now['shards'])}, "
                   f"{now['num_samples']} samples)")
    before, now = found["settings"], wanted["settings"]
    for key in sorted(set(before) & set(now)):
        if key == "data.shards" and fingerprints:
            continue  # compared by content above
        if before[key] != now[key] and not (key == "data.backend" and AUTO_BACKEND in (before[key], now[key])
                                            and {before[key], now[key]} <= {AUTO_BACKEND, "dali", "torch"}):
            out.append(f"{key}: {before[key]!r} -> {now[key]!r}")
    return out


def shown(path: str | os.PathLike) -> str:
    """`path` for a message: relative to the current folder when it lies inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def record(run_dir: Path, identity: dict[str, Any], exclusive: bool) -> bool:
    """Write run.json; with exclusive=True only if no run recorded one first (False then): two jobs
    starting at once cannot both take the same directory."""
    path, text = run_dir / IDENTITY_NAME, json.dumps(identity, indent=1) + "\n"
    run_dir.mkdir(parents=True, exist_ok=True)
    if not exclusive:
        with atomic_write(path, "w") as f:
            f.write(text)
        return True
    tmp = run_dir / f".{IDENTITY_NAME}.{os.getpid()}.tmp"
    tmp.write_text(text)
    try:
        os.link(tmp, path)  # atomic, complete when visible, and fails if the name exists: the first job wins
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive creation, then the content
        try:
            with open(path, "x") as f:
                f.write(text)
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def resume_from(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint a run continuing in `run_dir` loads: resume=PATH, else the newest good one."""
    if cfg.resume not in ("auto", "none"):
        if not Path(cfg.resume).is_file():
            raise ConfigError(f"resume={cfg.resume}: no such checkpoint file")
        return Path(cfg.resume)
    # resume=auto: the newest good one (load_latest warns past a corrupt newest file)
    latest = checkpoint.load_latest(run_dir, load_training) if cfg.resume == "auto" else None
    return latest[0] if latest else None


def choose(cfg: Config, run_dir: Path, identity: dict[str, Any], default_dir: bool) -> RunChoice:
    """Where this run goes and what it resumes from (see the module docstring); rank 0 only."""
    choice = _choose(cfg, run_dir, identity, default_dir)
    return replace(choice, kind="given") if cfg.resume not in ("auto", "none") else choice


def _choose(cfg: Config, run_dir: Path, identity: dict[str, Any], default_dir: bool) -> RunChoice:
    if not default_dir:
        return _explicit(cfg, run_dir, identity)
    why = ""  # why the run does not go to run_dir itself
    for k in count(1):
        candidate = run_dir if k == 1 else run_dir.with_name(f"{run_dir.name}-{k}")
        found = read_identity(candidate)
        if found is None:
            if not record(candidate, identity, exclusive=True):
                why = why or f"another job took {shown(run_dir)} a moment ago"
                continue
            note = None if k == 1 else (f"run directory {shown(candidate)}: a new run ({why}; hydra.run.dir=DIR picks "
                                        "a directory yourself)")
            return RunChoice(candidate, resume_from(cfg, candidate), note, "new" if k == 1 else "numbered")
        changed = differences(found, identity)
        if not changed and cfg.resume != "none":
            if found.get("data") is None:
                record(candidate, identity, exclusive=False)  # a run from before run.json: record it now
            return RunChoice(candidate, resume_from(cfg, candidate), kind="continued")
        if k == 1:
            why = (f"{shown(run_dir)} holds another one: {'; '.join(changed)}" if changed else
                   f"resume=none, and {shown(run_dir)} holds this run already")


def _explicit(cfg: Config, run_dir: Path, identity: dict[str, Any]) -> RunChoice:
    checkpoints = checkpoint.list_checkpoints(run_dir)
    if cfg.resume == "none" and checkpoints:
        raise ConfigError(f"resume=none but {checkpoint.checkpoint_dir(run_dir)} already holds {len(checkpoints)} "
                          "checkpoint(s), which this run would overwrite and prune: use resume=auto to continue that "
                          "run, or choose another directory with hydra.run.dir=DIR")
    found = read_identity(run_dir) if checkpoints else None
    changed = differences(found, identity) if found is not None else []
    if changed:
        rule = ("resume=auto only continues the same run" if cfg.resume == "auto" else
                "its checkpoints and this run's would mix, and pruning would delete theirs")
        raise ConfigError(f"{shown(run_dir)} holds another run ({'; '.join(changed)}), and {rule}: start this one "
                          "elsewhere with hydra.run.dir=ANOTHER_DIR (leave hydra.run.dir out to get a fresh "
                          "runs/NAME-K), or delete that directory to start over there")
    record(run_dir, identity, exclusive=False)
    start = resume_from(cfg, run_dir) if cfg.resume != "none" else None
    return RunChoice(run_dir, start, kind="continued" if found is not None or start is not None else "new")

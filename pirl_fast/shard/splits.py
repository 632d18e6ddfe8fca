"""Dataset roots with splits: which folder a path means, for the sharder, the trainer and eval alike.

A split folder is a sub-folder named train, val, validation or test (any case). The sharder turns
a source root such as `/imagenet/{train,val}` into a shard root `shards/in1k/{train,val}`: one
shard folder (manifest.json inside) per split, named in lower case, all with train's class list.
A shard root written by hand the same way (`shards/in1k/train`, `shards/in1k/val` made one by
one) is a shard root too.

    resolve_shards("shards/in1k")            -> shards/in1k/train     what data.shards=... trains on
    resolve_shards("shards/in1k", "eval")    -> shards/in1k/val       what eval measures on
    eval_split_beside(resolve_shards(...))   -> the val split beside a train split, if any

A folder holding manifest.json always means itself. For "eval" the preference is val, then
validation, then test (EVAL_SPLITS). An unfinished split (its folder exists, its manifest does
not) is an error, never skipped in favour of the next name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pirl_fast.shard.format import MANIFEST_NAME, ShardError, image_folder_advice

SPLIT_NAMES = ("train", "val", "validation", "test")
EVAL_SPLITS = ("val", "validation", "test")  # what eval measures on, in this order of preference


def split_name(folder_name: str) -> str | None:
    """The split a folder name stands for (lower case), or None."""
    name = folder_name.lower()
    return name if name in SPLIT_NAMES else None


def split_folders(root: str | os.PathLike) -> dict[str, Path]:
    """Split-named sub-folders of `root` by split name (hidden folders ignored).

    Raises ShardError when two folders name the same split (`val` and `Val`): which one is meant
    cannot be told."""
    found: dict[str, Path] = {}
    root = Path(root)
    if not root.is_dir():
        return found
    for p in sorted(root.iterdir()):
        name = split_name(p.name)
        if name and p.is_dir() and not p.name.startswith("."):
            if name in found:
                raise ShardError(f"{root} has two folders for the split {name}: {found[name].name} and {p.name}; "
                                 "rename or remove one")
            found[name] = p
    return found


@dataclass(frozen=True)
class ShardPath:
    dir: Path  # the shard folder (manifest.json inside), as given or chosen
    root: Path | None  # the shard root it is a split of (its parent), when its name is a split name
    split: str | None  # that split's name
    chosen: bool = False  # True when the path given was the root and this split was picked from it

    def __str__(self) -> str:
        return str(self.dir)


def resolve_shards(path: str | os.PathLike, want: str = "train") -> ShardPath:
    """The shard folder `path` means when `want` ("train" or "eval") is needed (see the module doc).

    A path that is neither a shard folder nor a shard root comes back as itself, for
    load_manifest to report what is wrong with it. Raises ShardError for a shard root without
    the wanted split, or whose wanted split is unfinished."""
    if want not in ("train", "eval"):
        raise ValueError(f"want={want!r}: expected 'train' or 'eval'")
    p = Path(path)
    if (p / MANIFEST_NAME).is_file():
        split = split_name(p.name)
        return ShardPath(p, p.parent if split else None, split)
    splits = split_folders(p)
    if not splits:
        return ShardPath(p, None, None)
    names = EVAL_SPLITS if want == "eval" else ("train",)
    for name in names:
        if name in splits:
            folder = splits[name]
            if not (folder / MANIFEST_NAME).is_file():
                raise ShardError(image_folder_advice(p, folder) or
                                 f"{folder} is the {name} split of {p} but has no {MANIFEST_NAME} (unfinished): "
                                 f"finish it with `python -m pirl_fast.shard SRC {p} --resume`")
            return ShardPath(folder, p, name, chosen=True)
    raise ShardError(f"{p} is a shard root with the split(s) {', '.join(sorted(splits))} but no "
                     f"{' / '.join(names)} split: " + ("shard one into it (python -m pirl_fast.shard SRC_ROOT "
                                                        f"{p} with SRC_ROOT/train), or point at a shard folder"
                                                        if want == "train" else "name a validation shard folder"))


def eval_split_beside(shards: ShardPath) -> ShardPath | None:
    """The validation split of the shard root `shards` belongs to (val, validation, test, in that
    order), or None when `shards` is no split of a root or the root has no other such split."""
    if shards.root is None:
        return None
    candidates = {name: p for name, p in split_folders(shards.root).items()
                  if name in EVAL_SPLITS and p.resolve() != shards.dir.resolve()}
    for name in EVAL_SPLITS:
        if name in candidates:
            if not (candidates[name] / MANIFEST_NAME).is_file():
                raise ShardError(f"{candidates[name]} is the {name} split beside {shards.dir} but has no "
                                 f"{MANIFEST_NAME} (unfinished): finish it with `python -m pirl_fast.shard SRC "
                                 f"{shards.root} --resume`, or pass the validation shards yourself")
            return ShardPath(candidates[name], shards.root, name, chosen=True)
    return None


def shard_splits(root: str | os.PathLike) -> dict[str, Path]:
    """The finished splits of a shard root (split-named folders holding manifest.json); {} for a
    shard folder or anything else."""
    root = Path(root)
    if (root / MANIFEST_NAME).is_file():
        return {}
    return {name: p for name, p in split_folders(root).items() if (p / MANIFEST_NAME).is_file()}

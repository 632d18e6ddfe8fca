"""What `python -m pirl_fast.shard SRC DST` reads: SRC's layout, and the inputs of each split.

SRC is an ImageFolder (SRC/<class>/**/<image>, classes = the sorted sub-folder names), a flat folder
of images with a labels file (labels_file.py), a multi-label image tree (multi_labels.py), or a
dataset root (SRC/<split>/, each split an ImageFolder or a flat folder, all with train's class list).
How --layout auto tells them apart, what is refused, and how keys and order follow each image's path
in ImageFolder layout: shards/README.md ("Dataset roots", "Flat folders and labels files").
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from pirl_fast.shard.format import CHECKSUM_MEMBERS, ShardError, sample_key
from pirl_fast.shard.images import UnusableImage
from pirl_fast.shard.labels_file import (
    EXAMPLES,
    KAGGLE_VAL_NAME,
    LabelsError,
    LabelTable,
    is_image_name,
    match_labels,
    read_labels,
    table_classes,
)
from pirl_fast.shard.multi_labels import MultiLabelTable, match_multi_labels, read_multi_labels
from pirl_fast.shard.splits import SPLIT_NAMES, split_folders, split_name

LAYOUTS = ("auto", "imagefolder", "splits")


class SourceError(Exception):
    """SRC or DST is unusable as given (exit code 2); the message says what to do."""


@dataclass(frozen=True)
class Input:
    relpath: str  # the image's path in ImageFolder layout relative to SRC, "/"-separated: decides key and order
    label: int
    key: str
    size: int
    mtime_ns: int
    file: str = ""  # where it really is, relative to SRC, when not at relpath (a flat split; `Val/` read as val)
    targets: bytes = b""  # multi-label sources: KEY.mlb, one int8 per class (multi_labels.py); label is then -1

    @property
    def path(self) -> str:
        return self.file or self.relpath


@dataclass
class Split:
    """One shard set to write: DST itself (name None) or DST/<name>."""
    name: str | None
    classes: list[str]  # label order; train's in a dataset root
    inputs: list[Input]  # sorted by relpath
    skipped: list[dict]  # loose files, unreadable folders, unlabelled non-images: {"path", "reason"}
    labels: dict | None = None  # the labels file used, as the manifest records it (labels_file.Matched.record)
    own_classes: list[str] | None = None  # classes this split's own folders or labels name (None: all `classes`)
    label_kind: str = "single"  # "multi": inputs carry `targets` (KEY.mlb) instead of one label

    @property
    def members(self) -> list[str]:
        """The tar members of each sample this split's shards hold (format.py)."""
        return CHECKSUM_MEMBERS + (["mlb"] if self.label_kind == "multi" else [])


@dataclass
class Source:
    root: Path  # SRC
    layout: str  # "imagefolder", "flat" or "splits"
    splits: list[Split]  # train first
    left_out: list[str] = field(default_factory=list)  # sub-folders of a dataset root not sharded, with why


# ------------------------------------------------------------------------------------------ one folder

def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_empty(folder: Path) -> bool:
    """No entry but hidden ones (.DS_Store and the like)."""
    return not any(not p.name.startswith(".") for p in folder.iterdir())


def _input(src: Path, path: Path, relpath: str, label: int) -> Input:
    try:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:  # e.g. a dangling symlink: kept as an input, skipped with its reason later
        size, mtime = -1, 0
    file = path.relative_to(src).as_posix()
    return Input(relpath, label, sample_key(relpath), size, mtime, "" if file == relpath else file)


def _unreadable(src: Path, skipped: list[dict], e: OSError) -> None:
    """os.walk's onerror: a folder it cannot list holds files nobody knows of, so say so in `skipped`."""
    skipped.append({"path": Path(e.filename).relative_to(src).as_posix(),
                    "reason": f"unreadable folder: {e.strerror or e}"})


def _check_keys(inputs: list[Input]) -> None:
    keys = {}
    for i in inputs:
        if i.key in keys:  # needs a 40-bit hash collision on top of identical cleaned paths
            raise SourceError(f"inputs {keys[i.key]} and {i.path} map to the same sample key {i.key}; rename one")
        keys[i.key] = i.path


def scan_imagefolder(src: Path, folder: Path, prefix: str = "", classes: list[str] | None = None,
                     name: str | None = None) -> Split:
    """The ImageFolder `folder` (inside SRC `src`): inputs at relpath prefix + <class>/..., labelled by
    position in `classes` (default: the sorted class folders; given: every class folder must be in it)."""
    found = [p.name for p in _subdirs(folder)]
    if not found:
        raise SourceError(f"{folder} has no class folders: expected {folder}/<class>/<image> (ImageFolder layout)"
                          "; a flat folder of images needs its labels: --labels FILE")
    if classes is None:
        classes = found
    missing = [c for c in found if c not in classes]
    if missing:
        raise SourceError(f"{folder} has class folder(s) that train lacks: {', '.join(missing[:EXAMPLES])}"
                          f"{' ...' if len(missing) > EXAMPLES else ''} ({len(missing)} of {len(found)}). Class ids "
                          "must mean the same in every split: add the class to train, or move the folder out")
    skipped = [{"path": p.relative_to(src).as_posix(), "reason": "not inside a class folder"}
               for p in sorted(folder.iterdir()) if p.is_file()]
    inputs = []
    for cls in found:
        for dirpath, dirnames, filenames in os.walk(folder / cls, onerror=partial(_unreadable, src, skipped)):
            dirnames.sort()
            for fname in filenames:
                path = Path(dirpath) / fname
                inputs.append(_input(src, path, prefix + path.relative_to(folder).as_posix(), classes.index(cls)))
    if not inputs:
        raise SourceError(f"{folder} has class folders {found[:5]}... but no files in them")
    inputs.sort(key=lambda i: i.relpath)
    _check_keys(inputs)
    return Split(name, list(classes), inputs, skipped, own_classes=found)


def _unlabelled(where: Path, table_path: Path, unlabelled: list[str], missing: str, fix: str) -> SourceError:
    """The refusal for image files a labels file does not label (sharding a subset by accident
    changes every number), naming a few of them."""
    n = len(unlabelled)
    return SourceError(f"{where}: {n} image file(s) have no {missing} in {table_path}: "
                       f"{', '.join(unlabelled[:5])}{' ...' if n > 5 else ''}. {fix}")


def scan_flat(src: Path, folder: Path, table: LabelTable, prefix: str = "", classes: list[str] | None = None,
              name: str | None = None) -> Split:
    """The flat folder `folder`, labelled by `table`: each image's relpath is prefix + <class>/<file>,
    where it would be in class folders. `classes` None: the table's own sorted class names."""
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and not p.is_dir()]
    files = [p.name for p in entries if p.is_file() and p.resolve() != table.path.resolve()]
    odd = [{"path": p.relative_to(src).as_posix(), "reason": not_regular(p)} for p in entries if not p.is_file()]
    try:
        matched = match_labels(table, files, classes)
    except LabelsError as e:
        raise SourceError(str(e)) from e
    if matched.unlabelled:
        raise _unlabelled(folder, table.path, matched.unlabelled, "label",
                          "Give the right labels file, add their labels, or move the images out")
    if not matched.labels:
        raise SourceError(f"{folder}: no file matches a name in {table.path} (e.g. "
                          f"{table.rows[-1][1]!r}): is it this folder's labels file?")
    classes = list(classes) if classes is not None else table_classes(table, matched)
    index = {c: k for k, c in enumerate(classes)}
    inputs = [_input(src, folder / f, f"{prefix}{cls}/{f}", index[cls]) for f, cls in matched.labels.items()]
    inputs.sort(key=lambda i: i.relpath)
    _check_keys(inputs)
    skipped = odd + [{"path": (folder / f).relative_to(src).as_posix(), "reason": "no label and not an image file name"}
                     for f in files if f not in matched.labels]
    return Split(name, classes, inputs, skipped, labels=matched.record(table),
                 own_classes=sorted(set(matched.labels.values())))


def scan_multi(src: Path, table: MultiLabelTable, classes: list[str] | None = None) -> Split:
    """The image tree SRC (any folders) labelled by a multi-label table: inputs at their own path,
    label -1, KEY.mlb in `targets`. `classes` None: the table's sorted class names."""
    skipped, files = [], []
    for dirpath, dirnames, filenames in os.walk(src, onerror=partial(_unreadable, src, skipped)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in filenames:
            path = Path(dirpath) / fname
            if not fname.startswith(".") and path.resolve() != table.path.resolve():
                files.append(path.relative_to(src).as_posix())
    try:
        matched = match_multi_labels(table, files, classes)
    except LabelsError as e:
        raise SourceError(str(e)) from e
    classes = matched.classes
    if matched.unlabelled:
        raise _unlabelled(src, table.path, matched.unlabelled, "entry", "Give the right labels file, add them (an "
                          "image with no class is written as path,[] or path,), or move them out")
    if not matched.targets:
        example = table.rows[-1].name if table.rows else "nothing"
        raise SourceError(f"{src}: no file matches a path in {table.path} (e.g. {example!r}); paths are relative "
                          "to SRC: is it this tree's labels file?")
    inputs = [replace(_input(src, src / f, f, -1), targets=t) for f, t in matched.targets.items()]
    inputs.sort(key=lambda i: i.relpath)
    _check_keys(inputs)
    skipped += [{"path": f, "reason": "no label and not an image file name"} for f in files
                if f not in matched.targets and not is_image_name(f)]
    present = {classes[k] for t in matched.targets.values() for k, v in enumerate(t) if v}
    return Split(None, classes, inputs, skipped, labels=matched.record(table),
                 own_classes=sorted(present, key=classes.index), label_kind="multi")


# ------------------------------------------------------------------------------------------ reading one input

_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


def not_regular(path: Path) -> str:
    """The skip reason of something that is not a regular file (symlinks followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    kind = next((name for test, name in _KINDS if test(mode)), "not a file")
    return f"not a regular file ({kind}{', via a symlink' if path.is_symlink() else ''})"


def read_input(path: Path, max_bytes: int) -> bytes:
    """The bytes of one input, read only if it is a regular file (symlinks followed) of at most
    `max_bytes`; both checked before reading, so a FIFO named x.jpg cannot block the sharder and a
    link to /dev/zero cannot fill its memory. Raises UnusableImage (the skip reason) or OSError."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnusableImage(not_regular(path))
    if st.st_size > max_bytes:
        raise UnusableImage(f"larger than --max-bytes ({st.st_size} > {max_bytes} bytes)")
    # O_NONBLOCK: should it have become a FIFO since the stat, opening it does not wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnusableImage(not_regular(path))
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since the stat
        raise UnusableImage(f"larger than --max-bytes (more than {max_bytes} bytes)")
    return data


# ------------------------------------------------------------------------------------------ SRC as a whole

def _detected_labels(folder: Path, src: Path, split: str | None) -> Path | None:
    """Kaggle's LOC_val_solution.csv beside the images, else in SRC (only for a val split, or a lone folder)."""
    if split not in (None, "val", "validation"):
        return None
    for place in (folder, src):
        if (place / KAGGLE_VAL_NAME).is_file():
            return place / KAGGLE_VAL_NAME
    return None


def _read(path: Path) -> LabelTable:
    if not path.is_file():
        raise SourceError(f"labels file {path} does not exist")
    try:
        return read_labels(path.resolve())  # resolved: the manifest records where it was
    except LabelsError as e:
        hint = ("; it looks like a multi-label file (path -> [class, ...]): pass --multi-label"
                if path.suffix.lower() == ".json" else "")
        raise SourceError(f"{e}{hint}") from e


def _read_multi_tree(src: Path, layout: str, named: dict[str, Path], plain: list[Path], by_split: dict[str, Path],
                     splits: list[str] | None, classes: list[str] | None) -> Source:
    """--multi-label: SRC is one image tree, labelled by the one --labels FILE."""
    if layout == "splits" or by_split or splits or (named and layout == "auto"):
        where = next(iter(named.values()), src / "train")
        raise SourceError(f"--multi-label shards one image tree at a time, but SRC {src} is read as a dataset root "
                          f"({', '.join(_ordered(named)) or '--layout splits'}). Shard each split on its own with its "
                          f"labels file, the first one's classes for the others: python -m pirl_fast.shard {where} "
                          f"DST/{where.name} --labels FILE --multi-label, then the next split with --classes "
                          f"DST/{where.name} (or --layout imagefolder: SRC is one tree whatever its folder names)")
    if not plain:
        raise SourceError("--multi-label needs the labels file: --labels FILE (a JSON of path -> [class, ...] or a "
                          "CSV of path,classes; python -m pirl_fast.shard --help)")
    if not plain[0].is_file():
        raise SourceError(f"labels file {plain[0]} does not exist")
    try:
        table = read_multi_labels(plain[0].resolve())
    except LabelsError as e:
        raise SourceError(str(e)) from e
    return Source(src, "multi", [scan_multi(src, table, classes)])


def parse_labels_args(values: list[str]) -> tuple[list[Path], dict[str, Path]]:
    """--labels values: (plain FILEs, {split: FILE} for SPLIT=FILE)."""
    plain, by_split = [], {}
    for v in values:
        head, sep, tail = v.partition("=")
        if sep and split_name(head) and not Path(v).exists():
            if split_name(head) in by_split:
                raise SourceError(f"--labels names the split {split_name(head)} twice")
            by_split[split_name(head)] = Path(tail)
        else:
            plain.append(Path(v))
    if len(plain) > 1:
        raise SourceError(f"--labels gives {len(plain)} files without saying which split each labels: write "
                          "--labels val=FILE")
    return plain, by_split


def read_source(src: str | os.PathLike, layout: str = "auto", labels: list[str] = (), splits: list[str] | None = None,
                classes: list[str] | None = None, multi_label: bool = False) -> Source:
    """Scan SRC (its layouts: shards/README.md); raises SourceError (exit 2) with every problem found.
    multi_label: SRC is one image tree labelled by a multi-label file (multi_labels.py)."""
    src = Path(src)
    if layout not in LAYOUTS:
        raise SourceError(f"--layout {layout}: expected one of {', '.join(LAYOUTS)}")
    if not src.is_dir():
        raise SourceError(f"SRC {src} does not exist or is not a directory: give an ImageFolder (SRC/<class>/<image>) "
                          "or a dataset root (SRC/train/<class>/<image>, SRC/val/...)")
    plain, by_split = parse_labels_args(list(labels))
    try:
        named = split_folders(src)
    except ShardError as e:
        raise SourceError(str(e)) from e
    if multi_label:
        return _read_multi_tree(src, layout, named, plain, by_split, splits, classes)
    others = [p.name for p in _subdirs(src) if not split_name(p.name)]
    if layout == "auto" and named:
        labelled = set(by_split) | {n for n, p in named.items() if _detected_labels(p, src, n)}
        looks_like_root = any(_subdirs(p) for p in named.values()) or labelled & set(named)
        if others or not looks_like_root:
            why = (f"beside other sub-folders ({', '.join(others[:5])}{' ...' if len(others) > 5 else ''})" if others
                   else "but they hold images directly, like class folders")
            raise SourceError(
                f"SRC {src} is ambiguous: it has sub-folders named like dataset splits ({', '.join(_ordered(named))}) "
                f"{why}. Say what it is:\n"
                f"  --layout splits       a dataset root: shard {', '.join(_ordered(named))} into DST/<split>/ with "
                f"train's class list{' (leaving out ' + ', '.join(others[:5]) + ')' if others else ''}\n"
                f"  --layout imagefolder  one ImageFolder whose {len(named) + len(others)} sub-folders are all classes")
        layout = "splits"
    if layout == "splits":
        if classes is not None:
            raise SourceError("--classes is for a single folder: a dataset root's splits use its train split's classes")
        return _read_root(src, named, others, plain, by_split, splits)
    if by_split or splits:
        raise SourceError(f"--labels SPLIT=FILE and --splits are for a dataset root; SRC {src} is read as one folder"
                          + (" (--layout imagefolder)" if named else ""))
    if _subdirs(src):
        if plain:
            raise SourceError(f"--labels is for a flat folder of images, but SRC {src} has class folders: "
                              "an ImageFolder's classes are its folders")
        return Source(src, "imagefolder", [scan_imagefolder(src, src, classes=classes)])
    label_file = plain[0] if plain else _detected_labels(src, src, None)
    if label_file is None:
        raise SourceError(f"SRC {src} has no class folders: expected SRC/<class>/<image> (ImageFolder layout); "
                          "a flat folder of images needs its labels: --labels FILE (formats: python -m "
                          "pirl_fast.shard --help)")
    return Source(src, "flat", [scan_flat(src, src, _read(label_file), classes=classes)])


def _read_root(src: Path, named: dict[str, Path], others: list[str], plain: list[Path], by_split: dict[str, Path],
               wanted: list[str] | None) -> Source:
    if not named:
        raise SourceError(f"--layout splits, but SRC {src} has no sub-folder named {', '.join(SPLIT_NAMES)}")
    for name in list(by_split) + list(wanted or []):
        if name not in named:
            raise SourceError(f"there is no split {name} in SRC {src}: its splits are {', '.join(_ordered(named))}")
    if "train" not in named:
        only = _ordered(named)
        raise SourceError(f"SRC {src} has the split(s) {', '.join(only)} but no train split, whose classes every split "
                          f"uses: shard a split folder on its own instead (python -m pirl_fast.shard {named[only[0]]} "
                          "DST, with --classes TRAIN_SHARDS to use train's class list)")
    order = [n for n in SPLIT_NAMES if n in named and (not wanted or n in wanted)]
    flat = [n for n in order if not _subdirs(named[n]) and not _is_empty(named[n])]
    problems: list[str] = []
    if plain:
        if len(flat) == 1:
            by_split[flat[0]] = plain[0]
        else:
            problems.append(f"--labels {plain[0]}: say which split it labels, e.g. --labels val={plain[0]} "
                            f"(flat splits: {', '.join(flat) or 'none'})")
    tables: dict[str, Path] = {}
    bad = []  # splits that cannot be sharded as they are
    for n in order:
        folder = named[n]
        if _is_empty(folder):
            problems.append(f"{folder} is empty: put the {n} images there")
            bad.append(n)
        elif n in flat:
            found = by_split.get(n) or _detected_labels(folder, src, n)
            if found is None:
                problems.append(f"{folder} holds images directly and no labels file was given or found "
                                f"({KAGGLE_VAL_NAME} in {folder} or {src}): pass --labels {n}=FILE")
                bad.append(n)
            else:
                tables[n] = found
        elif n in by_split:
            problems.append(f"--labels {n}=... but {folder} has class folders: an ImageFolder's classes are its "
                            "folders")
    hint = (f"or leave {', '.join(bad)} out: --splits {','.join(n for n in order if n not in bad)}"
            if bad and "train" not in bad and len(bad) < len(order) else "")
    if problems:
        raise SourceError(_together(src, problems, hint))
    result: list[Split] = []
    classes = _train_classes(src, named["train"], tables.get("train") or by_split.get("train"))
    for n in order:
        try:
            if n in tables:
                result.append(scan_flat(src, named[n], _read(tables[n]), f"{n}/", classes, n))
            else:
                result.append(scan_imagefolder(src, named[n], f"{n}/", classes, n))
        except SourceError as e:
            problems.append(str(e))
    if problems:
        raise SourceError(_together(src, problems))
    left = ([f"{o} (not a split name)" for o in others]
            + [f"{n} (not in --splits)" for n in _ordered(named) if n not in order])
    return Source(src, "splits", result, left)


def _ordered(names) -> list[str]:
    """Split names in SPLIT_NAMES order (train, val, validation, test)."""
    return [n for n in SPLIT_NAMES if n in names]


def _train_classes(src: Path, train: Path, table_path: Path | None) -> list[str]:
    """train's class list: its class folders, or the classes of its labels file when it is flat."""
    if _subdirs(train):
        return [p.name for p in _subdirs(train)]
    if _is_empty(train):
        raise SourceError(f"{train} is empty: its class folders decide every split's class ids")
    if table_path is None:
        raise SourceError(f"{train} holds images directly and has no labels file: pass --labels train=FILE")
    return scan_flat(src, train, _read(table_path)).classes


def _together(src: Path, problems: list[str], hint: str = "") -> str:
    """One message for all the problems found (the user fixes them in one go), then `hint`."""
    if len(problems) == 1:
        return f"dataset root {src}: {problems[0]}" + (f"; {hint}" if hint else "")
    return (f"dataset root {src}: {len(problems)} problems, nothing was written:\n"
            + "\n".join(f"  - {p}" for p in problems) + (f"\n  {hint}" if hint else ""))


def scan_source(src: Path) -> tuple[list[str], list[Input], list[dict]]:
    """(classes, inputs sorted by path, skip records) of the ImageFolder `src` (the benchmark's reader)."""
    split = read_source(src, layout="imagefolder").splits[0]
    return split.classes, split.inputs, split.skipped

"""Labels files: which class each image of a flat folder belongs to (file name -> class name).

Formats, recognised from the content by `read_labels`: csv (file name, class name), Kaggle's
LOC_val_solution.csv, and the devkit's ILSVRC2012_validation_ground_truth.txt (its meta.mat beside
it, read with scipy). What each looks like, and how `match_labels` pairs a table with a folder's
files: shards/README.md ("Flat folders and labels files").
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("csv", "kaggle", "devkit")
KAGGLE_HEADER = ["ImageId", "PredictionString"]
KAGGLE_VAL_NAME = "LOC_val_solution.csv"  # found beside the images or in the source root without --labels
DEVKIT_NAME = "ILSVRC2012_val_{:08d}"  # the file (without extension) ground-truth line i labels
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
EXAMPLES = 10  # file names quoted in messages and the manifest


class LabelsError(ValueError):
    """A labels file cannot be read or does not fit its folder; the message names the file and the fix."""


@dataclass
class LabelTable:
    path: Path
    format: str  # one of FORMATS
    rows: list[tuple[int, str, str]]  # (line number, file name as written, class name)
    may_have_header: bool = False  # csv: the first row is a header if it names no image of the folder


@dataclass
class Matched:
    labels: dict[str, str]  # file name in the folder -> class name
    unlabelled: list[str]  # image files of the folder without a label
    without_image: list[str] = field(default_factory=list)  # names in the table that match no file
    header: list[str] | None = None  # the csv header row, when the first row was one

    def record(self, table: LabelTable) -> dict:
        """What the manifest keeps about the labels file (`labels`)."""
        return {"file": str(table.path), "format": table.format, "rows": len(table.rows) - (self.header is not None),
                "header": self.header, "labelled_images": len(self.labels),
                "without_image": len(self.without_image), "without_image_examples": self.without_image[:EXAMPLES]}


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def read_labels(path: str | os.PathLike) -> LabelTable:
    """Read a labels file in any of FORMATS. Raises LabelsError naming the line that does not fit."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark is no part of a name
    except (OSError, UnicodeDecodeError) as e:
        raise LabelsError(f"labels file {path} cannot be read ({e}): give a CSV of file name,class name") from e
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise LabelsError(f"labels file {path} is empty: expected lines of file name,class name")
    if all(line.isdigit() for _, line in lines):
        return _read_devkit(path, lines)
    first = lines[0][1]
    delimiter = "," if "," in first else "\t" if "\t" in first else None  # None: runs of spaces
    rows = []
    for n, line in lines:
        fields = next(csv.reader(io.StringIO(line), delimiter=delimiter)) if delimiter else line.split()
        rows.append((n, [f.strip() for f in fields]))
    if rows[0][1] == KAGGLE_HEADER:
        return _read_kaggle(path, rows[1:])
    table = []
    for n, fields in rows:
        if len(fields) != 2 or not all(fields):
            raise LabelsError(f"labels file {path} line {n}: expected two fields, file name and class name, "
                              f"got {fields!r} (Kaggle's format starts with the header {','.join(KAGGLE_HEADER)})")
        table.append((n, fields[0], fields[1]))
    return LabelTable(path, "csv", table, may_have_header=True)


def _read_kaggle(path: Path, rows: list[tuple[int, list[str]]]) -> LabelTable:
    table = []
    for n, fields in rows:
        words = fields[1].split() if len(fields) == 2 else []
        if not fields[0] or not words:
            raise LabelsError(f"labels file {path} line {n}: expected ImageId,PredictionString with the class as "
                              f"PredictionString's first word, got {fields!r}")
        # PredictionString is "synset x_min y_min x_max y_max" per box; the validation set boxes only
        # objects of the image's own class, so every box names the same synset.
        classes = set(words[::5])
        if len(words) % 5 == 0 and len(classes) > 1:
            raise LabelsError(f"labels file {path} line {n}: {fields[0]} has boxes of several classes "
                              f"{sorted(classes)}; one class per image is supported")
        table.append((n, fields[0], words[0]))
    return LabelTable(path, "kaggle", table)


def _read_devkit(path: Path, lines: list[tuple[int, str]]) -> LabelTable:
    meta = path.parent / "meta.mat"
    if not meta.is_file():
        raise LabelsError(f"labels file {path} holds class numbers (the devkit's ILSVRC2012_validation_ground_truth"
                          f".txt); turning them into class names needs the devkit's meta.mat beside it ({meta} is "
                          "missing): keep the devkit's data/ folder together, or give a CSV of file name,class name")
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise LabelsError(f"reading the devkit's {meta} needs scipy: `pip install scipy`, or give a CSV of file "
                          "name,class name instead (e.g. Kaggle's LOC_val_solution.csv)") from e
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        wnid = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"].ravel(), synsets["WNID"].ravel())}
    except Exception as e:  # noqa: BLE001 -- whatever the .mat reader says, the fix is the same
        raise LabelsError(f"{meta} is not the devkit's meta.mat (a `synsets` array with ILSVRC2012_ID and WNID): "
                          f"{type(e).__name__}: {e}") from e
    table = []
    for position, (n, line) in enumerate(lines, start=1):
        if int(line) not in wnid:
            raise LabelsError(f"labels file {path} line {n}: ILSVRC2012_ID {line} is not in {meta}")
        table.append((n, DEVKIT_NAME.format(position), wnid[int(line)]))
    return LabelTable(path, "devkit", table)


class FileNames:
    """The files a labels file can name ("/"-separated paths relative to the folder or tree), each
    written as it is or without its extension (`ILSVRC2012_val_00000001` for `...001.JPEG`)."""

    def __init__(self, files: list[str]):
        self.names = set(files)
        self.stems: dict[str, list[str]] = {}  # name without extension -> the files it could mean
        for name in files:
            stem, dot, _ = name.rpartition(".")
            if dot and "/" not in name[len(stem):]:  # an extension is a dot in the last path component
                self.stems.setdefault(stem, []).append(name)

    def knows(self, name: str) -> bool:
        return name in self.names or name in self.stems

    def find(self, name: str, table_path: Path, line: int) -> str | None:
        """The file `name` means, or None when it names none. Raises LabelsError when it could mean
        several (x.jpg and x.png written as x)."""
        if name in self.names:
            return name
        found = self.stems.get(name, [])
        if len(found) > 1:
            raise LabelsError(f"labels file {table_path} line {line}: {name} could be any of {sorted(found)}; "
                              "write the name with its extension")
        return found[0] if found else None


def unknown_classes_error(table_path: Path, unknown: dict[str, int], class_list: str, fix: str) -> LabelsError:
    """The error for labels naming classes outside the class list (`unknown`: class -> images)."""
    names = ", ".join(f"{c} ({k} image{'s' * (k > 1)})" for c, k in sorted(unknown.items())[:EXAMPLES])
    return LabelsError(f"labels file {table_path} names {len(unknown)} class(es) that are not in the class list "
                       f"({class_list}): {names}. Class ids must mean the same in every split: {fix}")


def match_labels(table: LabelTable, files: list[str], classes: list[str] | None) -> Matched:
    """Pair `table` with the file names of a folder; `classes` (None: any name) is the class list
    every label must be in. Raises LabelsError for unknown classes, conflicting or ambiguous rows."""
    names = FileNames(files)
    rows = table.rows
    header = None
    if table.may_have_header and rows and not names.knows(rows[0][1]):
        header, rows = [rows[0][1], rows[0][2]], rows[1:]
    labels: dict[str, str] = {}
    line_of: dict[str, int] = {}
    without_image: list[str] = []
    unknown: dict[str, int] = {}
    known = set(classes) if classes is not None else None
    for n, name, cls in rows:
        file = names.find(name, table.path, n)
        if file is None:
            without_image.append(name)
            continue
        if known is not None and cls not in known:
            unknown[cls] = unknown.get(cls, 0) + 1
        if file in labels and labels[file] != cls:
            raise LabelsError(f"labels file {table.path} labels {file} twice: {labels[file]} (line "
                              f"{line_of[file]}) and {cls} (line {n}); one class per image is supported")
        labels[file], line_of[file] = cls, n
    if unknown:
        raise unknown_classes_error(table.path, unknown, f"{len(classes)} classes, train's",
                                    "fix the labels, or add the class to train")
    unlabelled = sorted(f for f in files if f not in labels and is_image_name(f))
    return Matched(labels, unlabelled, without_image, header)


def table_classes(table: LabelTable, matched: Matched) -> list[str]:
    """The sorted class names of the table's rows (header left out): the class list of a flat folder
    sharded on its own, without a train split to take one from."""
    rows = table.rows[1:] if matched.header is not None else table.rows
    return sorted({cls for _, _, cls in rows})

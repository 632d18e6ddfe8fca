"""Multi-label labels files: which classes each image of a tree holds (VOC07, COCO, ...).

`python -m pirl_fast.shard SRC DST --labels FILE --multi-label` reads one of these beside an image
tree (SRC/**/<image>, no class folders needed). Images are named by their path relative to SRC,
"/"-separated, with or without the extension (`JPEGImages/000005.jpg` or `JPEGImages/000005`).

    json    {"JPEGImages/000005.jpg": ["chair", "person"], ...}
            or, with the reference's "difficult" objects:
            {"JPEGImages/000005.jpg": {"present": ["chair"], "difficult": ["person"]}, ...}
    csv     path, then the classes present, then (optional) the difficult ones; class names within
            a field separated by spaces or ";": `JPEGImages/000005.jpg,chair;person,bottle`.
            Comma or tab between fields; an optional header row (a first row naming no image)

A class both present and difficult is present; an image with no class is a negative for every class
(VOC07 has none, COCO has some). What the shards store (KEY.mlb): shards/README.md.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pirl_fast.shard.labels_file import EXAMPLES, FileNames, LabelsError, is_image_name, unknown_classes_error

PRESENT, ABSENT, DIFFICULT = 1, 0, -1  # KEY.mlb values
_SEPARATORS = re.compile(r"[;\s]+")


@dataclass
class MultiLabelRow:
    line: int  # line number (csv) or position (json), for messages
    name: str  # the image's path relative to SRC, as written
    present: tuple[str, ...]
    difficult: tuple[str, ...]


@dataclass
class MultiLabelTable:
    path: Path
    format: str  # "json" or "csv"
    rows: list[MultiLabelRow]
    may_have_header: bool = False


def read_multi_labels(path: str | os.PathLike) -> MultiLabelTable:
    """Read a multi-label file (json or csv, told apart by its first character). Raises LabelsError
    naming the entry that does not fit."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelsError(f"labels file {path} cannot be read ({e}): give a JSON of path -> [class, ...]") from e
    if not text.strip():
        raise LabelsError(f"labels file {path} is empty: expected a JSON of path -> [class, ...] or a CSV of "
                          "path,classes")
    if text.lstrip()[0] in "{[":
        return _read_json(path, text)
    return _read_csv(path, text)


def _names(value, path: Path, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise LabelsError(f"labels file {path} {where}: expected a list of class names, got {value!r}")
    return tuple(v.strip() for v in value)


def _read_json(path: Path, text: str) -> MultiLabelTable:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise LabelsError(f"labels file {path} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise LabelsError(f"labels file {path}: expected a JSON object of path -> [class, ...], got a "
                          f"{type(raw).__name__}")
    rows = []
    for n, (name, value) in enumerate(raw.items(), start=1):
        where = f"entry {name!r}"
        if isinstance(value, dict):
            unknown = set(value) - {"present", "difficult"}
            if unknown:
                raise LabelsError(f"labels file {path} {where}: unknown field(s) {sorted(unknown)}; expected "
                                  "{\"present\": [...], \"difficult\": [...]}")
            present = _names(value.get("present", []), path, where + " present")
            difficult = _names(value.get("difficult", []), path, where + " difficult")
        else:
            present, difficult = _names(value, path, where), ()
        rows.append(MultiLabelRow(n, name, present, difficult))
    return MultiLabelTable(path, "json", rows)


def _read_csv(path: Path, text: str) -> MultiLabelTable:
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    delimiter = "\t" if "\t" in lines[0][1] and "," not in lines[0][1] else ","
    rows = []
    for n, line in lines:
        fields = [f.strip() for f in next(csv.reader(io.StringIO(line), delimiter=delimiter))]
        if not 2 <= len(fields) <= 3 or not fields[0]:
            raise LabelsError(f"labels file {path} line {n}: expected path,classes[,difficult classes] (class names "
                              f"separated by spaces or ';'), got {fields!r}")
        present = tuple(c for c in _SEPARATORS.split(fields[1]) if c)
        difficult = tuple(c for c in _SEPARATORS.split(fields[2]) if c) if len(fields) == 3 else ()
        rows.append(MultiLabelRow(n, fields[0], present, difficult))
    return MultiLabelTable(path, "csv", rows, may_have_header=True)


@dataclass
class MultiMatched:
    classes: list[str]  # the class list the targets' columns follow
    targets: dict[str, bytes]  # relpath in SRC -> KEY.mlb (one int8 per class)
    unlabelled: list[str]  # image files of the tree without an entry
    without_image: list[str]  # entries that name no file
    header: list[str] | None = None

    def record(self, table: MultiLabelTable) -> dict:
        """What the manifest keeps about the labels file (`labels`)."""
        return {"file": str(table.path), "format": f"multi-label {table.format}", "rows": len(table.rows) - (
                self.header is not None), "header": self.header, "labelled_images": len(self.targets),
                "without_image": len(self.without_image), "without_image_examples": self.without_image[:EXAMPLES]}


def match_multi_labels(table: MultiLabelTable, files: list[str], classes: list[str] | None) -> MultiMatched:
    """Pair the table with the tree's files (relpaths); every class must be in `classes` (None: the
    sorted class names the table uses, header row left out). Raises LabelsError for unknown classes
    and for an image listed twice with different classes."""
    names = FileNames(files)
    rows = table.rows
    header = None
    first = rows[0] if rows else None
    if table.may_have_header and first and not names.knows(first.name):
        header, rows = [first.name, " ".join(first.present), " ".join(first.difficult)], rows[1:]
    if classes is None:
        classes = sorted({c for row in rows for c in row.present + row.difficult})
    index = {c: k for k, c in enumerate(classes)}
    unknown: dict[str, int] = {}
    targets: dict[str, bytes] = {}
    line_of: dict[str, int] = {}
    without_image = []
    for row in rows:
        file = names.find(row.name, table.path, row.line)
        if file is None:
            without_image.append(row.name)
            continue
        target = bytearray(len(classes))  # ABSENT everywhere
        for c in row.difficult:
            if c in index:
                target[index[c]] = DIFFICULT & 0xFF
        for c in row.present:  # present wins over difficult
            if c in index:
                target[index[c]] = PRESENT
        for c in row.present + row.difficult:
            if c not in index:
                unknown[c] = unknown.get(c, 0) + 1
        if file in targets and targets[file] != bytes(target):
            raise LabelsError(f"labels file {table.path} lists {file} twice with different classes (line "
                              f"{line_of[file]} and line {row.line}): merge them into one entry")
        targets[file], line_of[file] = bytes(target), row.line
    if unknown:
        raise unknown_classes_error(table.path, unknown, f"{len(classes)} classes", "fix the labels, or shard the "
                                    "split that has them first and pass its shards to --classes")
    unlabelled = sorted(f for f in files if f not in targets and is_image_name(f))
    return MultiMatched(list(classes), targets, unlabelled, without_image, header)

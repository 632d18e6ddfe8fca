"""The shard format, the one place that writes, reads and checks it: sample keys, tar members, int64
and checksum members, the DALI index file, and the shard directory's manifest.json.

shards/README.md ("What a shard directory holds", "Multi-label shards") specifies all of it: the
members of each sample and their order, the fixed tar headers, the keys, the index file's lines and
every field of manifest.json. Loaders and the trainer read a shard directory only through
`load_manifest`, which checks that what the manifest lists is really there, so a half-written or
hand-edited directory fails at start-up with the fix in the message instead of deep inside a DALI
pipeline. A dataset root's shards are one such directory per split (splits.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tarfile
import zlib
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

INDEX_VERSION = "v1.2"
TAR_BLOCK = 512
MAX_SLUG = 80  # keeps "KEY.jpg" under ustar's 100-character name field (80 + 1 + 10 + 4)
HASH_CHUNK = 1 << 22  # 4 MiB reads when hashing a shard
_INT64 = struct.Struct("<q")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
SAMPLE_MEMBERS = ["jpg", "cls", "idx", "lbl"]  # member order inside every sample (the team contract)
CHECKSUM_MEMBER = "crc"  # the optional fifth member: CRC-32 of the jpg bytes
MULTI_LABEL_MEMBER = "mlb"  # multi-label shards' last member: the multi-hot targets
CHECKSUM_MEMBERS = [*SAMPLE_MEMBERS, CHECKSUM_MEMBER]  # what ShardWriter(checksums=True) writes per sample
OPTIONAL_MEMBERS = (CHECKSUM_MEMBER, MULTI_LABEL_MEMBER)  # after the four, in this order
MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "pirl_fast-shards"
FORMAT_VERSION = 1

_FIX = "run `python -m pirl_fast.shard SRC {dir}` to (re)make it, or `--resume` to finish an interrupted run"


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def holds_images(folder: Path, depth: int = 2, budget: int = 2000) -> bool:
    """True when `folder` has image files (by suffix) within `depth` levels and none of the sharder's
    files (`shard-*`, `.progress.jsonl`): an image folder, not an unfinished shard folder."""
    seen = 0
    todo = [(folder, 0)]
    found = False
    while todo and seen < budget:
        here, level = todo.pop()
        try:
            entries = list(os.scandir(here))
        except OSError:
            continue
        for e in entries:
            seen += 1
            if level == 0 and (e.name.startswith(("shard-", ".shard-")) or e.name == ".progress.jsonl"):
                return False
            if e.is_dir(follow_symlinks=False) and level + 1 < depth and not e.name.startswith("."):
                todo.append((Path(e.path), level + 1))
            elif e.name.lower().endswith(IMAGE_SUFFIXES):
                found = True
    return found


def image_folder_advice(given: Path, folder: Path) -> str | None:
    """The error for a folder of images given where shards are expected (`folder`: the part of
    `given` that was looked into), or None when it holds none."""
    if not holds_images(folder):
        return None
    src = given.parent if given.name.lower() in ("train", "val", "validation", "test") else given  # a split: its root
    dst = src.parent / "shards" if src.name.lower() in ("images", "imgs", "img", "raw") else src.with_name(
        f"{src.name}-shards")
    return (f"{given} holds images, not shards ({folder} has image files and no manifest.json): make shards from it "
            f"first with `python -m pirl_fast.shard {src} {dst}`, then pass data.shards={dst}")


def nearest_existing(path: Path) -> Path | None:
    """The existing folder closest to `path`, which does not exist: the nearest name beside its
    first missing part (with the rest of the path when that exists too), or None."""
    import difflib

    parts = path.parts
    for i in range(len(parts) - 1, -1, -1):
        base = Path(*parts[:i]) if i else Path(".")
        if not base.is_dir():
            continue
        try:
            names = [p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError:
            return None
        near = difflib.get_close_matches(parts[i], names, n=1, cutoff=0.6)
        if not near:
            return None
        guess = base / near[0] / Path(*parts[i + 1:]) if i + 1 < len(parts) else base / near[0]
        return guess if guess.exists() else base / near[0]
    return None


class ShardError(Exception):
    """A shard directory is missing, incomplete or inconsistent (the message names the fix)."""


def sample_key(relpath: str) -> str:
    """Stable, unique, dot-free key from an input's path relative to SRC ("cls/sub/x.JPEG").

    Readable part: the path without its last suffix, "/" -> "-", other unsafe runs -> "_",
    cut to 80 characters. A 10-hex-digit hash of the full path is appended, so paths that
    read the same after cleaning ("a.jpg" and "a.png", "a b" and "a_b") still get distinct keys.
    """
    stem = relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath
    slug = _UNSAFE.sub("_", stem.replace("/", "-"))[:MAX_SLUG] or "x"
    return f"{slug}-{hashlib.sha1(relpath.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"


def encode_int64(value: int) -> bytes:
    return _INT64.pack(value)


def decode_int64(data: bytes) -> int:
    if len(data) != 8:
        raise ValueError(f"expected 8 bytes of little-endian int64, got {len(data)} bytes")
    return _INT64.unpack(data)[0]


def checksum_problem(jpeg, crc_member) -> str | None:
    """None when the crc member (8 bytes little-endian, or an int) matches the JPEG bytes (any
    buffer: bytes, a numpy array), else what is wrong."""
    try:
        expected = crc_member if isinstance(crc_member, int) else decode_int64(bytes(crc_member))
    except ValueError as e:
        return f"its crc member is unreadable ({e})"
    actual = zlib.crc32(jpeg)
    if actual != expected:
        return f"its bytes do not match their CRC-32 (stored {expected:08x}, computed {actual:08x}): damaged"
    return None


def multi_hot_problem(mlb: bytes, label: int, lbl: int, num_classes: int) -> str | None:
    """What is wrong with a multi-label sample's members, or None (cls/lbl -1, one int8 of 1, 0 or -1
    per class)."""
    if label != -1 or lbl != -1:
        return f"cls {label} / lbl {lbl}, expected -1 in multi-label shards"
    if len(mlb) != num_classes:
        return f"mlb has {len(mlb)} bytes, expected one per class ({num_classes})"
    bad = sorted({v for v in mlb} - {0, 1, 0xFF})
    if bad:
        return f"mlb holds {bad}, expected 1 (present), 0 (absent) or -1 (difficult)"
    return None


@dataclass
class IndexEntry:
    """One sample's line in the index file: (ext, data offset, size, member name) per member."""
    key: str
    members: list[tuple[str, int, int, str]]

    def line(self) -> str:
        return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in self.members)

    def offset_of(self, ext: str) -> int:
        return next(offset for e, offset, _, _ in self.members if e == ext)


def index_text(entries: list[IndexEntry]) -> str:
    """The whole index file, byte for byte as DALI's wds2idx writes it (trailing newline included)."""
    return "".join([f"{INDEX_VERSION} {len(entries)}\n"] + [e.line() + "\n" for e in entries])


def parse_index(text: str, samples: int | None = None) -> list[IndexEntry]:
    """Read a v1.2 index file back; ValueError says what is wrong (the header, a line, or the
    sample count against `samples` when given)."""
    lines = text.splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ValueError(f"has header {lines[0] if lines else ''!r}, expected '{INDEX_VERSION} <num_samples>'")
    if int(header[1]) != len(lines) - 1 or samples not in (None, int(header[1])):
        raise ValueError(f"lists {header[1]} samples in its header and {len(lines) - 1} lines"
                         + (f", the manifest says {samples}" if samples is not None else ""))
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        try:
            if not fields or len(fields) % 4:
                raise ValueError("expected groups of <ext> <offset> <size> <name>")
            members = [(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                       for i in range(0, len(fields), 4)]
        except ValueError as e:
            raise ValueError(f"line {number} is malformed ({e})") from e
        entries.append(IndexEntry(key=members[0][3].split(".", 1)[0], members=members))
    return entries


def check_index_file(path: Path, samples: int, tar_bytes: int, fix: str) -> None:
    """`path` as the loaders need it: a v1.2 index (`parse_index`) of `samples` lines, every member
    inside the tar; raises ShardError."""
    try:
        entries = parse_index(path.read_text(), samples)
    except (OSError, UnicodeDecodeError) as e:
        raise ShardError(f"index file {path} cannot be read ({e}): {fix}") from e
    except ValueError as e:
        raise ShardError(f"index file {path} {e}: {fix}") from e
    for number, entry in enumerate(entries, start=2):
        if max(offset + size for _, offset, size, _ in entry.members) > tar_bytes:
            raise ShardError(f"index file {path} line {number} points past the end of its {tar_bytes}-byte tar: {fix}")


class ShardWriter:
    """Writes samples into an open binary file as a deterministic ustar archive.

    `add(key, jpeg, label, index)` appends the four members (five with checksums=True: the crc
    member after them; then the mlb member when `multi_hot` is given); `entries` collects the
    index-file lines; `close()` writes the end-of-archive blocks (the file itself stays open).
    """

    def __init__(self, fileobj: BinaryIO, checksums: bool = False):
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)
        self.entries: list[IndexEntry] = []
        self.checksums = checksums

    def _add_member(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        header_offset = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        # ustar: exactly one 512-byte header per member (names are < 100 chars, no PAX records).
        return header_offset + TAR_BLOCK, len(data)

    def add(self, key: str, jpeg: bytes, label: int, index: int, multi_hot: bytes = b"") -> None:
        contents = [("jpg", jpeg), ("cls", str(label).encode("ascii")), ("idx", encode_int64(index)),
                    ("lbl", encode_int64(label))]
        if self.checksums:
            contents.append((CHECKSUM_MEMBER, encode_int64(zlib.crc32(jpeg))))
        if multi_hot:
            contents.append((MULTI_LABEL_MEMBER, multi_hot))
        members = []
        for ext, data in contents:
            name = f"{key}.{ext}"
            offset, size = self._add_member(name, data)
            members.append((ext, offset, size, name))
        self.entries.append(IndexEntry(key=key, members=members))

    def close(self) -> None:
        self._tar.close()  # two zero blocks, padded to tarfile's 10240-byte record


def shift_indices(path: str, entries: list[IndexEntry], base: int) -> None:
    """Add `base` to every KEY.idx value of the tar at `path`, in place (8-byte fields, so no
    offset moves). Workers write shard-local indices 0..n-1 because a shard's first global
    index depends on how many earlier inputs were skipped, known only when they finish."""
    if base == 0:
        return
    with open(path, "r+b") as f:
        for local, entry in enumerate(entries):
            f.seek(entry.offset_of("idx"))
            f.write(encode_int64(base + local))


def iter_samples(fileobj: BinaryIO, skip: Container[str] = ()
                 ) -> Iterator[tuple[str, dict[str, bytes], dict[str, tuple[int, int]]]]:
    """Read a shard back with Python's tarfile: yields (key, {ext: data}, {ext: (offset, size)}),
    the data of members whose ext is in `skip` left unread (a scan of the headers).

    Members are grouped by consecutive key, as WebDataset and DALI group them.
    """
    key, data, where = None, {}, {}
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, _, ext = member.name.partition(".")
            if k != key and key is not None:
                yield key, data, where
                data, where = {}, {}
            key = k
            if ext not in skip:
                data[ext] = tar.extractfile(member).read()
            where[ext] = (member.offset_data, member.size)
    if key is not None:
        yield key, data, where


def member_name_at(f: BinaryIO, offset: int) -> str:
    """The name in the ustar header of the member whose data starts at `offset`, read raw (a damaged
    header gives whatever its bytes say, not an error)."""
    f.seek(offset - TAR_BLOCK)
    return f.read(100).split(b"\0", 1)[0].decode("utf-8", "replace")  # ustar's 100-byte name field


def read_member(tar: Path, offset: int) -> bytes:
    """The data of the ustar member whose data starts at `offset` (its header is the block before)."""
    with open(tar, "rb") as f:
        f.seek(offset - TAR_BLOCK)
        size = tarfile.TarInfo.frombuf(f.read(TAR_BLOCK), "utf-8", "surrogateescape").size
        return f.read(size)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------ the shard directory: manifest.json

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
    def multi_label(self) -> bool:
        """Every sample carries KEY.mlb (several classes per image) and cls/lbl are -1."""
        return MULTI_LABEL_MEMBER in self.members

    @property
    def has_checksums(self) -> bool:
        """Every sample carries a crc member (shards written before it existed do not)."""
        return CHECKSUM_MEMBER in self.members

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
        near = nearest_existing(Path(shard_dir))
        raise ShardError(f"shard directory {root} does not exist" + (f"; did you mean {near}?" if near else "")
                         + f" (to make it: `python -m pirl_fast.shard SRC {shard_dir}`)")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(image_folder_advice(Path(shard_dir), Path(shard_dir))
                         or f"{path} is missing (not a finished shard directory): {fix}")
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
        kind = raw.get("label_kind", "single")
        if kind != ("multi" if manifest.multi_label else "single"):
            raise ValueError(f"label_kind {kind!r} does not fit sample_members {manifest.members} (multi-label "
                             "shards have an mlb member, single-label ones none)")
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
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "num_samples": num_samples, "classes": classes,
            "sample_members": list(members), "shards": shards, "skipped": skipped, "options": options}


def check_shard_files(manifest: Manifest, sha256: bool, fix: str) -> None:
    """Every shard's files against the manifest, before any reader opens them: the tar's size; its
    index file (`check_index_file`); with `sha256`, the tar's SHA-256. Raises ShardError naming the
    file and `fix`."""
    for shard in manifest.shards:
        tar, index = manifest.root / shard.name, manifest.root / shard.index_name
        size = tar.stat().st_size
        if size != shard.bytes:
            raise ShardError(f"shard {tar} is {size} bytes, the manifest says {shard.bytes} "
                             f"(truncated or replaced): {fix}")
        check_index_file(index, shard.samples, size, fix)
        if sha256 and sha256_file(tar) != shard.sha256:
            raise ShardError(f"shard {tar} does not match its SHA-256 in the manifest (corrupt): {fix}")

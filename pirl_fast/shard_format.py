"""What one shard holds, byte for byte: sample keys, tar members and the DALI index file.

A shard is a plain (uncompressed) POSIX ustar archive. Each sample is four consecutive
members named KEY.<ext>, in this order (the team contract; DALI reads idx/lbl with
dtypes=INT64 and no Python per sample):

    KEY.jpg   baseline RGB JPEG
    KEY.cls   label as ASCII decimal text, no newline (the WebDataset convention)
    KEY.idx   global sample index 0..N-1 (the memory bank's row), 8 bytes little-endian int64
    KEY.lbl   label again, 8 bytes little-endian int64
    KEY.crc   (shards written with checksums=True only) zlib CRC-32 of the KEY.jpg bytes, as an
              8-byte little-endian int64 (0 .. 2**32-1); readers check it before decoding
              (pirl_fast/corrupt.py). The manifest's sample_members lists "crc" when it is there.

Every header is fixed (mtime 0, uid/gid 0, no user/group names, mode 0644), so the same
samples always give the same bytes. Keys hold only [A-Za-z0-9_-]: WebDataset and DALI split
a member name at the first dot after the last slash, and GNU tar (which DALI's wds2idx runs)
would escape other characters.

The index file (DALI's "v1.2" text format, what `wds2idx` writes):
    v1.2 <samples>
    jpg <data offset> <size> KEY.jpg cls <offset> <size> KEY.cls idx ... KEY.idx lbl ... KEY.lbl
one line per sample, offsets of the member data (header offset + 512) in bytes.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

INDEX_VERSION = "v1.2"
TAR_BLOCK = 512
MAX_SLUG = 80  # keeps "KEY.jpg" under ustar's 100-character name field (80 + 1 + 10 + 4)
_INT64 = struct.Struct("<q")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
CHECKSUM_MEMBER = "crc"  # the optional fifth member: CRC-32 of the jpg bytes


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


def parse_index(text: str) -> list[IndexEntry]:
    """Read a v1.2 index file back (raises ValueError naming the bad line)."""
    lines = text.splitlines()
    if not lines or lines[0].split()[:1] != [INDEX_VERSION] or len(lines[0].split()) != 2:
        raise ValueError(f"first line must be '{INDEX_VERSION} <samples>', got {lines[0] if lines else ''!r}")
    count = int(lines[0].split()[1])
    if count != len(lines) - 1:
        raise ValueError(f"header says {count} samples but there are {len(lines) - 1} sample lines")
    entries = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split(" ")
        if len(parts) % 4:
            raise ValueError(f"line {n}: expected groups of 'ext offset size name', got {line!r}")
        members = [(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]) for i in range(0, len(parts), 4)]
        entries.append(IndexEntry(key=members[0][3].split(".", 1)[0], members=members))
    return entries


class ShardWriter:
    """Writes samples into an open binary file as a deterministic ustar archive.

    `add(key, jpeg, label, index)` appends the four members (five with checksums=True: the crc
    member last); `entries` collects the index-file lines; `close()` writes the end-of-archive
    blocks (the file itself stays open).
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

    def add(self, key: str, jpeg: bytes, label: int, index: int) -> None:
        contents = [("jpg", jpeg), ("cls", str(label).encode("ascii")), ("idx", encode_int64(index)),
                    ("lbl", encode_int64(label))]
        if self.checksums:
            contents.append((CHECKSUM_MEMBER, encode_int64(zlib.crc32(jpeg))))
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


def iter_samples(fileobj: BinaryIO) -> Iterator[tuple[str, dict[str, bytes], dict[str, tuple[int, int]]]]:
    """Read a shard back with Python's tarfile: yields (key, {ext: data}, {ext: (offset, size)}).

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
            data[ext] = tar.extractfile(member).read()
            where[ext] = (member.offset_data, member.size)
    if key is not None:
        yield key, data, where


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

"""Corrupt samples found while training: how each backend finds them and names them.

Shards get damaged after the sharder checked them (a failing disk, an interrupted copy). A loader
finds a damaged sample in two ways (README.md, "Corrupt data found while training", has the details
and the measured cost: ~40-55 us per sample, against ~5 ms of CPU decoding and augmenting):
  - Its checksum: the `KEY.crc` member (shards/README.md), compared with the JPEG's bytes on the
    host before decoding on every backend (format.checksum_problem; `DaliGate` for DALI). The only
    check that sees damage libjpeg merely warns about or nvJPEG does not notice.
  - Its decoding fails. DALI's decoder then fails the whole pipeline, naming no file; `DaliGate`
    remembers the samples in flight and `find_undecodable` decodes them on the host to name it.
What happens then is data.on_corrupt (pirl_fast/data/batch.py): `error` stops naming the shard and
sample key; `skip` replaces the sample in its batch. DALI cannot skip a decoder failure.
"""

from __future__ import annotations

import collections
import functools
import re
import tarfile
from pathlib import Path

import numpy as np

from pirl_fast.shard.format import checksum_problem, read_member

FIX = ("check the shards with `python -m pirl_fast.shard --verify DIR`, then restore the damaged shard from a "
       "copy or re-shard")
SKIP_HINT = "; or train on without such samples with data.on_corrupt=skip (counted as corrupt_skipped in metrics.jsonl)"


@functools.lru_cache(maxsize=1)
def placeholder_jpeg() -> bytes:
    """A small valid grey JPEG, decoded in place of a corrupt sample's bytes (which are then
    replaced in the batch, so its pixels never reach the model)."""
    import torch
    from torchvision.io import encode_jpeg

    return encode_jpeg(torch.full((3, 32, 32), 128, dtype=torch.uint8)).numpy().tobytes()


def source_info_path(where: str) -> tuple[Path, int, str]:
    """DALI's webdataset source_info "TAR:OFFSET:MEMBER" -> (tar, data offset, member name)."""
    tar, offset, member = where.rsplit(":", 2)
    return Path(tar), int(offset), member


def describe(where: str, index: int | None = None) -> str:
    """A DALI source_info for people: "sample 17 (KEY) in TAR (its jpg at byte 37376)"."""
    tar, offset, member = source_info_path(where)
    number = f"sample {index} " if index is not None else "sample "
    return f"{number}({member.split('.', 1)[0]}) in {tar} (its jpg at byte {offset})"


def decoder_message(error: Exception) -> str:
    """torchvision's decode error without its C++ source location ("decode_jpeg, /path/x.cpp:171, ...")."""
    return re.sub(r"^\w+, \S+:\d+, ", "", str(error).strip())


def decode_problem(jpeg: bytes) -> str | None:
    """None when torchvision decodes `jpeg` fully (it fails on what libjpeg only warns about)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        return f"does not decode ({decoder_message(e)})"
    return None


def find_undecodable(sources: list[str]) -> list[str]:
    """`where: why` for each DALI source_info in `sources` whose JPEG fails to decode on the host."""
    found = []
    for where in dict.fromkeys(sources):  # unique, in order
        try:
            problem = decode_problem(read_member(*source_info_path(where)[:2]))
        except (OSError, ValueError, tarfile.TarError) as e:
            problem = f"cannot be read ({type(e).__name__}: {e})"
        if problem:
            found.append(f"{describe(where)}: {problem}")
    return found


class DaliGate:
    """The DALI python_function between the reader and the decoder, run on the host per batch:
    (jpegs, index, source_info[, crc]) -> jpegs, where a sample whose bytes fail their checksum is
    replaced by `placeholder_jpeg()` and recorded in `corrupt` (index -> "where: why"), so that the
    decoder never sees it and the loader can act on it. `in_flight` keeps the source_info of the
    last `keep` batches, the candidates when the decoder fails (`find_undecodable`)."""

    def __init__(self, checksums: bool, keep: int):
        self.checksums = checksums
        self.corrupt: dict[int, str] = {}
        self.in_flight: collections.deque[list[str]] = collections.deque(maxlen=keep)
        self.placeholder = np.frombuffer(placeholder_jpeg(), dtype=np.uint8)

    def __call__(self, jpegs, index, source_info, crc=None):
        wheres = [bytes(s).decode("utf-8", "surrogateescape") for s in source_info]
        self.in_flight.append(wheres)
        if crc is None:
            return list(jpegs)
        out = []
        for jpeg, i, where, c in zip(jpegs, index, wheres, crc):
            problem = checksum_problem(jpeg, int(c[0]))
            if problem is None:
                out.append(jpeg)
            else:
                self.corrupt[int(i[0])] = f"{describe(where, int(i[0]))}: {problem}"
                out.append(self.placeholder)
        return out

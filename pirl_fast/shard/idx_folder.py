"""python -m pirl_fast.idx_folder IDX_DIR DST [--split train|t10k] [--limit N] [--seed S]

MNIST-format (IDX) image files -> a labelled ImageFolder of JPEGs, the input `python -m
pirl_fast.shard` takes. Made for Fashion-MNIST (Xiao, Rasul & Vollgraf 2017: 60,000 training
and 10,000 test photographs of clothing, 28x28 greyscale, 10 classes), the real dataset the
learning benchmark (`python -m pirl_fast.bench learn`) runs on; any IDX pair of
`<split>-images-idx3-ubyte[.gz]` and `<split>-labels-idx1-ubyte[.gz]` works.

    sudo apt-get install dataset-fashion-mnist      # Debian: the original files under
                                                   # /usr/share/datasets/fashion-mnist/
    python -m pirl_fast.idx_folder /usr/share/datasets/fashion-mnist fmnist/train --split train --limit 2000
    python -m pirl_fast.shard fmnist/train shards/fmnist_train

The IDX format (LeCun's MNIST page): a big-endian header, magic 0x0000 <type> <ndim>, then one
uint32 size per dimension, then the data in C order; type 0x08 = unsigned byte. Images are
(N, rows, cols) uint8, labels (N,) uint8.

Output: DST/<class>/<split>_<nnnnn>.jpg (nnnnn: the image's position in the IDX file), greyscale
JPEGs at quality 95 (the sharder makes them RGB), classes named so that their sorted order is
the label order (00_t-shirt_top, 01_trouser, ... for Fashion-MNIST; 00, 01, ... otherwise).
`--limit N` keeps a class-balanced subset of N images drawn with `--seed` (the first N of a seeded
permutation, taken round-robin over classes).
Files are written under a temporary name and renamed, and the folder is refused if it already
holds images of another run (--overwrite replaces it).
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle_boot")  # label order, from the dataset's README
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts the files
INSTALL_HINT = ("install Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu: "
                f"the IDX files land in {DEFAULT_ROOT}), or download the four *-ubyte.gz files from "
                "https://github.com/zalandoresearch/fashion-mnist into a folder and pass that folder")
IDX_UBYTE = 0x08  # the only element type MNIST-style files use
JPEG_QUALITY = 95  # near-lossless on 28 px greyscale; the loaders decode it again


class IdxError(ValueError):
    """An IDX file is missing or malformed; the message names the file and the fix."""


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array of the shape its header gives."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise IdxError(f"cannot read {path} ({type(e).__name__}: {e}): re-download or reinstall it") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxError(f"{path} is not an IDX file (its first bytes are {raw[:4].hex()}, expected 0000 08 0n)")
    dtype, ndim = raw[2], raw[3]
    if dtype != IDX_UBYTE or ndim < 1:
        raise IdxError(f"{path}: element type 0x{dtype:02x} with {ndim} dimensions; only unsigned-byte IDX "
                       "files (type 0x08), as MNIST and Fashion-MNIST use, are supported")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise IdxError(f"{path}: header says shape {shape} ({expected} bytes in all) but the file has "
                       f"{len(raw)} bytes (truncated download?): re-download it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_split(root: str | Path, split: str) -> tuple[Path, Path]:
    """The (images, labels) IDX files of `split` under `root`, gzipped or not."""
    root = Path(root)
    found = []
    for kind, ndim in (("images", 3), ("labels", 1)):
        stem = f"{split}-{kind}-idx{ndim}-ubyte"
        candidates = [root / stem, root / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise IdxError(f"no {stem}[.gz] in {root}: {INSTALL_HINT}")
        found.append(path)
    return found[0], found[1]


def load_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W) uint8, labels (N,) int64) of `split` ("train" or "t10k" for (Fashion-)MNIST)."""
    image_path, label_path = find_split(root, split)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise IdxError(f"{image_path} has shape {images.shape} and {label_path} {labels.shape}: expected "
                       "(N, H, W) images and (N,) labels of the same N")
    return images, labels.astype(np.int64)


def balanced_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of `limit` samples, as equal per class as the counts allow, in a seeded random order."""
    order = np.random.default_rng(seed).permutation(labels.shape[0])  # (N,)
    per_class = [order[labels[order] == c] for c in np.unique(labels)]  # each in the seeded order
    rank_in_class = np.empty(labels.shape[0], dtype=np.int64)
    for members in per_class:
        rank_in_class[members] = np.arange(members.shape[0])
    # Round-robin over classes: sort by (rank within its class, position in the seeded order).
    position = np.empty(labels.shape[0], dtype=np.int64)
    position[order] = np.arange(labels.shape[0])
    chosen = np.lexsort((position, rank_in_class))[:limit]
    return np.sort(chosen)


def class_folders(num_classes: int, names: tuple[str, ...] | None) -> list[str]:
    """Folder names whose sorted order is the label order."""
    if names is not None and len(names) == num_classes:
        return [f"{c:02d}_{name}" for c, name in enumerate(names)]
    return [f"{c:02d}" for c in range(num_classes)]


def write_folder(images: np.ndarray, labels: np.ndarray, ids: np.ndarray, dst: str | Path, split: str,
                 names: tuple[str, ...] | None = FASHION_MNIST_CLASSES, overwrite: bool = False) -> Path:
    """Write DST/<class>/<split>_<id>.jpg for every (image, label, id: its position in the IDX file); returns DST.

    DST must not exist, be empty, or (with overwrite) is replaced. The folder is built under
    DST.partial and renamed when complete, so an interrupted run leaves no half folder at DST."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dst} already holds files: pass --overwrite to replace it, or another DST")
        shutil.rmtree(dst)
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    folders = class_folders(int(labels.max()) + 1, names)
    for folder in folders:
        (partial / folder).mkdir(parents=True)
    width = len(str(max(1, int(ids.max()))))
    for image, label, i in zip(images, labels, ids):
        Image.fromarray(image).save(partial / folders[label] / f"{split}_{i:0{width}d}.jpg", quality=JPEG_QUALITY)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.rmdir()  # empty (checked above)
    partial.rename(dst)
    return dst


def convert(root: str | Path, dst: str | Path, split: str, limit: int = 0, seed: int = 0,
            overwrite: bool = False) -> tuple[Path, int]:
    """IDX split -> ImageFolder at dst (a balanced subset of `limit` when > 0); returns (dst, images written)."""
    images, labels = load_split(root, split)
    keep = balanced_subset(labels, min(limit, labels.shape[0]), seed) if limit > 0 else np.arange(labels.shape[0])
    return write_folder(images[keep], labels[keep], keep, dst, split, overwrite=overwrite), int(keep.shape[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pirl_fast.idx_folder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("idx_dir", nargs="?", default=DEFAULT_ROOT, help=f"folder of the IDX files (default {DEFAULT_ROOT})")
    p.add_argument("dst", help="the ImageFolder to write")
    p.add_argument("--split", default="train", help="file prefix: train (default) or t10k for (Fashion-)MNIST")
    p.add_argument("--limit", type=int, default=0, help="a class-balanced subset of N images (default 0: all)")
    p.add_argument("--seed", type=int, default=0, help="which subset (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it holds files")
    args = p.parse_args(argv)
    if args.limit < 0:
        p.error(f"--limit {args.limit} must be >= 0")
    try:
        dst, count = convert(args.idx_dir, args.dst, args.split, args.limit, args.seed, args.overwrite)
    except (IdxError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} images to {dst}")
    return 0

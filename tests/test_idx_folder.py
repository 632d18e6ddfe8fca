"""IDX (MNIST-format) files -> ImageFolder: header parsing against hand-written files, balanced
subsets, the folder the sharder reads, and the installed Fashion-MNIST when it is there."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pirl_fast.shard.cli import Options, run_shard
from pirl_fast.shard.idx_folder import (
    DEFAULT_ROOT,
    FASHION_MNIST_CLASSES,
    IdxError,
    balanced_subset,
    convert,
    load_split,
    main,
    read_idx,
)

FMNIST = Path(DEFAULT_ROOT)
needs_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
                                  reason=f"Fashion-MNIST is not installed in {FMNIST} "
                                         "(`sudo apt-get install dataset-fashion-mnist`)")


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """An IDX file written from the format's definition: 0, 0, type 0x08, ndim, big-endian sizes, data."""
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_split(root: Path, n: int = 30, classes: int = 3, seed: int = 0, gz: bool = True):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:28, 0:28]
    phase = rng.uniform(0, 6.28, (n, 1, 1))
    images = (127.5 + 120 * np.sin(x / 4 + phase) * np.cos(y / 5)).astype(np.uint8)  # smooth: JPEG keeps it close
    labels = (np.arange(n) % classes).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{suffix}", images, gz)
    write_idx(root / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips(tmp_path, gz):
    images, labels = make_split(tmp_path, gz=gz)
    got_images, got_labels = load_split(tmp_path, "train")
    assert got_images.shape == (30, 28, 28) and np.array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and np.array_equal(got_labels, labels)


def test_read_idx_refuses_bad_files(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x89PNG....")
    with pytest.raises(IdxError, match="not an IDX file"):
        read_idx(bad)
    raw = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + bytes(7)  # header says 10, 7 given
    bad.write_bytes(raw)
    with pytest.raises(IdxError, match="truncated"):
        read_idx(bad)
    bad.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + bytes(4))  # float32 elements
    with pytest.raises(IdxError, match="unsigned-byte"):
        read_idx(bad)
    with pytest.raises(IdxError, match="apt-get install dataset-fashion-mnist"):
        load_split(tmp_path / "nowhere", "train")


@pytest.mark.parametrize("limit, counts", [(7, [2, 2, 3]), (12, [4, 4, 4]), (20, [4, 8, 8])])
def test_balanced_subset(limit, counts):
    labels = np.array([0] * 10 + [1] * 10 + [2] * 4)  # class 2 runs out after 4 rounds
    chosen = balanced_subset(labels, limit, seed=3)
    assert len(chosen) == limit and len(set(chosen.tolist())) == limit
    assert sorted(np.bincount(labels[chosen], minlength=3).tolist()) == counts
    assert np.array_equal(chosen, balanced_subset(labels, limit, seed=3))  # seeded
    assert not np.array_equal(balanced_subset(labels, limit, seed=4), chosen)


def test_convert_writes_an_image_folder_the_sharder_reads(tmp_path):
    images, labels = make_split(tmp_path / "idx")
    dst, count = convert(tmp_path / "idx", tmp_path / "folder", "train", limit=12, seed=0)
    assert count == 12
    folders = sorted(p.name for p in dst.iterdir())
    assert folders == ["00", "01", "02"]  # Fashion-MNIST's names only when there are its 10 classes
    files = sorted(dst.glob("*/*.jpg"))
    assert len(files) == 12 and all(len(list((dst / f).iterdir())) == 4 for f in folders)
    with Image.open(files[0]) as im:
        assert im.size == (28, 28) and im.mode == "L"
        index = int(files[0].stem.split("_")[1])
        decoded = np.asarray(im, dtype=np.float32)
    assert np.abs(decoded - images[index]).mean() < 3  # JPEG at q95: close, not exact
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(tmp_path / "idx", dst, "train")
    run_shard(Options(src=str(dst), dst=str(tmp_path / "shards"), samples_per_shard=8, seed=0, workers=1))
    manifest = (tmp_path / "shards" / "manifest.json").read_text()
    assert '"num_samples": 12' in manifest


def test_cli(tmp_path, capsys):
    make_split(tmp_path / "idx")
    assert main([str(tmp_path / "idx"), str(tmp_path / "out"), "--limit", "6"]) == 0
    assert "wrote 6 images" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), str(tmp_path / "out2")]) == 2
    assert "apt-get install" in capsys.readouterr().err


@needs_fmnist
def test_installed_fashion_mnist():
    images, labels = load_split(FMNIST, "t10k")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.array_equal(np.bincount(labels), np.full(10, 1000))  # the test split is balanced
    assert len(FASHION_MNIST_CLASSES) == 10

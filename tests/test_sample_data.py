"""The generated sample ImageFolder: reproducible, ImageNet-like in its format mix, and with
classes a simple non-learned feature can already tell apart (later issues train on it)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
from PIL import Image

from pirl_fast.shard.sample_data import class_names, main, write_sample_folder


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    assert main([str(tmp_path / "a"), "--classes", "3", "--per-class", "4", "--seed", "5"]) == 0
    write_sample_folder(tmp_path / "b", classes=3, per_class=4, seed=5)
    write_sample_folder(tmp_path / "c", classes=3, per_class=4, seed=6)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b and len(a) == 12
    assert sorted(p.split("/")[0] for p in a) == sorted(class_names(3) * 4)
    assert all(a[k] != c.get(k) for k in a)


def test_format_mix_sizes_and_class_separability(tmp_path):
    root = write_sample_folder(tmp_path, classes=8, per_class=10, seed=3)
    kinds = collections.Counter()
    features, labels = [], []
    for label, name in enumerate(sorted(p.name for p in root.iterdir())):
        for path in sorted((root / name).iterdir()):
            img = Image.open(path)
            img.load()  # every generated file decodes
            assert 96 <= img.width <= 400 and 96 <= img.height <= 400
            kinds[(img.format, img.mode, bool(img.info.get("progressive")))] += 1
            rgb = np.asarray(img.convert("RGB").resize((64, 64)), np.float32) / 255  # (64, 64, 3)
            features.append(np.concatenate([rgb.mean((0, 1)), rgb.std((0, 1))]))  # (6,) colour statistics
            labels.append(label)
    assert kinds[("JPEG", "RGB", False)] >= 40  # mostly clean baseline JPEGs, as in ImageNet
    for kind in [("JPEG", "L", False), ("JPEG", "CMYK", False), ("PNG", "RGB", False), ("JPEG", "RGB", True)]:
        assert kinds[kind] >= 1, f"no {kind} among {dict(kinds)}"
    # Leave-one-out 1-nearest-neighbour on colour statistics: far above chance (1/8).
    x = np.array(features)
    x = (x - x.mean(0)) / x.std(0)
    y = np.array(labels)
    dist = ((x[:, None] - x[None]) ** 2).sum(-1)  # (80, 80)
    np.fill_diagonal(dist, np.inf)
    accuracy = (y[dist.argmin(1)] == y).mean()
    assert accuracy > 0.6, f"classes barely separable: 1-NN accuracy {accuracy:.2f}"

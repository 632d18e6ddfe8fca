"""Multi-label shards from the sharder (--labels FILE --multi-label): read back by the webdataset
library and by `eval svm`'s reader, checked by --verify, the same from JSON and CSV, loadable for
pre-training, and refused where one class per image is needed."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pirl_fast.eval.cli as ev
from pirl_fast.data.config import DataConfig
from pirl_fast.data.loaders import build_loader
from pirl_fast.eval.features import ShardImageDataset, svm_transform
from pirl_fast.shard.cli import main
from pirl_fast.shard.format import load_manifest, sample_key
from pirl_fast.shard.verify import verify_shards

CLASSES = ["cat", "dog", "person"]
# relpath -> (present, difficult): nested folders, a difficult object, one image with no class at all
LABELS = {
    "JPEGImages/000001.jpg": (["cat"], []),
    "JPEGImages/000002.jpg": (["dog", "person"], []),
    "JPEGImages/000003.jpg": (["person"], ["cat"]),
    "JPEGImages/000004.jpg": (["cat", "dog", "person"], []),
    "JPEGImages/000005.jpg": ([], []),
    "JPEGImages/000006.jpg": (["dog"], ["person"]),
    "more/deep/a.png": (["cat", "person"], []),
    "more/deep/b.png": (["dog"], []),
}


def expected_targets(labels=LABELS) -> dict[str, list[int]]:
    out = {}
    for path, (present, difficult) in labels.items():
        row = [0] * len(CLASSES)
        for c in difficult:
            row[CLASSES.index(c)] = -1
        for c in present:
            row[CLASSES.index(c)] = 1
        out[path] = row
    return out


@pytest.fixture
def tree(tmp_path) -> Path:
    src = tmp_path / "voc"
    rng = np.random.default_rng(0)
    for path in LABELS:
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(src / path)
    return src


def write_json(path: Path, labels=LABELS) -> Path:
    path.write_text(json.dumps({p: {"present": pr, "difficult": d} if d else pr for p, (pr, d) in labels.items()}))
    return path


def write_csv(path: Path, labels=LABELS) -> Path:
    rows = ["image,classes,difficult"] + [f"{p.rsplit('.', 1)[0]},{';'.join(pr)},{' '.join(d)}"
                                          for p, (pr, d) in labels.items()]  # names without extension
    path.write_text("\n".join(rows) + "\n")
    return path


def shard(src: Path, dst: Path, labels: Path, *extra: str) -> int:
    return main([str(src), str(dst), "--labels", str(labels), "--multi-label", "--workers", "1",
                 "--samples-per-shard", "3", *extra])


def test_webdataset_reads_the_classes_of_every_image(tree, tmp_path):
    import webdataset as wds

    assert shard(tree, tmp_path / "out", write_json(tmp_path / "labels.json")) == 0
    manifest = load_manifest(tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert raw["label_kind"] == "multi" and raw["sample_members"] == ["jpg", "cls", "idx", "lbl", "crc", "mlb"]
    assert manifest.classes == CLASSES and manifest.multi_label and raw["labels"]["labelled_images"] == len(LABELS)
    by_key = {sample_key(p): t for p, t in expected_targets().items()}
    samples = list(wds.WebDataset(manifest.tar_paths(), shardshuffle=False, empty_check=False))
    assert sorted(s["__key__"] for s in samples) == sorted(by_key)
    for s in samples:
        assert list(np.frombuffer(s["mlb"], np.int8)) == by_key[s["__key__"]]
        assert s["cls"] == b"-1" and int.from_bytes(s["lbl"], "little", signed=True) == -1
    assert verify_shards(tmp_path / "out") == []


def test_csv_and_json_give_the_same_shards_and_svm_reads_them(tree, tmp_path):
    assert shard(tree, tmp_path / "a", write_json(tmp_path / "labels.json")) == 0
    assert shard(tree, tmp_path / "b", write_csv(tmp_path / "labels.csv")) == 0
    tars = sorted(p.name for p in (tmp_path / "a").glob("shard-*"))
    assert len(tars) == 6 and all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in tars)
    data = ShardImageDataset(tmp_path / "b", svm_transform(32))
    order = {sample_key(p): t for p, t in expected_targets().items()}
    assert data.multi_label
    assert data.targets.tolist() == [order[e.key] for e in data.entries]


def test_pre_training_reads_multi_label_shards(tree, tmp_path):
    """Pre-training never looks at labels: both backends deliver every image once (label -1)."""
    assert shard(tree, tmp_path / "out", write_json(tmp_path / "labels.json")) == 0
    for backend in ("torch", "dali"):
        cfg = DataConfig(shards=str(tmp_path / "out"), backend=backend, batch_size=4, workers=1, shuffle_buffer=4,
                         image_size=32, patch_crop_size=30, patch_size=8)
        loader = build_loader(cfg)
        batches = list(loader)
        loader.close()
        assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(len(LABELS))), backend


def test_the_verifier_finds_a_bad_multi_hot_byte(tree, tmp_path):
    assert shard(tree, tmp_path / "out", write_json(tmp_path / "labels.json")) == 0
    tar = tmp_path / "out" / "shard-000000.tar"
    with tarfile.open(tar) as t:
        offset = next(m.offset_data for m in t if m.name.endswith(".mlb"))
    data = bytearray(tar.read_bytes())
    data[offset] = 5
    tar.write_bytes(bytes(data))
    problems = verify_shards(tmp_path / "out")
    assert any("mlb holds [5], expected 1 (present), 0 (absent) or -1 (difficult)" in p for p in problems)


def test_changed_labels_are_a_different_plan(tree, tmp_path, capsys):
    assert shard(tree, tmp_path / "out", write_json(tmp_path / "labels.json")) == 0
    changed = dict(LABELS, **{"JPEGImages/000001.jpg": (["dog"], [])})
    assert shard(tree, tmp_path / "out", write_json(tmp_path / "labels.json", changed)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert shard(tree, tmp_path / "out", write_json(tmp_path / "labels.json", changed), "--overwrite") == 0
    data = ShardImageDataset(tmp_path / "out", svm_transform(32))
    row = data.targets[[e.key for e in data.entries].index(sample_key("JPEGImages/000001.jpg"))]
    assert row.tolist() == [0, 1, 0]


def test_classes_from_train_shards_keep_the_ids(tree, tmp_path):
    """The test split names fewer classes; --classes keeps train's ids and columns."""
    assert shard(tree, tmp_path / "train", write_json(tmp_path / "labels.json")) == 0
    few = {p: v for p, v in LABELS.items() if "cat" not in v[0] + v[1]}
    test_src = tmp_path / "test"
    for p in few:
        (test_src / p).parent.mkdir(parents=True, exist_ok=True)
        (test_src / p).write_bytes((tree / p).read_bytes())
    assert shard(test_src, tmp_path / "test_shards", write_json(tmp_path / "test.json", few), "--classes",
                 str(tmp_path / "train")) == 0
    data = ShardImageDataset(tmp_path / "test_shards", svm_transform(32))
    assert data.classes == CLASSES and not data.targets[:, 0].any()


@pytest.mark.parametrize("case, message", [
    ("unlabelled", r"1 image file\(s\) have no entry in .*labels.json: more/deep/b.png"),
    ("unknown class", r"names 1 class\(es\) that are not in the class list \(3 classes\): bird \(1 image\)"),
    ("twice", r"lists JPEGImages/000001.jpg twice with different classes \(line 1 and line 9\)"),
    ("not a list", r"entry 'JPEGImages/000001.jpg': expected a list of class names, got 'cat'"),
    ("json without --multi-label", r"looks like a multi-label file .*: pass --multi-label"),
    ("dataset root", r"--multi-label shards one image tree at a time, .* \(train, test\)"),
])
def test_bad_input_is_refused_with_the_fix(tree, tmp_path, capsys, case, message):
    labels = tmp_path / "labels.json"
    args = [str(tree), str(tmp_path / "out"), "--labels", str(labels), "--multi-label", "--workers", "1"]
    text = json.dumps({p: v[0] for p, v in LABELS.items()})
    if case == "unlabelled":
        text = json.dumps({p: v[0] for p, v in LABELS.items() if p != "more/deep/b.png"})
    elif case == "unknown class":
        text = json.dumps({p: (["bird"] if p == "more/deep/a.png" else v[0]) for p, v in LABELS.items()})
        args += ["--classes", str(tmp_path / "train")]
        assert shard(tree, tmp_path / "train", write_json(tmp_path / "t.json")) == 0
    elif case == "twice":
        text = text[:-1] + ', "JPEGImages/000001": ["dog"]}'
    elif case == "not a list":
        text = json.dumps({"JPEGImages/000001.jpg": "cat"})
    elif case == "json without --multi-label":
        flat = tmp_path / "flat"
        flat.mkdir()
        (flat / "x.jpg").write_bytes((tree / "JPEGImages/000001.jpg").read_bytes())
        args = [str(flat), str(tmp_path / "out"), "--labels", str(labels)]
    elif case == "dataset root":
        for split in ("train", "test"):
            (tree / split / "x").mkdir(parents=True)
    labels.write_text(text)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_knn_refuses_multi_label_shards_naming_svm(tree, tmp_path):
    assert shard(tree, tmp_path / "out", write_json(tmp_path / "labels.json")) == 0
    with pytest.raises(SystemExit, match=r"hold multi-label samples .*`eval knn` scores one class per image. Use "
                                         r"`python -m pirl_fast.eval svm`"):
        ev.main(["knn", "--random-init", "--arch", "resnet18", "--train-shards", str(tmp_path / "out"),
                 "--val-shards", str(tmp_path / "out"), "--workers", "0", "--device", "cpu"])

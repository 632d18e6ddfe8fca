"""Dataset roots with splits (`python -m pirl_fast.shard /imagenet shards/in1k`), flat validation
folders with labels files (plain CSV, Kaggle's LOC_val_solution.csv, the devkit's ground truth),
and the trainer and eval following a dataset root's shards; all on generated miniatures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pirl_fast.eval import cli as ev
from pirl_fast.shard.cli import main
from pirl_fast.shard.format import MANIFEST_NAME, ShardError, load_manifest
from pirl_fast.shard.sample_data import class_names, write_sample_folder
from pirl_fast.shard.splits import eval_split_beside, resolve_shards
from pirl_fast.shard.verify import verify_shards

CLASSES = class_names(3)  # c00_stripes, c01_checks, c02_rings
TRAIN_PER_CLASS, VAL_PER_CLASS = 5, 3
ARGS = ["--samples-per-shard", "4", "--max-side", "128", "--workers", "1"]


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """train/ and val/ ImageFolders of the same 3 classes; val's files renamed ImageNet-style, in an
    order that interleaves the classes (as ImageNet's validation files do)."""
    root = tmp_path_factory.mktemp("split_images") / "imagenet"
    write_sample_folder(root / "train", classes=3, per_class=TRAIN_PER_CLASS, seed=0)
    write_sample_folder(root / "val", classes=3, per_class=VAL_PER_CLASS, seed=1)
    files = sorted((root / "val").glob("*/*"))
    for n, f in enumerate(sorted(files, key=lambda p: (int(p.stem.rsplit("_", 1)[1]), p.parent.name)), start=1):
        f.rename(f.parent / f"{val_name(n)}{f.suffix}")
    return root


def val_labels(root: Path) -> list[tuple[str, str]]:
    """(file name, class) of every val image of the class-folder layout, in file-name order."""
    return sorted((p.name, p.parent.name) for p in (root / "val").glob("*/*"))


def flat_copy(images: Path, dst: Path) -> Path:
    """The same dataset root with val/ flat: every image directly in val/, no labels written yet."""
    shutil.copytree(images / "train", dst / "train")
    (dst / "val").mkdir()
    for name, cls in val_labels(images):
        shutil.copy2(images / "val" / cls / name, dst / "val" / name)
    return dst


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))}


def samples(folder: Path) -> list[dict]:
    return list(wds.WebDataset(load_manifest(folder).tar_paths(), shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def root_shards(images, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("root_shards") / "in1k"
    assert main([str(images), str(dst), *ARGS]) == 0
    return dst


# ------------------------------------------------------------------ a dataset root with train/ and val/

def test_root_with_splits_gives_train_and_val_with_one_class_list(images, root_shards, tmp_path, capsys):
    train, val = load_manifest(root_shards / "train"), load_manifest(root_shards / "val")
    assert train.classes == val.classes == CLASSES
    assert train.num_samples == 3 * TRAIN_PER_CLASS and val.num_samples == 3 * VAL_PER_CLASS
    assert sorted(p.name for p in root_shards.iterdir()) == ["train", "val"]
    for split, folder in (("train", images / "train"), ("val", images / "val")):
        got = samples(root_shards / split)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*"))
        # Keys say split, class and file; the label is the class folder's position in train's list.
        assert len(got) == len(files)
        for s in got:
            assert s["__key__"].startswith(f"{split}-c0")
            cls = s["__key__"].split("-")[1]
            assert int(s["cls"]) == CLASSES.index(cls) == int(np.frombuffer(s["lbl"], "<i8")[0])
        assert load_manifest(root_shards / split).options["split"] == split
    keys = [s["__key__"] for split in ("train", "val") for s in samples(root_shards / split)]
    assert len(set(keys)) == len(keys)
    assert not verify_shards(root_shards)
    # The same command again: nothing to do. With 2 workers elsewhere: byte-identical splits.
    capsys.readouterr()
    assert main([str(images), str(root_shards), *ARGS]) == 0
    assert capsys.readouterr().err.count("nothing to do") == 2
    again = tmp_path / "again"
    assert main([str(images), str(again), *ARGS[:-1], "2"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"train {3 * TRAIN_PER_CLASS} images 3 classes 0 skipped -> {again / 'train'}" in out
    assert f"val {3 * VAL_PER_CLASS} images 3 classes 0 skipped -> {again / 'val'}" in out
    for split in ("train", "val"):
        assert shard_bytes(again / split) == shard_bytes(root_shards / split)


def test_only_train_and_left_out_folders(images, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(images / "train", root / "train")
    (root / "devkit").mkdir()
    (root / "devkit" / "readme.txt").write_text("not images")
    assert main([str(root), str(tmp_path / "a"), *ARGS]) == 2  # splits beside another folder: ambiguous
    assert "--layout splits" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main([str(root), str(tmp_path / "a"), "--layout", "splits", *ARGS]) == 0
    out = capsys.readouterr().out
    assert "left out: devkit" in out and "--val-shards DIR (no val split here)" in out
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["train"]
    (root / "val").mkdir()  # an empty split folder: refused, nothing written
    assert main([str(root), str(tmp_path / "b"), "--layout", "splits", *ARGS]) == 2
    assert "val is empty" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_ambiguous_imagefolder_refuses_with_exit_2(images, tmp_path, capsys):
    src = tmp_path / "pets"
    for cls in ("cat", "dog", "test"):
        shutil.copytree(images / "train" / CLASSES[0], src / cls)
    proc = subprocess.run([sys.executable, "-m", "pirl_fast.shard", str(src), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--layout imagefolder" in proc.stderr and "--layout splits" in proc.stderr
    assert "cat, dog" in proc.stderr and not (tmp_path / "out").exists()
    assert main([str(src), str(tmp_path / "out"), "--layout", "imagefolder", *ARGS]) == 0
    assert load_manifest(tmp_path / "out").classes == ["cat", "dog", "test"]
    # train/ and val/ holding images directly look like classes as much as splits: refused too.
    flat = tmp_path / "flat"
    for split in ("train", "val"):
        shutil.copytree(images / "train" / CLASSES[0], flat / split)
    assert main([str(flat), str(tmp_path / "out2"), *ARGS]) == 2
    assert "hold images directly" in capsys.readouterr().err


def test_val_class_missing_from_train_is_an_error_naming_it(images, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(images, root)
    shutil.copytree(images / "val" / CLASSES[0], root / "val" / "c99_extra")
    assert main([str(root), str(tmp_path / "out"), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "c99_extra" in err and "train lacks" in err and not (tmp_path / "out").exists()
    # The same through a labels file: the class name is checked against train's list.
    flat = flat_copy(images, tmp_path / "flat")
    rows = [(n, "c99_extra" if k == 0 else c) for k, (n, c) in enumerate(val_labels(images))]
    (tmp_path / "labels.csv").write_text("".join(f"{n},{c}\n" for n, c in rows))
    assert main([str(flat), str(tmp_path / "out"), "--labels", str(tmp_path / "labels.csv"), *ARGS]) == 2
    assert "c99_extra (1 image)" in capsys.readouterr().err


# ------------------------------------------------------------------ ImageNet's flat val with a labels file

def write_meta_mat(path: Path, wnid_of_id: dict[int, str]) -> None:
    """A devkit-style meta.mat: a `synsets` struct array (ILSVRC2012_ID, WNID, words, num_children),
    with a non-leaf synset after the leaves as in the real file."""
    from scipy.io import savemat

    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(i, w, f"words for {w}", 0) for i, w in sorted(wnid_of_id.items())]
    rows.append((len(rows) + 1, "n00001740", "entity", 3))
    savemat(path, {"synsets": np.array(rows, dtype=dtype).reshape(-1, 1)})


def labels_kaggle(images: Path, root: Path) -> list[str]:
    body = "".join(f"{Path(n).stem},{c} 10 20 30 40 {c} 1 2 3 4 \n" for n, c in val_labels(images))
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + body)
    return []  # found in the root without --labels


def labels_kaggle_beside(images: Path, root: Path) -> list[str]:
    labels_kaggle(images, root)
    (root / "LOC_val_solution.csv").rename(root / "val" / "LOC_val_solution.csv")
    return []


def labels_csv_header(images: Path, root: Path) -> list[str]:
    (root / "val.csv").write_text("file,class\n" + "".join(f"{n},{c}\n" for n, c in val_labels(images)))
    return ["--labels", str(root / "val.csv")]


def labels_csv_stems_no_header(images: Path, root: Path) -> list[str]:
    (root / "val.txt").write_text("".join(f"{Path(n).stem}\t{c}\n" for n, c in reversed(val_labels(images))))
    return ["--labels", f"val={root / 'val.txt'}"]


def labels_devkit(images: Path, root: Path) -> list[str]:
    data = root / "devkit" / "data"
    data.mkdir(parents=True)
    ids = {w: 3 - k for k, w in enumerate(CLASSES)}  # ILSVRC2012_IDs are not the sorted-WNID order
    write_meta_mat(data / "meta.mat", {i: w for w, i in ids.items()})
    rows = dict(val_labels(images))
    lines = [ids[rows[n]] for n in sorted(rows)]  # line i: ILSVRC2012_val_{i:08d}
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in lines))
    return ["--layout", "splits", "--labels", str(data / "ILSVRC2012_validation_ground_truth.txt")]


@pytest.mark.parametrize("write_labels", [labels_kaggle, labels_kaggle_beside, labels_csv_header,
                                          labels_csv_stems_no_header, labels_devkit])
def test_flat_val_with_labels_gives_the_same_shards_as_class_folders(images, root_shards, tmp_path, write_labels):
    root = flat_copy(images, tmp_path / "imagenet")
    extra = write_labels(images, root)
    dst = tmp_path / "in1k"
    assert main([str(root), str(dst), *extra, *ARGS]) == 0
    # Same labels, same keys, same order: the tars are byte-identical to the class-folder layout's.
    assert shard_bytes(dst / "val") == shard_bytes(root_shards / "val")
    assert shard_bytes(dst / "train") == shard_bytes(root_shards / "train")
    assert [s["__key__"] for s in samples(dst / "val")] == [s["__key__"] for s in samples(root_shards / "val")]
    record = json.loads((dst / "val" / MANIFEST_NAME).read_text())["labels"]
    assert record["labelled_images"] == 3 * VAL_PER_CLASS and record["without_image"] == 0
    assert record["format"] == {labels_devkit: "devkit", labels_kaggle: "kaggle",
                                   labels_kaggle_beside: "kaggle"}.get(write_labels, "csv")
    assert not verify_shards(dst)


def test_flat_val_problems_are_reported(images, tmp_path, capsys):
    root = flat_copy(images, tmp_path / "imagenet")
    rows = val_labels(images)
    labels = tmp_path / "labels.csv"
    # A label without its image: sharded, counted, named in the output and the manifest.
    labels.write_text("".join(f"{n},{c}\n" for n, c in rows + [("ILSVRC2012_val_00099999.JPEG", CLASSES[1])]))
    (root / "val" / "notes.txt").write_text("a note, not an image")
    assert main([str(root), str(tmp_path / "a"), "--labels", str(labels), *ARGS]) == 0
    assert "ILSVRC2012_val_00099999.JPEG" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "a" / "val" / MANIFEST_NAME).read_text())
    assert manifest["labels"]["without_image"] == 1 and manifest["num_samples"] == len(rows)
    assert manifest["skipped"] == [{"path": "val/notes.txt", "reason": "no label and not an image file name"}]
    # An image without a label: refused, naming it; nothing written.
    labels.write_text("".join(f"{n},{c}\n" for n, c in rows[1:]))
    assert main([str(root), str(tmp_path / "b"), "--labels", str(labels), *ARGS]) == 2
    assert rows[0][0] in capsys.readouterr().err and not (tmp_path / "b").exists()
    # One image labelled twice with different classes: refused, naming both lines.
    labels.write_text("".join(f"{n},{c}\n" for n, c in rows + [(rows[0][0], CLASSES[2])]))
    assert main([str(root), str(tmp_path / "b"), "--labels", str(labels), *ARGS]) == 2
    assert "twice" in capsys.readouterr().err
    # A class train does not have: refused, naming it and its image count.
    labels.write_text("".join(f"{n},{c}\n" for n, c in rows[1:]) + f"{rows[0][0]},c99_extra\n")
    assert main([str(root), str(tmp_path / "b"), "--labels", str(labels), *ARGS]) == 2
    assert ("names 1 class(es) that are not in the class list (3 classes, train's): c99_extra (1 image)"
            in capsys.readouterr().err)
    # A name without extension that could mean two files: refused, asking for the extension.
    stem = rows[0][0].rsplit(".", 1)[0]
    shutil.copy2(root / "val" / rows[0][0], root / "val" / f"{stem}.png")
    labels.write_text("".join(f"{n},{c}\n" for n, c in rows[1:]) + f"{stem},{rows[0][1]}\n")
    assert main([str(root), str(tmp_path / "b"), "--labels", str(labels), *ARGS]) == 2
    err = capsys.readouterr().err
    assert f"{stem} could be any of {sorted([f'{stem}.png', rows[0][0]])}; write the name with its extension" in err
    (root / "val" / f"{stem}.png").unlink()
    # No labels at all: refused, saying what to pass.
    assert main([str(root), str(tmp_path / "b"), *ARGS]) == 2
    assert "--labels val=FILE" in capsys.readouterr().err


def test_flat_folder_on_its_own_takes_train_classes(images, root_shards, tmp_path, capsys):
    root = flat_copy(images, tmp_path / "imagenet")
    labels_kaggle(images, root)
    shutil.move(root / "LOC_val_solution.csv", root / "val")  # found beside the images
    assert main([str(root / "val"), str(tmp_path / "val"), "--classes", str(root_shards), *ARGS]) == 0
    assert load_manifest(tmp_path / "val").classes == CLASSES
    assert [int(s["cls"]) for s in samples(tmp_path / "val")] == [int(s["cls"]) for s in samples(root_shards / "val")]
    # A labels file that does not fit: exit 2 with the line, never a traceback.
    first = val_labels(images)[0][0]
    for text, words in [(f"{first},{CLASSES[0]},extra\n", "line 1: expected two fields"),
                        (f"{first},{CLASSES[0]}\n{first},{CLASSES[1]}\n", "twice")]:
        (tmp_path / "bad.csv").write_text(text)
        assert main([str(root / "val"), str(tmp_path / "v2"), "--labels", str(tmp_path / "bad.csv"), *ARGS]) == 2
        assert words in capsys.readouterr().err and not (tmp_path / "v2").exists()


# ------------------------------------------------------------------ resume, verify, overwrite per split

def test_resume_verify_and_overwrite_per_split(images, root_shards, tmp_path, capsys):
    dst = tmp_path / "in1k"
    shutil.copytree(root_shards, dst)
    (dst / "val" / MANIFEST_NAME).unlink()  # val interrupted: one shard lost, no manifest
    (dst / "val" / "shard-000001.tar").unlink()
    assert verify_shards(dst) and "val" in capsys.readouterr().err
    with pytest.raises(ShardError, match="unfinished"):
        eval_split_beside(resolve_shards(dst))
    inode = (dst / "train" / "shard-000000.tar").stat().st_ino
    assert main([str(images), str(dst), *ARGS]) == 2  # neither --resume nor --overwrite
    assert main([str(images), str(dst), "--resume", *ARGS]) == 0
    assert (dst / "train" / "shard-000000.tar").stat().st_ino == inode  # train was finished: kept as it was
    for split in ("train", "val"):
        assert shard_bytes(dst / split) == shard_bytes(root_shards / split)
    assert not verify_shards(dst)
    # A plain shard folder and a dataset root's shards never share a DST unless --overwrite says so.
    assert main([str(images / "train"), str(dst), *ARGS]) == 2
    assert "dataset root's shards" in capsys.readouterr().err
    assert main([str(images / "train"), str(dst), "--overwrite", *ARGS]) == 0
    assert not (dst / "train").exists() and load_manifest(dst).num_samples == 3 * TRAIN_PER_CLASS
    assert main([str(images), str(dst), *ARGS]) == 2
    assert main([str(images), str(dst), "--overwrite", *ARGS]) == 0
    assert not (dst / MANIFEST_NAME).exists() and shard_bytes(dst / "val") == shard_bytes(root_shards / "val")


def test_resolution(root_shards, tmp_path):
    assert resolve_shards(root_shards).dir == root_shards / "train"
    assert resolve_shards(root_shards, "eval").dir == root_shards / "val"
    assert resolve_shards(root_shards / "val", "train").dir == root_shards / "val"  # a shard folder is itself
    assert eval_split_beside(resolve_shards(root_shards / "train")).dir == root_shards / "val"
    assert eval_split_beside(resolve_shards(root_shards)).split == "val"
    # Preference val > validation > test; none beside a folder not named like a split.
    other = tmp_path / "root"
    for name in ("train", "test", "validation"):
        shutil.copytree(root_shards / "train", other / name)
    assert eval_split_beside(resolve_shards(other)).split == "validation"
    shutil.rmtree(other / "validation")
    assert eval_split_beside(resolve_shards(other)).split == "test"
    shutil.copytree(root_shards / "train", tmp_path / "plain")
    assert eval_split_beside(resolve_shards(tmp_path / "plain")) is None
    shutil.copytree(root_shards / "val", tmp_path / "only" / "val")
    with pytest.raises(ShardError, match="no train split"):
        resolve_shards(tmp_path / "only")


# ------------------------------------------------------------------ the trainer and eval follow

def test_train_and_knn_from_a_dataset_root_without_val_shards(root_shards, tmp_path, capsys, one_thread):
    from hydra import compose, initialize_config_module

    from pirl_fast.train.loop import train

    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            "experiment=smoke", f"data.shards={root_shards}", "data.backend=torch", "data.workers=0",
            "data.image_size=32", "data.patch_crop_size=30", "data.patch_size=8", "data.batch_size=4",
            "bank.num_negatives=16", "trainer.max_steps=2", "trainer.progress=false", f"run_dir={tmp_path / 'run'}"])
    summary = train(cfg)
    out = capsys.readouterr().out
    assert summary["step"] == 2
    assert f"training on its train split, {root_shards / 'train'} ({3 * TRAIN_PER_CLASS} samples)" in out
    assert ev.main(["knn", str(tmp_path / "run"), "--k", "5", "--workers", "0", "--batch-size", "8"]) == 0
    assert f"validation shards: {root_shards / 'val'}" in capsys.readouterr().out
    knn = json.loads((tmp_path / "run" / "knn.json").read_text())
    assert knn["val_shards"] == str((root_shards / "val").resolve()) and knn["num_val"] == 3 * VAL_PER_CLASS
    assert knn["train_shards"] == str((root_shards / "train").resolve())
    # linear and invariance find the same split.
    assert ev.main(["linear", str(tmp_path / "run"), "--no-augment", "--epochs", "1", "--workers", "0",
                    "--out", str(tmp_path / "lin")]) == 0
    assert json.loads((tmp_path / "lin" / "linear.json").read_text())["num_val"] == 3 * VAL_PER_CLASS
    assert ev.main(["invariance", str(tmp_path / "run"), "--workers", "0", "--out", str(tmp_path / "inv")]) == 0
    invariance = json.loads((tmp_path / "inv" / "invariance.json").read_text())
    assert invariance["shards"] == str((root_shards / "val").resolve()) and invariance["num_images"] == 9
    # --val-shards still wins; with a run whose shards are no split, the error says what to pass.
    assert ev.main(["knn", str(tmp_path / "run"), "--val-shards", str(root_shards / "train"), "--k", "5",
                    "--workers", "0", "--out", str(tmp_path / "x")]) == 0
    assert json.loads((tmp_path / "x" / "knn.json").read_text())["num_val"] == 3 * TRAIN_PER_CLASS
    shutil.copytree(root_shards / "train", tmp_path / "plain")
    with pytest.raises(SystemExit, match="--val-shards is required"):
        ev.main(["knn", str(tmp_path / "run"), "--train-shards", str(tmp_path / "plain"), "--workers", "0"])

"""Semi-supervised fine-tuning (`eval finetune`): class-balanced seeded subsets, the reference's
subset lists matched to shard samples, the DALI subset reader (subset index files) delivering
exactly the chosen samples, and fine-tuning beating the frozen probe."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval import save_checkpoint

from pirl_fast.eval import cli as ev
from pirl_fast.eval import finetune_data as ftd
from pirl_fast.eval.features import ShardImageDataset, eval_transform

pytestmark = pytest.mark.usefixtures("one_thread")


def test_balanced_subset_is_class_balanced_and_seeded():
    labels = np.repeat(np.arange(5), [40, 40, 60, 20, 100])
    a = ftd.balanced_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[a]).tolist() == [4, 4, 6, 2, 10]
    assert np.array_equal(a, ftd.balanced_subset(labels, 0.1, seed=3))
    assert not np.array_equal(a, ftd.balanced_subset(labels, 0.1, seed=4))
    assert np.bincount(labels[ftd.balanced_subset(labels, 0.01, seed=0)]).tolist() == [1] * 5  # at least one
    with pytest.raises(ValueError, match="fraction"):
        ftd.balanced_subset(labels, 1.5, seed=0)


def test_subset_lists_name_shard_samples(tmp_path, sample_image_dir, sample_shards):
    data = ShardImageDataset(sample_shards, eval_transform(32))
    files = sorted(p.relative_to(sample_image_dir).as_posix() for p in sample_image_dir.rglob("*") if p.is_file())
    chosen = files[::7]
    (tmp_path / "list.txt").write_text("\n".join(f"/data/imagenet/train/{f}" for f in chosen) + "\n")
    positions = ftd.subset_from_file(tmp_path / "list.txt", data)
    assert len(positions) == len(chosen)
    want = Counter(data.classes.index(f.split("/")[0]) for f in chosen)
    assert Counter(data.labels[positions].tolist()) == want
    np.save(tmp_path / "list.npy", np.array(chosen))
    assert np.array_equal(ftd.subset_from_file(tmp_path / "list.npy", data), positions)
    assert ftd.relative_path("n01440764_10026.JPEG") == "n01440764/n01440764_10026.JPEG"  # SimCLR's lists
    (tmp_path / "bad.txt").write_text("nope/missing.jpg\n")
    with pytest.raises(ValueError, match="not in"):
        ftd.subset_from_file(tmp_path / "bad.txt", data)


@pytest.mark.skipif(not ftd.dali_available(), reason="needs NVIDIA DALI")
def test_dali_subset_reader_delivers_exactly_the_subset(tmp_path, sample_shards):
    data = ShardImageDataset(sample_shards, eval_transform(32))
    positions = ftd.balanced_subset(data.labels.numpy(), 0.5, seed=1)  # spread over several tars
    val = ftd.build_loader("dali", data, positions, tmp_path / "idx", 32, 5, False, 1, torch.device("cpu"), 0)
    labels = torch.cat([y for _, y in val])
    assert sorted(labels.tolist()) == sorted(data.labels[positions].tolist())
    train = ftd.build_loader("dali", data, positions, tmp_path / "idx2", 32, 5, True, 1, torch.device("cpu"), 0)
    x, y = next(iter(train))
    assert x.shape == (5, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last) and len(train) == 24 // 5


def collapsed_checkpoint(run: Path, shards: Path) -> None:
    """A ResNet-18 whose first BatchNorm has collapsed (scale 0, shift 0.01): every image gives the
    same features, so a frozen probe is at chance, and only training the trunk can do better."""
    path = save_checkpoint(run, "pirl", shards)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["trunk.bn1.weight"].zero_()
    ckpt["model"]["trunk.bn1.bias"].fill_(0.01)
    torch.save(ckpt, path)


def test_finetuning_beats_the_frozen_probe(tmp_path, sample_shards):
    collapsed_checkpoint(tmp_path / "run", sample_shards)
    common = ["--train-shards", str(sample_shards), "--val-shards", str(sample_shards), "--fraction", "1.0",
              "--epochs", "12", "--milestones", "9", "--lr", "0.8", "--ft-batch-size", "8", "--image-size", "32",
              "--workers", "0", "--backend", "torch", "--out", str(tmp_path / "out")]
    assert ev.main(["finetune", str(tmp_path / "run"), *common, "--freeze-trunk"]) == 0
    assert ev.main(["finetune", str(tmp_path / "run"), *common]) == 0
    frozen = json.loads((tmp_path / "out" / "finetune_100pct_frozen.json").read_text())
    tuned = json.loads((tmp_path / "out" / "finetune_100pct.json").read_text())
    assert frozen["top1"] == pytest.approx(0.25)  # constant features: one class for everything
    assert tuned["top1"] >= frozen["top1"] + 0.25, (tuned["top1"], frozen["top1"])
    assert tuned["num_labelled"] == 48 and tuned["schedule"]["effective_lr"] == pytest.approx(0.025)
    assert (tmp_path / "out" / "finetune_100pct.pt").is_file()

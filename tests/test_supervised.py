"""method=supervised: the labelled upper bound of the learning benchmark, trained by the same trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from pirl_fast.eval.features import ShardImageDataset, eval_transform, load_pretrained, random_init
from pirl_fast.shard.format import load_manifest
from pirl_fast.train.config import ConfigError
from pirl_fast.train.loop import train

TINY = ["experiment=smoke", "trainer.progress=false", "trainer.log_every=1", "data.workers=0", "data.backend=torch",
        "data.image_size=32", "data.patch_crop_size=30", "data.patch_size=8", "data.batch_size=8",
        "bank.num_negatives=64", "method=supervised"]

pytestmark = pytest.mark.usefixtures("one_thread")


def config(run_dir, *overrides):
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        return compose("config", overrides=[*TINY, f"run_dir={run_dir}", *overrides])


def test_supervised_learns_the_labels_from_the_same_initial_trunk(tmp_path, sample_shards):
    classes = len(load_manifest(sample_shards).classes)
    cfg = config(tmp_path, f"data.shards={sample_shards}", f"model.num_classes={classes}", "trainer.epochs=5",
                 "trainer.seed=3")
    summary = train(cfg)
    assert summary["step"] == 30  # 5 epochs of 48 images at batch 8
    net = load_pretrained(tmp_path)
    assert net.method == "supervised" and net.model.classifier.out_features == classes
    # The trunk trained away from its start, the untrained network of the same seed (the weights every method
    # starts from: test_same_initial_trunk_as_pirl)
    start = random_init("resnet18", 3, "cpu", {"stem": "imagenet"}).model.trunk.state_dict()
    assert not torch.equal(start["conv1.weight"], net.model.trunk.state_dict()["conv1.weight"])
    # Training accuracy on the shards' own images (eval view) is far above chance after 30 steps (5 epochs):
    data = ShardImageDataset(sample_shards, eval_transform(32))
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        logits = net.model(x)
    acc = (logits.argmax(1) == y).float().mean().item()
    assert acc > 2.0 / classes, f"supervised training accuracy {acc:.2f} is not above chance ({1 / classes:.2f})"
    assert F.cross_entropy(logits, y).item() < torch.log(torch.tensor(float(classes))).item()  # below chance

def test_same_initial_trunk_as_pirl(tmp_path, sample_shards):
    """Step 0 of a supervised run and of a PIRL run of the same seed hold the same trunk."""
    from pirl_fast.runtime import dist
    from pirl_fast.train.config import to_dataclass
    from pirl_fast.train.loop import setup

    classes = len(load_manifest(sample_shards).classes)
    info = dist.DistInfo(rank=0, local_rank=0, world_size=1)
    sup = setup(to_dataclass(config(tmp_path / "s", f"data.shards={sample_shards}", f"model.num_classes={classes}")),
                tmp_path / "s", info)
    pirl = setup(to_dataclass(config(tmp_path / "p", f"data.shards={sample_shards}", "method=pirl")), tmp_path / "p",
                 info)
    for (k, a), (_, b) in zip(sup.module.trunk.state_dict().items(), pirl.module.trunk.state_dict().items()):
        assert torch.equal(a, b), k


def test_wrong_class_count_is_one_line(tmp_path, sample_shards):
    with pytest.raises(ConfigError, match="model.num_classes=3 but the shards .* have 4 classes"):
        train(config(tmp_path, f"data.shards={sample_shards}", "model.num_classes=3"))


def test_synthetic_data_needs_its_class_count(tmp_path):
    with pytest.raises(ConfigError, match="data.backend=synthetic draws labels of 1000 classes"):
        train(config(tmp_path, "data.backend=synthetic", "model.num_classes=10"))

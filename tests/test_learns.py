"""Does pre-training learn? The short version of scripts/learn_check.sh, and the full one (slow).

What a 2-minute CPU run can and cannot show (measured on the 2-core development machine, see the
README's learn-check section): on the generated sample classes a *random* ResNet-18 already gets a
high kNN accuracy (colour palettes survive random convolutions), and PIRL needs a few hundred
steps before its features overtake that baseline. So the short test asserts what holds after ~24
steps: the objective falls from its start towards (and below) the chance level of the InfoNCE
term, and the trained trunk's kNN stays far above chance, i.e. training neither diverged nor
collapsed the representation. The slow test runs the whole learn check: the trained network beats
its own initial weights by >= 5 points of kNN top-1.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from pirl_fast.features import ShardImageDataset, eval_transform, extract, load_pretrained, make_loader, random_init
from pirl_fast.knn import knn_evaluate
from pirl_fast.sample_data import write_sample_folder
from pirl_fast.shard import Options, run_shard
from pirl_fast import dist
from pirl_fast.config import to_dataclass
from pirl_fast.train import setup, train

REPO = Path(__file__).resolve().parents[1]
STEPS = 24  # 8 epochs of the 48 sample images at batch 16
NEGATIVES = 256  # experiment=smoke's K


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> Path:
    images = write_sample_folder(tmp_path_factory.mktemp("learn_val_images"), classes=4, per_class=6, seed=1)
    dst = tmp_path_factory.mktemp("learn_val_shards") / "shards"
    run_shard(Options(src=str(images), dst=str(dst), samples_per_shard=24, max_side=160, seed=0, workers=1))
    return dst


def knn_top1(net, train_dir: Path, val_dir: Path, size: int = 64) -> float:  # 64: experiment=smoke's image_size
    feats = []
    for shards in (train_dir, val_dir):
        loader = make_loader(ShardImageDataset(shards, eval_transform(size)), 24, 0)
        feats.append(extract(net.model.features, loader, "cpu", f"features {shards.name}")[:2])
    (tf, ty), (vf, vy) = feats
    return knn_evaluate(tf, ty, vf, vy, num_classes=4).top1


def test_short_pirl_run_learns_without_collapse(tmp_path, sample_shards, val_shards):
    with initialize_config_module("pirl_fast.conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            "experiment=smoke", f"data.shards={sample_shards}", "data.backend=torch", "data.workers=0",
            "data.batch_size=16", "loss=infonce", "optim.lr=0.03", "optim.reference_batch=16", f"trainer.max_steps={STEPS}",
            f"trainer.epochs={STEPS // 3}", "trainer.log_every=5", "trainer.progress=false", "trainer.ckpt_every=0",
            "trainer.ckpt_epoch_end=false", f"run_dir={tmp_path}"])
    summary = train(cfg)
    assert summary["step"] == STEPS
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    chance = math.log(NEGATIVES + 1)  # InfoNCE when the positive scores like a negative
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses  # the objective went down
    assert losses[-1] < chance + 0.1, (losses, chance)  # and reached (about) chance from far above it
    trained = knn_top1(load_pretrained(tmp_path), sample_shards, val_shards)
    baseline = knn_top1(random_init("resnet18", seed=0), sample_shards, val_shards)  # = the run's initial trunk
    print(f"kNN top-1 after {STEPS} steps: trained {trained:.3f}, random init {baseline:.3f} (chance 0.25)")
    assert trained >= 0.25 + 0.2, (trained, baseline)  # far above chance: no collapse, no divergence


@pytest.mark.parametrize("seed", [0, 3])
def test_random_init_is_the_runs_own_starting_point(tmp_path, sample_shards, seed):
    """`eval knn --random-init` compares against the very weights training starts from."""
    with initialize_config_module("pirl_fast.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", f"data.shards={sample_shards}", "data.backend=torch",
                                           "data.workers=0", f"trainer.seed={seed}", f"run_dir={tmp_path}"])
    run = setup(to_dataclass(cfg), tmp_path, dist.info())  # builds everything, trains nothing
    run.loader.close()
    ours = random_init("resnet18", seed=seed).model.trunk.state_dict()
    theirs = run.module.trunk.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k].float(), theirs[k].float()) for k in theirs)


@pytest.mark.slow
def test_learn_check_beats_random_init(tmp_path):
    """scripts/learn_check.sh end to end (about 10 minutes on 2 idle CPU cores)."""
    env = {**os.environ, "LEARN_DIR": str(tmp_path / "learn_check")}
    result = subprocess.run(["bash", str(REPO / "scripts" / "learn_check.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=3600)
    tail = (result.stdout + result.stderr)[-3000:]
    assert result.returncode == 0, tail
    assert "PASS" in result.stdout, tail
    run = tmp_path / "learn_check" / "run"
    trained = json.loads((run / "knn.json").read_text())["top1"]
    own_init = json.loads((run / "knn_random_init.json").read_text())
    assert own_init["random_init_seed"] == 0  # the run's trainer.seed: the weights it started from
    assert trained >= own_init["top1"] + 0.05, (trained, own_init["top1"])

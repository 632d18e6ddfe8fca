"""The trainer's kNN monitor (pirl_fast/train/knn_monitor.py): its score against a slow loop written from the
weighted-kNN formula of Wu et al. 2018, its lines in metrics.jsonl, weights unchanged by it, the one line
that says it is off, and the same top-1 from two processes as from one.

The shard root holds the session's sample shards (4 classes x 12 images) as train/ and again as val/.
"""

from __future__ import annotations

import io
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from hydra import compose, initialize_config_module
from PIL import Image
from torchvision import transforms as T

from pirl_fast.model.network import PIRLModel
from pirl_fast.shard.format import load_manifest
from pirl_fast.shard.splits import resolve_shards
from pirl_fast.train import knn_monitor
from pirl_fast.train.config import ConfigError, to_dataclass
from pirl_fast.train.loop import run_training

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=smoke", "trainer.progress=false", "trainer.log_every=5", "data.workers=0", "data.backend=torch",
        "data.image_size=32", "data.patch_crop_size=30", "data.patch_size=8", "data.batch_size=4",
        "bank.num_negatives=64"]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def split_root(tmp_path_factory, sample_shards) -> Path:
    root = tmp_path_factory.mktemp("knn_root") / "shards"
    for split in ("train", "val"):
        shutil.copytree(sample_shards, root / split)
    return root


def compose_config(*overrides: str):
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        return compose("config", overrides=[*TINY, *overrides])


def read_shards(shard_dir: Path) -> tuple[list[Image.Image], list[int], list[int]]:
    """Every sample through the webdataset library (not the code under test): images, labels, indices."""
    images, labels, index = [], [], []
    for s in wds.WebDataset(load_manifest(shard_dir).tar_paths(), shardshuffle=False, empty_check=False):
        with Image.open(io.BytesIO(s["jpg"])) as img:
            images.append(img.convert("RGB"))
        labels.append(int.from_bytes(s["lbl"], "little", signed=True))
        index.append(int.from_bytes(s["idx"], "little", signed=True))
    return images, labels, index


def slow_knn_top1(queries: torch.Tensor, query_labels: list[int], keys: torch.Tensor, key_labels: list[int],
                  k: int, tau: float) -> float:
    """Wu et al. 2018, Sec. 3.4, one query at a time: the k most similar keys (cosine), each voting
    exp(sim / tau) for its class; the class with the largest summed vote is the prediction."""
    correct = 0
    for q, y in zip(queries.tolist(), query_labels):
        sims = [sum(a * b for a, b in zip(q, key)) for key in keys.tolist()]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes: dict[int, float] = defaultdict(float)
        for i in nearest:
            votes[key_labels[i]] += math.exp(sims[i] / tau)
        correct += max(votes, key=votes.get) == y
    return correct / len(query_labels)


@pytest.mark.parametrize("k", [1, 5, 200])
def test_score_matches_the_weighted_knn_formula(split_root, k):
    cfg = to_dataclass(compose_config(f"data.shards={split_root}", "data.batch_size=48"))
    shards = resolve_shards(split_root)
    monitor, line = knn_monitor.build(cfg, shards, 48, 0, 1, torch.device("cpu"))
    assert monitor is not None and "the 48 images of" in line and str(split_root / "val") in line
    monitor.k = k
    torch.manual_seed(0)
    model = PIRLModel(cfg.model)  # in train mode, as the trainer leaves it: score must use eval mode and restore it
    # The evaluation view from its rule (resize to 32 * 256/224, centre crop, ImageNet mean/std), applied here.
    view = T.Compose([T.Resize(round(32 * 256 / 224)), T.CenterCrop(32), T.ToTensor(),
                      T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    images, labels, index = read_shards(split_root / "val")
    model.eval()
    with torch.no_grad():
        queries = model.embed_image(torch.stack([view(im) for im in images]))  # (48, D), the shards' order
    model.train()
    # Bank row i = the embedding of training sample i (= val sample i here), plus noise for k > 1 so that the
    # score is neither chance nor 100%; with k = 1 and no noise each query's nearest row is its own.
    rows = torch.empty_like(queries)
    rows[torch.tensor(index)] = queries
    noise = 0.1 if k > 1 else 0.0
    bank = F.normalize(rows + noise * torch.randn(rows.shape, generator=torch.Generator().manual_seed(1)), dim=1)
    bank_labels = [0] * 48
    for i, y in zip(index, labels):
        bank_labels[i] = y
    rng = torch.get_rng_state()
    result = monitor.score(model, bank, torch.device("cpu"), None)
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # mode and RNG as they were
    expected = slow_knn_top1(queries, labels, bank, bank_labels, k, 0.07)
    assert result["knn_top1"] == pytest.approx(expected, abs=1e-9), (k, result, expected)
    if k == 1:  # labels are read by sample index, not in the shards' order
        assert result["knn_top1"] == 1.0


def test_knn_top1_is_logged_and_leaves_training_unchanged(split_root, tmp_path, capsys):
    """18 steps of 12 per epoch: scored at the end of epoch 1 (step 12) and at the end of training (step 18);
    the weights and the bank are the same bit for bit as without the monitor (torch loader with
    data.workers=0: its augmentations draw from the global RNG the monitor must leave alone)."""
    common = [f"data.shards={split_root}", "trainer.epochs=2", "trainer.max_steps=18"]
    run_on, summary = run_training(compose_config(*common, "trainer.knn_every=1", f"run_dir={tmp_path / 'on'}"))
    out = capsys.readouterr().out
    run_off, _ = run_training(compose_config(*common, "trainer.knn_every=0", f"run_dir={tmp_path / 'off'}"))
    assert "kNN monitor: every 1 epoch(s)" in out and "knn top-1 " in out
    lines = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in lines if "knn_top1" in r]
    assert [r["step"] for r in scored] == [12, 18]
    assert all(0 <= r["knn_top1"] <= 1 and r["knn_time_s"] > 0 and math.isfinite(r["loss"]) for r in scored)
    assert summary["knn_top1"] == scored[-1]["knn_top1"]
    assert [r["step"] for r in lines if "knn_top1" not in r] == [5, 10, 15]  # log_every=5 as before
    off = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in off] == [5, 10, 15, 18] and not any("knn_top1" in r for r in off)
    on_state, off_state = run_on.module.state_dict(), run_off.module.state_dict()
    for name in on_state:
        assert torch.equal(on_state[name], off_state[name]), name
    assert torch.equal(run_on.bank.bank, run_off.bank.bank)


def test_off_without_labels_or_validation_split_said_once(sample_shards, tmp_path, capsys):
    run_training(compose_config(f"data.shards={sample_shards}", "trainer.max_steps=1", f"run_dir={tmp_path / 'a'}"))
    out = capsys.readouterr().out
    assert out.count("kNN monitor off") == 1 and "no val, validation or test split beside" in out
    run_training(compose_config("data.backend=synthetic", "trainer.max_steps=1", f"run_dir={tmp_path / 'b'}"))
    out = capsys.readouterr().out
    assert out.count("kNN monitor off") == 1 and "data.backend=synthetic has no labels" in out
    run_training(compose_config("data.backend=synthetic", "trainer.max_steps=1", "trainer.knn_every=0",
                                f"run_dir={tmp_path / 'c'}"))
    assert "kNN" not in capsys.readouterr().out  # asked off: nothing to say
    for run in "abc":
        assert not any("knn_top1" in line for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(ConfigError, match="trainer.knn_every=-1 must be >= 0"):
        run_training(compose_config("data.backend=synthetic", "trainer.knn_every=-1", f"run_dir={tmp_path / 'd'}"))


def test_two_processes_score_the_same_top1_as_one(split_root, tmp_path, monkeypatch):
    """gloo, 2 ranks: each embeds half of the validation split; one all-reduce of the counts gives the
    one-process figure (the same worker, run in this process) exactly."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    worker = str(REPO / "tests" / "knn_monitor_worker.py")
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", worker, str(two), str(split_root)],
                            cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    monkeypatch.setattr(sys, "argv", [worker, str(one), str(split_root)])
    runpy.run_path(worker, run_name="__main__")
    single = json.loads((one / "rank0.json").read_text())
    r0, r1 = (json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1))
    assert single["embedded"] == 48 and r0["embedded"] == r1["embedded"] == 24
    assert r0["knn_top1"] == r1["knn_top1"] == single["knn_top1"]
    assert 0 < single["knn_top1"] < 1  # the noisy bank: a figure that would show a rank's count missing

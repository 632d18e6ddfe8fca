"""Evaluation (pirl_fast.eval, features, linear_probe, invariance) on tiny checkpoints: export round
trip, the shard reader against webdataset, kNN end to end against a one-image-at-a-time
recomputation, per-stage features against forward hooks, the probes, and the invariance numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image
from test_knn import slow_knn_scores

from pirl_fast.eval import cli as ev
from pirl_fast.eval import finetune_data as ftd
from pirl_fast.eval import invariance as inv
from pirl_fast.eval import linear_probe as lp
from pirl_fast.eval.features import ShardImageDataset, eval_transform, load_pretrained, make_loader
from pirl_fast.model.batchnorm import reestimate_running_stats
from pirl_fast.model.jigsaw import JigsawModel
from pirl_fast.model.network import ModelConfig, PIRLModel
from pirl_fast.shard.cli import Options, run_shard
from pirl_fast.shard.format import load_manifest
from pirl_fast.shard.sample_data import write_sample_folder

MODEL = {"arch": "resnet18", "embed_dim": 16, "num_patches": 9}
DATA = {"image_size": 48, "patch_crop_size": 63, "grid": 3, "patch_size": 16, "num_permutations": 6}


def save_checkpoint(run_dir: Path, method: str, shards: Path, seed: int = 0) -> Path:
    """A checkpoint as the trainer writes it (model state + resolved config YAML), with non-trivial
    BatchNorm statistics so that eval-mode features depend on every buffer."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**MODEL)
    model = PIRLModel(cfg) if method == "pirl" else JigsawModel(cfg, DATA["num_permutations"])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    config = {"method": method, "model": MODEL, "data": {**DATA, "shards": str(shards)}}
    path = run_dir / "checkpoints" / "step_000000007.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config_yaml": OmegaConf.to_yaml(OmegaConf.create(config)), "step": 7},
               path)
    return path


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> Path:
    images = write_sample_folder(tmp_path_factory.mktemp("val_images"), classes=4, per_class=4, seed=1)
    dst = tmp_path_factory.mktemp("val_shards") / "shards"
    run_shard(Options(src=str(images), dst=str(dst), samples_per_shard=10, max_side=160, seed=0, workers=1))
    return dst


@pytest.fixture(scope="module")
def pirl_run(tmp_path_factory, sample_shards) -> Path:
    run = tmp_path_factory.mktemp("pirl_run")
    save_checkpoint(run, "pirl", sample_shards)
    return run


def read_with_webdataset(shard_dir: Path) -> dict[int, tuple[np.ndarray, int]]:
    """Every sample via the webdataset library (an independent reader): {global index: (RGB array, label)}."""
    out = {}
    for sample in wds.WebDataset(load_manifest(shard_dir).tar_paths(), shardshuffle=False, empty_check=False):
        index = int.from_bytes(sample["idx"], "little", signed=True)
        with Image.open(__import__("io").BytesIO(sample["jpg"])) as img:
            out[index] = (np.asarray(img.convert("RGB")), int.from_bytes(sample["lbl"], "little", signed=True))
    return out


def test_export_round_trip_gives_identical_features(tmp_path, sample_shards, capsys):
    ckpt = save_checkpoint(tmp_path / "run", "pirl", sample_shards)
    assert ev.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    assert "trunk_resnet18.pth" in capsys.readouterr().out
    trunk = torch.load(tmp_path / "export" / "trunk_resnet18.pth", weights_only=True)
    plain = torchvision.models.resnet18()
    missing, unexpected = plain.load_state_dict(trunk, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    plain.fc = torch.nn.Identity()
    plain.load_state_dict(trunk, strict=True)
    model = load_pretrained(ckpt).model
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        # Same weights and the same memory layout (evaluation on the CPU runs plain NCHW): bit for bit equal.
        plain = plain.eval()
        torch.testing.assert_close(plain(x), model.features(x), rtol=0, atol=0)
        plain = plain.to(memory_format=torch.channels_last)  # any layout: equal to rounding
        torch.testing.assert_close(plain(x.contiguous(memory_format=torch.channels_last)), model.features(x),
                                   rtol=1e-4, atol=1e-5)
    heads = torch.load(tmp_path / "export" / "heads.pth", weights_only=True)
    assert heads["method"] == "pirl"
    assert set(heads["state_dict"]) == {f"{h}.{p}" for h in ("image_head", "patch_head", "jigsaw_head")
                                        for p in ("weight", "bias")}
    torch.testing.assert_close(heads["state_dict"]["jigsaw_head.weight"], model.jigsaw_head.weight)


def test_export_small_stem(tmp_path, sample_shards, capsys, monkeypatch):
    """A stem=small trunk exports to torchvision with conv1/maxpool swapped as the printed recipe says."""
    monkeypatch.setitem(MODEL, "stem", "small")
    ckpt = save_checkpoint(tmp_path / "run", "pirl", sample_shards)
    assert ev.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    assert "m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); m.maxpool = torch.nn.Identity()" in \
        capsys.readouterr().out
    plain = torchvision.models.resnet18()
    plain.conv1, plain.maxpool, plain.fc = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity(), \
        torch.nn.Identity()
    plain.load_state_dict(torch.load(tmp_path / "export" / "trunk_resnet18.pth", weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), load_pretrained(ckpt).model.features(x), rtol=0, atol=0)


def test_a_corrupt_newest_checkpoint_falls_back_like_the_trainer(tmp_path, sample_shards, capsys):
    """eval on a run dir whose newest checkpoint is truncated: the previous one, with the trainer's
    warning (checkpoint.load_latest serves both); given the corrupt file itself, a clear refusal."""
    good = save_checkpoint(tmp_path / "run", "pirl", sample_shards)
    newest = good.with_name("step_000000009.pt")
    newest.write_bytes(good.read_bytes()[:1000])  # killed mid-copy, or a damaged disk
    with pytest.warns(RuntimeWarning, match=r"step_000000009.pt is unreadable .*falling back to the previous one"):
        assert ev.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    assert load_pretrained(tmp_path / "run").path == good
    with pytest.raises(ValueError, match="cannot read checkpoint .*step_000000009.pt"):
        ev.main(["export", str(newest), "--out", str(tmp_path / "export2")])


def test_shard_reader_matches_webdataset(sample_shards):
    ds = ShardImageDataset(sample_shards, transform=np.asarray)
    reference = read_with_webdataset(sample_shards)
    assert len(ds) == len(reference) == load_manifest(sample_shards).num_samples
    for i in range(len(ds)):
        pixels, label, index = ds[i]
        assert index == i  # global-index order
        np.testing.assert_array_equal(pixels, reference[index][0])
        assert label == reference[index][1]
    assert ShardImageDataset(sample_shards, np.asarray, limit=5).labels.tolist() == ds.labels[:5].tolist()


def test_knn_cli_matches_one_image_at_a_time(pirl_run, sample_shards, val_shards):
    assert ev.main(["knn", str(pirl_run), "--val-shards", str(val_shards), "--k", "10", "--batch-size", "7",
                    "--workers", "0", "--device", "cpu"]) == 0
    got = json.loads((pirl_run / "knn.json").read_text())
    # Independent path: webdataset reader, one image at a time, the formula's slow loop.
    model = load_pretrained(pirl_run).model
    tf = eval_transform(DATA["image_size"])

    def feats(shards):
        samples = read_with_webdataset(shards)
        with torch.no_grad():  # one batch of everything: independent of the CLI's batching
            f = model.features(torch.stack([tf(Image.fromarray(samples[i][0])) for i in sorted(samples)]))
        return f, torch.tensor([samples[i][1] for i in sorted(samples)])

    (tf_, ty), (vf, vy) = feats(sample_shards), feats(val_shards)
    scores = slow_knn_scores(tf_, ty, vf, 4, k=10, temperature=0.07)
    ranked = scores.argsort(dim=1, descending=True)
    assert got["top1"] == pytest.approx((ranked[:, 0] == vy).double().mean().item(), abs=1e-9)
    assert got["top5"] == 1.0  # 4 classes: every label is within the top 4
    assert (got["num_train"], got["num_val"], got["k"], got["method"]) == (48, 16, 10, "pirl")


def test_knn_random_init_writes_its_own_json(pirl_run, val_shards):
    """The run's own initial weights (seed = its trainer.seed, 0 here) -> knn_random_init.json; another
    seed -> knn_random_init_seed1.json, leaving the first alone."""
    common = ["knn", str(pirl_run), "--val-shards", str(val_shards), "--random-init", "--workers", "0"]
    assert ev.main(common) == 0
    got = json.loads((pirl_run / "knn_random_init.json").read_text())
    assert got["method"] == "random-init" and got["arch"] == "resnet18" and 0 <= got["top1"] <= 1
    assert got["random_init_seed"] == 0
    assert ev.main([*common, "--seed", "1"]) == 0
    assert json.loads((pirl_run / "knn_random_init.json").read_text()) == got
    assert json.loads((pirl_run / "knn_random_init_seed1.json").read_text())["random_init_seed"] == 1


@pytest.mark.parametrize("command, seed, random_init, trainer_seed, name", [
    ("knn", None, False, 0, "knn"), ("knn", 3, False, 0, "knn"),  # a trained network's kNN has no seed
    ("knn", None, True, 5, "knn_random_init"), ("knn", 5, True, 5, "knn_random_init"),
    ("knn", 0, True, 5, "knn_random_init_seed0"), ("linear", None, False, 5, "linear"),
    ("linear", 2, False, 5, "linear_seed2"), ("linear", 2, True, 0, "linear_random_init_seed2"),
    ("svm", 1, False, 0, "svm_seed1"), ("finetune_1pct", 4, False, 0, "finetune_1pct_seed4"),
    ("invariance", 7, True, 0, "invariance_seed7")])
def test_results_of_other_seeds_get_their_own_names(command, seed, random_init, trainer_seed, name):
    """Every command with --seed: a seed other than its default goes into the file name."""
    import argparse

    args = argparse.Namespace(seed=seed, random_init=random_init)
    net = None if command == "invariance" else argparse.Namespace(config={"trainer": {"seed": trainer_seed}})
    assert ev.result_stem(command, args, net, seeded=not (command == "knn" and not random_init)) == name


def test_knn_and_linear_with_reestimated_bn(pirl_run, val_shards, monkeypatch):
    """--reestimate-bn re-estimates the BN statistics on the training images (all of them, in the
    evaluation view) before extracting features, and says so in its own JSON."""
    seen = []

    def spy(model, forward, images, device):
        batches = list(images)
        seen.append(sum(len(x) for x in batches))
        return reestimate_running_stats(model, forward, batches, device)

    monkeypatch.setattr(ev, "reestimate_running_stats", spy)
    common = ["--val-shards", str(val_shards), "--workers", "0", "--reestimate-bn"]
    assert ev.main(["knn", str(pirl_run), *common]) == 0
    assert ev.main(["knn", str(pirl_run), *common, "--random-init"]) == 0
    assert ev.main(["linear", str(pirl_run), *common, "--no-augment", "--epochs", "2"]) == 0
    assert seen == [48, 48, 48]  # the 48 sample training images, once per command
    for name in ("knn_bn.json", "knn_random_init_bn.json", "linear_bn.json"):
        assert json.loads((pirl_run / name).read_text())["bn_reestimated"] is True


def test_stage_features_match_forward_hooks():
    torch.manual_seed(0)
    model = PIRLModel(ModelConfig(**MODEL)).eval()
    trunk, captured = model.trunk, {}
    trunk.maxpool.register_forward_hook(lambda m, i, o: captured.__setitem__("conv1", i[0]))
    for name, layer in zip(lp.STAGES[1:], (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)):
        layer.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        res5 = model.features(x)  # the ordinary forward fills `captured`
    ours = lp.stage_features(trunk, x)
    for stage in lp.STAGES:
        torch.testing.assert_close(ours[stage], captured[stage].mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["res5"], res5, rtol=1e-5, atol=1e-6)
    assert lp.stage_widths(trunk) == {k: v.shape[1] for k, v in ours.items()} == \
        {"conv1": 64, "res2": 64, "res3": 128, "res4": 256, "res5": 512}
    r50 = torchvision.models.resnet50()
    assert list(lp.stage_widths(r50).values()) == [64, 256, 512, 1024, 2048]


def test_probe_accuracy_counts_and_schedule():
    g = torch.Generator().manual_seed(0)
    probes = lp.StageProbes({s: 8 for s in lp.STAGES}, num_classes=6)
    feats = {s: torch.randn(30, 8, generator=g) for s in lp.STAGES}
    labels = torch.randint(0, 6, (30,), generator=g)
    got = lp.evaluate_probes(probes, lp.cached_batches(feats, labels, 7, False, 0), "cpu")
    with torch.no_grad():
        for s in lp.STAGES:
            logits = probes.heads[s](feats[s])
            top1 = sum(int(logits[i].argmax() == labels[i]) for i in range(30)) / 30
            top5 = sum(int(labels[i] in logits[i].topk(5).indices) for i in range(30)) / 30
            assert got[s] == {"top1": pytest.approx(top1), "top5": pytest.approx(top5)}
    cfg = lp.ProbeConfig(epochs=28, lr=0.5)
    assert [lp.lr_at(e / 28, cfg) for e in (0, 7, 8, 16, 24, 27)] == pytest.approx([0.5, 0.5, 0.05, 5e-3, 5e-4, 5e-4])


@pytest.mark.parametrize("protocol", ["goyal", "gap"])
def test_linear_cli_fits_separable_training_set(pirl_run, sample_shards, protocol):
    out = pirl_run / f"linear_fit_{protocol}"
    # val = train: 48 points in 512+ dims are linearly separable, so a working probe must fit them.
    # lr 3.2 per 256 images at batch 8 is 0.1 per step.
    assert ev.main(["linear", str(pirl_run), "--val-shards", str(sample_shards), "--no-augment", "--epochs", "30",
                    "--lr", "3.2", "--probe-batch-size", "8", "--weight-decay", "0", "--workers", "0",
                    "--protocol", protocol, "--out", str(out)]) == 0
    got = json.loads((out / "linear.json").read_text())
    heads = lp.GOYAL_HEADS if protocol == "goyal" else lp.STAGES
    assert list(got["stages"]) == list(heads)
    assert got["stages"]["res5"]["top1"] >= 0.9, got["stages"]
    assert got["loss_per_epoch"][-1] < got["loss_per_epoch"][0]
    assert got["protocol"]["augment"] is False and got["num_train"] == 48
    assert got["protocol"]["protocol"] == protocol and got["protocol"]["effective_lr"] == pytest.approx(0.1)
    if protocol == "goyal":  # resnet18 at 48 px: adaptive pooling to the reference's grids
        assert got["head_in_features"] == {"conv1": 64 * 144, "res2": 64 * 36, "res3": 128 * 16, "res4": 256 * 9,
                                           "res5": 512 * 4, "res5avg": 512, "res5avg_fc": 512}


def test_linear_cli_augmented_path_runs(pirl_run, val_shards):
    out = pirl_run / "linear_aug"
    assert ev.main(["linear", str(pirl_run), "--val-shards", str(val_shards), "--epochs", "1", "--workers", "0",
                    "--probe-batch-size", "16", "--out", str(out)]) == 0
    got = json.loads((out / "linear.json").read_text())
    assert got["protocol"]["augment"] is True and len(got["loss_per_epoch"]) == 1
    assert got["protocol"]["protocol"] == "goyal" and got["protocol"]["nesterov"] is True
    assert got["train_loader"] == ("DaliClassifyLoader" if ftd.dali_available() else "TorchClassifyLoader")
    assert all(0 <= got["stages"][s]["top1"] <= 1 for s in lp.GOYAL_HEADS)


# ---- invariance ---------------------------------------------------------------------------------

def test_cells_split_join_and_permutation_semantics():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    cells = inv.split_cells(x, 3)  # (2, 9, 3, 2, 2)
    torch.testing.assert_close(cells[1, 5], x[1, :, 2:4, 4:6])  # cell 5 = row 1, column 2
    torch.testing.assert_close(inv.join_cells(cells, 3), x)
    perm = torch.tensor([[8, 7, 6, 5, 4, 3, 2, 1, 0], [1, 0, 2, 3, 4, 5, 6, 7, 8]])
    shuffled = inv.join_cells(inv.apply_perm(cells, perm), 3)
    torch.testing.assert_close(shuffled[0, :, 0:2, 0:2], x[0, :, 4:6, 4:6])  # position 0 shows cell 8
    torch.testing.assert_close(shuffled[1, :, 0:2, 2:4], x[1, :, 0:2, 0:2])  # position 1 shows cell 0
    perms = inv.non_identity_permutations(500, 9, torch.Generator().manual_seed(0))
    assert (perms.sort(dim=1).values == torch.arange(9)).all()
    assert not (perms == torch.arange(9)).all(dim=1).any()


class PooledColour(torch.nn.Module):
    """A 'trunk' with a known answer: the mean colour is invariant to shuffling cells; the mean
    colour of the top third is not."""

    def __init__(self, top_third: bool):
        super().__init__()
        self.top_third = top_third

    def features(self, x):
        x = x[:, :, : x.shape[2] // 3] if self.top_third else x
        return x.mean(dim=(2, 3)) + 3.0  # offset: keep the vector away from the origin


def test_invariance_known_answers(sample_shards):
    views = inv.ViewConfig(48, 63, 3, 16)
    loader = make_loader(ShardImageDataset(sample_shards, inv.InvarianceViews(views), limit=12), 5, 0)
    invariant = inv.invariance_distances(PooledColour(False), "jigsaw", loader, 3, "cpu")
    assert set(invariant) == {"trunk", "trunk_other"} and invariant["trunk"].shape == (12,)
    assert invariant["trunk"].max() < 1e-5
    assert invariant["trunk_other"].mean() > 1e-3  # other images have other mean colours
    summary = {m: inv.summarise(d) for m, d in invariant.items()}
    assert inv.gaps(summary) == {"trunk": pytest.approx(invariant["trunk_other"].mean().item()
                                                        - invariant["trunk"].mean().item())}
    sensitive = inv.invariance_distances(PooledColour(True), "jigsaw", loader, 3, "cpu")
    assert sensitive["trunk"].mean() > 1e-3
    same = inv.invariance_distances(PooledColour(True), "jigsaw", loader, 3, "cpu", identity=True)
    assert same["trunk"].max() < 1e-5


def test_pirl_head_distance_matches_direct_computation(pirl_run, sample_shards):
    net = load_pretrained(pirl_run)
    views = inv.ViewConfig(48, 63, 3, 16)
    dataset = ShardImageDataset(sample_shards, inv.InvarianceViews(views), limit=4)
    got = inv.invariance_distances(net.model, "pirl", make_loader(dataset, 4, 0), 3, "cpu", seed=3)
    perms = inv.non_identity_permutations(4, 9, torch.Generator().manual_seed(3))  # the same draw
    fs, gs = [], []
    with torch.no_grad():
        for i in range(4):
            (image, patches, _), _, _ = dataset[i]
            fs.append(net.model.embed_image(image[None])[0])
            gs.append(net.model.embed_patches(torch.stack([patches[int(c)] for c in perms[i]]))[0])
    for i in range(4):
        assert got["pirl_head"][i].item() == pytest.approx((fs[i] - gs[i]).norm().item(), abs=1e-5)
        # "other": image i against the previous image's shuffled patches (the batch rolled by one)
        assert got["pirl_head_other"][i].item() == pytest.approx((fs[i] - gs[i - 1]).norm().item(), abs=1e-5)
    with torch.no_grad():  # "trunk_other": crop i against the previous image's shuffled crop
        crops = torch.stack([dataset[i][0][2] for i in range(4)])
        shuffled = inv.join_cells(inv.apply_perm(inv.split_cells(crops, 3), perms), 3)
        own, other = net.model.features(crops), net.model.features(shuffled)
    for i in range(4):
        expected = (F.normalize(own[i], dim=0) - F.normalize(other[i - 1], dim=0)).norm().item()
        assert got["trunk_other"][i].item() == pytest.approx(expected, abs=1e-5)
    assert ((got["pirl_head"] >= 0) & (got["pirl_head"] <= 2)).all()


def test_invariance_cli_two_checkpoints(tmp_path, pirl_run, sample_shards, val_shards):
    jig = save_checkpoint(tmp_path / "jigsaw_run", "jigsaw", sample_shards, seed=1)
    out = tmp_path / "inv"
    assert ev.main(["invariance", str(pirl_run), str(jig), "--shards", str(val_shards), "--labels", "PIRL",
                    "Jigsaw", "--random-init", "--workers", "0", "--out", str(out)]) == 0
    got = json.loads((out / "invariance.json").read_text())
    assert list(got["checkpoints"]) == ["PIRL", "Jigsaw", "random-init"]
    assert "pirl_head" in got["checkpoints"]["PIRL"] and "pirl_head" not in got["checkpoints"]["Jigsaw"]
    for entry in got["checkpoints"].values():
        assert 0 <= entry["trunk"]["mean"] <= 2 and entry["trunk"]["n"] == 16
    with Image.open(out / "invariance.png") as png:
        assert png.format == "PNG"


def test_clear_errors(tmp_path, val_shards, capsys):
    assert ev.main(["knn", str(tmp_path), "--val-shards", str(val_shards)]) == 2  # one line, no traceback
    assert capsys.readouterr().err.startswith(f"error: no checkpoint (checkpoints/step_*.pt) under {tmp_path}")
    assert ev.main(["knn", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint {tmp_path / 'nope'} does not exist: pass a " \
                                               "checkpoint file or a run directory"
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ValueError, match="not a pirl_fast training checkpoint"):
        ev.main(["export", str(bad)])
    with pytest.raises(SystemExit, match="--arch"):
        ev.main(["knn", "--random-init", "--val-shards", str(val_shards)])


def test_reestimated_bn_statistics_are_the_batch_averages():
    from pirl_fast.model.batchnorm import reestimate_running_stats

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    batches = [torch.randn(5, 3, 8, 8) * (i + 1) + i for i in range(3)]
    copy = reestimate_running_stats(net, lambda m, x: m(x), batches, "cpu")
    with torch.no_grad():
        outs = [net[0](x) for x in batches]
    mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(copy[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(copy[1].running_var, var, rtol=1e-5, atol=1e-5)
    assert not copy.training and torch.equal(net[1].running_mean, torch.zeros(4))  # the original is untouched


@pytest.mark.parametrize("argv", [[], ["export"], ["knn"], ["linear"], ["svm"], ["finetune"], ["invariance"],
                                  ["import-vissl"]])
def test_every_command_prints_its_help(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        ev.main([*argv, "--help"])
    assert stop.value.code == 0 and "usage: python -m pirl_fast.eval" in capsys.readouterr().out

"""The Jigsaw pretext baseline (pirl_fast.model.jigsaw): shapes, order sensitivity, the loss against its
formula, clear errors, and that the model can learn the task on a tiny set."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pirl_fast.data.permutations import max_hamming_permutations
from pirl_fast.model.jigsaw import JigsawLoss, JigsawModel, jigsaw_accuracy
from pirl_fast.model.network import ModelConfig

CFG = ModelConfig(arch="resnet18", embed_dim=16)


def shuffled_patches(cells: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """cells (B, 9, 3, h, w) in grid order, perms (B, 9) -> (B*9, 3, h, w), position j shows cell perms[b, j]."""
    b = torch.arange(cells.shape[0])[:, None]
    return cells[b, perms].flatten(0, 1)


def test_forward_shapes_and_trunk_keys():
    torch.manual_seed(0)
    model = JigsawModel(CFG, num_permutations=7).eval()
    patches = torch.randn(2 * 9, 3, 32, 32)
    logits = model(patches)
    assert logits.shape == (2, 7) and logits.dtype == torch.float32
    assert model.features(torch.randn(3, 3, 40, 40)).shape == (3, 512)
    # The trunk's keys are torchvision's minus fc, so it exports like PIRL's.
    import torchvision
    expected = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert set(model.trunk.state_dict()) == expected


def test_logits_depend_on_patch_order():
    torch.manual_seed(0)
    model = JigsawModel(CFG, num_permutations=5).eval()
    cells = torch.randn(1, 9, 3, 32, 32)
    identity = torch.arange(9)[None]
    swapped = torch.tensor([[1, 0, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        a, b = model(shuffled_patches(cells, identity)), model(shuffled_patches(cells, swapped))
    assert not torch.allclose(a, b, atol=1e-5)  # the order is the signal, unlike PIRL's g


def test_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g)
    target = torch.randint(0, 10, (6,), generator=g)
    expected = -sum(logits[i, target[i]] - math.log(sum(math.exp(v) for v in logits[i].tolist()))
                    for i in range(6)) / 6
    assert JigsawLoss()(logits, target).item() == pytest.approx(float(expected), rel=1e-5)
    assert jigsaw_accuracy(logits, logits.argmax(1)) == 1.0
    terms = JigsawLoss().terms(logits, target)  # the trainer's LossTerms shape
    assert terms.total.item() == terms.jigsaw.item() == pytest.approx(float(expected), rel=1e-5)
    assert terms.image.item() == 0.0


def test_clear_errors():
    with pytest.raises(ValueError, match="data.num_permutations"):
        JigsawModel(CFG, num_permutations=0)
    with pytest.raises(ValueError, match="data.num_permutations=P > 0"):
        JigsawLoss()(torch.randn(2, 4), torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="disagree"):
        JigsawLoss()(torch.randn(2, 4), torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="multiple of num_patches"):
        JigsawModel(CFG, num_permutations=3)(torch.randn(10, 3, 32, 32))


def test_learns_to_tell_permutations_apart():
    """A few SGD steps on a fixed tiny set drive the loss well below chance (ln P)."""
    torch.manual_seed(0)
    P, B = 4, 8
    perm_set = max_hamming_permutations(P, seed=0)  # (P, 9)
    # Each cell a distinct flat colour plus noise: the net must see which colour sits where.
    colours = torch.rand(9, 3, 1, 1)
    cells = (colours[None] + 0.1 * torch.randn(B, 9, 3, 8, 8)).clamp(0, 1)  # (B, 9, 3, 8, 8)
    perm_id = torch.arange(B) % P
    patches = shuffled_patches(cells, perm_set[perm_id])
    # NCHW weights: on the CPU channels-last convolutions are ~10x slower at these tiny sizes.
    model = JigsawModel(CFG, num_permutations=P).to(memory_format=torch.contiguous_format)
    criterion = JigsawLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(20):
        loss = criterion(model(patches), perm_id)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # train mode: BN uses this batch's statistics, as during the steps above
        logits = model(patches)
    final = criterion(logits, perm_id).item()
    assert first == pytest.approx(math.log(P), abs=0.5)  # starts near chance
    assert final < 0.5 * math.log(P), (first, final)
    assert jigsaw_accuracy(logits, perm_id) == 1.0


# ---- the trainer's method=jigsaw ---------------------------------------------------------------

def jigsaw_config(run_dir, *overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        return compose("config", overrides=[
            "experiment=smoke", "method=jigsaw", "data.backend=synthetic", "data.synthetic_samples=16",
            "data.batch_size=4", "data.image_size=32", "data.patch_crop_size=30", "data.patch_size=8",
            "data.num_permutations=4", "trainer.max_steps=2", "trainer.progress=false", f"run_dir={run_dir}",
            *overrides])


def test_trainer_method_jigsaw_trains_and_evaluates(tmp_path):
    from pirl_fast.eval.features import load_pretrained
    from pirl_fast.train.loop import train

    summary = train(jigsaw_config(tmp_path))
    assert summary["step"] == 2
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(4), abs=1.0)  # cross-entropy over 4 permutations, near chance
    net = load_pretrained(tmp_path)  # the checkpoint rebuilds as a JigsawModel
    assert net.method == "jigsaw" and isinstance(net.model, JigsawModel) and net.model.num_permutations == 4


def test_trainer_method_jigsaw_needs_a_permutation_set(tmp_path):
    from pirl_fast.train.config import ConfigError
    from pirl_fast.train.loop import train

    with pytest.raises(ConfigError, match="data.num_permutations"):
        train(jigsaw_config(tmp_path, "data.num_permutations=0"))


def test_reference_head_has_the_reference_shapes():
    # jigsaw_8gpu_resnet.yaml: mlp [2048, 1000] + BN + ReLU per patch, concat of 9 -> 9000, mlp [9000, 2000]
    with torch.device("meta"):  # shapes only: a ResNet-50 and a 9000 x 2000 Linear, no memory
        model = JigsawModel(ModelConfig(arch="resnet50", jigsaw_head="reference"), num_permutations=2000)
    linear, bn, relu = model.patch_head
    assert (linear.in_features, linear.out_features, bn.num_features) == (2048, 1000, 1000)
    assert isinstance(relu, torch.nn.ReLU)
    assert (model.classifier.in_features, model.classifier.out_features) == (9000, 2000)
    small = JigsawModel(ModelConfig(arch="resnet18", jigsaw_head="reference"), num_permutations=5).eval()
    assert small(torch.randn(18, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="light, reference"):
        JigsawModel(ModelConfig(arch="resnet18", jigsaw_head="mlp"), num_permutations=5)


def test_trainer_trains_the_reference_head_with_a_multistep_schedule(tmp_path):
    from pirl_fast.train.loop import train

    summary = train(jigsaw_config(tmp_path, "model.jigsaw_head=reference", "optim.schedule=multistep",
                                  "optim.milestones=[1]", "trainer.epochs=2"))
    assert summary["step"] == 2
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) >= 1 and all(math.isfinite(x) for x in lrs)

"""The LR schedule (a pure function of the step) and the optimiser's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pirl_fast.train.optim import OptimConfig, build_optimizer, param_groups
from pirl_fast.train.schedule import LRSchedule, lr_at, scaled_lr


def test_cosine_runs_from_peak_to_final_through_the_midpoint():
    s = LRSchedule(peak_lr=0.12, final_lr=0.00012, total_steps=101)
    assert lr_at(0, s) == pytest.approx(0.12)
    assert lr_at(50, s) == pytest.approx((0.12 + 0.00012) / 2)  # cos(pi/2) = 0: halfway between
    assert lr_at(100, s) == pytest.approx(0.00012)
    assert lr_at(10_000, s) == pytest.approx(0.00012)  # past the end it stays at the floor
    lrs = [lr_at(i, s) for i in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never increases
    # a quarter of the way: peak - (peak - final) * (1 - cos(pi/4)) / 2
    assert lr_at(25, s) == pytest.approx(0.00012 + (0.12 - 0.00012) * 0.5 * (1 + math.cos(math.pi / 4)))


def test_warmup_is_linear_then_the_cosine_starts_at_the_peak():
    s = LRSchedule(peak_lr=1.0, final_lr=0.0, total_steps=20, warmup_steps=4)
    assert [lr_at(i, s) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4, s) == pytest.approx(1.0)
    assert lr_at(19, s) == pytest.approx(0.0)


def test_schedule_is_a_pure_function_of_the_step():
    s = LRSchedule(peak_lr=0.5, final_lr=0.001, total_steps=37, warmup_steps=3)
    forwards = [lr_at(i, s) for i in range(37)]
    backwards = [lr_at(i, s) for i in reversed(range(37))][::-1]
    assert forwards == backwards


def test_linear_scaling_rule_matches_the_paper_at_batch_1024():
    assert scaled_lr(0.12, 1024) == pytest.approx(0.12)
    assert scaled_lr(0.12, 256) == pytest.approx(0.03)
    assert scaled_lr(0.12, 8, reference_batch=8) == pytest.approx(0.12)


def test_schedule_rejects_nonsense():
    with pytest.raises(ValueError, match="warm-up"):
        LRSchedule(peak_lr=0.1, final_lr=0.0, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="final_lr"):
        LRSchedule(peak_lr=0.1, final_lr=0.2, total_steps=10)
    with pytest.raises(ValueError):
        lr_at(-1, LRSchedule(peak_lr=0.1, final_lr=0.0, total_steps=10))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)  # weight decays, bias does not


def test_param_groups_put_bn_and_biases_in_the_no_decay_group():
    model = Tiny()
    decay, no_decay = param_groups(model, weight_decay=1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(model.conv.weight), id(model.fc.weight)}
    assert ids(no_decay["params"]) == {id(model.bn.weight), id(model.bn.bias), id(model.fc.bias)}


def test_resnet_groups_cover_every_parameter_once():
    import torchvision

    model = torchvision.models.resnet18()
    decay, no_decay = param_groups(model, 1e-4)
    all_ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    assert all(p.dim() == 1 for p in no_decay["params"])  # BN scales/shifts and the fc bias
    assert all(p.dim() > 1 for p in decay["params"])  # conv kernels and the fc matrix


def test_sgd_step_decays_conv_weights_but_not_bn_or_bias():
    torch.manual_seed(0)
    model = Tiny()
    nn.init.constant_(model.bn.weight, 2.0)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1, momentum=0.0), lr=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no loss gradient: only weight decay can move a parameter
    opt.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["conv.weight"], before["conv.weight"] * (1 - 0.5 * 0.1))
    assert torch.allclose(after["fc.weight"], before["fc.weight"] * (1 - 0.5 * 0.1))
    for name in ("bn.weight", "bn.bias", "fc.bias"):
        assert torch.equal(after[name], before[name]), name


def test_unknown_optimizer_names_the_valid_ones():
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer(Tiny(), OptimConfig(name="adamw"), lr=0.1)


def test_multistep_with_warmup_from_a_fraction_of_the_peak():
    # The reference's Jigsaw: 0.025 -> 0.1 linearly over 5 epochs, then x0.1 at 30, 60, 90, 100 (10 steps/epoch).
    s = LRSchedule(peak_lr=0.1, final_lr=0.0, total_steps=1050, warmup_steps=50,
                   milestones=(300, 600, 900, 1000), warmup_start_ratio=0.25)
    assert [lr_at(t, s) for t in (0, 25, 49, 50, 299, 300, 600, 900, 1000, 1049)] == pytest.approx(
        [0.025, 0.0625, 0.0985, 0.1, 0.1, 0.01, 1e-3, 1e-4, 1e-5, 1e-5])

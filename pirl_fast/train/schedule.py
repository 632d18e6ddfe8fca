"""Learning-rate schedule: pure functions of the global optimiser step (nanoGPT's `get_lr(it)`).

The paper's recipe (PIRL, Misra & van der Maaten 2020, section 4): SGD, batch 1024, cosine
decay from 0.12 to 0.00012 over 800 epochs. We keep the learning rate *per 1024 samples* in
the config and scale it linearly with the global batch (Goyal et al. 2017, "Accurate, Large
Minibatch SGD"):

    peak_lr  = optim.lr * global_batch / optim.reference_batch      (reference_batch = 1024)
    final_lr = peak_lr * optim.final_lr_ratio                        (0.00012 / 0.12 = 1e-3)

so `experiment=pirl_in1k_r50` at batch 1024 gives exactly the paper's 0.12 -> 0.00012, and the
same config at batch 256 gives 0.03 -> 0.00003. An optional linear warm-up (`optim.warmup_epochs`,
0 in the paper) ramps from 0 to the peak before the cosine starts.

`optim.schedule=multistep` replaces the cosine by steps: peak x 0.1 after each of `optim.milestones`
(epochs), as the reference's Jigsaw recipe (experiment=jigsaw_in1k_r50); there the warm-up starts
at `optim.warmup_start_ratio` x peak (0.25: 0.025 -> 0.1) instead of near 0.

Because the LR is a function of the step alone, resuming needs only the step: the checkpoint's
"LR schedule position" is its `step`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """Everything `lr_at` needs, resolved once at start-up from the config and the loader length."""

    peak_lr: float
    final_lr: float
    total_steps: int  # the cosine spans the whole run: epochs * batches per epoch
    warmup_steps: int = 0
    milestones: tuple[int, ...] = ()  # steps; non-empty: step decay x0.1 at each instead of the cosine
    warmup_start_ratio: float = 0.0  # > 0: the warm-up is linear from this x peak (step 0) to the peak

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"LRSchedule.total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f"warm-up ({self.warmup_steps} steps) must be shorter than the run ({self.total_steps} steps): "
                "lower optim.warmup_epochs or raise trainer.epochs"
            )
        if self.peak_lr <= 0 or self.final_lr < 0 or self.final_lr > self.peak_lr:
            raise ValueError(f"need 0 <= final_lr <= peak_lr and peak_lr > 0, got peak {self.peak_lr}, "
                             f"final {self.final_lr}")


def scaled_lr(lr_per_reference: float, global_batch: int, reference_batch: int = 1024) -> float:
    """The linear scaling rule: `lr_per_reference` is the LR at `reference_batch` samples per step."""
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(f"batch sizes must be positive, got global {global_batch}, reference {reference_batch}")
    return lr_per_reference * global_batch / reference_batch


def lr_at(step: int, schedule: LRSchedule) -> float:
    """LR for optimiser step `step` (0-based: step 0 is the first update).

    Linear warm-up over [0, warmup_steps) from peak/warmup_steps to peak, then a half cosine
    from peak (at step = warmup_steps) down to final_lr (at step = total_steps - 1 and beyond).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < schedule.warmup_steps:
        if schedule.warmup_start_ratio > 0:
            r = schedule.warmup_start_ratio
            return schedule.peak_lr * (r + (1 - r) * step / schedule.warmup_steps)
        return schedule.peak_lr * (step + 1) / schedule.warmup_steps
    if schedule.milestones:
        return schedule.peak_lr * 0.1 ** sum(step >= m for m in schedule.milestones)
    decay_steps = schedule.total_steps - schedule.warmup_steps - 1
    if decay_steps <= 0:  # a one-step run (after warm-up): nothing to decay over
        return schedule.peak_lr
    progress = min(1.0, (step - schedule.warmup_steps) / decay_steps)  # 0 -> 1
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return schedule.final_lr + (schedule.peak_lr - schedule.final_lr) * cosine

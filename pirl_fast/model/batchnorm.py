"""Where BatchNorm running statistics come from: the patch forward leaves them alone, and a
frozen network can have them re-estimated on images.

In training, BatchNorm normalises with each batch's own statistics and keeps running averages
(momentum 0.1) that evaluation then uses. The PIRL trunk runs twice per step, on the images and on
the 9x as many patches; with the reference's plain forward the running averages end up about half
patch statistics, although the representation is evaluated on whole images. At small sizes the
two differ a lot (8 px patches reach res4/res5 as 1x1 maps; a 32 px image as 2x2 or 4x4), and the
evaluation features of the trained network are then normalised with the wrong statistics.
`frozen_running_stats` is how `model.patch_bn_stats=false` (the default) trains: the patch forward
normalises with its batch statistics as before (the loss and the gradients are unchanged) but does
not move the running averages.

`reestimate_running_stats` recomputes them for a frozen network from images (no labels, no
gradient; SWA's `update_bn`): the learning benchmark uses it to also compare every network,
trained or not, with statistics of the evaluation view, so that no comparison turns on them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Inside the block, `module`'s BatchNorm layers do not update their running statistics
    (momentum 0: running <- 1 * running + 0 * batch); normalisation itself is unchanged."""
    layers = batchnorms(module)
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum


@torch.no_grad()
def reestimate_running_stats(model: nn.Module, forward, images: Iterable[Tensor], device) -> nn.Module:
    """A copy of `model` whose BatchNorm running statistics are the averages of the batch statistics
    over `images` (batches of inputs for `forward(copy, x)`), in eval mode; `model` is left as it is."""
    copied = copy.deepcopy(model)
    layers = batchnorms(copied)
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    for x in images:
        forward(copied, x.to(device, non_blocking=True))
    for m in layers:
        m.momentum = 0.1  # torch's default again, should anyone train the copy
    return copied.eval()

"""Crossing between the host and the device on purpose, and nowhere else.

On CUDA the host queues work and runs ahead of the GPU; anything that needs a device value on
the host (`.item()`, `.tolist()`, `float(t)`, `bool(t)`, `if t.any():`, a blocking `.to("cpu")`)
makes it wait until the GPU has caught up, and a Python list turned into a device tensor
(`torch.tensor([...], device="cuda")`) is a pageable host-to-device copy that waits too. The
training step keeps one such read, on purpose: the finite-loss check (pirl_fast/train/loop.py,
`train_step`), once per step, after backward was queued. Every deliberate read goes through
`read` below, so tests can count them (tests/test_host_sync.py: one per step, and no
`torch.cuda.synchronize`) and a new sync cannot slip in unseen.

    read(tensor)                   device -> host, the one blocking read; Python number or list
    device_values(numbers, device) host numbers -> a device tensor without a copy or a wait

`read` is also the one place allowed to sync under torch.cuda.set_sync_debug_mode("error"),
which is how the GPU test finds any other sync in a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def read(tensor: torch.Tensor) -> Any:
    """The values of `tensor` on the host (`tensor.tolist()`: a number for a 0-d tensor, else a
    list). On CUDA this waits for the work queued before it: call it once, as late as possible."""
    if tensor.device.type != "cuda":
        return tensor.tolist()
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)  # this read is the intended one
    try:
        return tensor.tolist()
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def device_values(numbers: Sequence[float], device: torch.device) -> torch.Tensor:
    """(len(numbers),) float32 on `device`, without a host-to-device copy: zeros, then one fill
    kernel per non-zero number (the value travels as a kernel argument), so the host never waits.
    Meant for a few flags and counts that are usually zero (stop requests, corrupt samples)."""
    out = torch.zeros(len(numbers), device=device)  # (n,)
    for k, value in enumerate(numbers):
        if value:
            out[k].fill_(float(value))
    return out

"""What this machine has, cheaply and without importing torch (the sharder's "next:" line uses it)."""

from __future__ import annotations

import os
from pathlib import Path


def gpu_visible() -> bool:
    """True when an NVIDIA GPU is there for this process: a driver-listed GPU (or /dev/nvidiaN) and a
    CUDA_VISIBLE_DEVICES that does not hide them all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    listed = Path("/proc/driver/nvidia/gpus")
    try:
        if listed.is_dir() and any(listed.iterdir()):
            return True
    except OSError:
        pass
    return any(Path(f"/dev/nvidia{i}").exists() for i in range(16))

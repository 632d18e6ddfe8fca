"""One rank of the kNN monitor's multi-process test in test_knn_monitor.py (run by torchrun or plainly, not
collected by pytest).

    torchrun --standalone --nproc_per_node=2 tests/knn_monitor_worker.py OUT_DIR SHARD_ROOT
    python tests/knn_monitor_worker.py OUT_DIR SHARD_ROOT

Builds the monitor for SHARD_ROOT's train split exactly as the trainer does (`knn_monitor.build`), with a
seeded ResNet-18 and a memory bank filled with that network's embeddings of the training images plus
seeded noise (so the score is neither chance nor 100%), scores once, and writes OUT_DIR/rank<R>.json:
the top-1 and how many validation images this rank embedded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from pirl_fast.data.labelled_shards import ShardImageDataset, eval_transform
from pirl_fast.model.network import PIRLModel
from pirl_fast.runtime import dist
from pirl_fast.shard.splits import resolve_shards
from pirl_fast.train import knn_monitor
from pirl_fast.train.config import to_dataclass


def main() -> None:
    out, root = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    info = dist.init()
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        cfg = to_dataclass(compose("config", overrides=[
            "experiment=smoke", "data.workers=0", "data.image_size=32", "data.batch_size=6", f"data.shards={root}"]))
    shards = resolve_shards(root)
    torch.manual_seed(0)
    model = PIRLModel(cfg.model).eval()
    train = ShardImageDataset(shards.dir, eval_transform(32))
    with torch.no_grad():
        f = model.embed_image(torch.stack([train[i][0] for i in range(len(train))]))  # (N, D)
    bank = F.normalize(f + 0.1 * torch.randn(f.shape, generator=torch.Generator().manual_seed(1)), dim=1)
    monitor, line = knn_monitor.build(cfg, shards, len(train), info.rank, info.world_size, torch.device("cpu"))
    result = monitor.score(model, bank, torch.device("cpu"), None)
    (out / f"rank{info.rank}.json").write_text(json.dumps({**result, "embedded": len(monitor.val), "line": line}))
    dist.shutdown()


if __name__ == "__main__":
    main()

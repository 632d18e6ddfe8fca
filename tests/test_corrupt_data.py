"""Corrupt JPEGs found while training (pirl_fast/shard/corrupt.py): named on every backend, and
data.on_corrupt=skip keeping the epoch contract, the ranks in step and the bank clean.

Damage is made the way disks and copies make it, in a copy of the session's shards after the
sharder's checks: 64 bytes inverted in the middle of a JPEG's entropy-coded data (libjpeg only
warns, "Corrupt JPEG data", and decodes garbage) or 40 bytes of its header scrambled (DALI's
decoder fails the whole pipeline, "nvImageCodec failure").
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path

import pytest
import torch
import webdataset
from hydra import compose, initialize_config_module

from pirl_fast.data.batch import replace_corrupt
from pirl_fast.data.config import DataConfig
from pirl_fast.data.loaders import build_loader
from pirl_fast.model.memory_bank import BankConfig, MemoryBank
from pirl_fast.shard.corrupt import DaliGate, describe
from pirl_fast.shard.format import ShardError, checksum_problem, encode_int64, load_manifest
from pirl_fast.shard.verify import verify_shards
from pirl_fast.train.loop import run_training

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SHARD, LINE = 1, 3  # the damaged sample: the 4th of shard 1 (14 samples per shard), global index 17
INDEX = 14 * SHARD + LINE
NUM_SAMPLES = 48


def damage(shards: Path, dst: Path, kind: str) -> tuple[Path, str]:
    """A copy of `shards` with sample INDEX's JPEG damaged; returns (copy, the sample's key)."""
    shutil.copytree(shards, dst)
    fields = (dst / f"shard-{SHARD:06d}.idx").read_text().splitlines()[1 + LINE].split()
    offset, size, key = int(fields[1]), int(fields[2]), fields[3].split(".")[0]
    with open(dst / f"shard-{SHARD:06d}.tar", "r+b") as f:
        start, length, mask = (offset + size // 2, 64, 0xFF) if kind == "middle" else (offset + 2, 40, 0x5A)
        f.seek(start)
        data = f.read(length)
        f.seek(start)
        f.write(bytes(b ^ mask for b in data))
    return dst, key


def config(shards: Path, backend: str, on_corrupt: str, world_size: int = 1, workers: int = 1) -> DataConfig:
    return DataConfig(shards=str(shards), backend=backend, batch_size=4 * world_size, workers=workers, image_size=32,
                      patch_crop_size=30, patch_size=8, shuffle_buffer=16, on_corrupt=on_corrupt)


def one_epoch(loader) -> tuple[list[int], int, int]:
    """(indices delivered, batches, corrupt samples replaced) over one epoch."""
    seen, batches, corrupt = [], 0, 0
    for batch in loader:
        seen += batch.index.tolist()
        batches += 1
        corrupt += batch.corrupt
        assert torch.isfinite(batch.images).all() and batch.images.shape[0] == loader.batch_size
    return seen, batches, corrupt


# ---------------------------------------------------------------------------------------------- checksums
def test_checksum_members_are_written_read_and_verified(sample_shards, legacy_shards, tmp_path):
    manifest = load_manifest(sample_shards)
    assert manifest.has_checksums and manifest.members == ["jpg", "cls", "idx", "lbl", "crc"]
    assert not load_manifest(legacy_shards).has_checksums
    for sample in webdataset.WebDataset(manifest.tar_paths()[:1], shardshuffle=False, empty_check=False):
        assert int.from_bytes(sample["crc"], "little") == zlib.crc32(sample["jpg"])  # independent of our reader
        assert checksum_problem(sample["jpg"], sample["crc"]) is None
        assert "do not match" in checksum_problem(sample["jpg"][:-1] + b"\0", sample["crc"])
    assert checksum_problem(b"abc", encode_int64(zlib.crc32(b"abc"))) is None
    assert verify_shards(sample_shards) == []
    damaged, key = damage(sample_shards, tmp_path / "d", "middle")
    problems = verify_shards(damaged)
    assert any(key in p and "do not match their CRC-32" in p for p in problems), problems


def test_gate_passes_good_bytes_and_swaps_bad_ones_for_the_placeholder():
    import numpy as np

    good, bad = np.frombuffer(b"\xff\xd8good", np.uint8), np.frombuffer(b"\xff\xd8bad!", np.uint8)
    crcs = [np.array([zlib.crc32(good)]), np.array([zlib.crc32(b"\xff\xd8other")])]
    infos = [np.frombuffer(f"/s/shard-000001.tar:{o}:k{o}.jpg".encode(), np.uint8) for o in (512, 4096)]
    gate = DaliGate(checksums=True, keep=2)
    out = gate([good, bad], [np.array([7]), np.array([9])], infos, crcs)
    assert out[0] is good and out[1] is gate.placeholder
    assert list(gate.corrupt) == [9] and gate.corrupt[9].startswith("sample 9 (k4096) in /s/shard-000001.tar")
    assert list(gate.in_flight) == [["/s/shard-000001.tar:512:k512.jpg", "/s/shard-000001.tar:4096:k4096.jpg"]]
    assert describe("/a/b.tar:1536:x-1.jpg") == "sample (x-1) in /a/b.tar (its jpg at byte 1536)"


def test_replace_corrupt_copies_good_rows_of_the_batch():
    rows = torch.arange(5)[:, None].expand(5, 3).clone()  # (5, 3): row b holds b
    index = torch.arange(10, 15)
    new_rows, new_index = replace_corrupt([1, 3], ["a", "b"], rows, index)
    assert new_index.tolist() == [10, 10, 12, 12, 14]  # good rows 0 and 2 taken in turn
    assert torch.equal(new_rows[:, 0], torch.tensor([0, 0, 2, 2, 4]))
    assert index.tolist() == [10, 11, 12, 13, 14]  # inputs left alone
    with pytest.raises(ShardError, match="every sample of a batch is corrupt"):
        replace_corrupt([0, 1], ["a", "b"], rows[:2])


# ---------------------------------------------------------------------------------------------- loaders
@pytest.mark.parametrize("backend, workers", [("dali", 1), ("torch", 0), ("torch", 2)])
@pytest.mark.parametrize("kind", ["middle", "header"])
def test_error_names_the_shard_and_key(sample_shards, tmp_path, backend, workers, kind):
    damaged, key = damage(sample_shards, tmp_path / "d", kind)
    loader = build_loader(config(damaged, backend, "error", workers=workers))
    with pytest.raises(ShardError, match=rf"sample {INDEX} \({key}\) in .*shard-{SHARD:06d}\.tar"):
        one_epoch(loader)
    loader.close()


@pytest.mark.parametrize("backend, workers", [("dali", 1), ("torch", 0), ("torch", 2)])
def test_skip_keeps_the_epoch_contract_on_two_ranks(sample_shards, tmp_path, backend, workers):
    """Each rank yields its usual number of full batches; every other sample comes at least once over
    the ranks in each epoch; the damaged one never, and is counted once per epoch."""
    damaged, _ = damage(sample_shards, tmp_path / "d", "middle")
    loaders = [build_loader(config(damaged, backend, "skip", 2, workers), rank=r, world_size=2) for r in (0, 1)]
    for epoch in range(2):
        results = [one_epoch(loader) for loader in loaders]
        assert [batches for _, batches, _ in results] == [len(loaders[0])] * 2 == [6, 6]
        seen = set(results[0][0]) | set(results[1][0])
        assert seen == set(range(NUM_SAMPLES)) - {INDEX}, epoch
        assert sum(corrupt for _, _, corrupt in results) == 1
    for loader in loaders:
        loader.close()


@pytest.mark.parametrize("on_corrupt", ["error", "skip"])
def test_dali_names_a_sample_its_decoder_rejects_in_shards_without_checksums(legacy_shards, tmp_path, on_corrupt):
    """Old shards: the header damage fails DALI's pipeline; the sample is found by decoding the
    samples in flight on the host. It cannot be skipped, and the error says why and what helps."""
    damaged, key = damage(legacy_shards, tmp_path / "d", "header")
    with pytest.warns(RuntimeWarning, match="no per-sample checksums"):
        loader = build_loader(config(damaged, "dali", on_corrupt))
    with pytest.raises(ShardError, match=rf"decoder failed .*\n  sample \({key}\) in .*shard-{SHARD:06d}\.tar") as e:
        one_epoch(loader)
    assert "cannot skip this one" in str(e.value) and "checksums" in str(e.value)


def test_torch_skips_a_sample_that_does_not_decode_in_shards_without_checksums(legacy_shards, tmp_path):
    damaged, _ = damage(legacy_shards, tmp_path / "d", "header")
    seen, batches, corrupt = one_epoch(build_loader(config(damaged, "torch", "skip", workers=0)))
    assert set(seen) == set(range(NUM_SAMPLES)) - {INDEX} and batches == 12 and corrupt == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["middle", "header"])
def test_dali_gpu_graph_checks_checksums_before_nvjpeg(sample_shards, legacy_shards, tmp_path, kind):
    """The gate (a python_function) in the device="mixed" graph: damage is named, or skipped with the
    epoch contract, before nvJPEG sees it; in old shards a header nvJPEG rejects is still named."""
    damaged, key = damage(sample_shards, tmp_path / "crc", kind)
    with pytest.raises(ShardError, match=rf"sample {INDEX} \({key}\)"):
        one_epoch(build_loader(config(damaged, "dali", "error"), device="cuda"))
    seen, batches, corrupt = one_epoch(build_loader(config(damaged, "dali", "skip"), device="cuda"))
    assert set(seen) == set(range(NUM_SAMPLES)) - {INDEX} and batches == 12 and corrupt == 1
    if kind == "header":  # old shards: whether nvJPEG rejects this header is nvJPEG's call; if it does, it is named
        old, key = damage(legacy_shards, tmp_path / "old", kind)
        with pytest.warns(RuntimeWarning, match="no per-sample checksums"):
            loader = build_loader(config(old, "dali", "error"), device="cuda")
        try:
            one_epoch(loader)
        except ShardError as e:
            assert re.search(rf"decoder failed .*\n  sample \({key}\)", str(e)), str(e)


# ---------------------------------------------------------------------------------------------- the trainer
def test_training_skips_the_sample_counts_it_and_leaves_its_bank_row_alone(sample_shards, tmp_path):
    damaged, _ = damage(sample_shards, tmp_path / "d", "middle")
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            "experiment=smoke", "trainer.progress=false", f"data.shards={damaged}", "data.backend=dali",
            "data.workers=1", "data.image_size=32", "data.patch_crop_size=30", "data.patch_size=8",
            "data.batch_size=4", "bank.num_negatives=64", "data.on_corrupt=skip", "trainer.max_steps=0",
            "trainer.epochs=1", f"run_dir={tmp_path / 'run'}"])
    run, summary = run_training(cfg)
    assert summary["step"] == 12 and summary["corrupt_skipped"] == 1
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["corrupt_skipped"] == 1  # cumulative, over all ranks
    initial = MemoryBank(NUM_SAMPLES, 128, BankConfig(seed=0)).bank
    moved = (run.bank.bank != initial).any(dim=1)
    assert not moved[INDEX] and moved.sum() == NUM_SAMPLES - 1  # every other row was updated

"""The loader layer: the Batch contract for every backend, epoch coverage, errors up front."""

import itertools
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
import webdataset

from pirl_fast.data.batch import epoch_length
from pirl_fast.data.config import DataConfig, resolve_workers
from pirl_fast.data.loader_dali import dali_import_error
from pirl_fast.data.loaders import build_loader, resolve_backend
from pirl_fast.shard.cli import Options, run_shard
from pirl_fast.shard.format import ShardError, load_manifest
from pirl_fast.shard.sample_data import write_sample_folder

needs_dali = pytest.mark.skipif(dali_import_error() is not None, reason="needs NVIDIA DALI")
DALI = pytest.param("dali", marks=needs_dali)  # the dali backend as a parameter: skipped without DALI

NUM_CLASSES = 4
NUM_SAMPLES = 20  # 4 classes x 5: divides by none of the global batches below (3, 6, 9)
PER_RANK = 3
LOW = [(0 - m) / s for m, s in zip([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]  # normalised 0
HIGH = [(1 - m) / s for m, s in zip([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]  # normalised 255


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """20 samples in 4 shards of 6, 6, 6, 2 (greyscale/CMYK/PNG inputs normalised by the sharder)."""
    root = tmp_path_factory.mktemp("loader_data")
    write_sample_folder(root / "src", classes=NUM_CLASSES, per_class=NUM_SAMPLES // NUM_CLASSES, seed=1)
    run_shard(Options(src=str(root / "src"), dst=str(root / "shards"), samples_per_shard=6, seed=1))
    return str(root / "shards")


def config(shards: str, backend: str, world_size: int = 1, **overrides) -> DataConfig:
    overrides.setdefault("workers", 1)
    return DataConfig(shards=shards, backend=backend, batch_size=PER_RANK * world_size,
                      synthetic_samples=NUM_SAMPLES, shuffle_buffer=8, **overrides)


@pytest.mark.parametrize("backend", [DALI, "torch", "synthetic"])
@pytest.mark.parametrize("num_permutations", [0, 5])
def test_batch_contract(shards, backend, num_permutations):
    loader = build_loader(config(shards, backend, num_permutations=num_permutations))
    batch = next(iter(loader))
    B = PER_RANK
    assert batch.images.shape == (B, 3, 224, 224) and batch.images.dtype == torch.float32
    assert batch.patches.shape == (B * 9, 3, 64, 64) and batch.patches.dtype == torch.float32
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.patches.is_contiguous(memory_format=torch.channels_last)
    for name in ("index", "label", "perm_id"):
        assert getattr(batch, name).shape == (B,) and getattr(batch, name).dtype == torch.int64, name
    assert batch.perm.shape == (B, 9) and batch.perm.dtype == torch.int64
    assert torch.equal(batch.perm.sort(dim=1).values, torch.arange(9).expand(B, 9))
    assert ((batch.index >= 0) & (batch.index < NUM_SAMPLES)).all()
    if num_permutations:
        fixed = loader.order.fixed
        assert ((batch.perm_id >= 0) & (batch.perm_id < num_permutations)).all()
        assert torch.equal(fixed[batch.perm_id], batch.perm)
    else:
        assert (batch.perm_id == -1).all()
    if backend != "synthetic":  # real pixels: normalised uint8, per channel
        assert ((batch.label >= 0) & (batch.label < NUM_CLASSES)).all()
        for view in (batch.images, batch.patches):
            for c in range(3):
                assert view[:, c].min() >= LOW[c] - 1e-4 and view[:, c].max() <= HIGH[c] + 1e-4
            assert view.std() > 0.1  # not blank
    loader.close()


# 4 torch workers on purpose, whatever the machine has (torch warns when that exceeds the cores): the
# uneven split of 7 batches over 4 workers and an idle worker are what this checks.
@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes:UserWarning")
@pytest.mark.parametrize("backend,workers",
                         [pytest.param("dali", 1, marks=needs_dali), ("torch", 0), ("torch", 1), ("torch", 4)])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_covers_every_sample(shards, backend, workers, world_size):
    """torch with 4 workers: 7 batches split 2/2/2/1 (world 1), and one idle worker (world 3: 3 batches)."""
    loaders = [build_loader(config(shards, backend, world_size, workers=workers), rank=r, world_size=world_size)
               for r in range(world_size)]
    global_batch = PER_RANK * world_size
    expected_len, expected_dups = epoch_length(NUM_SAMPLES, global_batch)
    assert [len(loader) for loader in loaders] == [expected_len] * world_size  # DDP needs equal counts
    for epoch in range(2):
        delivered = []
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == len(loader)
            assert all(len(b.index) == PER_RANK for b in batches)
            delivered += torch.cat([b.index for b in batches]).tolist()
        missing = set(range(NUM_SAMPLES)) - set(delivered)
        assert not missing and set(delivered) == set(range(NUM_SAMPLES)), f"epoch {epoch} misses {missing}"
        duplicates = len(delivered) - NUM_SAMPLES
        assert duplicates == loaders[0].duplicates_per_epoch == expected_dups < global_batch
    for loader in loaders:
        assert loader.num_samples == NUM_SAMPLES and loader.batch_size == PER_RANK
        loader.close()


@needs_dali
def test_backends_agree_on_labels(shards):
    """Index -> label read by DALI from .idx/.lbl equals what the torch reader finds."""
    seen = {}
    for backend in ("torch", "dali"):
        for batch in build_loader(config(shards, backend)):
            for i, lbl in zip(batch.index.tolist(), batch.label.tolist()):
                assert seen.setdefault((backend, i), lbl) == lbl
    by_backend = {name: {i: label for (b, i), label in seen.items() if b == name} for name in ("dali", "torch")}
    assert by_backend["dali"] == by_backend["torch"]
    assert set(seen.values()) == set(range(NUM_CLASSES))


@pytest.mark.parametrize("backend", [DALI, "torch"])
def test_epochs_are_reshuffled(shards, backend):
    loader = build_loader(config(shards, backend))
    orders = [torch.cat([b.index for b in loader]).tolist() for _ in range(3)]
    assert orders[0] != orders[1] or orders[1] != orders[2]


def test_synthetic_index_cycles(shards):
    loader = build_loader(config(shards, "synthetic", world_size=2), rank=1, world_size=2)
    index = torch.cat([b.index for b in loader])
    assert len(index) == len(loader) * PER_RANK and index.max() < NUM_SAMPLES
    assert index[:PER_RANK].tolist() == [3, 4, 5]  # rank 1 takes the second slice of each global batch


@needs_dali
def test_auto_means_dali_where_it_imports_and_workers_fit_the_machine(shards, monkeypatch):
    assert resolve_backend("auto") == ("dali", None) and resolve_backend("torch") == ("torch", None)
    loader = build_loader(config(shards, "auto", workers="auto"))
    assert type(loader).__name__ == "DaliLoader"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's ranks on this node share its cores
    assert resolve_workers("auto") == max(1, len(os.sched_getaffinity(0)) // 2)
    assert resolve_workers(3) == 3 and resolve_workers("3") == 3
    with pytest.raises(ValueError, match="data.workers='many'"):
        resolve_workers("many")


def test_bad_backend_and_batch_size():
    with pytest.raises(ValueError, match="dali, torch, synthetic"):
        build_loader(DataConfig(backend="ffcv"))
    with pytest.raises(ValueError, match="multiple of the world size 3"):
        build_loader(DataConfig(backend="synthetic", batch_size=8), world_size=3)


@pytest.fixture
def damaged(shards, tmp_path):
    """A private copy of the shards to break."""
    dst = tmp_path / "shards"
    shutil.copytree(shards, dst)
    return dst


@pytest.mark.parametrize("backend", [DALI, "torch"])
def test_errors_name_the_shard(damaged, backend):
    """Checked before any reader starts, so the error is ours and names the file, for both backends."""
    manifest = load_manifest(damaged)
    tar = manifest.tar_paths()[1]
    cfg = config(str(damaged), backend)

    with open(tar, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ShardError, match=f"shard {tar} is 1000 bytes.*truncated"):
        build_loader(cfg)
    (damaged / manifest.shards[1].name).unlink()
    with pytest.raises(ShardError, match=f"{tar} is listed .* but missing"):
        build_loader(cfg)
    (damaged / "manifest.json").unlink()
    with pytest.raises(ShardError, match="manifest.json is missing"):
        build_loader(cfg)


def test_corrupt_bytes_caught_by_sha256(shards, damaged):
    tar = load_manifest(damaged).tar_paths()[0]
    data = bytearray(open(tar, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    open(tar, "wb").write(bytes(data))
    with pytest.raises(ShardError, match=f"shard {tar} does not match its SHA-256"):
        build_loader(config(str(damaged), "torch", verify_sha256=True))


def test_bad_index_files_named(damaged):
    manifest = load_manifest(damaged)
    index = manifest.index_paths()[2]
    cfg = config(str(damaged), "torch")
    original = open(index).read()

    open(index, "w").write(original.replace("v1.2", "v1.1", 1))
    with pytest.raises(ShardError, match=f"index file {index} has header"):
        build_loader(cfg)
    lines = original.splitlines()
    open(index, "w").write("\n".join(lines[:-1]) + "\n")  # a sample missing
    with pytest.raises(ShardError, match=f"index file {index} lists"):
        build_loader(cfg)
    fields = lines[1].split()
    fields[1] = str(10**9)  # an offset past the end of the tar
    open(index, "w").write("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    with pytest.raises(ShardError, match=f"index file {index} line 2 points past the end"):
        build_loader(cfg)
    (damaged / manifest.shards[2].index_name).unlink()
    with pytest.raises(ShardError, match=f"{index} is listed"):
        build_loader(cfg)


def test_works_without_dali(shards):
    """`import pirl_fast.data.loaders` and the torch backend need no DALI; auto falls back to torch with a
    one-line notice; asking for dali explicitly is an error that says what to do."""
    code = f"""
import sys
sys.modules["nvidia.dali"] = None  # make `import nvidia.dali` fail
import pytest
from pirl_fast.data.config import DataConfig
from pirl_fast.data.loaders import BackendUnavailable, build_loader, resolve_backend
cfg = DataConfig(shards={shards!r}, backend="torch", batch_size=2, workers=0)
assert next(iter(build_loader(cfg))).images.shape == (2, 3, 224, 224)
backend, notice = resolve_backend("auto")
assert backend == "torch" and "torch backend" in notice and "pip install nvidia-dali" in notice and "\\n" not in notice
cfg.backend = "auto"
assert type(build_loader(cfg)).__name__ == "TorchLoader"
cfg.backend, cfg.workers = "dali", 1
with pytest.raises(BackendUnavailable, match="use data.backend=auto .* or data.backend=torch"):
    build_loader(cfg)
assert "nvidia.dali.fn" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("backend", [DALI, "torch"])
def test_batches_outlive_the_next_iteration(shards, backend):
    """Nothing in a Batch aliases a reader buffer that the next batches overwrite."""
    stream = iter(build_loader(config(shards, backend)))
    first = next(stream)
    saved = {name: getattr(first, name).clone() for name in ("images", "patches", "index", "label")}
    for _ in range(3):
        next(stream)
    for name, value in saved.items():
        assert torch.equal(getattr(first, name), value), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_dali
def test_dali_gpu_graph(shards):
    """device="mixed" decode and GPU augmentation: same contract, on the GPU, full coverage."""
    loader = build_loader(config(shards, "dali"), device="cuda")
    batches = list(loader)
    batch = batches[0]
    for name in ("images", "patches", "index", "label", "perm", "perm_id"):
        assert getattr(batch, name).device.type == "cuda", name
    assert batch.images.shape == (PER_RANK, 3, 224, 224)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.patches.shape == (PER_RANK * 9, 3, 64, 64)
    assert batch.patches.is_contiguous(memory_format=torch.channels_last)
    assert set(torch.cat([b.index for b in batches]).tolist()) == set(range(NUM_SAMPLES))
    for c in range(3):
        assert batch.images[:, c].min() >= LOW[c] - 1e-4 and batch.images[:, c].max() <= HIGH[c] + 1e-4


@pytest.mark.parametrize("backend", [DALI, "torch"])
def test_abandoned_epoch_does_not_shift_the_next(shards, backend):
    loader = build_loader(config(shards, backend))
    next(iter(loader))  # one batch, then a new epoch
    assert set(torch.cat([b.index for b in loader]).tolist()) == set(range(NUM_SAMPLES))


# ---------------------------------------------------------------------------------------------- torch backend
def test_torch_reads_through_webdataset(shards, monkeypatch):
    """Every shard is opened by webdataset.WebDataset, and one epoch yields exactly the (index, label)
    pairs of a direct WebDataset iteration (cls as ASCII, idx/lbl as 8-byte little-endian int64)."""
    import pirl_fast.data.loader_torch as loader_torch

    real, opened = webdataset.WebDataset, []

    def spy(urls, **kwargs):
        opened.extend(urls)
        return real(urls, **kwargs)

    monkeypatch.setattr(loader_torch.wds, "WebDataset", spy)
    delivered = {pair for batch in build_loader(config(shards, "torch", workers=0))
                 for pair in zip(batch.index.tolist(), batch.label.tolist())}
    tars = load_manifest(shards).tar_paths()
    assert set(opened) == set(tars)
    direct = set()
    for sample in real(tars, shardshuffle=False, nodesplitter=None, empty_check=False):
        label = int.from_bytes(sample["lbl"], "little", signed=True)
        assert int(sample["cls"]) == label and len(sample["idx"]) == 8
        direct.add((int.from_bytes(sample["idx"], "little", signed=True), label))
    assert delivered == direct and len(direct) == NUM_SAMPLES


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_epoch_is_a_function_of_seed_and_epoch(shards, workers):
    """A loader set to epoch 2 delivers what another delivered as its third epoch: the same samples in
    the same order and, with workers (reseeded per epoch) or the same global RNG state, the same pixels."""
    def epoch(loader, rng_seed):
        torch.manual_seed(rng_seed)  # augmentations of workers=0 draw from the global RNG
        batches = list(loader)
        return torch.cat([b.index for b in batches]), torch.cat([b.images for b in batches])

    straight = build_loader(config(shards, "torch", workers=workers))
    epochs = [epoch(straight, e) for e in range(3)]
    resumed = build_loader(config(shards, "torch", workers=workers))
    resumed.set_epoch(2)
    index, images = epoch(resumed, 2)
    assert torch.equal(index, epochs[2][0]) and torch.equal(images, epochs[2][1])
    assert epoch(resumed, 3)[0].tolist() != index.tolist() or epochs[0][0].tolist() != index.tolist()
    other_seed = build_loader(config(shards, "torch", workers=workers, seed=1))
    other_seed.set_epoch(2)
    assert epoch(other_seed, 2)[0].tolist() != index.tolist()
    for loader in (straight, resumed, other_seed):
        loader.close()


@pytest.mark.parametrize("world_size,per_rank,workers,sizes", [
    (8, 7, 5, [random.Random(0).randint(1, 40) for _ in range(50)]),
    (3, 4, 2, [5, 0, 7, 1, 0, 9]),  # empty shards
    (2, 4, 3, [2, 0, 1]),  # 3 samples, 8 deliveries: the stream wraps more than once
])
def test_torch_split_delivers_every_slot_once(world_size, per_rank, workers, sizes):
    """The plan alone (no decoding): each (rank, worker) reads its whole batches, each rank the same
    count, and together they read stream position t mod N for every delivery t of the epoch."""
    from pirl_fast.data.loader_torch import plan_visits, shard_order, worker_slots

    num_samples = sum(sizes)
    batches, duplicates = epoch_length(num_samples, per_rank * world_size)
    order = shard_order(len(sizes), seed=3, epoch=5)
    assert order == shard_order(len(sizes), seed=3, epoch=5) and sorted(order) == list(range(len(sizes)))
    starts = dict(zip(order, itertools.accumulate((sizes[s] for s in order), initial=0)))  # shard -> stream offset
    positions = []
    for rank in range(world_size):
        on_rank = 0
        for worker in range(workers):
            first, end = worker_slots(rank, worker, workers, batches, per_rank)
            visits = plan_visits(order, sizes, first, end)
            assert all(0 <= v.start < v.stop <= sizes[v.shard] for v in visits)
            whole_batches = len(range(worker, batches, workers))  # batch b of a rank comes from worker b mod W
            assert sum(v.stop - v.start for v in visits) == end - first == per_rank * whole_batches
            positions += [starts[v.shard] + p for v in visits for p in range(v.start, v.stop)]
            on_rank += end - first
        assert on_rank == batches * per_rank  # identical per-rank counts
    assert sorted(positions) == sorted(t % num_samples for t in range(batches * per_rank * world_size))
    assert len(positions) - num_samples == duplicates


@pytest.mark.parametrize("workers", [0, 1])
def test_torch_names_a_shard_damaged_mid_epoch(damaged, workers):
    """Damage the start-up check cannot see (same size, no SHA-256): a broken tar header or JPEG is
    reported mid-epoch naming the shard, from the main process or a worker, without hanging."""
    manifest = load_manifest(damaged)
    tar, index = manifest.tar_paths()[1], manifest.index_paths()[1]
    lines = open(index).read().splitlines()
    jpg_offset = {fields[0]: int(fields[1]) for fields in [lines[4].split()[i:i + 4] for i in range(0, 16, 4)]}["jpg"]
    data = bytearray(open(tar, "rb").read())
    data[jpg_offset:jpg_offset + 2] = b"\0\0"  # sample 3's JPEG loses its SOI marker
    open(tar, "wb").write(bytes(data))
    with pytest.raises(ShardError, match=f"in {re.escape(tar)}: its bytes do not match their CRC-32"):
        list(build_loader(config(str(damaged), "torch", workers=workers)))  # the sharder writes KEY.crc
    data[jpg_offset - 512:jpg_offset] = b"x" * 512  # its tar header: the stream ends there
    open(tar, "wb").write(bytes(data))
    with pytest.raises(ShardError, match=f"shard {re.escape(tar)} ended after 3 samples, the manifest says 6"):
        list(build_loader(config(str(damaged), "torch", workers=workers)))


@pytest.mark.parametrize("backend", [DALI, "torch", "synthetic"])
def test_float16_views_are_the_float32_views_rounded(shards, backend):
    """data.output_dtype=float16 on every backend (the DALI CPU graph included): the same draws, the
    views rounded to float16 (values within 2.7 of 0: spacing <= 2**-9), channels-last as before."""
    def first_batch(dtype: str):
        torch.manual_seed(0)  # the torch backend's transforms draw from it with workers=0
        return next(iter(build_loader(config(shards, backend, output_dtype=dtype, workers=int(backend != "torch")))))

    half, full = first_batch("float16"), first_batch("float32")
    for name in ("images", "patches"):
        h, f = getattr(half, name), getattr(full, name)
        assert h.dtype == torch.float16 and f.dtype == torch.float32, name
        assert h.is_contiguous(memory_format=torch.channels_last), name
        if backend != "synthetic":  # synthetic draws randn in each dtype: different numbers
            assert torch.allclose(h.float(), f, atol=2**-10, rtol=0), (name, (h.float() - f).abs().max())
    assert torch.equal(half.index, full.index)


@needs_dali
def test_float16_views_train_on_the_cpu(shards, tmp_path):
    """The fp32 model on the CPU takes float16 views (it casts them); one step, a finite loss."""
    from hydra import compose, initialize_config_module

    from pirl_fast.train.loop import train

    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            "experiment=smoke", f"data.shards={shards}", "data.backend=dali", "data.workers=1", "data.batch_size=4",
            "data.output_dtype=float16", "data.image_size=32", "data.patch_crop_size=30", "data.patch_size=8",
            "bank.num_negatives=16", "trainer.max_steps=1", "trainer.progress=false", f"run_dir={tmp_path}"])
    summary = train(cfg)
    assert summary["step"] == 1 and summary["precision"] == "fp32"

"""The loader layer: the Batch contract for every backend, epoch coverage, errors up front."""

import shutil
import subprocess
import sys

import pytest
import torch

from pirl_fast.data import BACKENDS, DataConfig, build_loader, epoch_length
from pirl_fast.manifest import ShardError, load_manifest
from pirl_fast.sample_data import write_sample_folder
from pirl_fast.shard import Options, run_shard

pytest.importorskip("nvidia.dali")

NUM_CLASSES = 4
NUM_SAMPLES = 20  # 4 classes x 5: divides by none of the global batches below (3, 6, 9)
PER_RANK = 3
LOW = [(0 - m) / s for m, s in zip([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]  # normalised 0
HIGH = [(1 - m) / s for m, s in zip([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]  # normalised 255


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """20 samples in 4 shards of 6, 6, 6, 2 (greyscale/CMYK/PNG inputs normalised by the sharder)."""
    root = tmp_path_factory.mktemp("loader_data")
    write_sample_folder(root / "src", classes=NUM_CLASSES, per_class=NUM_SAMPLES // NUM_CLASSES, seed=1)
    run_shard(Options(src=str(root / "src"), dst=str(root / "shards"), samples_per_shard=6, seed=1))
    return str(root / "shards")


def config(shards: str, backend: str, world_size: int = 1, **overrides) -> DataConfig:
    return DataConfig(shards=shards, backend=backend, batch_size=PER_RANK * world_size, workers=1,
                      synthetic_samples=NUM_SAMPLES, shuffle_buffer=8, **overrides)


@pytest.mark.parametrize("backend", BACKENDS)
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


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_covers_every_sample(shards, backend, world_size):
    loaders = [build_loader(config(shards, backend, world_size), rank=r, world_size=world_size)
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
        assert set(delivered) == set(range(NUM_SAMPLES)), f"epoch {epoch} misses {set(range(NUM_SAMPLES)) - set(delivered)}"
        duplicates = len(delivered) - NUM_SAMPLES
        assert duplicates == loaders[0].duplicates_per_epoch == expected_dups < global_batch
    for loader in loaders:
        assert loader.num_samples == NUM_SAMPLES and loader.batch_size == PER_RANK
        loader.close()


def test_backends_agree_on_labels(shards):
    """Index -> label read by DALI from .idx/.lbl equals what the torch reader finds."""
    seen = {}
    for backend in ("torch", "dali"):
        for batch in build_loader(config(shards, backend)):
            for i, lbl in zip(batch.index.tolist(), batch.label.tolist()):
                assert seen.setdefault((backend, i), lbl) == lbl
    assert {i: l for (b, i), l in seen.items() if b == "dali"} == {i: l for (b, i), l in seen.items() if b == "torch"}
    assert set(seen.values()) == set(range(NUM_CLASSES))


def test_epochs_are_reshuffled(shards):
    loader = build_loader(config(shards, "dali"))
    orders = [torch.cat([b.index for b in loader]).tolist() for _ in range(3)]
    assert orders[0] != orders[1] or orders[1] != orders[2]


def test_synthetic_index_cycles(shards):
    loader = build_loader(config(shards, "synthetic", world_size=2), rank=1, world_size=2)
    index = torch.cat([b.index for b in loader])
    assert len(index) == len(loader) * PER_RANK and index.max() < NUM_SAMPLES
    assert index[:PER_RANK].tolist() == [3, 4, 5]  # rank 1 takes the second slice of each global batch


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


@pytest.mark.parametrize("backend", ["dali", "torch"])
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
        build_loader(config(str(damaged), "dali", verify_sha256=True))


def test_bad_index_files_named(damaged):
    manifest = load_manifest(damaged)
    index = manifest.index_paths()[2]
    cfg = config(str(damaged), "dali")
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
    """`import pirl_fast.data` and the torch backend need no DALI; asking for dali says what to do."""
    code = f"""
import sys
sys.modules["nvidia.dali"] = None  # make `import nvidia.dali` fail
import pytest
from pirl_fast.data import DataConfig, build_loader
cfg = DataConfig(shards={shards!r}, backend="torch", batch_size=2, workers=0)
assert next(iter(build_loader(cfg))).images.shape == (2, 3, 224, 224)
cfg.backend, cfg.workers = "dali", 1
with pytest.raises(ImportError, match="use data.backend=torch"):
    build_loader(cfg)
assert "nvidia.dali.fn" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("backend", ["dali", "torch"])
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
def test_dali_gpu_graph(shards):
    """device="mixed" decode and GPU augmentation: same contract, on the GPU, full coverage."""
    loader = build_loader(config(shards, "dali"), device="cuda")
    batches = list(loader)
    batch = batches[0]
    for name in ("images", "patches", "index", "label", "perm", "perm_id"):
        assert getattr(batch, name).device.type == "cuda", name
    assert batch.images.shape == (PER_RANK, 3, 224, 224) and batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.patches.shape == (PER_RANK * 9, 3, 64, 64) and batch.patches.is_contiguous(memory_format=torch.channels_last)
    assert set(torch.cat([b.index for b in batches]).tolist()) == set(range(NUM_SAMPLES))
    for c in range(3):
        assert batch.images[:, c].min() >= LOW[c] - 1e-4 and batch.images[:, c].max() <= HIGH[c] + 1e-4


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_abandoned_epoch_does_not_shift_the_next(shards, backend):
    loader = build_loader(config(shards, backend))
    next(iter(loader))  # one batch, then a new epoch
    assert set(torch.cat([b.index for b in loader]).tolist()) == set(range(NUM_SAMPLES))

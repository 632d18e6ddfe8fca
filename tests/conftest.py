"""Shared fixtures: a small generated ImageFolder and shards made from it, built once per session.

    sample_image_dir  Path of an ImageFolder: 4 classes x 12 images (seed 0), clean inputs only
                      (mixed JPEG/PNG/greyscale/CMYK/progressive, sides 96-400 px).
    sample_shards     Path of a shard directory made from it with 14 samples per shard:
                      shards of 14, 14, 14 and 6 samples (indices 0..47), DALI index files and
                      manifest.json. Read it through pirl_fast.shard.format.load_manifest.
    legacy_shards     The same samples rewritten without the per-sample crc member, as the sharder
                      wrote them before checksums (sample_members jpg, cls, idx, lbl).

Both are read-only for tests: copy them (shutil.copytree) before changing anything.

    triton_device     Where this session's Triton kernels run: the CPU (interpreted) on a machine
                      without CUDA, CUDA (compiled) on one with it. See the note below.
    needs_interpreter A test that runs Triton kernels on CPU tensors: skipped in a compiling session.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal

import torch

# Triton reads TRITON_INTERPRET once, when it is imported, and then interprets or compiles every
# kernel of the process, its own library (tl.sum, tl.max) included: the two never mix. Decided
# here, before anything imports triton: the interpreter (on CPU tensors) where there is no CUDA,
# the compiled kernels (on CUDA tensors) where there is. Set TRITON_INTERPRET to choose yourself.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pirl_fast.model import bank_kernels  # noqa: E402
from pirl_fast.shard.cli import Options, run_shard  # noqa: E402
from pirl_fast.shard.format import (  # noqa: E402
    MANIFEST_NAME,
    SAMPLE_MEMBERS,
    ShardWriter,
    decode_int64,
    index_text,
    iter_samples,
    sha256_file,
)
from pirl_fast.shard.sample_data import write_sample_folder  # noqa: E402

# PIRL_TEST_TIMEOUT=SECONDS: each test's call is stopped after that long (scripts/gpu_bench.sh sets 60), so one
# hanging test (a deliberate nvJPEG failure, a deadlocked loader) costs its limit, not the stage. A TimeoutError
# is raised in the test (SIGALRM); a hang inside C code that never returns to Python ends the process 30 s
# later with every thread's traceback (faulthandler), and the stage goes on.
TEST_TIMEOUT = float(os.environ.get("PIRL_TEST_TIMEOUT") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if TEST_TIMEOUT <= 0:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past PIRL_TEST_TIMEOUT={TEST_TIMEOUT:g}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    faulthandler.dump_traceback_later(TEST_TIMEOUT + 30, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


SAMPLE_CLASSES = 4
SAMPLE_PER_CLASS = 12
SAMPLE_SHARD_SIZE = 14  # 48 images -> 14 + 14 + 14 + 6: several shards, the last one partial


@pytest.fixture
def one_thread():
    """One intra-op thread, as DataLoader workers have: with data.workers=0 the torch transforms run
    in the test process, where a thread pool on a busy small machine makes each epoch 10-100x
    slower. Opt in per module: pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_device() -> torch.device:
    return torch.device("cpu" if bank_kernels.interpreted() else "cuda")


@pytest.fixture
def needs_interpreter() -> None:
    if not bank_kernels.interpreted():
        pytest.skip("runs Triton on CPU tensors, which needs TRITON_INTERPRET=1; this session compiles the "
                    "kernels (CUDA is present), and the tests on triton_device cover them")


@pytest.fixture(scope="session")
def sample_image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample_images")
    return write_sample_folder(root, classes=SAMPLE_CLASSES, per_class=SAMPLE_PER_CLASS, seed=0)


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory: pytest.TempPathFactory, sample_image_dir: Path) -> Path:
    dst = tmp_path_factory.mktemp("sample_shards") / "shards"
    run_shard(Options(src=str(sample_image_dir), dst=str(dst), samples_per_shard=SAMPLE_SHARD_SIZE,
                      max_side=320, seed=0, workers=1))
    return dst


@pytest.fixture(scope="session")
def legacy_shards(tmp_path_factory: pytest.TempPathFactory, sample_shards: Path) -> Path:
    """sample_shards rewritten as the sharder wrote them before per-sample checksums: four members
    (jpg, cls, idx, lbl), no KEY.crc. Old shards must keep working."""
    dst = tmp_path_factory.mktemp("legacy_shards") / "shards"
    dst.mkdir()
    manifest = json.loads((sample_shards / MANIFEST_NAME).read_text())
    for shard in manifest["shards"]:
        with open(sample_shards / shard["name"], "rb") as src, open(dst / shard["name"], "wb") as out:
            writer = ShardWriter(out, checksums=False)
            for key, data, _ in iter_samples(src):
                writer.add(key, data["jpg"], decode_int64(data["lbl"]), decode_int64(data["idx"]))
            writer.close()
        (dst / shard["index_name"]).write_text(index_text(writer.entries))
        shard.update(bytes=(dst / shard["name"]).stat().st_size, sha256=sha256_file(str(dst / shard["name"])))
    manifest["sample_members"] = SAMPLE_MEMBERS
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return dst

"""The sharder, checked against independent readers: the webdataset library, DALI's webdataset
reader (CPU-only), DALI's own wds2idx, PIL, and a from-the-spec recomputation of the order."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import pirl_fast.shard.cli as shard_mod
from pirl_fast.shard.cli import Options, main, run_shard
from pirl_fast.shard.format import MANIFEST_NAME, ShardError, load_manifest
from pirl_fast.shard.sample_data import write_odd_files, write_sample_folder
from pirl_fast.shard.verify import verify_shards

SHARD_SIZE, MAX_SIDE = 14, 320  # as in conftest's sample_shards


def source_files(src: Path) -> list[str]:
    return sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())


def read_with_webdataset(shard_dir: Path) -> list[dict]:
    import webdataset as wds

    manifest = load_manifest(shard_dir)
    return list(wds.WebDataset(manifest.tar_paths(), shardshuffle=False, empty_check=False))


def shard_bytes(shard_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(shard_dir.glob("shard-*"))}


def reference_copy(sample_shards: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(sample_shards, dst)
    return dst


# ------------------------------------------------------------------ read back by independent readers

def test_webdataset_reads_every_image_once_with_label_and_index(sample_image_dir, sample_shards):
    samples = read_with_webdataset(sample_shards)
    files = source_files(sample_image_dir)
    classes = sorted(p.name for p in sample_image_dir.iterdir())
    # The spec, recomputed here: sorted inputs, shuffled with random.Random(seed), index = position.
    order = list(files)
    random.Random(0).shuffle(order)
    assert len(samples) == len(files) == 48
    assert [s["__key__"] for s in samples] == [shard_mod.sample_key(p) for p in order]
    for i, (s, relpath) in enumerate(zip(samples, order)):
        label = classes.index(relpath.split("/")[0])
        assert list(k for k in s if not k.startswith("__")) == ["jpg", "cls", "idx", "lbl", "crc"]
        assert int(s["cls"].decode("ascii")) == label
        assert np.frombuffer(s["idx"], "<i8").tolist() == [i]
        assert np.frombuffer(s["lbl"], "<i8").tolist() == [label]
        assert "." not in s["__key__"]
        # The image under the key is the source image (normalised: RGB, at most MAX_SIDE).
        got = Image.open(io.BytesIO(s["jpg"]))
        assert got.format == "JPEG" and got.mode == "RGB" and not got.info.get("progressive")
        src = Image.open(sample_image_dir / relpath).convert("RGB")
        assert max(got.size) <= MAX_SIDE
        src = src.resize(got.size, Image.Resampling.BILINEAR)
        diff = np.abs(np.asarray(got, np.float32) - np.asarray(src, np.float32)).mean()
        assert diff < 12, f"{relpath}: image under key {s['__key__']} differs from the source (mean abs {diff:.1f})"


def read_with_dali(shard_dir: Path, batch: int = 5) -> dict[int, tuple[int, tuple]]:
    """{global index: (label, decoded image shape)} for one epoch of DALI's CPU-only webdataset reader."""
    from nvidia.dali import fn, pipeline_def, types

    manifest = load_manifest(shard_dir)

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=0)
    def pipe():
        jpg, cls, idx, lbl = fn.readers.webdataset(
            paths=manifest.tar_paths(), index_paths=manifest.index_paths(), ext=["jpg", "cls", "idx", "lbl"],
            dtypes=[types.UINT8, types.UINT8, types.INT64, types.INT64], missing_component_behavior="error",
            pad_last_batch=True, name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, idx, lbl

    p = pipe()
    p.build()
    epoch = p.reader_meta("reader")["epoch_size_padded"]
    seen: dict[int, tuple[int, tuple]] = {}
    for _ in range(-(-epoch // batch)):  # the last batch is padded with repeats: count each index once
        images, cls, idx, lbl = p.run()
        for b in range(batch):
            i = int(np.array(idx.at(b))[0])
            label = int(np.array(lbl.at(b))[0])
            assert bytes(np.array(cls.at(b))).decode() == str(label)
            seen.setdefault(i, (label, np.array(images.at(b)).shape))
    return seen


def test_dali_reads_every_image_once_with_label_and_index(sample_shards):
    seen = read_with_dali(sample_shards, batch=5)  # 5 does not divide 48: padding is exercised
    assert sorted(seen) == list(range(load_manifest(sample_shards).num_samples))
    by_index = {int(np.frombuffer(s["idx"], "<i8")[0]): s for s in read_with_webdataset(sample_shards)}
    for i, (label, shape) in seen.items():
        ref = Image.open(io.BytesIO(by_index[i]["jpg"]))
        assert label == int(by_index[i]["cls"]) and shape == (ref.height, ref.width, 3)


def test_index_files_match_dali_wds2idx(sample_shards, tmp_path):
    from wds2idx import IndexCreator  # DALI's own tool (runs GNU tar to list member offsets)

    manifest = load_manifest(sample_shards)
    assert len(manifest.shards) == 4 and [s.samples for s in manifest.shards] == [14, 14, 14, 6]
    for tar, ours in zip(manifest.tar_paths(), manifest.index_paths()):
        theirs = tmp_path / (Path(tar).stem + ".idx")
        with IndexCreator(tar, str(theirs), verbose=False) as creator:
            creator.create_index()
        assert theirs.read_bytes() == Path(ours).read_bytes(), f"{ours} differs from wds2idx's index"


def test_manifest_fields(sample_image_dir, sample_shards):
    raw = json.loads((sample_shards / MANIFEST_NAME).read_text())
    assert raw["num_samples"] == 48 and raw["classes"] == sorted(p.name for p in sample_image_dir.iterdir())
    assert raw["skipped"] == [] and raw["sample_members"] == ["jpg", "cls", "idx", "lbl", "crc"]
    assert raw["options"] == {"src": str(sample_image_dir), "seed": 0, "samples_per_shard": SHARD_SIZE,
                              "max_side": MAX_SIDE, "quality": 95, "max_bytes": 2**28}
    first = 0
    for s in raw["shards"]:
        data = (sample_shards / s["name"]).read_bytes()
        assert s["bytes"] == len(data) and s["first_index"] == first
        assert s["sha256"] == hashlib.sha256(data).hexdigest()
        first += s["samples"]
    assert not (sample_shards / ".progress.jsonl").exists()


# ------------------------------------------------------------------ what goes in: odd inputs, byte copies

def test_odd_inputs_become_rgb_jpegs_or_listed_skips(tmp_path):
    src = write_sample_folder(tmp_path / "src", classes=2, per_class=3, seed=1)
    expected = write_odd_files(src / "c00_stripes", seed=1)
    (src / "README.txt").write_text("a loose file outside any class folder\n")
    manifest = run_shard(Options(src=str(src), dst=str(tmp_path / "dst"), samples_per_shard=4, max_side=256))
    samples = {s["__key__"]: s for s in read_with_webdataset(tmp_path / "dst")}
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    want_skipped = {f"c00_stripes/{n}" for n, outcome in expected.items() if outcome == "skipped"} | {"README.txt"}
    assert set(skipped) == want_skipped and all(skipped.values())
    assert "empty" in skipped["c00_stripes/odd_empty.JPEG"]
    assert "truncated" in skipped["c00_stripes/odd_truncated.JPEG"]
    # Every other class-folder file is a sample: nothing lost, nothing extra.
    inputs = [p for p in source_files(src) if "/" in p and p not in want_skipped]
    assert sorted(samples) == sorted(shard_mod.sample_key(p) for p in inputs)
    assert manifest["num_samples"] == len(inputs)
    for s in samples.values():
        img = Image.open(io.BytesIO(s["jpg"]))
        img.load()
        assert img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")
        assert max(img.size) <= 256
    # EXIF orientation was applied: stored 200x120 with orientation 6, upright 120x200.
    rotated = Image.open(io.BytesIO(samples[shard_mod.sample_key("c00_stripes/odd_exif_rotated.JPEG")]["jpg"]))
    upright = ImageOps.exif_transpose(Image.open(src / "c00_stripes/odd_exif_rotated.JPEG"))
    assert rotated.size == upright.size == (120, 200)
    assert not verify_shards(tmp_path / "dst")
    assert sorted(read_with_dali(tmp_path / "dst")) == list(range(len(inputs)))  # DALI decodes every one


def test_clean_baseline_jpeg_is_copied_byte_for_byte(sample_image_dir, sample_shards):
    by_key = {s["__key__"]: s["jpg"] for s in read_with_webdataset(sample_shards)}
    copied = reencoded = 0
    for relpath in source_files(sample_image_dir):
        data = (sample_image_dir / relpath).read_bytes()
        img = Image.open(io.BytesIO(data))
        clean = (img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")
                 and max(img.size) <= MAX_SIDE and img.getexif().get(0x0112, 1) == 1)
        stored = by_key[shard_mod.sample_key(relpath)]
        if clean:
            assert stored == data, f"{relpath} is a clean baseline JPEG but was re-encoded"
            copied += 1
        else:
            assert stored != data
            reencoded += 1
    assert copied >= 5 and reencoded >= 5  # the sample folder exercises both paths


# ------------------------------------------------------------------ determinism, resume, refusal

def test_same_seed_gives_identical_bytes_different_seed_another_order(sample_image_dir, sample_shards, tmp_path):
    again = tmp_path / "again"  # 2 worker processes this time: the bytes must not depend on W
    run_shard(Options(src=str(sample_image_dir), dst=str(again), samples_per_shard=SHARD_SIZE,
                      max_side=MAX_SIDE, seed=0, workers=2))
    assert shard_bytes(again) == shard_bytes(sample_shards)
    other = tmp_path / "other"
    run_shard(Options(src=str(sample_image_dir), dst=str(other), samples_per_shard=SHARD_SIZE,
                      max_side=MAX_SIDE, seed=1))
    keys0 = [s["__key__"] for s in read_with_webdataset(sample_shards)]
    keys1 = [s["__key__"] for s in read_with_webdataset(other)]
    assert keys0 != keys1 and sorted(keys0) == sorted(keys1)


KILL_AT_SHARD_2 = """
import os, signal, sys
import pirl_fast.shard.cli as s
import pirl_fast.shard.write as w
real = w.finish_shard
def finish_or_die(dst, k, entries, base):
    if k == 2:  # shard 2 sits complete in its temp file: the process dies before renaming it
        os.kill(os.getpid(), signal.SIGKILL)
    return real(dst, k, entries, base)
w.finish_shard = finish_or_die
sys.exit(s.main(sys.argv[1:]))
"""


def test_resume_after_a_kill_matches_a_clean_run(sample_image_dir, sample_shards, tmp_path):
    dst = tmp_path / "dst"
    args = [str(sample_image_dir), str(dst), "--samples-per-shard", str(SHARD_SIZE), "--max-side", str(MAX_SIDE)]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_SHARD_2, *args, "--workers", "2"], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()
    assert not (dst / MANIFEST_NAME).exists() and (dst / ".progress.jsonl").exists()
    assert (dst / ".shard-000002.tar.tmp").exists() and not (dst / "shard-000002.tar").exists()
    with pytest.raises(ShardError, match="missing"):
        load_manifest(dst)  # an unfinished directory is never taken for done
    assert main(args) == 2  # neither --resume nor --overwrite: refused
    with open(dst / ".progress.jsonl", "a") as f:
        f.write('{"name": "shard-000002.tar", "sam')  # a journal line torn by the crash
    inode = (dst / "shard-000001.tar").stat().st_ino
    assert main(args + ["--resume"]) == 0
    assert (dst / "shard-000001.tar").stat().st_ino == inode  # the finished prefix was kept, not rewritten
    assert shard_bytes(dst) == shard_bytes(sample_shards)
    assert json.loads((dst / MANIFEST_NAME).read_text()) == json.loads((sample_shards / MANIFEST_NAME).read_text())
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in sample_shards.iterdir())

    # A second kind of damage: manifest and one shard deleted, a stray temp file left behind.
    (dst / MANIFEST_NAME).unlink()
    (dst / "shard-000002.tar").unlink()
    (dst / ".shard-000003.tar.tmp").write_bytes(b"half a shard")
    assert main(args + ["--resume"]) == 0
    assert shard_bytes(dst) == shard_bytes(sample_shards) and not list(dst.glob(".*tmp"))
    assert not verify_shards(dst)


def test_refuses_a_destination_holding_other_shards_unless_overwrite(sample_image_dir, sample_shards, tmp_path):
    dst = reference_copy(sample_shards, tmp_path)
    same = Options(src=str(sample_image_dir), dst=str(dst), samples_per_shard=SHARD_SIZE, max_side=MAX_SIDE)
    run_shard(same)  # the same plan again: nothing to do, nothing touched
    assert shard_bytes(dst) == shard_bytes(sample_shards)
    args = [str(sample_image_dir), str(dst), "--samples-per-shard", "10", "--max-side", str(MAX_SIDE)]
    assert main(args) == 2
    assert shard_bytes(dst) == shard_bytes(sample_shards)
    assert main(args + ["--overwrite"]) == 0
    assert [s.samples for s in load_manifest(dst).shards] == [10, 10, 10, 10, 8]
    assert not (dst / "shard-000000.tar").read_bytes() == (sample_shards / "shard-000000.tar").read_bytes()


def test_bad_source_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(b"x")
    for src, words in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "no class folders"),
                       (flat, "no class folders")]:
        assert main([str(src), str(tmp_path / "out")]) == 2
        assert words in capsys.readouterr().err
    # The real command line, once: exit status 2 from the process itself.
    proc = subprocess.run([sys.executable, "-m", "pirl_fast.shard", str(tmp_path / "missing"), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "ImageFolder" in proc.stderr


# ------------------------------------------------------------------ --verify and load_manifest

def test_verify_catches_a_corrupted_shard(sample_shards, tmp_path):
    dst = reference_copy(sample_shards, tmp_path)
    assert verify_shards(dst) == []
    tar = dst / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    offset = int((dst / "shard-000001.idx").read_text().splitlines()[3].split()[1])  # 3rd sample's jpg
    data[offset + 700: offset + 1200] = bytes(500)  # zero a run inside the JPEG's entropy-coded data
    tar.write_bytes(bytes(data))
    problems = verify_shards(dst)
    assert problems and all("shard-000001.tar" in p for p in problems)
    assert any("sha256" in p for p in problems)
    proc = subprocess.run([sys.executable, "-m", "pirl_fast.shard", "--verify", str(dst)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "shard-000001.tar" in proc.stderr


def test_load_manifest_errors_name_the_path_and_the_fix(sample_shards, tmp_path):
    with pytest.raises(ShardError, match=r"does not exist.*pirl_fast\.shard"):
        load_manifest(tmp_path / "nowhere")
    dst = reference_copy(sample_shards, tmp_path)
    (dst / "shard-000002.idx").unlink()
    with pytest.raises(ShardError, match=r"shard-000002\.idx.*missing.*pirl_fast\.shard"):
        load_manifest(dst)
    (dst / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ShardError, match=r"manifest\.json.*JSON"):
        load_manifest(dst)
    m = load_manifest(sample_shards)
    assert m.tar_paths() == [str(sample_shards.resolve() / f"shard-00000{k}.tar") for k in range(4)]
    assert m.index_paths() == [p[:-4] + ".idx" for p in m.tar_paths()]


def test_sample_keys_are_stable_dot_free_and_distinct():
    key = shard_mod.sample_key("n01440764/n01440764_10026.JPEG")
    digest = hashlib.sha1(b"n01440764/n01440764_10026.JPEG").hexdigest()[:10]
    assert key == f"n01440764-n01440764_10026-{digest}"
    odd = ["c/a.jpg", "c/a.png", "c/a b.jpg", "c/a_b.jpg", "c/x.y.z.jpg", "c/" + "é" * 200 + ".jpg", "c/.hidden"]
    keys = [shard_mod.sample_key(p) for p in odd]
    assert len(set(keys)) == len(keys)
    for k in keys:
        assert all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in k), k
        assert len(k + ".jpg") < 100  # fits ustar's name field: no PAX/GNU long-name headers


def test_large_rotated_jpeg_is_made_upright_and_downscaled_like_pil():
    from pirl_fast.shard.images import normalise_image
    from pirl_fast.shard.sample_data import make_image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 2000x1000, upright 1000x2000
    buf = io.BytesIO()
    make_image(3, np.random.default_rng(0)).resize((2000, 1000)).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    result = normalise_image(buf.getvalue(), max_side=500)  # takes the reduced-scale (draft) decode path
    out = Image.open(io.BytesIO(result.jpeg))
    assert out.size == (result.width, result.height) == (250, 500) and not result.copied
    assert out.getexif().get(0x0112) is None  # orientation applied, not left for a reader to apply again
    ref = ImageOps.exif_transpose(Image.open(buf)).convert("RGB").resize(out.size, Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32)).mean() < 8

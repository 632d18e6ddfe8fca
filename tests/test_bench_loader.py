"""`python -m pirl_fast.bench loader` runs both backends with the augmentation it is told (no timing asserted)."""

import pytest

from pirl_fast.bench.__main__ import main
from pirl_fast.bench.loader import data_settings

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_data_settings_are_typed_by_the_schema():
    assert data_settings(["photometric_p=0", "blur_sigma=[0.5,1.5]", "color_aug=false"]) == {
        "photometric_p": 0.0, "blur_sigma": [0.5, 1.5], "color_aug": False}
    with pytest.raises(SystemExit, match="photometrc_p"):
        data_settings(["photometrc_p=0"])
    with pytest.raises(SystemExit, match="blur_p"):
        data_settings(["blur_p=often"])


def test_loader_bench_runs_both_backends_with_the_new_ops(tmp_path, capsys):
    out = tmp_path / "loader.json"
    assert main(["loader", "--images", "12", "--batch-size", "4", "--workers", "1", "--batches", "1", "--warmup", "1",
                 "--rounds", "1", "--data", "blur_p=0.5", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "dali" in table and "torch" in table and "blur_p=0.5" in table and out.exists()


def test_hw_decoder_sweep_on_a_gpu_only(monkeypatch, capsys):
    """The GPU contenders are one dali run per hw_decoder_load; a CPU-only machine says the sweep needs a GPU."""
    import argparse

    import torch

    from pirl_fast.bench import loader

    parser = argparse.ArgumentParser()
    loader.add_arguments(parser)
    args = parser.parse_args(["--hw-decoder-loads", "0", "0.8"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [(b, d.type, extra) for b, d, extra in loader.contenders(args)] == [
        ("dali", "cpu", {}), ("torch", "cpu", {}), ("dali", "cuda", {"hw_decoder_load": 0.0}),
        ("dali", "cuda", {"hw_decoder_load": 0.8})]
    with pytest.raises(SystemExit, match="must be in \\[0, 1\\]"):
        loader.contenders(parser.parse_args(["--hw-decoder-loads", "1.5"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [b for b, _, _ in loader.contenders(args)] == ["dali", "torch"]
    monkeypatch.setattr(loader, "measure", lambda shards, args, rec=None: [])
    loader.run(parser.parse_args(["--shards", "unused"]))
    assert "hw_decoder_load sweep: needs a GPU" in capsys.readouterr().out

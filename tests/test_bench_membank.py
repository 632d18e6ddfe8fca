"""bench membank on tiny sizes: every row and column is there and the figures hang together (no timing asserted)."""

import argparse
import types

import pytest
import torch

from pirl_fast.bench import membank
from pirl_fast.model import bank_kernels


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    membank.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_rows_compare_three_paths_per_loss_and_dtype(monkeypatch):
    b, k, d = 4, 2000, 16
    monkeypatch.setattr(bank_kernels, "CHUNK_ELEMENTS", b * d * 100)  # chunks of 100 negatives: memory shows
    args = parse("--batch", str(b), "--negatives", str(k), "--num-samples", "500", "--dim", str(d), "--repeats", "1",
                 "--device", "cpu", "--copy-mib", "4")
    copy, *rows = membank.run(args)
    assert copy["path"] == "copy" and copy["copy_gb_per_s"] > 0  # the device's copy bandwidth, measured first
    assert [(r["bank_dtype"], r["loss"], r["path"]) for r in rows] == [
        (dtype, loss, path) for dtype in ("float32", "bfloat16") for loss in ("nce", "infonce")
        for path in ("naive", "two-pass", "fused")]
    for row in rows:
        assert row["kernel"] == ("naive" if row["path"] == "naive" else "torch")  # auto on CPU
        assert row["fwd_bwd_ms"] > 0 and row["samples_per_s"] == pytest.approx(b * 1e3 / row["fwd_bwd_ms"])
        gathers = 2 if row["path"] == "two-pass" else 1
        elem = 4 if row["bank_dtype"] == "float32" else 2
        assert row["gather_gb_per_s"] == pytest.approx(gathers * b * k * d * elem / row["fwd_bwd_ms"] / 1e6)
        assert "frac_of_peak" not in row  # no bandwidth peak on a CPU unless given
        if row["path"] == "naive":
            naive = row
            assert row["peak_extra_mib"] * 2**20 >= b * k * d * elem  # the (B, K, D) gather
        else:
            assert row["speedup"] == pytest.approx(naive["fwd_bwd_ms"] / row["fwd_bwd_ms"])
            # fused: a chunk of 100 of the 2000 negatives; two-pass also keeps (B, K) scores and gradients
            assert row["memory_ratio"] > (10 if row["path"] == "fused" else 2), row
        assert ("target" in row) == (row["path"] == "fused") and "error" not in row
        if row["path"] == "fused":  # the gather pass alone: bank rows and index read, against the copy bandwidth
            assert row["kernel_bytes"] == b * k * (d * elem + 8)
            assert row["frac_of_copy"] == pytest.approx(row["kernel_gb_per_s"] / copy["copy_gb_per_s"])


def test_peak_bandwidth_from_device_properties(monkeypatch):
    """H100 SXM: HBM3 at 2,619 MHz on a 5,120-bit bus -> 2 x 2.619e9 x 640 B = 3,352 GB/s (NVIDIA: 3.35 TB/s)."""
    props = types.SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120, name="NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda = torch.device("cuda")
    assert membank.peak_bandwidth(parse(), cuda) == pytest.approx(3352.3, abs=0.1)
    assert membank.peak_bandwidth(parse("--peak-gb-per-s", "4800"), cuda) == 4800
    props.memory_clock_rate = 0  # not reported: the vendor figure by name
    assert membank.peak_bandwidth(parse(), cuda) == 3350.0
    assert membank.peak_bandwidth(parse(), torch.device("cpu")) is None

"""`python -m pirl_fast.bench learn` end to end on a tiny generated IDX dataset (the plumbing, not
the learning: that is tests/test_learns.py and the benchmark itself), and its report helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_idx_folder import write_idx

from pirl_fast.bench import learn
from pirl_fast.bench.__main__ import build_parser, main


def write_dataset(root, n_train=40, n_test=20, classes=10, seed=0):
    """IDX files in Fashion-MNIST's names: 28 px images whose stripe angle depends on the class."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:28, 0:28]
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % classes
        angle = labels[:, None, None] * np.pi / classes
        phase = rng.uniform(0, 6.28, (n, 1, 1))
        images = 127.5 + 100 * np.sin((x * np.cos(angle) + y * np.sin(angle)) / 2 + phase)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images.astype(np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root


def test_learn_bench_end_to_end(tmp_path, capsys):
    idx = write_dataset(tmp_path / "idx")
    out = tmp_path / "bench"
    argv = ["learn", "--idx-dir", str(idx), "--out", str(out), "--train-images", "40", "--test-images", "20",
            "--epochs", "1", "--batch", "20", "--seeds", "0", "--evals", "2", "--workers", "1",
            "--json", str(tmp_path / "learn.json"), "--override", "bank.num_negatives=32"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "PIRL kNN top-1 >= untrained + 5 points" in printed and "Jigsaw" in printed
    assert "PIRL kNN top-1 >= raw pixels + 3 points" in printed and "| raw pixels | 1 |" in printed
    results = json.loads((tmp_path / "learn.json").read_text())["results"]["learn"]
    assert [r["network"] for r in results] == ["PIRL", "Jigsaw", "supervised", "untrained", "raw pixels"]
    for row in results:
        assert 0 <= row["knn_top1"] <= 100 and 0 <= row["linear_res5_top1"] <= 100
        assert row["seeds"] == 1 and row["knn_spread"] == 0
    details = json.loads((out / "learn.json").read_text())
    assert [s["metric"] for s in details["gap_shares"]] == ["kNN top-1", "linear res5"] * 2
    assert details["config"]["method"] == "pirl"
    sup = (out / "runs" / "supervised_seed0" / "config.yaml").read_text()
    assert "method: supervised" in sup and "num_classes: 10" in sup
    assert all("logistic_res5" in r for r in results)
    # Raw pixels at their own size, recomputed here from the shards read by the webdataset library and the
    # weighted-kNN formula written out (mean-centred pixels, cosine, k = min(200, N), tau = 0.07)
    native = details["per_seed"]["0"]["pixels"]["native"]
    assert native["size"] == 28
    assert native["knn_top1"] == pytest.approx(independent_pixel_knn(out), abs=1e-3)  # one query is 5 points
    # A second invocation reruns nothing: the runs and their evaluation are reused
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "pre-train" not in again and again.count("reusing the finished run") == 3 and "reusing" in again
    assert json.loads((out / "learn.json").read_text())["rows"] == details["rows"]
    # `report` prints the same table from learn.json
    from pirl_fast.report.cli import main as report_main
    assert report_main([str(out)]) == 0
    assert "| raw pixels | 1 |" in capsys.readouterr().out and (out / "learn.md").is_file()
    curve = details["per_seed"]["0"]["pirl"]["knn_curve"]
    assert [step for step, _ in curve] == [0, 1, 2]  # the untrained point, then every 2 steps / 2 evals
    assert curve[0][1] == details["per_seed"]["0"]["untrained"]["knn_top1"]
    assert len(details["targets"]) == 8 and (out / "learn.png").stat().st_size > 0
    gaps = details["per_seed"]["0"]["pirl"]["invariance_gap"]
    assert set(gaps) == {"pirl_head", "trunk"}
    assert set(details["per_seed"]["0"]["jigsaw"]["invariance_gap"]) == {"trunk"}
    assert details["config"]["model"]["arch"] == "resnet18"
    # a second run reuses the data and shards
    args = build_parser().parse_args(argv)
    assert learn.prepare_split(args, "train", 40, out / "data" / "train_40") == out / "data" / "train_40" / "shards"
    assert "reusing" in capsys.readouterr().out


def independent_pixel_knn(out) -> float:
    import io

    import webdataset as wds
    from PIL import Image

    def read(folder):
        tars = sorted(str(p) for p in folder.glob("shard-*.tar"))
        xs, ys = [], []
        for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
            image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float64) / 255
            xs.append(image.transpose(2, 0, 1).ravel())
            ys.append(int(sample["cls"]))
        return np.stack(xs), np.array(ys)

    (x, y), (q, qy) = read(out / "data" / "train_40" / "shards"), read(out / "data" / "test_20" / "shards")
    mean = x.mean(axis=0)
    x, q = x - mean, q - mean
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    correct = 0
    for row, label in zip(q, qy):
        sims = x @ row
        votes = np.zeros(10)
        for i in np.argsort(-sims)[:min(200, len(x))]:
            votes[y[i]] += np.exp(sims[i] / 0.07)
        correct += int(np.argmax(votes) == label)
    return 100 * correct / len(q)


def test_summary_targets_and_spread():
    def result(knn, res5, gap, head=None, bn_knn=None):
        r = {"knn_top1": knn, "linear_top1": {s: res5 - 1 for s in learn.STAGES}, "invariance_gap": {"trunk": gap}}
        r["linear_top1"]["res5"] = res5
        if head is not None:
            r["invariance_gap"]["pirl_head"] = head
        bn = {f"bn_{k}": v for k, v in r.items()}  # BN re-estimated: the same unless told
        bn["bn_knn_top1"] = knn if bn_knn is None else bn_knn
        return {**r, **bn}

    pixels = {"knn_top1": 75.0, "linear_top1": {"res5": 80.0}, "bn_knn_top1": 75.0, "bn_linear_top1": {"res5": 80.0}}
    per_seed = {0: {"pirl": result(80, 82, 0.3, 0.5), "jigsaw": result(70, 75, 0.1), "untrained": result(72, 70, 0.05),
                    "supervised": result(92, 90, 0.0), "pixels": pixels},
                1: {"pirl": result(78, 80, 0.2, 0.4), "jigsaw": result(71, 74, 0.1), "untrained": result(73, 71, 0.04),
                    "supervised": result(93, 91, 0.0), "pixels": pixels}}
    rows = learn.summarise(per_seed)
    assert [r["network"] for r in rows] == ["PIRL", "Jigsaw", "supervised", "untrained", "raw pixels"]
    assert rows[-1]["knn_top1"] == 75 and rows[-1]["knn_spread"] == 0 and "trunk_inv_gap" not in rows[-1]
    shares = learn.gap_shares(per_seed)
    assert shares[0]["metric"] == "kNN top-1" and shares[0]["bn"] == "as is"
    assert shares[0]["per_seed"] == pytest.approx([8 / 20, 5 / 20])  # (80-72)/(92-72), (78-73)/(93-73)
    assert shares[0]["share"] == pytest.approx(0.325) and shares[0]["spread"] == pytest.approx(0.15)
    assert shares[1]["per_seed"] == pytest.approx([12 / 20, 9 / 20])  # res5: (82-70)/(90-70), (80-71)/(91-71)
    pirl = rows[0]
    assert pirl["knn_top1"] == 79 and pirl["knn_spread"] == 2 and pirl["knn_per_seed"] == "80.00 78.00"
    assert pirl["trunk_inv_gap"] == pytest.approx(0.25) and pirl["head_inv_gap"] == pytest.approx(0.45)
    assert pirl["linear_best_stage"] == "res5 81.00"
    assert np.isnan(rows[1]["head_inv_gap"])
    met = [m for _, m in learn.targets(rows)]
    # 79 >= 72.5 + 5, 79 > 70.5, 81 > 70.5, 0.25 > 0.1; pixels: 79 >= 75 + 3, 81 >= 80 + 1
    assert met == [True, True, True, True, True, True]
    per_seed[1]["pirl"]["knn_top1"] = 74  # mean 77: 4.5 points above untrained, still above Jigsaw, < pixels + 3
    text, met = zip(*learn.targets(learn.summarise(per_seed)))
    assert list(met) == [False, True, True, True, True, True]  # pixels: met with BN re-estimated (79 >= 78)
    assert text[4].endswith("met with BN re-estimated")
    per_seed[1]["pirl"]["bn_knn_top1"] = 74
    assert not learn.targets(learn.summarise(per_seed))[4][1]
    per_seed[1]["pirl"]["knn_top1"] = 78
    per_seed[1]["pirl"]["bn_knn_top1"] = 78
    per_seed[0]["untrained"]["bn_knn_top1"] = 76  # the untrained network gains from re-estimated statistics
    text, met = learn.targets(learn.summarise(per_seed))[0]
    assert not met and "BN re-estimated: 79.00 vs 74.50" in text


def test_help_says_how_to_get_the_data(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["learn", "--help"])
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().out


def test_missing_dataset_exits_2_saying_how_to_install(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["learn", "--idx-dir", str(tmp_path), "--out", str(tmp_path / "bench")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "needs Fashion-MNIST" in err and "apt-get install dataset-fashion-mnist" in err and str(tmp_path) in err
    assert not (tmp_path / "bench").exists()  # nothing started


def test_validation_split_is_held_out_from_pretraining(tmp_path):
    """--eval-on val: class-balanced training-split images that pre-training never sees."""
    idx = write_dataset(tmp_path / "idx", n_train=60)
    args = build_parser().parse_args(["learn", "--idx-dir", str(idx), "--workers", "1"])
    train = learn.prepare_split(args, "train", 30, tmp_path / "train")
    val = learn.prepare_split(args, "train", 20, tmp_path / "val", skip=30)
    names = {d: sorted(p.name for p in (d.parent / "images").rglob("*.jpg")) for d in (train, val)}
    assert len(names[train]) == 30 and len(names[val]) == 20 and not set(names[train]) & set(names[val])
    per_class = [len(list(c.iterdir())) for c in sorted((val.parent / "images").iterdir())]
    assert per_class == [2] * 10  # balanced: 20 images over 10 classes
    with pytest.raises(SystemExit, match="only 60"):
        learn.prepare_split(args, "train", 40, tmp_path / "too_many", skip=30)


def test_curve_of_pirl_against_pixels_by_number_of_images(tmp_path, capsys):
    idx = write_dataset(tmp_path / "idx", n_train=60, n_test=20)
    out = tmp_path / "bench"
    argv = ["learn", "--idx-dir", str(idx), "--out", str(out), "--curve", "20,40", "--test-images", "20",
            "--epochs", "1", "--batch", "20", "--seeds", "0", "--workers", "1", "--override", "bank.num_negatives=16"]
    assert main(argv) == 0
    curve = json.loads((out / "curve.json").read_text())
    assert [p["train_images"] for p in curve["points"]] == [20, 40]
    for point in curve["points"]:
        assert all(0 <= point[k] <= 100 for k in ("pirl_knn", "pirl_bn_knn", "pirl_linear", "pixels_knn",
                                                 "pixels_linear"))
    assert (out / "curve.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="at least two numbers"):
        main([*argv[:-4], "--curve", "20"])

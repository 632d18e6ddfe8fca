"""Linear SVM transfer (pirl_fast.eval.svm): the VOC AP against a loop transcribed from the reference's
evaluate.py, separable features at 100%, shuffled labels at chance, the multi-label mAP path with
"difficult" entries, agreement with a direct scikit-learn fit, low-shot draws (class-balanced,
seeded), and the CLI on generated shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pirl_fast.eval import cli as ev
from pirl_fast.eval import svm

FAST = svm.SVMConfig(costs=(0.1, 1.0, 10.0))


def reference_ap(targets: np.ndarray, scores: np.ndarray) -> float:
    """vissl/utils/svm_utils/evaluate.py get_precision_recall + calculate_ap, loop for loop."""
    targets = np.array(targets > 0, dtype=np.float32)
    ind = np.argsort(scores)[::-1]
    tp = np.array([targets[i] for i in ind], dtype=np.float64)
    fp = np.array([0.0 if t >= 1 else 1.0 for t in tp])
    precision = np.cumsum(tp) / (np.cumsum(tp) + np.cumsum(fp))
    recall = np.cumsum(tp) / np.sum(targets)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return float(sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in np.where(mrec[1:] != mrec[:-1])[0] + 1))


def test_voc_ap_matches_the_reference_formula():
    rng = np.random.default_rng(0)
    for n in (5, 37, 200):
        scores = rng.normal(size=n)
        positive = rng.random(n) < 0.3
        positive[0] = True
        assert svm.voc_ap(scores, positive) == pytest.approx(reference_ap(positive.astype(int), scores))
    assert svm.voc_ap(np.array([3.0, 2.0, 1.0]), np.array([True, True, False])) == pytest.approx(1.0)


def clusters(n_per_class: int, classes: int, dims: int, seed: int, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    centres = np.eye(classes, dims) * 5
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + spread * rng.normal(size=(labels.size, dims)), np.eye(classes, dtype=np.int8)[labels]


def test_separable_features_reach_100_percent():
    train_x, train_t = clusters(12, 4, 16, seed=0)
    test_x, test_t = clusters(10, 4, 16, seed=1)
    result = svm.train_and_test(train_x, train_t, test_x, test_t, single_label=True, cfg=FAST)
    assert result.top1 == 1.0 and result.mAP == pytest.approx(1.0)
    assert len(result.chosen_cost) == 4 and all(c in FAST.costs for c in result.chosen_cost)


def test_shuffled_labels_are_near_chance():
    rng = np.random.default_rng(3)
    train_x, test_x = rng.normal(size=(200, 32)), rng.normal(size=(400, 32))
    train_t = np.eye(4, dtype=np.int8)[rng.integers(0, 4, 200)]
    test_t = np.eye(4, dtype=np.int8)[rng.integers(0, 4, 400)]
    result = svm.train_and_test(train_x, train_t, test_x, test_t, single_label=True, cfg=FAST)
    assert abs(result.top1 - 0.25) < 0.1, result.top1  # 400 samples: chance +- ~5 standard errors
    assert result.mAP < 0.4, result.mAP  # random scores: AP near the positive rate, 0.25


def test_multi_label_map_ignores_difficult_and_matches_a_direct_fit():
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(5)
    x = rng.normal(size=(120, 6))
    targets = (x[:, :3] > 0.2).astype(np.int8)  # class c present when feature c is large: several per sample
    train_x, train_t, test_x, test_t = x[:80], targets[:80], x[80:], targets[80:].copy()
    cfg = svm.SVMConfig(costs=(1.0,))
    result = svm.train_and_test(train_x, train_t, test_x, test_t, single_label=False, cfg=cfg)
    assert result.top1 is None and result.mAP > 0.9
    # Independent path: scikit-learn with the reference's arguments, the reference's AP loop.
    xn = train_x / (np.linalg.norm(train_x, axis=1) + 1e-5)[:, None]
    tn = test_x / (np.linalg.norm(test_x, axis=1) + 1e-5)[:, None]
    for c in range(3):
        clf = LinearSVC(C=1.0, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2", loss="squared_hinge",
                        tol=1e-4, dual=True, max_iter=2000).fit(xn, np.where(train_t[:, c] == 1, 1, -1))
        want = reference_ap(test_t[:, c], clf.decision_function(tn))
        assert result.ap_per_class[c] == pytest.approx(want, abs=1e-6)
    # A "difficult" (-1) test entry is left out of its class's AP (scores 3, 2, 1, 0; identity weights).
    raw = svm.SVMConfig(normalize=False)
    scores = np.array([[3.0], [2.0], [1.0], [0.0]])
    _, full, _ = svm.evaluate(np.eye(1), np.zeros(1), scores, np.array([[1], [0], [1], [0]]), False, raw)
    _, easy, _ = svm.evaluate(np.eye(1), np.zeros(1), scores, np.array([[1], [0], [-1], [0]]), False, raw)
    assert full == pytest.approx(0.5 * 1 + 0.5 * 2 / 3) and easy == pytest.approx(1.0)


def test_low_shot_draws_are_class_balanced_and_seeded():
    _, single = clusters(9, 5, 8, seed=0)
    a = svm.low_shot_draw(single, 3, True, np.random.default_rng([0, 0, 3]))
    b = svm.low_shot_draw(single, 3, True, np.random.default_rng([0, 0, 3]))
    c = svm.low_shot_draw(single, 3, True, np.random.default_rng([0, 1, 3]))
    chosen = (a != -1).all(1)
    assert chosen.sum() == 15 and np.bincount(single[chosen].argmax(1), minlength=5).tolist() == [3] * 5
    assert np.array_equal(a[chosen], single[chosen]) and ((a == -1).all(1) | chosen).all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    rng = np.random.default_rng(1)
    multi = (rng.random((300, 4)) < 0.3).astype(np.int8)
    m = svm.low_shot_draw(multi, 2, False, np.random.default_rng(7))
    for cls in range(4):
        assert (m[:, cls] == 1).sum() == 2 and (m[:, cls] == 0).sum() == 3 * 2
        assert (multi[m[:, cls] == 1, cls] == 1).all() and (multi[m[:, cls] == 0, cls] == 0).all()
    with pytest.raises(ValueError, match="class 0 has only 9"):
        svm.low_shot_draw(single, 10, True, np.random.default_rng(0))


def test_low_shot_on_separable_features():
    train_x, train_t = clusters(10, 3, 8, seed=0, spread=0.1)
    test_x, test_t = clusters(10, 3, 8, seed=1, spread=0.1)
    out = svm.low_shot(train_x, train_t, test_x, test_t, [1, 4], True, FAST, draws=3)
    assert set(out) == {1, 4}
    assert out[4]["mean"] == 1.0 and out[4]["std"] == 0.0 and len(out[4]["per_draw"]) == 3
    assert out[1]["metric"] == "top1" and len(out[1]["per_cost_mean"]) == len(FAST.costs)


def test_svm_cli_on_shards(tmp_path, sample_shards):
    from test_vissl_import import pirl_heads, reference_checkpoint

    reference_checkpoint(tmp_path / "ref.torch", "resnet18", pirl_heads())
    run = tmp_path / "run"
    assert ev.main(["import-vissl", str(tmp_path / "ref.torch"), "--out", str(run)]) == 0
    common = ["--train-shards", str(sample_shards), "--val-shards", str(sample_shards), "--workers", "0",
              "--image-size", "32", "--costs", "0.1", "1", "--folds", "2"]
    assert ev.main(["svm", str(run), *common, "--feature", "res5avg"]) == 0
    got = json.loads((run / "svm.json").read_text())
    assert got["label_kind"] == "single" and got["dims"] == 512 and got["num_classes"] == 4
    assert 0 <= got["top1"] <= 1 and len(got["ap_per_class"]) == 4
    assert ev.main(["svm", str(run), *common, "--low-shot", "1", "2", "--draws", "2"]) == 0
    low = json.loads((run / "svm_lowshot.json").read_text())
    assert low["dims"] == 512 * 4 and set(low["low_shot"]) == {"1", "2"}  # res5 by default: 512 x 2 x 2


def write_multi_label_shards(root, targets: np.ndarray, classes: list[str]) -> None:
    """A shard directory in the proposed multi-label format (shards/README.md): the usual members with
    KEY.lbl = -1, plus KEY.mlb = C int8. Written by hand, independently of the sharder (whose own
    multi-label output tests/test_multi_label_shards.py checks)."""
    import io
    import tarfile

    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with tarfile.open(root / "shard-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, row in enumerate(targets):
            jpeg = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(jpeg, "JPEG")
            members = {"jpg": jpeg.getvalue(), "cls": b"-1", "idx": i.to_bytes(8, "little", signed=True),
                       "lbl": (-1).to_bytes(8, "little", signed=True), "mlb": row.astype(np.int8).tobytes()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "shard-000000.idx").write_text("v1.2 0\n")
    size = (root / "shard-000000.tar").stat().st_size
    (root / "manifest.json").write_text(json.dumps({
        "format": "pirl_fast-shards", "version": 1, "num_samples": len(targets), "classes": classes,
        "label_kind": "multi", "sample_members": ["jpg", "cls", "idx", "lbl", "mlb"],
        "shards": [{"name": "shard-000000.tar", "index_name": "shard-000000.idx", "samples": len(targets),
                    "bytes": size, "sha256": ""}]}))


def test_multi_label_shards_are_read_and_scored_with_map(tmp_path):
    from test_vissl_import import pirl_heads, reference_checkpoint

    from pirl_fast.eval.features import ShardImageDataset, svm_transform

    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, -1], [0, 1, 1]] * 2, np.int8)
    write_multi_label_shards(tmp_path / "voc", targets, ["cat", "dog", "person"])
    data = ShardImageDataset(tmp_path / "voc", svm_transform(32))
    assert data.multi_label and np.array_equal(data.targets, targets)
    reference_checkpoint(tmp_path / "ref.torch", "resnet18", pirl_heads())
    assert ev.main(["import-vissl", str(tmp_path / "ref.torch"), "--out", str(tmp_path / "run")]) == 0
    assert ev.main(["svm", str(tmp_path / "run"), "--train-shards", str(tmp_path / "voc"), "--val-shards",
                    str(tmp_path / "voc"), "--workers", "0", "--image-size", "32", "--costs", "1", "--folds", "2",
                    "--feature", "res5avg"]) == 0
    got = json.loads((tmp_path / "run" / "svm.json").read_text())
    assert got["label_kind"] == "multi" and got["top1"] is None and len(got["ap_per_class"]) == 3
    assert 0 < got["mAP"] <= 1

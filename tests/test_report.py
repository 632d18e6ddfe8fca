"""`python -m pirl_fast.report` on fake run directories: the table carries exactly the numbers the
eval JSON holds, the swept key and nothing else from the config, and a readable PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pirl_fast.report import cli as report


def fake_run(path: Path, lam: float, knn_top1: float, res5: float, loss: float, extra: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        f"method: pirl\nname: sweep\nrun_dir: {path}\nloss:\n  kind: nce\n  lam: {lam}\n  temperature: 0.07\n"
        "bank:\n  num_negatives: 256\ndata:\n  image_scale: [0.08, 1.0]\n")
    (path / "knn.json").write_text(json.dumps({"top1": knn_top1, "top5": 1.0, "k": 200}))
    stages = {s: {"top1": res5 / (5 - i), "top5": 1.0} for i, s in enumerate(["conv1", "res2", "res3", "res4", "res5"])}
    (path / "linear.json").write_text(json.dumps({"stages": stages}))
    ckpt = str(path / "checkpoints" / "step_000000010.pt")
    (path / "invariance.json").write_text(json.dumps({"checkpoints": {
        "other": {"checkpoint": "/elsewhere/step_1.pt", "trunk": {"mean": 9.0}},
        "mine": {"checkpoint": ckpt, "pirl_head": {"mean": 0.25 + lam}, "trunk": {"mean": 0.5}}}}))
    (path / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": loss + 10 - s}) for s in range(11)))
    for name, payload in (extra or {}).items():
        (path / name).write_text(json.dumps(payload))
    return path


def parse_table(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_report_on_two_runs(tmp_path, capsys):
    a = fake_run(tmp_path / "runs" / "lam_a", lam=0.25, knn_top1=0.5, res5=0.6, loss=3.0,
                 extra={"knn_random_init.json": {"top1": 0.125}})
    b = fake_run(tmp_path / "runs" / "lam_b", lam=0.75, knn_top1=0.625, res5=0.7, loss=2.5)
    assert report.main([str(a), str(b)]) == 0
    out = tmp_path / "runs" / "report_lam_a+lam_b"  # beside the runs, named after them
    rows = parse_table((out / "report.md").read_text())
    assert [r["run"] for r in rows] == ["lam_a", "lam_b"]
    # Only the swept key appears from the config (run_dir differs too, but is not a setting).
    config_columns = [c for c in rows[0] if "." in c]
    assert config_columns == ["loss.lam"]
    assert [r["loss.lam"] for r in rows] == ["0.25", "0.75"]
    assert [r["knn_top1"] for r in rows] == ["50", "62.5"]
    assert [r["linear_res5_top1"] for r in rows] == ["60", "70"]
    assert [r["linear_conv1_top1"] for r in rows] == ["12", "14"]  # res5 / 5
    assert [r["knn_random_top1"] for r in rows] == ["12.5", ""]
    assert [r["invariance_pirl_head_mean"] for r in rows] == ["0.5", "1"]  # this run's checkpoint, not "other"
    assert [r["final_loss"] for r in rows] == ["3", "2.5"]
    with Image.open(out / "report.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert "| lam_a |" in capsys.readouterr().out


def test_layerwise_figure_has_a_line_per_method(tmp_path):
    pirl = fake_run(tmp_path / "runs" / "pirl", lam=0.5, knn_top1=0.5, res5=0.6, loss=1.0)
    jigsaw = fake_run(tmp_path / "runs" / "jigsaw", lam=0.5, knn_top1=0.4, res5=0.45, loss=1.0)
    for run, method in ((pirl, "pirl"), (jigsaw, "jigsaw")):
        linear = json.loads((run / "linear.json").read_text())
        (run / "linear.json").write_text(json.dumps({**linear, "method": method, "protocol": {"protocol": "goyal"}}))
    (pirl / "linear_random_init.json").write_text(json.dumps({"stages": {s: {"top1": 0.1} for s in report.LAYERS},
                                                               "protocol": {"protocol": "goyal"}}))
    lines = report.layerwise_lines([pirl, jigsaw])
    assert [label for label, _ in lines] == ["pirl (pirl, goyal)", "jigsaw (jigsaw, goyal)", "untrained (pirl, goyal)"]
    assert lines[0][1] == pytest.approx([12, 15, 20, 30, 60]) and lines[1][1] == pytest.approx([9, 11.25, 15, 22.5, 45])
    assert lines[2][1] == pytest.approx([10] * 5)
    assert report.main([str(pirl), str(jigsaw), "--out", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "layerwise.png") as png:
        assert png.format == "PNG" and png.size[0] > 100


def test_sweep_folder_expands_in_job_order(tmp_path):
    sweep = tmp_path / "sweep_negatives"
    for job, k in [(10, 0.9), (2, 0.3), (0, 0.1)]:
        fake_run(sweep / str(job), lam=0.5, knn_top1=k, res5=k, loss=1.0)
        cfg = sweep / str(job) / "config.yaml"
        cfg.write_text(cfg.read_text().replace("num_negatives: 256", f"num_negatives: {job * 100 + 1}"))
    out = tmp_path / "report"
    assert report.main([str(sweep), "--out", str(out), "--x", "bank.num_negatives"]) == 0
    rows = parse_table((out / "report.md").read_text())
    assert [r["run"] for r in rows] == ["0", "2", "10"]  # numeric job order, not "0, 10, 2"
    assert [r["bank.num_negatives"] for r in rows] == ["1", "201", "1001"]
    assert [r["knn_top1"] for r in rows] == ["10", "30", "90"]
    assert (out / "report.png").stat().st_size > 0


def test_report_errors_name_the_problem(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="neither a run directory"):
        report.main([str(empty)])
    run = fake_run(tmp_path / "r", lam=0.5, knn_top1=0.5, res5=0.5, loss=1.0)
    with pytest.raises(SystemExit, match="not a config key"):
        report.main([str(run), "--x", "loss.lamda"])
    (run / "knn.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        report.main([str(run)])


def test_one_run_reports_inside_it_with_seeds_averaged_the_steps_run_and_the_untrained_probe(tmp_path, capsys,
                                                                                               monkeypatch):
    run = fake_run(tmp_path / "runs" / "smoke", lam=0.5, knn_top1=0.5, res5=0.6, loss=1.0, extra={
        "knn_random_init.json": {"top1": 0.25}, "knn_random_init_seed1.json": {"top1": 0.5},
        "knn_random_init_seed2.json": {"top1": 0.75}, "knn_random_init_seedx.json": {"top1": 1.0},  # not a seed
        "linear_random_init.json": {"stages": {"res4": {"top1": 0.2}, "res5": {"top1": 0.3}}},
        "summary.json": {"step": 201}})
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text() + "trainer:\n  max_steps: 500\n")
    monkeypatch.chdir(tmp_path)
    assert report.main(["runs/smoke"]) == 0
    assert "wrote runs/smoke/report.md" in capsys.readouterr().out  # inside the run, and said so
    (row,) = parse_table((run / "report.md").read_text())
    assert row["steps"] == "201" and "trainer.max_steps" not in row  # what ran, not what was asked for
    assert row["knn_random_top1"] == "50 ± 25 (3 seeds)"  # mean and sample std over seeds 0, 1, 2
    assert row["linear_random_top1"] == "30"  # the untrained network's best head
    assert not (tmp_path / "report.md").exists()


def test_steps_come_from_the_newest_checkpoint_without_a_summary(tmp_path, monkeypatch):
    a = fake_run(tmp_path / "a", lam=0.25, knn_top1=0.5, res5=0.6, loss=1.0)
    fake_run(tmp_path / "b", lam=0.75, knn_top1=0.5, res5=0.6, loss=1.0)
    for step in (5, 40):
        (a / "checkpoints").mkdir(exist_ok=True)
        (a / "checkpoints" / f"step_{step:09d}.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # the runs' common folder is the current one: the report goes to reports/
    assert report.main(["a", "b"]) == 0
    rows = parse_table((tmp_path / "reports" / "report_a+b" / "report.md").read_text())
    assert [r["steps"] for r in rows] == ["40", ""]


@pytest.mark.parametrize("margin, status", [(5, 0), (7.5, 1)])
def test_min_knn_gain_passes_only_when_every_row_clears_the_margin(tmp_path, capsys, margin, status):
    """Trained vs untrained: +37.5 points with BN statistics as they are, +6.25 re-estimated; the
    smaller gain decides (scripts/learn_check.sh's verdict)."""
    run = fake_run(tmp_path / "run", lam=0.5, knn_top1=0.5, res5=0.6, loss=3.0, extra={
        "knn_random_init.json": {"top1": 0.125}, "knn_bn.json": {"top1": 0.5625},
        "knn_random_init_bn.json": {"top1": 0.5}})
    assert report.main([str(run), "--min-knn-gain", str(margin)]) == status
    out = capsys.readouterr().out
    assert "trained 50.00%, untrained 12.50% (+37.5 points)" in out
    assert "trained 56.25%, untrained 50.00% (+6.2 points)" in out
    assert ("PASS" if status == 0 else "FAIL") in out
    rows = parse_table((run / "report.md").read_text())
    assert rows[0]["knn_bn_top1"] == "56.25" and rows[0]["knn_random_bn_top1"] == "50"


def test_min_knn_gain_fails_without_an_untrained_measurement(tmp_path, capsys):
    run = fake_run(tmp_path / "run", lam=0.5, knn_top1=0.5, res5=0.6, loss=3.0)
    assert report.main([str(run), "--min-knn-gain", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out

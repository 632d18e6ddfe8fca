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

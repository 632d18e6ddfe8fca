"""Progress output: a bar on a terminal, a few plain lines in a pipe or a log file (pirl_fast/runtime/progress.py)."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from pirl_fast.runtime import progress as pg


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(pg.time, "monotonic", clock)
    return clock


def test_a_pipe_gets_a_line_per_interval_and_one_at_the_end(clock, capsys):
    bar = pg.progress(total=10, desc="features: train", unit="batch")
    assert isinstance(bar, pg.PlainProgress)  # pytest's captured stderr is no terminal
    for step in range(10):
        clock.now += 10.0  # 10 s per batch: a line after every 3rd (30 s)
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.2f}")
    bar.close()
    bar.close()  # closing twice prints nothing more
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["features: train: 3/10 batch (30%) after 30 s, 0.1 batch/s, loss=0.50",
                     "features: train: 6/10 batch (60%) after 60 s, 0.1 batch/s, loss=0.20",
                     "features: train: 9/10 batch (90%) after 90 s, 0.1 batch/s, loss=0.12",
                     "features: train: 10/10 batch in 100.0 s, 0.1 batch/s, loss=0.10"]


def test_quick_work_in_a_pipe_prints_nothing(clock, capsys):
    for _ in pg.progress(range(5), desc="scan", unit="shard"):
        clock.now += 0.1
    assert capsys.readouterr().err == ""


def test_iterating_reports_as_it_goes_and_counts_from_initial(clock, capsys):
    def slow():
        for i in range(4):
            clock.now += 20.0
            yield i

    assert list(pg.progress(slow(), total=10, initial=6, desc="shard", unit="img")) == [0, 1, 2, 3]
    assert capsys.readouterr().err.splitlines() == ["shard: 8/10 img (80%) after 40 s, 0.05 img/s",
                                                    "shard: 10/10 img in 80.0 s, 0.05 img/s"]


def test_a_terminal_gets_a_tqdm_bar_and_disabled_means_silent(monkeypatch):
    monkeypatch.setattr(pg.sys, "stderr", FakeTTY())
    assert pg.is_terminal() and not pg.is_terminal(io.StringIO())
    bar = pg.progress(total=3, desc="x")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    quiet = pg.progress(total=3, enabled=False)
    assert isinstance(quiet, tqdm) and quiet.disable
    monkeypatch.setattr(pg.sys, "stderr", io.StringIO())
    assert isinstance(pg.progress(total=3), pg.PlainProgress)

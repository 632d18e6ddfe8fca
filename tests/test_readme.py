"""README.md's commands, run as written: the blocks are read from README.md itself, so the two cannot drift.

Every ```bash block is a list of commands (a line ending in `\\` continues on the next); each runs
with `bash -c` in a temporary folder that stands in for a fresh clone (the repository's .venv and
scripts/ linked in, nothing else), in README order, with .venv/bin first on PATH (what
`source .venv/bin/activate` does). A marker in square brackets at the start of a command's comment
says how it is walked:

    [fails: MESSAGE]   must exit non-zero, print MESSAGE, and print no traceback
    [slow]             walked only by the slow test (bash scripts/test.sh -m slow)
    [GPU] [nodes] [ImageNet] [VOC] [SLURM] [download] [tests]
                       never walked here: needs CUDA, several machines, a dataset, a SLURM
                       cluster, a downloaded file, or is the test suite itself

The default test walks the "first hour" section (a couple of minutes); the slow test walks the
whole README, the first hour again included (later blocks build on its runs).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TOUR_HEADING = "## The first hour"
SKIP_TAGS = {"GPU", "nodes", "ImageNet", "VOC", "SLURM", "download", "tests"}
TAG = re.compile(r"#\s*\[(fails: [^\]]+|slow|GPU|nodes|ImageNet|VOC|SLURM|download|tests)\]")
COMMAND_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Command:
    text: str  # what bash runs (the comment left out)
    tag: str | None  # the marker, e.g. "fails: does not exist", "slow", "GPU"
    section: str  # the README's "## " heading above it
    line: int  # README line number, for messages

    @property
    def fails_with(self) -> str | None:
        return self.tag[len("fails: "):] if self.tag and self.tag.startswith("fails: ") else None


def readme_commands(text: str) -> list[Command]:
    """Every command of every ```bash block, in order."""
    commands, section, block, pending, start = [], "", None, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if block is None:
            if line.startswith("## "):
                section = line.strip()
            elif line.strip() == "```bash":
                block = []
            continue
        if line.strip() == "```":
            block = None
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full, pending = pending + line, ""
        code, _, comment = split_comment(full)
        if not code.strip():
            continue
        match = TAG.match("# " + comment) if comment.startswith("[") else None
        if comment.startswith("[") and not match:
            raise AssertionError(f"README.md line {start}: unknown marker in {comment!r} (known: {TAG.pattern})")
        commands.append(Command(code.strip(), match.group(1) if match else None, section, start))
    return commands


def split_comment(line: str) -> tuple[str, str, str]:
    """(code, "#", comment): the first # that is outside quotes and starts a word begins the comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], "#", line[i + 1:].strip()
    return line, "", ""


def tour(commands: list[Command]) -> list[Command]:
    return [c for c in commands if c.section == TOUR_HEADING]


def walk(commands: list[Command], folder: Path, slow: bool) -> list[str]:
    """Run `commands` in order in `folder`; returns what was skipped and why (asserts on the rest)."""
    for name in (".venv", "scripts"):
        if not (folder / name).exists():
            (folder / name).symlink_to(REPO / name)
    venv = Path(os.environ.get("PIRL_VENV", REPO / ".venv"))
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
           "PYTHONUNBUFFERED": "1"}
    skipped = []
    for c in commands:
        if c.tag in SKIP_TAGS or (c.tag == "slow" and not slow):
            skipped.append(f"line {c.line} [{c.tag}]: {c.text}")
            continue
        result = subprocess.run(["bash", "-c", c.text], cwd=folder, env=env, capture_output=True, text=True,
                                timeout=COMMAND_TIMEOUT_S)
        output = result.stdout + result.stderr
        where = f"README.md line {c.line} ({c.section}): {c.text}\n--- output (last 4000 characters):\n{output[-4000:]}"
        if c.fails_with is None:
            assert result.returncode == 0, f"exit {result.returncode}, README says it works: {where}"
        else:
            assert result.returncode != 0, f"exit 0, README says it fails with {c.fails_with!r}: {where}"
            assert c.fails_with in output, f"README says it fails with {c.fails_with!r}: {where}"
            assert "Traceback" not in output, f"a traceback instead of a one-line error: {where}"
        assert "\r" not in output, f"progress bar frames in piped output (no terminal here): {where}"
    return skipped


def test_readme_markers_parse():
    """Every block parses, the tour exists, its failures are marked, and nothing in it is skipped."""
    commands = readme_commands(README.read_text())
    steps = tour(commands)
    assert len(steps) >= 10, f"the {TOUR_HEADING!r} section has {len(steps)} commands"
    assert any(c.fails_with for c in steps), "the tour shows no expected failure"
    assert not [c for c in steps if c.tag in SKIP_TAGS | {"slow"}], "the tour must run as written, everywhere"


def test_the_first_hour_runs_as_written(tmp_path):
    """The README's tour, command by command, in a folder standing in for a fresh clone."""
    walk(tour(readme_commands(README.read_text())), tmp_path, slow=False)


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    """The whole README in order; commands marked [GPU], [nodes], [ImageNet], ... are skipped (and listed)."""
    skipped = walk(readme_commands(README.read_text()), tmp_path, slow=True)
    print("not walked (marked in README.md):\n  " + "\n  ".join(skipped))

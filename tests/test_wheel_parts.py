"""scripts/wheel_parts.sh: wheels packed into parts no larger than asked, each part's size and sha256 checked when
it arrives, a damaged or missing part refused, the rest installed with pip --no-index (wheels built here by the
wheel format's rule: PEP 427, a zip with NAME-VERSION.dist-info/{METADATA,WHEEL,RECORD})."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "wheel_parts.sh"


def make_wheel(folder: Path, name: str, payload: bytes) -> None:
    info = f"{name}-1.0.dist-info"
    files = {f"{name}/__init__.py": b"VALUE = 42\n", f"{name}/blob.bin": payload,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w", zipfile.ZIP_STORED) as z:
        for path, data in {**files, f"{info}/RECORD": record.encode()}.items():
            z.writestr(path, data)


def run(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_pack_receive_install(tmp_path):
    repo, wheels, parts = tmp_path / "repo", tmp_path / "wheels", tmp_path / "parts"
    repo.mkdir(), wheels.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for i in range(2):
        make_wheel(wheels, f"fakepkg{i}", os.urandom(1_300_000))  # random: nothing compresses; ~2.6 MB in all
    env = {**os.environ, "PARTS_DIR": str(parts), "SITE_DIR": str(tmp_path / "site"), "PIRL_PYTHON": sys.executable}
    proc = run(repo, env, "pack", "--from", str(wheels), "--part-mib", "1", "--rate-mib-s", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.name for p in (repo / ".whl").glob("part-*"))
    assert names == ["part-00", "part-01", "part-02"]
    assert all((repo / ".whl" / n).stat().st_size <= 2**20 for n in names)
    assert "3 parts" in proc.stdout and "at 4 MiB/s (assumed)" in proc.stdout
    assert "/.whl/" in (repo / ".git" / "info" / "exclude").read_text()

    assert run(repo, env, "install").returncode == 1  # nothing received yet
    for name in names[:2]:
        proc = run(repo, env, "receive", f".whl/{name}")
        assert proc.returncode == 0 and "sha256 ok" in proc.stdout, proc.stderr
    proc = run(repo, env, "install")
    assert proc.returncode == 1 and "part-02: missing" in proc.stderr
    damaged = bytearray((repo / ".whl" / "part-02").read_bytes())
    damaged[100] ^= 1
    (repo / ".whl" / "part-02").write_bytes(bytes(damaged))
    proc = run(repo, env, "receive", ".whl/part-02")
    assert proc.returncode == 1 and "sha256 differs" in proc.stderr
    (repo / ".whl" / "part-02").write_bytes(bytes(damaged[:-10]))
    assert "a cut transfer" in run(repo, env, "receive", ".whl/part-02").stderr
    damaged[100] ^= 1
    (repo / ".whl" / "part-02").write_bytes(bytes(damaged))
    assert run(repo, env, "receive", ".whl/part-02").returncode == 0
    proc = run(repo, env, "install")
    assert proc.returncode == 0 and "installed 2 wheels" in proc.stdout, proc.stdout + proc.stderr
    check = subprocess.run([sys.executable, "-c", "import fakepkg0, fakepkg1; print(fakepkg1.VALUE)"],
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True)
    assert check.stdout.strip() == "42", check.stderr

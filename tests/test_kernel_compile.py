"""Every Triton kernel of the project compiles for real GPUs (sm_80, sm_90), proved on a CPU.

Triton compiles ahead of time for an explicit target without a GPU: triton.compile(ASTSource,
target=GPUTarget("cuda", arch, 32)) runs the whole pipeline (TTIR, TTGIR, LLVM IR, PTX) and the
ptxas that ships in the triton wheel (cubin). tests/kernel_compile_worker.py does that in its own
process (this session may interpret Triton, see tests/conftest.py) for each kernel, bank dtype
(float32, bfloat16; D = 128) and arch; here we assert:
  - it compiles;
  - no register spills, read from ptxas's own report ("N bytes spill stores, M bytes spill
    loads"). CompiledKernel.n_spills exists too, but only once the cubin is loaded into a CUDA
    context (driver.load_binary), which needs a GPU;
  - the bank-row loads are vector loads of the widest width the tile allows: 128-bit
    (ld.global.v4.b32) for the gather kernels. The bank update's program holds one 128-wide row
    in one warp: 16 bytes a thread in fp32, but only 8 in bf16 (ld.global.v2.b32).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).parent))
from kernel_compile_worker import ARCHS, BANK, KERNELS, D, base_name  # noqa: E402

from pirl_fast.model import bank_kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """(kernel, dtype, arch) -> the worker's result, all compiled in one process."""
    out = tmp_path_factory.mktemp("kernel_compile") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kernel_compile_worker.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {(r["kernel"], r["dtype"], r["arch"]): r for r in json.loads(out.read_text())}


def test_every_triton_kernel_is_covered():
    """A kernel launched through bank_kernels.jit or .tuned anywhere in the package must appear in KERNELS."""
    package = Path(bank_kernels.__file__).parent
    launched = {m for path in package.rglob("*.py")
                for m in re.findall(r"\b(?:jit|tuned)\((_\w+)", path.read_text())}
    assert launched == {base_name(name) for name in KERNELS}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", sorted(BANK))
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_compiles_without_spills_with_vector_loads(compiled, name, dtype, arch):
    result = compiled[(name, dtype, arch)]
    assert "error" not in result, f"{name} {dtype} sm_{arch} does not compile:\n{result['error']}"
    report = result["report"]
    assert result["cubin_bytes"] > 0 and f"for 'sm_{arch}" in report, f"no cubin / ptxas report:\n{report}"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills and all(s == ("0", "0") for s in spills), f"{name} {dtype} sm_{arch} spills registers:\n{report}"
    # Bank rows per program step, spread over the program's threads: bytes per thread, loaded in
    # vectors of at most 16 bytes (PTX has no wider load).
    *_, num_warps, rows = KERNELS[name]
    per_thread = rows * D * BANK[dtype][1] // (32 * num_warps)
    width = min(16, per_thread)
    loads = result["loads"]
    assert sum(w for w in loads if w == width) >= per_thread, (
        f"{name} {dtype} sm_{arch}: expected the {per_thread} bytes of bank rows per thread in {width}-byte loads; "
        f"global loads found (bytes each): {sorted(loads)}")

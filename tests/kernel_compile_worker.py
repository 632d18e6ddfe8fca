"""Compiles every Triton kernel of the project for sm_80 and sm_90 and writes, as JSON, what
tests/test_kernel_compile.py checks. A process of its own because Triton reads TRITON_INTERPRET
once, at import: a CPU test session interprets every kernel, and this one must compile them.

    TRITON_INTERPRET=0 python tests/kernel_compile_worker.py OUT.json

triton.compile(ASTSource, target=GPUTarget("cuda", arch, 32)) needs no GPU: it runs TTIR, TTGIR,
LLVM IR and PTX in-process and the ptxas shipped in the triton wheel for the cubin. For each
kernel, bank dtype (D = 128) and arch it records the compile error if any, ptxas's report
(-v, printed through Triton's TRITON_DUMP_PTXAS_LOG knob: registers, spill stores and loads)
and the width in bytes of every global load in the PTX. Pointer arguments are declared 16-byte
aligned, as Triton's launcher specialises them for torch's (64-byte aligned) allocations;
integer arguments get no divisibility hint (the worst case). Nothing goes to ~/.triton: the
cache is a temporary directory and every kernel is compiled afresh.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import tempfile
import traceback
from pathlib import Path

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from pirl_fast.model import bank_kernels, bank_loss

D = 128
ARCHS = (80, 90)  # A100, H100/H200
BANK = {"float32": ("*fp32", 4), "bfloat16": ("*bf16", 2)}
# kernel -> (module, signature with "BANK" for the bank pointer, constexprs, num_warps, bank rows per step)
KERNELS = {
    "_scores_fwd": (bank_kernels, dict(q_ptr="*fp32", bank_ptr="BANK", idx_ptr="*i64", out_ptr="*fp32", K="i32"),
                    dict(D=D, BLOCK_K=bank_kernels.BLOCK_K, BLOCK_D=D), 4, bank_kernels.BLOCK_K),
    "_scores_bwd": (bank_kernels, dict(grad_ptr="*fp32", bank_ptr="BANK", idx_ptr="*i64", part_ptr="*fp32", K="i32",
                                       K_PER_SPLIT="i32"),
                    dict(D=D, BLOCK_K=bank_kernels.BLOCK_K, BLOCK_D=D), 4, bank_kernels.BLOCK_K),
    "_bank_update": (bank_kernels, dict(bank_ptr="BANK", emb_ptr="*fp32", sorted_idx_ptr="*i64", order_ptr="*i64",
                                        first_ptr="*i8", end_ptr="*i64", momentum="fp32"),
                     dict(D=D, BLOCK_D=D), 1, 1),
    "_loss_fwd[nce]": (bank_loss, dict(q_ptr="*fp32", l0_ptr="*fp32", shift_ptr="*fp32", bank_ptr="BANK",
                                       idx_ptr="*i64", stats_ptr="*fp32", rows_ptr="*fp32", K="i32", K_PER_SPLIT="i32"),
                       dict(D=D, NCE=True, BLOCK_K=bank_kernels.BLOCK_K, BLOCK_D=D), bank_loss.LOSS_WARPS,
                       bank_kernels.BLOCK_K),
    "_loss_fwd[infonce]": (bank_loss, dict(q_ptr="*fp32", l0_ptr="*fp32", shift_ptr="*fp32", bank_ptr="BANK",
                                           idx_ptr="*i64", stats_ptr="*fp32", rows_ptr="*fp32", K="i32",
                                           K_PER_SPLIT="i32"),
                           dict(D=D, NCE=False, BLOCK_K=bank_kernels.BLOCK_K, BLOCK_D=D), bank_loss.LOSS_WARPS,
                           bank_kernels.BLOCK_K),
}
# Every other config triton.autotune may choose on the card (bank_kernels.tuned): "NAME@BLOCK_Kxnum_warps".
TUNED = {"_scores_fwd": bank_kernels.SCORES_FWD_CONFIGS, "_scores_bwd": bank_kernels.SPLIT_K_CONFIGS,
         "_loss_fwd": bank_loss.LOSS_CONFIGS}
for _name, (_module, _signature, _constexprs, _warps, _rows) in list(KERNELS.items()):
    for _config in TUNED.get(_name.split("[")[0], [])[1:]:  # the first is the default, listed above
        _block_k = _config.kwargs.get("BLOCK_K", _constexprs["BLOCK_K"])
        KERNELS[f"{_name}@{_block_k}x{_config.num_warps}"] = (
            _module, _signature, {**_constexprs, "BLOCK_K": _block_k}, _config.num_warps, _block_k)


def base_name(name: str) -> str:
    """'_loss_fwd[nce]@32x4' -> '_loss_fwd': the kernel's function."""
    return re.split(r"[\[@]", name)[0]


LOAD = re.compile(r"\bld\.global(?:\.\w+)*?(?:\.v(\d))?\.b(\d+)\b")  # ld.global[.nc...][.vN].bBITS


def compile_kernel(name: str, bank_type: str, arch: int, cache_dir: Path):
    """-> (compiled kernel, ptxas's report) for the kernel `name` with the bank pointer of type bank_type."""
    module, signature, constexprs, num_warps, _ = KERNELS[name]
    fn = JITFunction(getattr(module, base_name(name)))
    signature = {k: bank_type if v == "BANK" else v for k, v in signature.items()}
    signature.update({k: "constexpr" for k in constexprs})
    assert list(signature) == fn.arg_names, \
        f"{name}: update its signature in tests/kernel_compile_worker.py to the kernel's arguments"
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names) if signature[arg].startswith("*")}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=aligned)
    report = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), knobs.cache.scope(), contextlib.redirect_stdout(report):
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by Triton after the cubin is built
        knobs.compilation.always_compile = True
        knobs.cache.dir = str(cache_dir)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return kernel, report.getvalue()


def main(out: str) -> None:
    if bank_kernels.interpreted():
        sys.exit("run with TRITON_INTERPRET=0: this process must compile the kernels, not interpret them")
    results = []
    with tempfile.TemporaryDirectory() as cache:
        for name in KERNELS:
            for dtype, (bank_type, _) in BANK.items():
                for arch in ARCHS:
                    row = {"kernel": name, "dtype": dtype, "arch": arch}
                    try:
                        kernel, report = compile_kernel(name, bank_type, arch, Path(cache))
                        row.update(report=report, cubin_bytes=len(kernel.asm["cubin"]),
                                   loads=[int(v or 1) * int(bits) // 8 for v, bits in LOAD.findall(kernel.asm["ptx"])])
                    except Exception:  # reported per kernel, so one failure does not hide the others
                        row["error"] = traceback.format_exc()
                    results.append(row)
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])

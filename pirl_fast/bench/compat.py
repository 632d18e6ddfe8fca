"""Compatibility smoke, on the CPU, in seconds: does this Python's torch / triton / torchvision run what the GPU
stages need? The first step of scripts/gpu_bench.sh's stage 1, so an API mismatch shows before anything else.

    python -m pirl_fast.bench.compat [--jsonl PATH]     # exit 1 if a check failed

Checks, each a row (guarded: one failing check does not hide the others):
  versions  the installed torch, triton and torchvision lie in pyproject.toml's [tool.pirl_fast.supported]
            ranges (the GPU image's torch 2.11 / triton 3.6 / torchvision 0.26 among them; the pins in
            [project] dependencies are what .venv installs)
  apis      every attribute of torch, triton and torchvision the benchmarks and kernels call exists
  cpu step  one PIRL training step (ResNet-18, toy sizes, fused loss's torch path, SGD, bank update) on the CPU
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from importlib import metadata
from pathlib import Path

from pirl_fast.bench.record import Recorder

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# module -> attributes (dotted) the GPU stages use; a rename in another release fails here, by name
APIS = {
    "torch": ("OutOfMemoryError", "compile", "channels_last", "autocast", "aminmax", "segment_reduce",
              "_assert_async", "cuda.Event", "cuda.max_memory_allocated", "cuda.reset_peak_memory_stats",
              "Tensor.untyped_storage", "utils._python_dispatch.TorchDispatchMode", "optim.SGD"),
    "triton": ("cdiv", "next_power_of_2", "jit", "autotune", "Config", "runtime.jit.JITFunction",
               "runtime.interpreter.InterpretedFunction", "language.sum", "language.constexpr"),
    "torchvision": ("models.resnet50", "models.resnet18"),
}


def supported_ranges(path: Path = PYPROJECT) -> dict[str, str]:
    """[tool.pirl_fast.supported] of pyproject.toml: {package: "SPEC,SPEC"}."""
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)["tool"]["pirl_fast"]["supported"]


def release(version: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0); pre-release and local parts dropped."""
    return tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def satisfies(version: str, spec: str) -> bool:
    """Whether `version` meets every comma-separated clause of `spec` (>=, <, <=, >, ==) on release numbers."""
    have = release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, want = re.fullmatch(r"(>=|<=|==|<|>)\s*([\d.]+)", clause).groups()
        want_t = release(want)
        n = max(len(have), len(want_t))
        a, b = have + (0,) * (n - len(have)), want_t + (0,) * (n - len(want_t))
        if not {">=": a >= b, "<=": a <= b, "==": a == b, "<": a < b, ">": a > b}[op]:
            return False
    return True


def check_versions() -> dict:
    ranges = supported_ranges()
    found, bad = {}, []
    for name, spec in ranges.items():
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            bad.append(f"{name} is not installed (supported: {spec})")
            continue
        if not satisfies(found[name], spec):
            bad.append(f"{name} {found[name]} is outside the supported {spec}")
    if bad:
        raise RuntimeError("; ".join(bad) + " (pyproject.toml [tool.pirl_fast.supported])")
    return {"versions": found, "supported": ranges}


def check_apis() -> dict:
    missing = []
    for module_name, attributes in APIS.items():
        module = importlib.import_module(module_name)
        for dotted in attributes:
            obj = module
            for i, part in enumerate(dotted.split(".")):
                if not hasattr(obj, part):  # a submodule not imported by its parent yet
                    try:
                        obj = importlib.import_module(".".join([module_name, *dotted.split(".")[:i + 1]]))
                        continue
                    except ImportError:
                        missing.append(f"{module_name}.{dotted}")
                        break
                obj = getattr(obj, part)
    if missing:
        raise RuntimeError(f"missing in this install: {', '.join(missing)}")
    return {"apis": sum(len(a) for a in APIS.values())}


def check_cpu_step() -> dict:
    from pirl_fast.bench import compute

    args = argparse.Namespace(batch=2, steps=1, warmup=0, arch="resnet18", image_size=32, patch_size=8, bank_rows=64,
                              negatives=16, compile=["off"], device="cpu")
    row = compute.measure(args, compiled=False)
    return {"step_ms": row["step_ms"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pirl_fast.bench.compat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jsonl", metavar="PATH", help="append a header and one row per check to PATH")
    args = parser.parse_args(argv)
    rec = Recorder("compat", args.jsonl)
    rec.header("python -m pirl_fast.bench.compat")
    for name, check in (("versions", check_versions), ("apis", check_apis), ("cpu step", check_cpu_step)):
        row = rec.guarded({"check": name}, check)
        print(f"compat {name}: " + (f"FAILED {row['error']}" if "error" in row else "ok"), flush=True)
    return 1 if any("error" in r for r in rec.rows) else 0


if __name__ == "__main__":
    sys.exit(main())

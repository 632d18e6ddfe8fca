"""python -m pirl_fast.bench {shard,loader,membank,compute,step,learn,analyses,all} [options] [--json PATH]
[--jsonl PATH]"""

from __future__ import annotations

import argparse
import importlib
import inspect
import shlex
import sys

from pirl_fast.bench.output import format_table, machine_description, write_json
from pirl_fast.bench.record import Recorder

# Sub-command -> (module in this package, one line of help). Each module has add_arguments(parser) and
# run(args[, rec]). Only the chosen sub-command's module is imported: `membank` and `compute` run where
# Hydra, WebDataset and DALI are missing (a bare GPU image); a sub-command whose module cannot be
# imported says what is missing in one line.
BENCHMARKS = {
    "shard": ("pirl_fast.bench.shard", "sharder throughput beside a plain tar of the same files"),
    "loader": ("pirl_fast.bench.loader", "PIRL samples/s of the dali loader against the torch baseline "
               "(needs webdataset; DALI for dali)"),
    "membank": ("pirl_fast.bench.membank", "the memory-bank loss term: naive vs two-pass vs fused, and the "
                "fused gather against the device's copy bandwidth"),
    "compute": ("pirl_fast.bench.compute", "the PIRL training step on synthetic data without Hydra: the "
                "compute ceiling, optionally with torch.compile"),
    "step": ("pirl_fast.bench.step", "the full training step (pirl_fast.train) with synthetic data vs each real "
             "loader (needs hydra-core)"),
    "learn": ("pirl_fast.bench.learn", "does PIRL learn? PIRL vs raw pixels, untrained, Jigsaw and supervised on "
              "Fashion-MNIST"),
    "analyses": ("pirl_fast.bench.analyses", "the paper's five analyses (invariance, layers, lambda, P, K) on "
                 "Fashion-MNIST"),
}
# Left out of `all`: learn and analyses measure quality, not speed; they need Fashion-MNIST and CPU time
# (learn ~25 minutes, analyses ~1.5 hours on 2 idle cores). compute is step's synthetic row without the
# trainer; step measures it too.
NOT_IN_ALL = ("learn", "analyses", "compute")


def load(name: str):
    """The module of sub-command `name`; a missing optional package exits 2 naming it."""
    try:
        return importlib.import_module(BENCHMARKS[name][0])
    except ImportError as e:
        raise SystemExit(f"python -m pirl_fast.bench {name}: cannot import {BENCHMARKS[name][0]} ({e}); install "
                         "what it names, or run a sub-command that does not need it (membank, compute)") from e


def build_parser(names: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the sub-commands in `names` (default: all) get their options (and import their module)."""
    names = list(BENCHMARKS) if names is None else names
    parser = argparse.ArgumentParser(prog="python -m pirl_fast.bench", description="Throughput benchmarks, each side "
                                     "by side with its baseline; `learn`, the learning benchmark (PIRL vs raw "
                                     "pixels, the untrained network, Jigsaw and supervised on Fashion-MNIST); and "
                                     "`analyses`, the paper's five analyses on the same data. Every command prints a "
                                     "table; --json PATH also writes the figures (rates named *_per_s) at the end, "
                                     "--jsonl PATH appends each row the moment it is measured.")
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (_, help_line) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_line, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name in names:
            module = load(name)
            p.description = module.__doc__
            module.add_arguments(p)
        add_output_arguments(p)
    add_output_arguments(sub.add_parser("all", help=f"run every benchmark with its defaults, except "
                                        f"{', '.join(NOT_IN_ALL)}"))
    return parser


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (at the end)")
    p.add_argument("--jsonl", metavar="PATH", help="append a header (versions, GPU, clocks) and then every row to "
                   "PATH as JSON lines, each the moment it is measured; a row that fails holds its error")


def chosen(argv: list[str]) -> list[str]:
    """The sub-command argv names (its first word that is no option; `all`: all but NOT_IN_ALL)."""
    word = next((a for a in argv if not a.startswith("-")), None)
    if word == "all":
        return [n for n in BENCHMARKS if n not in NOT_IN_ALL]
    return [word] if word in BENCHMARKS else []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = chosen(argv)
    args = build_parser(names).parse_args(argv)
    command = "python -m pirl_fast.bench " + shlex.join(argv)
    results = {}
    print(f"machine: {machine_description()}")
    for name in names:
        module = load(name)
        sub_args = build_parser([name]).parse_args([name]) if args.bench == "all" else args  # all: its defaults
        print(f"\n== {name}", flush=True)
        rec = Recorder(name, args.jsonl)
        rec.header(command)
        if "rec" in inspect.signature(module.run).parameters:
            module.run(sub_args, rec)  # rows recorded (and guarded) one by one as they are measured
        else:
            for row in module.run(sub_args):
                rec.add(row)
        results[name] = rec.rows
        print(format_table(results[name]))
    if args.json:
        write_json(args.json, results, command)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m pirl_fast.bench {shard,loader,membank,step,learn,analyses,all} [options] [--json PATH]"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from pirl_fast.bench.output import format_table, machine_description, write_json

# Sub-command -> module in this package. Each module has add_arguments(parser) and run(args).
BENCHMARKS = {
    "shard": "pirl_fast.bench.shard",
    "loader": "pirl_fast.bench.loader",
    "membank": "pirl_fast.bench.membank",
    "step": "pirl_fast.bench.step",
    "learn": "pirl_fast.bench.learn",
    "analyses": "pirl_fast.bench.analyses",
}
# Left out of `all`: learn and analyses measure quality, not speed; they need Fashion-MNIST and CPU time
# (learn ~15 minutes, analyses ~1.5 hours on 2 idle cores).
NOT_IN_ALL = ("learn", "analyses")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pirl_fast.bench", description="Throughput benchmarks, each side "
                                     "by side with its baseline; `learn`, the learning benchmark (PIRL vs Jigsaw "
                                     "vs untrained on Fashion-MNIST); and `analyses`, the paper's five analyses on "
                                     "the same data. Every command prints a table; --json PATH also writes the "
                                     "figures (rates named *_per_s).")
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0], description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p = sub.add_parser("all", help=f"run every benchmark with its defaults, except {', '.join(NOT_IN_ALL)}")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    names = [n for n in BENCHMARKS if n not in NOT_IN_ALL] if args.bench == "all" else [args.bench]
    results = {}
    print(f"machine: {machine_description()}")
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        sub_args = build_parser().parse_args([name]) if args.bench == "all" else args  # all: each with its defaults
        print(f"\n== {name}")
        results[name] = module.run(sub_args)
        print(format_table(results[name]))
    if args.json:
        write_json(args.json, results, "python -m pirl_fast.bench " + shlex.join(argv))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

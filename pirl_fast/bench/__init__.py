"""Throughput benchmarks: `python -m pirl_fast.bench {shard,loader,membank,step,all}`.

Each benchmark is a module here with `add_arguments(parser)` and `run(args) -> list[dict]`;
every dict is one row of the printed table. Rates are named `*_per_s` so that tools tracking
the JSON can find them.
"""

"""The evaluation JSON of several runs (an ablation sweep, or any runs to compare) as one markdown
table (report.md), one plot (report.png) and the layer-wise plot (layerwise.png); README.md, "Evaluation".

A RUN_DIR is a training run directory (it holds config.yaml and/or checkpoints/ and the JSON
written by `python -m pirl_fast.eval`); a folder that is not a run itself but holds runs, such as
a Hydra multirun sweep folder runs/sweep_lambda/{0,1,2,...}, stands for all of them.

Per run it reads:
    config      config.yaml (the resolved config the trainer writes), else .hydra/config.yaml;
                the table shows the keys whose values differ between the runs (the swept ones),
                plus .hydra/overrides.yaml when Hydra wrote one
    knn         knn.json -> knn_top1, knn_top5; knn_random_init.json -> knn_random_top1; with BatchNorm
                statistics re-estimated (`eval knn --reestimate-bn`): knn_bn.json -> knn_bn_top1,
                knn_random_init_bn.json -> knn_random_bn_top1
    linear      linear.json -> linear_<stage>_top1 for conv1, res2..res5 (+ res5avg, res5avg_fc);
                linear_random_init.json -> linear_random_top1 (the untrained network's best head)
    invariance  invariance.json -> invariance_<pirl_head|trunk>_mean (this run's checkpoint)
    training    summary.json -> steps (the steps actually run; else the newest checkpoint's step);
                metrics.jsonl -> final_loss (the last logged loss)
Results of other seeds (NAME_seedS.json beside NAME.json) are averaged with them: "mean ± std
(n seeds)" in the table, the mean in the plot. The plot has one panel per metric family over the
swept key (--x); layerwise.png has one line per run with linear.json over conv1 .. res5 (run
`eval linear` on each run with the same --protocol).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from pirl_fast.report.learn_table import learn_report
from pirl_fast.runtime import atomic

IGNORED_KEYS = ("run_dir", "name", "resume", "trainer.max_steps")  # differ between runs without being a setting
ACCURACY_PREFIXES = ("knn_", "linear_")
LAYERS = ("conv1", "res2", "res3", "res4", "res5")  # linear_probe.STAGES (not imported: it pulls in torch)
# The table's first columns, in this order (the rest follow alphabetically): trained beside untrained.
COLUMNS = ("steps", "knn_top1", "knn_top5", "knn_random_top1", "knn_bn_top1", "knn_random_bn_top1",
           *(f"linear_{s}_top1" for s in (*LAYERS, "res5avg", "res5avg_fc")), "linear_random_top1")


def is_run_dir(path: Path) -> bool:
    markers = ("config.yaml", "checkpoints", "knn.json", "linear.json", "invariance.json", ".hydra")
    return any((path / m).exists() for m in markers)


def expand_runs(paths: list[str]) -> list[Path]:
    """Run directories named directly, or found one level below (a multirun folder); in order."""
    runs: list[Path] = []
    for arg in paths:
        p = Path(arg)
        if not p.is_dir():
            raise SystemExit(f"report: {p} is not a directory (pass run directories or a sweep folder)")
        if is_run_dir(p):
            runs.append(p)
            continue
        children = [c for c in p.iterdir() if c.is_dir() and is_run_dir(c)]
        if not children:
            raise SystemExit(f"report: {p} is neither a run directory (config.yaml, checkpoints/ or eval JSON) "
                             "nor a folder of run directories")
        runs.extend(sorted(children, key=lambda c: (not c.name.isdigit(), int(c.name) if c.name.isdigit() else 0,
                                                    c.name)))
    return runs


def flatten(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree if not isinstance(tree, list) else str(tree)}


def read_config(run: Path) -> tuple[dict[str, object], list[str]]:
    """(flattened resolved config, Hydra's command-line overrides if recorded)."""
    config: dict[str, object] = {}
    for path in (run / "config.yaml", run / ".hydra" / "config.yaml"):
        if path.is_file():
            config = flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
            break
    overrides_path = run / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_path)] if overrides_path.is_file() else []
    return config, overrides


def seed_results(run: Path, stem: str) -> list[dict]:
    """The results `eval` wrote as STEM.json (the default seed) and STEM_seed<S>.json (other seeds)."""
    others = sorted(p for p in run.glob(f"{stem}_seed*.json") if p.stem[len(stem) + len("_seed"):].isdigit())
    return [r for r in map(_json, [run / f"{stem}.json", *others]) if r is not None]


def mean_over_seeds(m: dict[str, float], spread: dict[str, tuple[float, int]], key: str, values: list[float]) -> None:
    """m[key] = the mean of `values` (one per seed); spread[key] = (std, n) when there are several."""
    if not values:
        return
    m[key] = sum(values) / len(values)
    if len(values) > 1:
        spread[key] = (statistics.stdev(values), len(values))


def read_metrics(run: Path) -> tuple[dict[str, float], dict[str, tuple[float, int]]]:
    """({metric: value}, {metric: (std over seeds, seeds)} for the metrics measured with several seeds)."""
    m: dict[str, float] = {}
    spread: dict[str, tuple[float, int]] = {}
    knn = _json(run / "knn.json")
    if knn:
        m["knn_top1"], m["knn_top5"] = knn["top1"], knn["top5"]
    mean_over_seeds(m, spread, "knn_random_top1", [r["top1"] for r in seed_results(run, "knn_random_init")])
    knn_bn = _json(run / "knn_bn.json")
    if knn_bn:
        m["knn_bn_top1"] = knn_bn["top1"]
    mean_over_seeds(m, spread, "knn_random_bn_top1", [r["top1"] for r in seed_results(run, "knn_random_init_bn")])
    linear = seed_results(run, "linear")
    for stage in (linear[0]["stages"] if linear else {}):
        mean_over_seeds(m, spread, f"linear_{stage}_top1", [r["stages"][stage]["top1"] for r in linear
                                                            if stage in r["stages"]])
    mean_over_seeds(m, spread, "linear_random_top1", [max(s["top1"] for s in r["stages"].values())
                                                      for r in seed_results(run, "linear_random_init")])
    invariance = _json(run / "invariance.json")
    if invariance:
        entries = list(invariance["checkpoints"].values())
        own = [e for e in entries if e.get("checkpoint") and Path(e["checkpoint"]).resolve().is_relative_to(
            run.resolve())]
        entry = (own or entries)[0]
        for metric in ("pirl_head", "trunk"):
            if metric in entry:
                m[f"invariance_{metric}_mean"] = entry[metric]["mean"]
    log = run / "metrics.jsonl"
    if log.is_file():
        losses = [json.loads(line).get("loss") for line in log.read_text().splitlines() if line.strip()]
        losses = [x for x in losses if isinstance(x, (int, float))]
        if losses:
            m["final_loss"] = float(losses[-1])
    steps = steps_run(run)
    if steps is not None:
        m["steps"] = steps
    return m, spread


def steps_run(run: Path) -> int | None:
    """Optimiser steps the run actually did: summary.json's, else its newest checkpoint's (by name)."""
    summary = _json(run / "summary.json")
    if summary and "step" in summary:
        return int(summary["step"])
    steps = [int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt") if p.stem[5:].isdigit()]
    return max(steps) if steps else None


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"report: {path} is not valid JSON ({e}); re-run the evaluation that wrote it") from e


def varying_keys(configs: list[dict[str, object]]) -> list[str]:
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if not k.startswith(IGNORED_KEYS) and not k.startswith("hydra.")
            and len({repr(c.get(k)) for c in configs}) > 1]


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def cell(m: dict[str, float], spread: dict[str, tuple[float, int]], key: str) -> str:
    """A metric for the table: accuracies in %, with "± std (n seeds)" when several seeds were measured."""
    if key not in m:
        return ""
    scale = 100 if key.startswith(ACCURACY_PREFIXES) else 1
    if key not in spread:
        return fmt(scale * m[key])
    std, n = spread[key]
    return f"{fmt(scale * m[key])} ± {fmt(scale * std)} ({n} seeds)"


def build_table(runs: list[Path], configs, overrides, metrics, keys: list[str],
                spreads: list[dict] | None = None) -> tuple[list[str], list[list[str]]]:
    metric_names = sorted({k for m in metrics for k in m}, key=lambda k: (COLUMNS.index(k) if k in COLUMNS else
                                                                          len(COLUMNS), k))
    header = ["run"] + keys + (["overrides"] if any(overrides) else []) + metric_names
    rows = []
    for run, c, o, m, spread in zip(runs, configs, overrides, metrics, spreads or [{}] * len(runs)):
        row = [run.name] + [fmt(c.get(k)) for k in keys] + ([" ".join(o)] if any(overrides) else [])
        row += [cell(m, spread, k) for k in metric_names]
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(runs: list[Path], configs, metrics, x_key: str | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [("accuracy (%)", ACCURACY_PREFIXES), ("invariance distance", ("invariance_",)), ("loss", ("final_",))]
    families = [(t, pre) for t, pre in families if any(k.startswith(pre) for m in metrics for k in m)]
    if not families:
        raise SystemExit("report: none of the runs has evaluation JSON yet; run `python -m pirl_fast.eval knn ...` "
                         "on each run first")
    xs = [c.get(x_key) if x_key else None for c in configs]
    numeric = x_key is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
    order = sorted(range(len(runs)), key=lambda i: xs[i]) if numeric else list(range(len(runs)))
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4), squeeze=False)
    for ax, (title, prefixes) in zip(axes[0], families):
        names = sorted({k for m in metrics for k in m if k.startswith(prefixes)})
        for j, name in enumerate(names):
            scale = 100 if name.startswith(ACCURACY_PREFIXES) else 1
            ys = [metrics[i].get(name, math.nan) * scale for i in order]
            if numeric:
                ax.plot([xs[i] for i in order], ys, marker="o", label=name)
            else:
                width = 0.8 / len(names)
                ax.bar([p + j * width for p in range(len(order))], ys, width=width, label=name)
        positive = [v for v in xs if numeric and v > 0]
        if positive and min(xs) >= 0 and max(positive) > 50 * min(positive):
            ax.set_xscale("symlog", linthresh=1)  # negatives / permutations span decades (and 0 = all 9!)
        if not numeric:
            labels = [f"{runs[i].name}\n{fmt(xs[i])}" if x_key else runs[i].name for i in order]
            ax.set_xticks([p + 0.4 - 0.4 / max(1, len(names)) for p in range(len(order))], labels, fontsize=8)
        ax.set_xlabel(x_key or "run")
        ax.set_ylabel(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def layerwise_lines(runs: list[Path]) -> list[tuple[str, list[float]]]:
    """[(label, linear top-1 in % for conv1 .. res5)] for each run whose linear.json has all five, then
    the untrained network's (linear_random_init.json; label "untrained (...)", drawn dashed)."""
    lines = []
    for name, method in (("linear", None), ("linear_random_init", "untrained")):
        for run in runs:
            linear = _json(run / f"{name}.json")
            if linear and all(s in linear.get("stages", {}) for s in LAYERS):
                protocol = linear.get("protocol", {}).get("protocol", "gap")
                label = f"{method or linear.get('method', '?')} ({run.name}, {protocol})"
                lines.append((label, [100 * linear["stages"][s]["top1"] for s in LAYERS]))
    return lines


def plot_layerwise(runs: list[Path], path: Path) -> bool:
    """The layer-wise figure: a line per run over conv1 .. res5; False (nothing written) when no run
    has linear.json."""
    lines = layerwise_lines(runs)
    if not lines:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in lines:
        dashed = label.startswith("untrained")
        ax.plot(range(len(LAYERS)), ys, marker="o", label=label, linestyle="--" if dashed else "-")
    ax.set_xticks(range(len(LAYERS)), LAYERS)
    ax.set_xlabel("layer (frozen trunk)")
    ax.set_ylabel("linear top-1 (%)")
    ax.set_title("layer-wise linear evaluation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pirl_fast.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or sweep folders; a `bench "
                        "learn --out` folder (it holds learn.json) prints the learning benchmark's table, baselines "
                        "and targets, and writes learn.md there")
    parser.add_argument("--out", default=None, help="folder for report.md, report.png and layerwise.png (default: "
                        "beside the runs: inside a single run or sweep folder, else report_<runs>/ in their common "
                        "folder, or ./reports/ when that is the current folder)")
    parser.add_argument("--min-knn-gain", type=float, default=None, metavar="POINTS",
                        help="exit 1 (FAIL) unless every run's kNN top-1 beats the same network untrained "
                             "(`eval knn --random-init`) by POINTS, with BatchNorm statistics as they are and, "
                             "when measured, re-estimated (scripts/learn_check.sh uses it)")
    parser.add_argument("--x", default=None, metavar="KEY", help="config key for the plot's x axis, e.g. loss.lam "
                                                                 "(default: the first key that varies)")
    args = parser.parse_args(argv)
    benches = [Path(p) for p in args.runs if (Path(p) / "learn.json").is_file()]
    for bench in benches:  # `bench learn --out DIR`: its table, baselines and targets, from DIR/learn.json
        text = learn_report(json.loads((bench / "learn.json").read_text()))
        with atomic.atomic_write(bench / "learn.md", "w") as fh:
            fh.write(text + "\n")
        print(f"{text}\nwrote {bench / 'learn.md'}")
    if len(benches) == len(args.runs):
        return 0
    runs = expand_runs([p for p in args.runs if Path(p) not in benches])
    read = [read_config(r) for r in runs]
    configs, overrides = [c for c, _ in read], [o for _, o in read]
    read_back = [read_metrics(r) for r in runs]
    metrics, spreads = [m for m, _ in read_back], [s for _, s in read_back]
    keys = varying_keys(configs)
    if args.x and args.x not in {k for c in configs for k in c}:
        raise SystemExit(f"report: --x {args.x} is not a config key of these runs; varying keys: {keys}")
    x_key = args.x or (keys[0] if keys else None)
    header, rows = build_table(runs, configs, overrides, metrics, keys, spreads)
    table = markdown(header, rows)
    out = Path(args.out) if args.out else default_out(args.runs, runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(f"# pirl_fast report ({len(runs)} runs)\n\nAccuracies in %.\n\n" + table)
    plot(runs, configs, metrics, x_key, out / "report.png")
    print(table)
    print(f"wrote {out / 'report.md'}\nwrote {out / 'report.png'}")
    if plot_layerwise(runs, out / "layerwise.png"):
        print(f"wrote {out / 'layerwise.png'}")
    gains = [knn_gains(run, m) for run, m in zip(runs, metrics)]
    if args.min_knn_gain is None:
        return 0
    if all(g and min(g) >= args.min_knn_gain for g in gains):
        print(f"PASS: every trained network beats its own initialisation by >= {args.min_knn_gain:g} kNN points")
        return 0
    print(f"FAIL: needs >= +{args.min_knn_gain:g} kNN points over the untrained network (`eval knn --random-init`) "
          f"in every row above. Try more steps and read the loss and the collapse diagnostics in metrics.jsonl")
    return 1


def knn_gains(run: Path, m: dict[str, float]) -> list[float]:
    """Prints the run's throughput and its trained-vs-untrained kNN rows; returns the gains in points."""
    summary = _json(run / "summary.json")
    if summary and "samples_per_s" in summary:
        graph = ""
        if summary["backend"] == "dali":
            graph = " (its CPU graph)" if summary["device"] == "cpu" else " (GPU graph)"
        print(f"{run}: {summary['step']} steps on data.backend={summary['backend']}{graph} at "
              f"{summary['samples_per_s']:.1f} samples/s (data wait {summary['data_wait_share']:.0%})")
    gains = []
    for label, key in (("BN statistics as trained", "knn"), ("BN statistics re-estimated", "knn_bn")):
        trained, untrained = m.get(f"{key}_top1"), m.get(key.replace("knn", "knn_random") + "_top1")
        if trained is not None and untrained is not None:
            gains.append((trained - untrained) * 100)
            print(f"{run}: kNN top-1, {label}: trained {trained:.2%}, untrained {untrained:.2%} "
                  f"({gains[-1]:+.1f} points)")
    return gains


def default_out(args: list[str], runs: list[Path]) -> Path:
    """Beside the runs (module docstring): never the current folder itself."""
    if len(args) == 1:
        return Path(args[0])  # the run, or the sweep folder holding the runs
    common = Path(os.path.commonpath([r.resolve() for r in runs]))
    cwd = Path.cwd().resolve()
    if cwd.is_relative_to(common):  # the runs share no folder below the current one
        common = cwd / "reports"
    names = [r.name for r in runs]
    label = "+".join(names[:3]) + (f"+{len(names) - 3}-more" if len(names) > 3 else "")
    return common / f"report_{label}"

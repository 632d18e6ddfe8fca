"""python -m pirl_fast.report RUN_DIR [RUN_DIR ...] [--out DIR] [--x KEY]

Gathers the evaluation JSON of several runs (an ablation sweep, or any runs to compare) into one
markdown table and one PNG plot.

A RUN_DIR is a training run directory (it holds config.yaml and/or checkpoints/ and the JSON
written by `python -m pirl_fast.eval`); a folder that is not a run itself but holds runs, such as
a Hydra multirun sweep folder runs/sweep_lambda/{0,1,2,...}, stands for all of them.

Per run it reads:
    config      config.yaml (the resolved config the trainer writes), else .hydra/config.yaml;
                the table shows the keys whose values differ between the runs (the swept ones),
                plus .hydra/overrides.yaml when Hydra wrote one
    knn         knn.json -> knn_top1, knn_top5; knn_random_init.json -> knn_random_top1
    linear      linear.json -> linear_<stage>_top1 for conv1, res2..res5
    invariance  invariance.json -> invariance_<pirl_head|trunk>_mean (this run's checkpoint)
    training    metrics.jsonl -> final_loss (the last logged loss)

The plot has one panel per metric family; x is the swept key (--x, default: the first key that
varies), as a line over sorted numeric values or as bars otherwise.

layerwise.png (whenever a run has linear.json): the paper's layer-wise comparison, linear top-1 of
conv1, res2 .. res5 with one line per run, labelled by method (PIRL against the Jigsaw baseline is
the paper's figure; run `eval linear` on both runs with the same --protocol, goyal by default).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

IGNORED_KEYS = ("run_dir", "name", "resume")  # differ between runs without being a setting
ACCURACY_PREFIXES = ("knn_", "linear_")
LAYERS = ("conv1", "res2", "res3", "res4", "res5")  # linear_probe.STAGES (not imported: it pulls in torch)


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


def read_metrics(run: Path) -> dict[str, float]:
    m: dict[str, float] = {}
    knn = _json(run / "knn.json")
    if knn:
        m["knn_top1"], m["knn_top5"] = knn["top1"], knn["top5"]
    knn_random = _json(run / "knn_random_init.json")
    if knn_random:
        m["knn_random_top1"] = knn_random["top1"]
    linear = _json(run / "linear.json")
    if linear:
        for stage, r in linear["stages"].items():
            m[f"linear_{stage}_top1"] = r["top1"]
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
    return m


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


def build_table(runs: list[Path], configs, overrides, metrics, keys: list[str]) -> tuple[list[str], list[list[str]]]:
    metric_names = sorted({k for m in metrics for k in m}, key=lambda k: (not k.startswith("knn"), k))
    header = ["run"] + keys + (["overrides"] if any(overrides) else []) + metric_names
    rows = []
    for run, c, o, m in zip(runs, configs, overrides, metrics):
        row = [run.name] + [fmt(c.get(k)) for k in keys] + ([" ".join(o)] if any(overrides) else [])
        row += [fmt(100 * m[k]) if k in m and k.startswith(ACCURACY_PREFIXES) else fmt(m.get(k)) for k in metric_names]
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
    """[(label, linear top-1 in % for conv1 .. res5)] for each run whose linear.json has all five."""
    lines = []
    for run in runs:
        linear = _json(run / "linear.json")
        if linear and all(s in linear.get("stages", {}) for s in LAYERS):
            protocol = linear.get("protocol", {}).get("protocol", "gap")
            label = f"{linear.get('method', '?')} ({run.name}, {protocol})"
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
        ax.plot(range(len(LAYERS)), ys, marker="o", label=label)
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
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or sweep folders")
    parser.add_argument("--out", default=None, help="folder for report.md and report.png (default: the common "
                                                    "parent of the runs)")
    parser.add_argument("--x", default=None, metavar="KEY", help="config key for the plot's x axis, e.g. loss.lam "
                                                                 "(default: the first key that varies)")
    args = parser.parse_args(argv)
    runs = expand_runs(args.runs)
    read = [read_config(r) for r in runs]
    configs, overrides = [c for c, _ in read], [o for _, o in read]
    metrics = [read_metrics(r) for r in runs]
    keys = varying_keys(configs)
    if args.x and args.x not in {k for c in configs for k in c}:
        raise SystemExit(f"report: --x {args.x} is not a config key of these runs; varying keys: {keys}")
    x_key = args.x or (keys[0] if keys else None)
    header, rows = build_table(runs, configs, overrides, metrics, keys)
    table = markdown(header, rows)
    out = Path(args.out) if args.out else Path(*_common_parts([r.resolve() for r in runs]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(f"# pirl_fast report ({len(runs)} runs)\n\nAccuracies in %.\n\n" + table)
    plot(runs, configs, metrics, x_key, out / "report.png")
    print(table)
    print(f"wrote {out / 'report.md'}\nwrote {out / 'report.png'}")
    if plot_layerwise(runs, out / "layerwise.png"):
        print(f"wrote {out / 'layerwise.png'}")
    return 0


def _common_parts(paths: list[Path]) -> tuple[str, ...]:
    parts = paths[0].parts if len(paths) > 1 else paths[0].parent.parts
    for p in paths[1:]:
        n = 0
        while n < min(len(parts), len(p.parts)) and parts[n] == p.parts[n]:
            n += 1
        parts = parts[:n]
    return parts


if __name__ == "__main__":
    sys.exit(main())

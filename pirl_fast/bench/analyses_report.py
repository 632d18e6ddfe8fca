"""The report of `bench analyses`: a verdict per claim, a figure per study, one table, report.md and JSON.

A verdict compares two means over seeds. The difference is signed so that positive is the paper's
direction; it decides only when it is larger than the spread between seeds (max - min over seeds) of
the points compared, the largest of them:

    difference > spread    agrees
    difference < -spread   does not agree
    otherwise              undecided (the seeds disagree by more than the effect)

A claim with two parts agrees when both do and does not agree when either does not. With one seed
there is no spread: the verdict is then that seed's sign, and the text says so.
"""

from __future__ import annotations

import math
import textwrap
import time
from pathlib import Path

from pirl_fast.bench import learn
from pirl_fast.runtime import atomic

ALL_ORDERS = math.factorial(9)  # P = 0: any of the 9! orders
PAPER = {  # study -> (section, claim)
    "invariance": ("5.1.1", "the distance between an image's and its jigsaw-shuffled version's representations is "
                   "much smaller for PIRL than for Jigsaw"),
    "layers": ("5.1.2", "PIRL's linear probe is best at res5; Jigsaw's peaks earlier (res4) and falls at res5"),
    "lambda": ("5.2.1", "accuracy is best at lambda = 0.5; lambda = 1 (no image-vs-patch term) is clearly worse"),
    "permutations": ("5.2.2", "PIRL improves with the number of permutations P, Jigsaw does not"),
    "negatives": ("5.2.3", "more negatives K, better accuracy"),
}
XLABEL = {"lambda": "lambda (weight of the jigsaw term)", "permutations": "number of permutations P (9! = all)",
          "negatives": "number of negatives K"}


def res5(r: dict) -> float:
    return r["bn_linear_top1"]["res5"]  # the verdicts' accuracy: res5 probe, BN statistics re-estimated


def knn(r: dict) -> float:
    return r["bn_knn_top1"]


def x_value(study: str, x):
    return ALL_ORDERS if study == "permutations" and x == 0 else x


class Values:
    """A quantity's values over seeds: mean, spread (max - min), and how it prints."""

    def __init__(self, values: list[float], unit: str = "%"):
        self.values, self.unit = values, unit
        self.mean, self.spread = learn.spread(values)

    def __str__(self) -> str:
        fmt = ".2f" if self.unit == "%" else ".3f"
        spread = f", spread {self.spread:{fmt}}" if len(self.values) > 1 else ""
        return f"{self.mean:{fmt}}{self.unit}{spread}"


def decide(difference: float, *compared: Values) -> tuple[str, str]:
    """(verdict, why) for a signed difference (positive: the paper's direction) against the seeds' spread."""
    threshold = max(v.spread for v in compared)
    seeds = min(len(v.values) for v in compared)
    fmt = ".2f" if compared[0].unit == "%" else ".3f"
    sign = "agrees" if difference > 0 else "does not agree"
    if seeds == 1:
        return sign, f"difference {difference:+{fmt}} (one seed: no spread)"
    if abs(difference) <= threshold:
        return "undecided", f"difference {difference:+{fmt}} is within the seed spread {threshold:{fmt}}"
    return sign, f"difference {difference:+{fmt}} > spread {threshold:{fmt}}"


def combine(verdicts: list[str]) -> str:
    if "does not agree" in verdicts:
        return "does not agree"
    return "agrees" if all(v == "agrees" for v in verdicts) else "undecided"


# ---------------------------------------------------------------------------------------------- data per study
def series(points, results, seeds, study: str, metric) -> dict[str, dict]:
    """{series: {x: Values}} for one study's points."""
    out: dict[str, dict] = {}
    for p in points:
        if p.study == study:
            out.setdefault(p.series, {})[p.x] = Values([metric(results[(p.run.name, s)]) for s in seeds])
    return out


def base_results(points, results, seeds, study: str) -> dict[str, list[dict]]:
    return {p.series: [results[(p.run.name, s)] for s in seeds] for p in points if p.study == study}


# ---------------------------------------------------------------------------------------------- verdicts
def verdict_invariance(points, results, seeds) -> tuple[str, str]:
    runs = base_results(points, results, seeds, "invariance")
    dist = {m: Values([r["bn_invariance"]["trunk"] for r in rs], "") for m, rs in runs.items()}
    other = {m: Values([r["bn_invariance"]["trunk_other"] for r in rs], "") for m, rs in runs.items()}
    verdict, why = decide(dist["jigsaw"].mean - dist["pirl"].mean, dist["pirl"], dist["jigsaw"])
    head = Values([r["bn_invariance"]["pirl_head"] for r in runs["pirl"]], "")
    head_other = Values([r["bn_invariance"]["pirl_head_other"] for r in runs["pirl"]], "")
    return verdict, (f"trunk distance ||n(res5(I)) - n(res5(I_t))||: PIRL {dist['pirl']} vs Jigsaw {dist['jigsaw']} "
                     f"({why}); against another image's shuffle: PIRL {other['pirl']}, Jigsaw {other['jigsaw']}; "
                     f"PIRL heads ||f(v_I) - g(v_It)|| {head} (another image: {head_other})")


def verdict_layers(points, results, seeds) -> tuple[str, str]:
    runs = base_results(points, results, seeds, "layers")
    probe = {m: {s: Values([r["bn_linear_top1"][s] for r in rs]) for s in learn.STAGES} for m, rs in runs.items()}
    parts, texts = [], []
    for method, sign in (("pirl", 1), ("jigsaw", -1)):  # PIRL: res5 above the rest; Jigsaw: the rest above res5
        best = max(learn.STAGES[:-1], key=lambda s: probe[method][s].mean)
        verdict, why = decide(sign * (probe[method]["res5"].mean - probe[method][best].mean),
                              probe[method]["res5"], probe[method][best])
        parts.append(verdict)
        curve = ", ".join(f"{s} {probe[method][s].mean:.2f}" for s in learn.STAGES)
        texts.append(f"{learn.LABELS[method]}: res5 {probe[method]['res5']} vs its best earlier stage, {best}, "
                     f"{probe[method][best]} ({why}: {verdict}) [{curve}]")
    return combine(parts), "; ".join(texts)


def verdict_lambda(points, results, seeds) -> tuple[str, str]:
    acc = series(points, results, seeds, "lambda", res5)["pirl"]
    if 0.5 not in acc or 1 not in acc:
        return "undecided", f"the grid {sorted(acc)} needs 0.5 and 1 to test the claim"
    best_other = max((x for x in acc if x != 0.5), key=lambda x: acc[x].mean)
    v1, why1 = decide(acc[0.5].mean - acc[best_other].mean, acc[0.5], acc[best_other])
    v2, why2 = decide(acc[0.5].mean - acc[1].mean, acc[0.5], acc[1])
    return combine([v1, v2]), (f"res5 probe at lambda 0.5 {acc[0.5]} vs the best other, lambda {best_other:g}, "
                               f"{acc[best_other]} ({why1}: {v1}); vs lambda 1 {acc[1]} ({why2}: {v2})")


def verdict_permutations(points, results, seeds) -> tuple[str, str]:
    acc = series(points, results, seeds, "permutations", res5)
    ends = {m: (min(a, key=lambda x: x_value("permutations", x)), max(a, key=lambda x: x_value("permutations", x)))
            for m, a in acc.items()}
    lo, hi = (acc["pirl"][x] for x in ends["pirl"])
    gain = hi.mean - lo.mean
    v1, why1 = decide(gain, lo, hi)
    name = {m: [f"P={x_value('permutations', x)}" for x in ends[m]] for m in ends}
    text = f"PIRL {name['pirl'][0]} {lo} -> {name['pirl'][1]} {hi} ({why1}: {v1})"
    if "jigsaw" not in acc:
        return v1, text
    jlo, jhi = (acc["jigsaw"][x] for x in ends["jigsaw"])
    v2, why2 = decide(gain - (jhi.mean - jlo.mean), lo, hi, jlo, jhi)
    return combine([v1, v2]), (f"{text}; Jigsaw {name['jigsaw'][0]} {jlo} -> {name['jigsaw'][1]} {jhi}: PIRL's gain "
                               f"{gain:+.2f} minus Jigsaw's {jhi.mean - jlo.mean:+.2f} ({why2}: {v2})")


def verdict_negatives(points, results, seeds) -> tuple[str, str]:
    acc = series(points, results, seeds, "negatives", res5)["pirl"]
    lo, hi = min(acc), max(acc)
    verdict, why = decide(acc[hi].mean - acc[lo].mean, acc[lo], acc[hi])
    curve = ", ".join(f"K={k} {acc[k].mean:.2f}" for k in sorted(acc))
    return verdict, f"res5 probe at K={lo} {acc[lo]} vs K={hi} {acc[hi]} ({why}) [{curve}]"


VERDICTS = {"invariance": verdict_invariance, "layers": verdict_layers, "lambda": verdict_lambda,
            "permutations": verdict_permutations, "negatives": verdict_negatives}


# ---------------------------------------------------------------------------------------------- figures
def figure(study: str, points, results, seeds, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from pirl_fast.eval.invariance import plot_histograms

    if study == "invariance":  # invariance.py's histograms, every seed's images pooled
        runs = base_results(points, results, seeds, study)
        pooled = {learn.LABELS[m]: {k: torch.tensor(sum((r["bn_distances"][k] for r in rs), []))
                                    for k in rs[0]["bn_distances"]} for m, rs in runs.items()}
        plot_histograms(pooled, path)
        return
    colours = {"pirl": "tab:blue", "jigsaw": "tab:orange"}
    panels = [("linear probe top-1 (%)", None)] if study == "layers" else [("res5 linear probe top-1 (%)", res5),
                                                                           ("kNN top-1 (%)", knn)]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8, 6 * len(panels)), 4.4), squeeze=False)
    for ax, (ylabel, metric) in zip(axes[0], panels):
        if study == "layers":
            runs = base_results(points, results, seeds, study)
            data = {m: {i: Values([r["bn_linear_top1"][s] for r in rs]) for i, s in enumerate(learn.STAGES)}
                    for m, rs in runs.items()}
            ax.set_xticks(range(len(learn.STAGES)), learn.STAGES)
        else:
            data = {m: {x_value(study, x): v for x, v in d.items()}
                    for m, d in series(points, results, seeds, study, metric).items()}
            if study != "lambda":
                ax.set_xscale("log")
            ax.set_xlabel(XLABEL[study])
        for method, d in data.items():
            xs = sorted(d)
            means = [d[x].mean for x in xs]
            low = [d[x].mean - min(d[x].values) for x in xs]
            high = [max(d[x].values) - d[x].mean for x in xs]
            ax.errorbar(xs, means, yerr=[low, high], fmt="o-", capsize=4, color=colours[method],
                        label=f"{learn.LABELS[method]} (mean; bars: min-max over {len(seeds)} seed(s))")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- table and files
def table(points, results, seeds) -> list[dict]:
    """One row per study, network and x: the verdict's quantity, mean over seeds, spread, per seed."""
    rows = []
    for p in dict.fromkeys((p.study, p.series, p.x, p.run) for p in points):
        study, method, x, run = p
        rs = [results[(run.name, s)] for s in seeds]
        if study == "invariance":
            quantities = [("trunk distance, own shuffle", [r["bn_invariance"]["trunk"] for r in rs]),
                          ("trunk distance, other image", [r["bn_invariance"]["trunk_other"] for r in rs])]
        elif study == "layers":
            quantities = [(f"{s} probe %", [r["bn_linear_top1"][s] for r in rs]) for s in learn.STAGES]
        else:
            quantities = [("res5 probe %", [res5(r) for r in rs]), ("kNN %", [knn(r) for r in rs])]
        for quantity, values in quantities:
            v = Values(values)
            rows.append({"study": study, "network": learn.LABELS[method], "x": str(x_value(study, x)),
                         "quantity": quantity, "mean": v.mean, "spread": v.spread, "run": run.name,
                         "per_seed": " ".join(f"{a:{fmt(study)}}" for a in values)})
    return rows


def fmt(study: str) -> str:
    return ".3f" if study == "invariance" else ".2f"  # distances in [0, 2]; accuracies in %


def timing(results, wall_s: float, distinct: int) -> dict:
    """Measured seconds per run and the estimate for every study (`distinct` runs per seed) with two seeds."""
    per_run = [r["train_s"] + r["eval_s"] for r in results.values()]
    mean = sum(per_run) / len(per_run)
    return {"wall_s": wall_s, "runs": len(per_run), "mean_run_s": mean,
            "mean_train_s": sum(r["train_s"] for r in results.values()) / len(per_run),
            "mean_eval_s": sum(r["eval_s"] for r in results.values()) / len(per_run),
            "all_studies_runs_per_seed": distinct, "estimate_all_2_seeds_min": 2 * distinct * mean / 60}


def write(args, out: Path, points, seeds, results, wall_s: float, all_runs: int) -> list[dict]:
    """report.md, analyses.json and the figures under `out`; prints the verdicts; returns the table's rows.
    `all_runs`: distinct runs per seed of all five studies with these grids (for the time estimate)."""
    studies = list(dict.fromkeys(p.study for p in points))
    split = "test split" if args.eval_on == "test" else "held-out training images"
    config = results.get(("pirl", seeds[0]), results[next(iter(results))])["overrides"]
    title = (f"Fashion-MNIST, {args.train_images} train / {args.test_images} {split}, {args.epochs} epochs of "
             f"batch {args.batch}, seeds {','.join(map(str, seeds))}; BN re-estimated")
    verdicts, figures = {}, {}
    for study in studies:
        verdicts[study] = VERDICTS[study](points, results, seeds)
        figures[study] = out / f"{study}.png"
        figure(study, points, results, seeds, figures[study], f"{study} (PIRL Sec. {PAPER[study][0]}): {title}")
    rows = table(points, results, seeds)
    times = timing(results, wall_s, all_runs)
    lines = [f"# PIRL's analyses on real images ({time.strftime('%Y-%m-%d')})", "", title, "",
             "Recipe: `python -m pirl_fast.train " + " ".join(config) + "` (one run; the others differ in method, "
             "seed and the swept key).", ""]
    for study in studies:
        section, claim = PAPER[study]
        verdict, why = verdicts[study]
        lines += [f"## {study} (Sec. {section})", "", f"Paper: {claim}.", "", f"**Verdict: {verdict}.** {why}", "",
                  f"![{study}]({figures[study].name})", "", "| network | x | quantity | mean | spread | per seed |",
                  "|---|---|---|---:|---:|---|"]
        lines += [f"| {r['network']} | {r['x']} | {r['quantity']} | {r['mean']:{fmt(study)}} | "
                  f"{r['spread']:{fmt(study)}} | "
                  f"{r['per_seed']} |" for r in rows if r["study"] == study] + [""]
    lines += ["## Time", "", f"{times['runs']} runs reported, mean {times['mean_run_s'] / 60:.1f} min each "
              f"(training {times['mean_train_s'] / 60:.1f}, evaluation {times['mean_eval_s'] / 60:.1f}, as measured "
              f"when each was made); this invocation {wall_s / 60:.1f} min. All five studies with these grids: "
              f"{times['all_studies_runs_per_seed']} runs per seed, so about {times['estimate_all_2_seeds_min']:.0f} "
              "min with two seeds at that rate.", ""]
    write_text(out / "report.md", "\n".join(lines))
    atomic.write_json(out / "analyses.json", {
        "title": title, "seeds": seeds, "studies": studies, "time": times,
        "verdicts": {s: {"claim": PAPER[s][1], "verdict": v, "numbers": why} for s, (v, why) in verdicts.items()},
        "figures": {s: str(p) for s, p in figures.items()}, "table": rows,
        "runs": {f"{n}_seed{s}": {k: v for k, v in r.items() if k not in ("bn_distances", "config")}
                 for (n, s), r in results.items()}})
    print(f"\n{title}")
    for study, (verdict, why) in verdicts.items():
        print(f"  [{verdict}] {study} (Sec. {PAPER[study][0]}): {why}")
    print(f"wrote {out / 'report.md'}, {out / 'analyses.json'} and {', '.join(str(f) for f in figures.values())}")
    return [{k: v for k, v in r.items() if k != "run"} for r in rows]


def write_text(path: Path, text: str) -> None:
    with atomic.atomic_write(path, "w") as f:
        f.write(text + "\n")

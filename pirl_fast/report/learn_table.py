"""The learning benchmark's table (`python -m pirl_fast.bench learn`), as markdown: written by the benchmark
and printed again by `python -m pirl_fast.report OUT` from OUT/learn.json.

How to read it: every row is measured by the same code on the same images (the evaluation view of the
pre-training images as the kNN memory and the probes' training set; accuracies on the test split, or
held-out training images with --eval-on val). The two baselines bracket what a representation is
worth here: raw pixels (no network at all) below, and the same network trained with the labels
(`method=supervised`, same trunk, initial weights, images, views and epochs) above. "Gap share" is
PIRL's (trained - untrained) / (supervised - untrained): 0 is no better than its initial weights,
1 is as good as the labels. Two linear classifiers: the SGD probe of `eval linear --protocol gap` (the
targets' "linear probe"), and scikit-learn's logistic regression trained to convergence on the same
standardised res5 features (or pixels), the one a reader would fit on raw pixels themselves.
"""

from __future__ import annotations

COLUMNS = (  # (header, row key, spread key or None)
    ("kNN top-1, BN as is", "knn_top1", "knn_spread"),
    ("kNN, BN re-estimated", "bn_knn_top1", "bn_knn_spread"),
    ("linear res5, BN as is", "linear_res5_top1", "linear_res5_spread"),
    ("res5, BN re-estimated", "bn_linear_res5_top1", "bn_linear_res5_spread"),
    ("res5 logistic (scikit-learn), as is / re-est.", "logistic_res5", None),
    ("best probe stage", "linear_best_stage", None),
    ("trunk invariance gap", "trunk_inv_gap", None),
)


def _cell(row: dict, key: str, spread: str | None) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if key == "logistic_res5":
        return f"{value:.2f}% / {row.get('bn_logistic_res5', value):.2f}%"
    if key.endswith("inv_gap"):
        return f"{value:+.3f}"
    return f"{value:.2f}%" + (f" ({row[spread]:.1f})" if spread and row.get("seeds", 1) > 1 else "")


def results_markdown(rows: list[dict], shares: list[dict]) -> str:
    """The networks' table (means over seeds, spread max - min in brackets) and PIRL's gap shares."""
    lines = ["| network | seeds | " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(COLUMNS)]
    for row in rows:
        lines.append(f"| {row['network']} | {row['seeds']} | "
                     + " | ".join(_cell(row, key, spread) for _, key, spread in COLUMNS) + " |")
    native = next((row["native"] for row in rows if "native" in row), None)
    if native:
        lines += ["", f"Raw pixels at the images' own size ({native['size']} px, not the evaluation view's resize and "
                  f"centre crop): kNN {native['knn_top1']:.2f}%, logistic regression {native['logistic']:.2f}%."]
    if shares:
        lines += ["", "PIRL's share of the gap from the untrained network to the supervised one "
                  "((PIRL - untrained) / (supervised - untrained); mean over seeds, spread max - min):", "",
                  "| metric | BN statistics | gap share | spread | per seed |", "|---|---|---:|---:|---|"]
        for s in shares:
            per_seed = " ".join(f"{v:.2f}" for v in s["per_seed"])
            lines.append(f"| {s['metric']} | {s['bn']} | {s['share']:.2f} | {s['spread']:.2f} | {per_seed} |")
    return "\n".join(lines)


def learn_report(details: dict) -> str:
    """The whole text `report` prints for a learn.json: title, table, gap shares and targets."""
    text = [details.get("title", "bench learn"), "", results_markdown(details.get("rows", []),
                                                                      details.get("gap_shares", [])), ""]
    for t in details.get("targets", []):
        text.append(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}")
    return "\n".join(text)

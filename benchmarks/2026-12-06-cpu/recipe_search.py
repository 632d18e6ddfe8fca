"""The recipe search of 2026-12-06 (issue 20), kept as it ran: one PIRL run of `experiment=fmnist` with the given
overrides on Fashion-MNIST, scored on held-out training images (`bench learn --eval-on val`'s split, never the
test split) as `bench learn` scores a network (kNN top-1 on res5, the gap probes, BN statistics as they are and
re-estimated); or, with --pixels, the raw-pixel baselines (and scikit-learn's logistic regression on them).
It is `python -m pirl_fast.bench learn --eval-on val --seeds 0 --override ...` restricted to PIRL, which made a
dozen variants affordable. Appends one JSON line per run to OUT/results.jsonl (recipe_search_results.jsonl here).

    OMP_NUM_THREADS=1 python benchmarks/2026-12-06-cpu/recipe_search.py base data.backend=dali
    OMP_NUM_THREADS=1 python benchmarks/2026-12-06-cpu/recipe_search.py e24 --epochs 24 data.backend=dali
    python benchmarks/2026-12-06-cpu/recipe_search.py pix1000 --pixels
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pirl_fast.bench import learn  # noqa: E402
from pirl_fast.eval import linear_probe as lp  # noqa: E402
from pirl_fast.eval.features import ShardImageDataset, eval_transform, load_pretrained, make_loader  # noqa: E402
from pirl_fast.eval.knn import knn_evaluate  # noqa: E402
from pirl_fast.model.batchnorm import reestimate_running_stats  # noqa: E402

PROBE = lp.ProbeConfig(protocol="gap", epochs=30, lr=0.1, augment=False)  # bench learn's probe protocol


def loaders(train, val, size):
    return (make_loader(ShardImageDataset(train, eval_transform(size)), 250, 0),
            make_loader(ShardImageDataset(val, eval_transform(size)), 250, 0))


def pixels(train, val, size) -> dict:
    from sklearn.linear_model import LogisticRegression

    (x, y), (xv, yv) = ((torch.cat([b[0] for b in dl]).flatten(1), torch.cat([b[1] for b in dl]))
                        for dl in loaders(train, val, size))
    mean = x.mean(0)
    probes, _ = lp.probe_cached({"res5": x}, y, {"res5": xv}, yv, 10, PROBE, "cpu")
    logistic = LogisticRegression(max_iter=2000).fit((x - mean).numpy(), y.numpy())
    return {"pix_knn": 100 * knn_evaluate(x - mean, y, xv - mean, yv, 10).top1,
            "pix_probe": 100 * probes["res5"]["top1"],
            "pix_logreg": 100 * logistic.score((xv - mean).numpy(), yv.numpy())}


def pirl(a, train, val, top: Path) -> dict:
    run = top / "runs" / a.name
    args = argparse.Namespace(workers=2, train_images=a.n, epochs=a.epochs, batch=a.batch, evals=1, override=a.ov)
    overrides = learn.training_overrides(args, "pirl", a.seed, train, run) + ["trainer.progress=false"]
    shutil.rmtree(run, ignore_errors=True)
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "pirl_fast.train", *overrides], capture_output=True, text=True,
                          cwd=REPO)
    (top / "logs").mkdir(parents=True, exist_ok=True)
    (top / "logs" / f"{a.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    out = {"train_s": time.time() - started}
    net = load_pretrained(run)
    train_dl, val_dl = loaders(train, val, net.config["data"]["image_size"])
    rebn = reestimate_running_stats(net.model, lambda m, x: m.features(x), (x for x, _, _ in train_dl), "cpu")
    for tag, model in (("", net.model), ("bn_", rebn)):
        f, y = lp.cache_stage_features(model.trunk, train_dl, "cpu", "train", "gap")
        fv, yv = lp.cache_stage_features(model.trunk, val_dl, "cpu", "val", "gap")
        out[tag + "knn"] = 100 * knn_evaluate(f["res5"], y, fv["res5"], yv, 10).top1
        out[tag + "knn_res4"] = 100 * knn_evaluate(f["res4"], y, fv["res4"], yv, 10).top1
        probes, _ = lp.probe_cached(f, y, fv, yv, 10, PROBE, "cpu")
        out[tag + "probe"] = {s: round(100 * probes[s]["top1"], 2) for s in lp.STAGES}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("--n", type=int, default=1000, help="pre-training images")
    p.add_argument("--val", type=int, default=1000, help="held-out training images scored")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pixels", action="store_true", help="the raw-pixel baselines instead of a PIRL run")
    p.add_argument("--size", type=int, default=32, help="--pixels: the evaluation view's size")
    p.add_argument("--out", default="runs/recipe_search", help="data, runs, logs and results.jsonl")
    p.add_argument("ov", nargs="*", help="Hydra overrides for the PIRL run")
    a = p.parse_intermixed_args()
    top = Path(a.out)
    data = argparse.Namespace(idx_dir="/usr/share/datasets/fashion-mnist", workers=2)
    train = learn.prepare_split(data, "train", a.n, top / "data" / f"train_{a.n}")
    val = learn.prepare_split(data, "train", a.val, top / "data" / f"val_{a.val}_after_{a.n}", skip=a.n)
    started = time.time()
    result = {"name": a.name, "n": a.n, "epochs": a.epochs, "ov": a.ov}
    result.update(pixels(train, val, a.size) if a.pixels else pirl(a, train, val, top))
    result["total_s"] = time.time() - started
    print(json.dumps(result))
    with open(top / "results.jsonl", "a") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

"""Does PIRL learn from real images? PIRL between two plain baselines, raw pixels below and the same network
trained with labels above, beside the Jigsaw baseline and the untrained network.

    python -m pirl_fast.bench learn [--json learn.json]       # CPU: about 25 min on 2 idle cores (*)
    python -m pirl_fast.bench learn --eval-on val --seeds 0   # for choosing a recipe: never the test split
    python -m pirl_fast.bench learn --curve 500,1000,2000     # PIRL vs pixels by the number of images

The data is Fashion-MNIST (Xiao et al. 2017: 28 px greyscale photographs of clothing, 10 classes),
which nothing else in pirl_fast needs. Install it with `sudo apt-get install dataset-fashion-mnist`
(Debian/Ubuntu: the IDX files land in /usr/share/datasets/fashion-mnist), or put the four
*-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist in a folder and pass
--idx-dir. Steps, everything under --out (the data steps are skipped when their output is there):

  1. data      IDX -> ImageFolder of JPEGs (pirl_fast.idx_folder): a class-balanced subset of
               --train-images from the training split (pre-training, and the kNN / probe
               training set) and --test-images from the test split (every reported accuracy;
               --eval-on val: held-out training images instead, to choose recipes on)
  2. shard     both through `python -m pirl_fast.shard`, the product's path
  3. train     per seed, `experiment=fmnist` (pirl_fast/train/conf/experiment/fmnist.yaml, where the
               choices are explained): PIRL, Jigsaw (method=jigsaw, P=100 permutations, the
               reference's Jigsaw input scaled to this size: JIGSAW_REFERENCE_INPUT) and supervised
               (method=supervised: cross-entropy on the labels), with the same trunk, initial
               weights, steps, batch, data, image view and LR schedule; a checkpoint every
               steps / --evals steps. A finished run is reused when the command is run again.
  4. evaluate  per seed, on the test split: weighted kNN top-1 (k=200, tau=0.07, train split as
               the memory) of every checkpoint of both runs and of the untrained network (the
               very weights both runs started from); linear probes on all five stages (stored
               centre-crop features, the `eval linear --no-augment` protocol) of the final
               networks and the untrained one; the invariance analysis (pirl_fast.eval.invariance:
               own-image vs other-image distance, the gap) of all three
  5. report    one table (mean over seeds and the spread, max - min) with raw pixels as a row (the
               same kNN on mean-centred pixels of the evaluation view, the same probe on the pixels),
               PIRL's share of the gap from untrained to supervised, one plot (kNN top-1 over
               training; the untrained network and pixels as lines), the targets met or not, JSON
               and learn.md (`python -m pirl_fast.report OUT` prints it again)

(*) BENCHMARKS.md (2026-12-06). On a machine shared with other jobs, set OMP_NUM_THREADS=1: with more
busy threads than cores, PyTorch's OpenMP threads wait on each other and steps ran up to 30x slower
(measured, BENCHMARKS.md); shrink it with --seeds 0 --train-images 500 and say so beside any figure.

Every network is evaluated with the same views, layer (res5 average-pooled; the probes also at
conv1..res4) and protocol. On CUDA the defaults grow (the whole dataset, the small stem, more
epochs): see --help for both sets.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from pirl_fast.report.learn_table import learn_report, results_markdown
from pirl_fast.runtime import atomic

STAGES = ("conv1", "res2", "res3", "res4", "res5")
METHODS = ("pirl", "jigsaw", "supervised")  # trained per seed, from the same initial weights
NETWORKS = (*METHODS, "untrained", "pixels")  # the table's rows: the trained three and the two baselines
LABELS = {"pirl": "PIRL", "jigsaw": "Jigsaw", "supervised": "supervised", "untrained": "untrained",
          "pixels": "raw pixels"}
JIGSAW_PERMUTATIONS = 100  # Noroozi & Favaro's smaller set (their best, 1000, is 1 class per image here)
# The reference's Jigsaw input (experiment=jigsaw_in1k_r50 sets the same keys; vissl configs/config/pretrain/
# jigsaw/jigsaw_8gpu_resnet.yaml): resize then a random crop with 1 px of slack (256 -> 255 there,
# patch_crop_size + 1 -> patch_crop_size here), one flip and one greyscale draw (p 0.66) per image, no colour
# jitter or photometric ops, patch offsets drawn as its ImgPatchesFromTensor does, max-average Hamming
# permutations. Scaled to this size: 8 px patches in 10 px cells (offsets 0..1; the reference: 64 in 85, 0..20),
# 100 permutations (the reference: 2,000). Greyscale is a no-op on Fashion-MNIST's grey images.
JIGSAW_REFERENCE_INPUT = ["data.patch_view=jigsaw", "data.patch_offsets=reference", "data.permutation_set=max_avg",
                          "data.brightness=0", "data.contrast=0", "data.saturation=0", "data.hue=0",
                          "data.photometric_p=0", "data.gray_p=0.66"]
KNN_MARGIN = 5.0  # target: PIRL kNN top-1 at least this many points above the untrained network
PIXEL_KNN_MARGIN = 3.0  # target: PIRL kNN top-1 at least this many points above kNN on raw pixels
PIXEL_LINEAR_MARGIN = 1.0  # target: PIRL's res5 probe at least this many points above the probe on raw pixels
PROBE_EPOCHS, PROBE_LR = 30, 0.1  # cached-feature probes on a few thousand images; lr per 256 images
# gap: one global-pooled probe per stage (linear_probe.py: "the right probe for very small images"); the
# Goyal pooling grids are sized for 224 px maps, which 32 px images do not have.
PROBE_PROTOCOL = "gap"
LOGISTIC_ITERATIONS = 3000  # L-BFGS iterations: enough for convergence on 1,000-10,000 samples of <= 3,072 features
INVARIANCE_IMAGES = 500  # test images for the invariance analysis (distances are means; 500 is plenty)
# Sizes per device; on CUDA the runs also get GPU_OVERRIDES
# 24 epochs: kNN top-1 on held-out training images rose from 75.0 (16) to 76.5 (24) and stayed (76.4 at 32);
# BENCHMARKS.md, "Choosing the recipe" (2026-12-06)
CPU_SIZE = dict(train_images=1000, test_images=1000, epochs=24, batch=50)
GPU_SIZE = dict(train_images=60000, test_images=10000, epochs=100, batch=512)
GPU_OVERRIDES = ["model.stem=small", "data.backend=dali", "data.workers=8", "bank.num_negatives=4096"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pirl_fast.shard.idx_folder import DEFAULT_ROOT

    size = GPU_SIZE if torch.cuda.is_available() else CPU_SIZE
    p.add_argument("--idx-dir", default=DEFAULT_ROOT, help=f"Fashion-MNIST IDX files (default {DEFAULT_ROOT})")
    p.add_argument("--out", default="runs/bench_learn", help="working folder: data, shards, runs, plot "
                   "(default runs/bench_learn; data and shards are reused by later runs)")
    p.add_argument("--train-images", type=int, default=size["train_images"],
                   help=f"pre-training images (default: CPU {CPU_SIZE['train_images']}, "
                   f"CUDA {GPU_SIZE['train_images']})")
    p.add_argument("--test-images", type=int, default=size["test_images"],
                   help=f"images evaluated on: the test split, or held-out training images with --eval-on val "
                   f"(default: CPU {CPU_SIZE['test_images']}, CUDA {GPU_SIZE['test_images']})")
    p.add_argument("--epochs", type=int, default=size["epochs"],
                   help=f"pre-training epochs (default: CPU {CPU_SIZE['epochs']}, CUDA {GPU_SIZE['epochs']})")
    p.add_argument("--batch", type=int, default=size["batch"],
                   help=f"global batch (default: CPU {CPU_SIZE['batch']}, CUDA {GPU_SIZE['batch']})")
    p.add_argument("--eval-on", choices=("test", "val"), default="test",
                   help="test: the Fashion-MNIST test split (what is reported); val: held-out training images, "
                   "disjoint from the pre-training ones (for choosing settings; default test)")
    p.add_argument("--seeds", default="0,1", help="training seeds, comma-separated (default 0,1)")
    p.add_argument("--evals", type=int, default=4, help="kNN points over training per run (default 4)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data workers / sharder processes (default: the cores, at most 8)")
    p.add_argument("--plot", metavar="PATH.png", help="the kNN-over-training plot (default OUT/learn.png)")
    p.add_argument("--curve", metavar="N,N,...", help="instead of the comparison: PIRL against raw pixels at each "
                   "number of pre-training images (same epochs, --seeds), to see where self-supervision overtakes "
                   "pixels; writes OUT/curve.json and OUT/curve.png")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for both trainings (repeatable), e.g. --override loss=nce")


# ---------------------------------------------------------------------------------------------- data
def prepare_split(args, split: str, count: int, folder: Path, skip: int = 0) -> Path:
    """Fashion-MNIST `split` -> folder/images (ImageFolder) -> folder/shards, unless already there.

    A class-balanced subset of `count` images, seeded; `skip` > 0 leaves out the first `skip` of the
    same balanced order (the pre-training images), so the two subsets of one split never overlap."""
    from pirl_fast.shard.format import load_manifest
    from pirl_fast.shard.idx_folder import balanced_subset, load_split, write_folder

    shards = folder / "shards"
    if (shards / "manifest.json").is_file() and load_manifest(shards).num_samples == count:
        print(f"reusing {shards} ({count} images)")
        return shards
    shutil.rmtree(folder, ignore_errors=True)
    images, labels = load_split(args.idx_dir, split)
    if skip + count > labels.shape[0]:
        raise SystemExit(f"{count} images from the {split} split (after the {skip} pre-training ones): it has only "
                         f"{labels.shape[0]}; lower --train-images / --test-images")
    before = balanced_subset(labels, skip, seed=0) if skip else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(balanced_subset(labels, skip + count, seed=0), before)  # (count,), class-balanced
    write_folder(images[keep], labels[keep], keep, folder / "images", split)
    command = [sys.executable, "-m", "pirl_fast.shard", str(folder / "images"), str(shards),
               "--samples-per-shard", "250", "--workers", str(args.workers), "--seed", "0"]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return shards


def prepare_data(args, out: Path, held_out_after: int = 0) -> tuple[Path, Path]:
    """(training shards, evaluation shards) under out/data: --train-images of the training split, and
    --test-images of the test split, or with --eval-on val of the training split after the first
    `held_out_after` (default --train-images) images, which pre-training never sees."""
    train = prepare_split(args, "train", args.train_images, out / "data" / f"train_{args.train_images}")
    if args.eval_on == "val":
        after = held_out_after or args.train_images
        return train, prepare_split(args, "train", args.test_images,
                                    out / "data" / f"val_{args.test_images}_after_{after}", skip=after)
    return train, prepare_split(args, "t10k", args.test_images, out / "data" / f"test_{args.test_images}")


def check_dataset(idx_dir: str) -> None:
    """Exit 2, saying how to install Fashion-MNIST, unless both splits' IDX files are in idx_dir."""
    from pirl_fast.shard.idx_folder import IdxError, find_split

    try:
        for split in ("train", "t10k"):
            find_split(idx_dir, split)
    except IdxError as e:
        print(f"bench learn needs Fashion-MNIST: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------------- training
def training_overrides(args, method: str, seed: int, shards: Path, run_dir: Path) -> list[str]:
    steps_per_epoch = math.ceil(args.train_images / args.batch)
    steps = args.epochs * steps_per_epoch
    every = max(1, steps // args.evals)
    # data.backend=auto: DALI's CPU graph where DALI is installed (fewer CPU cycles per sample than the torch
    # workers, so more of the 2 cores train; the recipe was chosen with it), else the torch loader
    overrides = ["experiment=fmnist", "data.backend=auto", f"data.shards={shards}", f"data.batch_size={args.batch}",
                 f"data.workers={args.workers}", f"trainer.epochs={args.epochs}", f"trainer.seed={seed}",
                 f"data.seed={seed}", f"bank.seed={seed}", f"trainer.ckpt_every={every}",
                 "trainer.ckpt_epoch_end=false",
                 f"trainer.keep_checkpoints={args.evals + 2}", "resume=none", f"run_dir={run_dir}"]
    if torch.cuda.is_available():
        overrides += GPU_OVERRIDES
    if method == "jigsaw":
        crop = composed(overrides + list(args.override)).data.patch_crop_size
        overrides += ["method=jigsaw", f"data.num_permutations={JIGSAW_PERMUTATIONS}",
                      f"data.patch_resize={crop + 1}", *JIGSAW_REFERENCE_INPUT]
    if method == "supervised":  # the same trunk, views, schedule and epochs, trained with the labels
        from pirl_fast.shard.format import load_manifest

        overrides += ["method=supervised", f"model.num_classes={len(load_manifest(shards).classes)}"]
    return overrides + list(args.override)


def composed(overrides: list[str]):
    """The training config these overrides compose (nothing runs); inside a caller's own Hydra context too."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def pretrain(args, method: str, seed: int, shards: Path, run_dir: Path) -> dict:
    """Train one network, unless run_dir already holds this very run, finished (the benchmark is resumable:
    run it again after an interruption and only what is missing runs)."""
    from pirl_fast.runtime.signals import STOP_SIGNALS, exit_status
    from pirl_fast.train.loop import train

    overrides = training_overrides(args, method, seed, shards, run_dir)
    done = finished_run(run_dir, overrides)
    if done is not None:
        print(f"\n-- {LABELS[method]}, seed {seed}: reusing the finished run {run_dir} (step {done['step']})",
              flush=True)
        return done
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"\n-- pre-train {LABELS[method]}, seed {seed}: python -m pirl_fast.train " + " ".join(overrides), flush=True)
    summary = train(composed(overrides))
    stopped_by = {s.name: s for s in STOP_SIGNALS}.get(summary["stopped_by"])
    if stopped_by is not None:  # the trainer saved a checkpoint and returned: stop the whole benchmark
        print(f"bench learn: stopped by {stopped_by.name} during {run_dir}; run the same command again to go on "
              "(finished runs and their evaluations are reused; the interrupted run starts again)", file=sys.stderr)
        raise SystemExit(exit_status(stopped_by))
    atomic.write_json(run_dir / DONE_FILE, {"overrides": overrides, "config": fingerprint(overrides),
                                            "summary": summary})
    return summary


DONE_FILE = "bench_done.json"  # written after a run finished: its overrides and summary


def fingerprint(overrides: list[str]) -> str:
    """The composed training config as YAML, less what does not change the result (data.workers). A finished
    run is reused only while this is unchanged: the same overrides compose another run when a default or
    an experiment file changed (loss.z's default did, between two sittings of bench analyses)."""
    from omegaconf import OmegaConf

    cfg = composed(overrides)
    cfg.data.workers = 0
    return OmegaConf.to_yaml(cfg)


def finished_run(run_dir: Path, overrides: list[str]) -> dict | None:
    """The summary of the run in run_dir when it finished with these overrides composing the same config as
    now, else None (a done file of an older format, without the config, is not trusted either)."""
    try:
        done = json.loads((run_dir / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None
    same = done.get("overrides") == overrides and done.get("config") == fingerprint(overrides)
    return done["summary"] if same else None


# ---------------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """The train and test images in the evaluation view, and the three measurements of a network."""

    def __init__(self, train_shards: Path, test_shards: Path, image_size: int, views):
        from pirl_fast.eval.features import ShardImageDataset, eval_transform, make_loader
        from pirl_fast.eval.invariance import InvarianceViews

        self.train = make_loader(ShardImageDataset(train_shards, eval_transform(image_size)), 250, 0)
        self.test = make_loader(ShardImageDataset(test_shards, eval_transform(image_size)), 250, 0)
        self.num_classes = len(self.train.dataset.classes)
        self.invariance = make_loader(ShardImageDataset(test_shards, InvarianceViews(views), INVARIANCE_IMAGES), 100, 0)
        self.grid = views.grid

    def stage_features(self, trunk):
        from pirl_fast.eval import linear_probe as lp

        return (lp.cache_stage_features(trunk, self.train, "cpu", "features: train", PROBE_PROTOCOL),
                lp.cache_stage_features(trunk, self.test, "cpu", "features: test", PROBE_PROTOCOL))

    def knn(self, trunk) -> float:
        """kNN top-1 (%) on res5 average-pooled (what `eval knn` uses), train split -> test split."""
        from pirl_fast.eval.knn import knn_evaluate

        (train, train_y), (test, test_y) = self.stage_features(trunk)
        return 100 * knn_evaluate(train["res5"], train_y, test["res5"], test_y, self.num_classes).top1

    def full(self, model, method: str, invariance: bool = True, distances: bool = False) -> dict:
        """kNN, the five linear probes and the invariance distances of a final network, with its BN running
        statistics as they are and re-estimated on the training images (`bn_`: see pirl_fast/model/batchnorm.py).
        invariance=False skips the invariance analysis; distances=True also keeps its per-image distances."""
        from pirl_fast.model.batchnorm import reestimate_running_stats

        out = self.measure(model, method, invariance, distances)
        images = (x for x, _, _ in self.train)
        rebn = reestimate_running_stats(model, lambda m, x: m.features(x), images, "cpu")
        out.update({f"bn_{k}": v for k, v in self.measure(rebn, method, invariance, distances).items()})
        return out

    def pixels(self) -> dict:
        """Raw pixels measured as a network is: the evaluation view flattened, (N, 3*S*S); kNN (same k and
        tau) on the pixels mean-centred by the training images' mean, and the same probe protocol
        (PROBE_PROTOCOL's BatchNorm + linear head, epochs, lr) on the pixels. Seed-independent."""
        from torchvision import transforms as T

        from pirl_fast.eval import linear_probe as lp
        from pirl_fast.eval.features import make_loader
        from pirl_fast.eval.knn import knn_evaluate

        def flat(loader):
            xs, ys = zip(*((x.flatten(1), y) for x, y, _ in loader))
            return torch.cat(xs), torch.cat(ys).long()

        def centred_knn(train, train_y, test, test_y) -> float:
            mean = train.mean(dim=0)  # (3*S*S,): cosine kNN on raw pixels would be dominated by the mean image
            return 100 * knn_evaluate(train - mean, train_y, test - mean, test_y, self.num_classes).top1

        (train, train_y), (test, test_y) = flat(self.train), flat(self.test)
        knn = centred_knn(train, train_y, test, test_y)
        probe_cfg = lp.ProbeConfig(protocol=PROBE_PROTOCOL, epochs=PROBE_EPOCHS, lr=PROBE_LR, augment=False)
        probes, _ = lp.probe_cached({"pixels": train}, train_y, {"pixels": test}, test_y, self.num_classes,
                                    probe_cfg, "cpu")
        out = {"knn_top1": knn, "linear_top1": {"res5": 100 * probes["pixels"]["top1"]},
               "logistic_res5": logistic_top1(train, train_y, test, test_y)}
        # A skeptic's baselines, outside the shared evaluation view: the stored images at their own size (28 px),
        # not resized and centre-cropped; kNN on the mean-centred pixels, logistic regression to convergence.
        native = [make_loader(dl.dataset.with_transform(T.ToTensor()), 250, 0) for dl in (self.train, self.test)]
        (train, train_y), (test, test_y) = flat(native[0]), flat(native[1])
        out["native"] = {"knn_top1": centred_knn(train, train_y, test, test_y),
                         "logistic": logistic_top1(train, train_y, test, test_y),
                         "size": native[0].dataset[0][0].shape[-1]}
        return {**out, **{f"bn_{k}": v for k, v in out.items()}}  # no BatchNorm: the same either way

    def measure(self, model, method: str, invariance: bool = True, distances: bool = False) -> dict:
        from pirl_fast.eval import invariance as inv
        from pirl_fast.eval import linear_probe as lp
        from pirl_fast.eval.knn import knn_evaluate

        (train, train_y), (test, test_y) = self.stage_features(model.trunk)
        knn = 100 * knn_evaluate(train["res5"], train_y, test["res5"], test_y, self.num_classes).top1
        probe_cfg = lp.ProbeConfig(protocol=PROBE_PROTOCOL, epochs=PROBE_EPOCHS, lr=PROBE_LR, augment=False)
        probes, _ = lp.probe_cached(train, train_y, test, test_y, self.num_classes, probe_cfg, "cpu")
        out = {"knn_top1": knn, "linear_top1": {s: 100 * probes[s]["top1"] for s in STAGES},
               "logistic_res5": logistic_top1(train["res5"], train_y, test["res5"], test_y)}
        if invariance:
            per_image = inv.invariance_distances(model, method, self.invariance, self.grid, "cpu")
            stats = {m: inv.summarise(d) for m, d in per_image.items()}
            out.update({"invariance": {m: stats[m]["mean"] for m in stats}, "invariance_gap": inv.gaps(stats)})
            if distances:  # (N,) per metric, for histograms
                out["distances"] = {m: [round(v, 5) for v in d.tolist()] for m, d in per_image.items()}
        return out


def logistic_top1(train, train_y, test, test_y) -> float:
    """Top-1 (%) of scikit-learn's logistic regression trained to convergence on standardised features: a
    second linear classifier beside the SGD probe, the one a reader would fit on raw pixels themselves."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train.numpy())
    model = LogisticRegression(max_iter=LOGISTIC_ITERATIONS).fit(scaler.transform(train.numpy()), train_y.numpy())
    return 100 * model.score(scaler.transform(test.numpy()), test_y.numpy())


def evaluate_seed(evaluator: Evaluator, runs: dict[str, Path], seed: int) -> dict[str, dict]:
    """{network: results} for the PIRL, Jigsaw and supervised runs and the untrained network of one seed."""
    from pirl_fast.eval.features import load_pretrained, random_init, read_checkpoint
    from pirl_fast.train.checkpoint import list_checkpoints, step_of

    out = {}
    _, _, config = read_checkpoint(runs["pirl"])
    untrained = random_init(config["model"]["arch"], seed, "cpu", config["model"])  # both runs' initial weights
    print(f"\n-- evaluate the untrained network, seed {seed}", flush=True)
    out["untrained"] = evaluator.full(untrained.model, "random-init")
    for method, run_dir in runs.items():
        checkpoints = list_checkpoints(run_dir)[::-1]  # oldest first
        print(f"\n-- evaluate {LABELS[method]}, seed {seed}: {len(checkpoints)} checkpoints", flush=True)
        curve = [[0, out["untrained"]["knn_top1"]]]
        for path in checkpoints[:-1]:
            net = load_pretrained(path)
            curve.append([step_of(path), evaluator.knn(net.model.trunk)])
        final = load_pretrained(checkpoints[-1])
        out[method] = evaluator.full(final.model, method)
        curve.append([step_of(checkpoints[-1]), out[method]["knn_top1"]])
        out[method]["knn_curve"] = curve
    return out


def cached_evaluation(path: Path, runs: dict[str, Path], evaluate) -> dict:
    """evaluate(), or its stored result when it was made from these very runs (their bench_done.json)."""
    stamp = {m: (r / DONE_FILE).read_text() for m, r in runs.items()}
    try:
        stored = json.loads(path.read_text())
        if stored["runs"] == stamp:
            print(f"reusing {path}", flush=True)
            return stored["results"]
    except (OSError, ValueError, KeyError):
        pass
    results = evaluate()
    atomic.write_json(path, {"runs": stamp, "results": results})
    return json.loads(path.read_text())["results"]  # as stored: the same types on a first and a resumed run


# ---------------------------------------------------------------------------------------------- report
def spread(values: list[float]) -> tuple[float, float]:
    return sum(values) / len(values), max(values) - min(values)


def summarise(per_seed: dict[int, dict[str, dict]]) -> list[dict]:
    """One row per network: means over seeds and spreads (max - min); `bn_` columns: BN statistics re-estimated.
    Raw pixels have no invariance gap and one value whatever the seed (spread 0)."""
    rows = []
    for network in NETWORKS:
        results = [per_seed[s][network] for s in per_seed if network in per_seed[s]]
        if not results:
            continue
        row = {"network": LABELS[network], "seeds": len(results)}
        for bn in ("", "bn_"):
            knn, knn_spread = spread([r[f"{bn}knn_top1"] for r in results])
            res5, res5_spread = spread([r[f"{bn}linear_top1"]["res5"] for r in results])
            row.update({f"{bn}knn_top1": knn, f"{bn}knn_spread": knn_spread,
                        f"{bn}linear_res5_top1": res5, f"{bn}linear_res5_spread": res5_spread})
            if all(f"{bn}logistic_res5" in r for r in results):  # evaluations stored before it had none
                row[f"{bn}logistic_res5"] = spread([r[f"{bn}logistic_res5"] for r in results])[0]
            if network != "pixels":
                gap, gap_spread = spread([r[f"{bn}invariance_gap"]["trunk"] for r in results])
                head = [r[f"{bn}invariance_gap"].get("pirl_head") for r in results]
                row.update({f"{bn}trunk_inv_gap": gap, f"{bn}trunk_inv_gap_spread": gap_spread,
                            f"{bn}head_inv_gap": sum(head) / len(head) if None not in head else float("nan")})
        row["knn_per_seed"] = " ".join(f"{r['knn_top1']:.2f}" for r in results)
        if network == "pixels" and "native" in results[0]:
            row["native"] = results[0]["native"]
        if network != "pixels":
            best = max(STAGES, key=lambda s: sum(r["linear_top1"][s] for r in results))
            row["linear_best_stage"] = f"{best} {sum(r['linear_top1'][best] for r in results) / len(results):.2f}"
        rows.append(row)
    return rows


def metric_value(result: dict, key: str) -> float:
    """A network's kNN top-1 or its res5 probe (the linear_top1 keys hold all five stages)."""
    return result[key]["res5"] if key.endswith("linear_top1") else result[key]


def gap_shares(per_seed: dict[int, dict[str, dict]]) -> list[dict]:
    """PIRL's share of the gap from the untrained network to the supervised one, per metric and BN mode:
    (PIRL - untrained) / (supervised - untrained) per seed, then the mean and the spread (max - min).
    0 is no better than the untrained network, 1 as good as training with the labels."""
    out = []
    for bn in ("", "bn_"):
        for metric, key in (("kNN top-1", "knn_top1"), ("linear res5", "linear_top1")):
            shares = []
            for results in per_seed.values():
                pirl, low, high = (metric_value(results[n], bn + key) for n in ("pirl", "untrained", "supervised"))
                shares.append((pirl - low) / (high - low) if high != low else float("nan"))
            mean, width = spread(shares)
            out.append({"metric": metric, "bn": "re-estimated" if bn else "as is", "share": mean, "spread": width,
                        "per_seed": shares})
    return out


def targets(rows: list[dict]) -> list[tuple[str, bool]]:
    """The targets. Against the untrained network and Jigsaw: met only if met with the BN statistics both as
    trained and re-estimated. Against raw pixels (no BatchNorm): met if met in either mode, which is named."""
    by = {r["network"]: r for r in rows}
    pirl, jigsaw, untrained, pixels = by["PIRL"], by["Jigsaw"], by["untrained"], by["raw pixels"]
    checks = [  # (what, column, the other network, the test, format)
        (f"PIRL kNN top-1 >= untrained + {KNN_MARGIN:g} points", "knn_top1", untrained,
         lambda a, b: a >= b + KNN_MARGIN, ".2f"),
        ("PIRL kNN top-1 > Jigsaw (same steps and data)", "knn_top1", jigsaw, lambda a, b: a > b, ".2f"),
        ("PIRL linear probe (res5) > untrained", "linear_res5_top1", untrained, lambda a, b: a > b, ".2f"),
        ("PIRL trunk invariance gap > Jigsaw's", "trunk_inv_gap", jigsaw, lambda a, b: a > b, "+.4f"),
    ]
    out = []
    for text, key, other, test, fmt in checks:
        met = all(test(pirl[bn + key], other[bn + key]) for bn in ("", "bn_"))
        out.append((f"{text}: {pirl[key]:{fmt}} vs {other[key]:{fmt}} (BN re-estimated: {pirl['bn_' + key]:{fmt}} vs "
                    f"{other['bn_' + key]:{fmt}})", met))
    for text, key, margin in ((f"PIRL kNN top-1 >= raw pixels + {PIXEL_KNN_MARGIN:g} points", "knn_top1",
                               PIXEL_KNN_MARGIN),
                              (f"PIRL linear probe (res5) >= linear probe on raw pixels + {PIXEL_LINEAR_MARGIN:g} "
                               "points", "linear_res5_top1", PIXEL_LINEAR_MARGIN)):
        modes = [name for bn, name in (("", "BN as is"), ("bn_", "BN re-estimated"))
                 if pirl[bn + key] >= pixels[key] + margin]
        out.append((f"{text}: {pirl[key]:.2f} (BN re-estimated: {pirl['bn_' + key]:.2f}) vs {pixels[key]:.2f}"
                    + (f"; met with {' and '.join(modes)}" if modes else ""), bool(modes)))
    native = pixels.get("native")
    if native and "logistic_res5" in pirl:  # the same margins against a skeptic's pixels at the images' own size
        for text, key, theirs, margin in (
                (f"PIRL kNN top-1 >= kNN on raw {native['size']} px pixels + {PIXEL_KNN_MARGIN:g} points",
                 "knn_top1", native["knn_top1"], PIXEL_KNN_MARGIN),
                (f"PIRL res5 logistic regression >= logistic regression on raw {native['size']} px pixels + "
                 f"{PIXEL_LINEAR_MARGIN:g} points", "logistic_res5", native["logistic"], PIXEL_LINEAR_MARGIN)):
            modes = [name for bn, name in (("", "BN as is"), ("bn_", "BN re-estimated"))
                     if pirl[bn + key] >= theirs + margin]
            out.append((f"{text}: {pirl[key]:.2f} (BN re-estimated: {pirl['bn_' + key]:.2f}) vs {theirs:.2f}"
                        + (f"; met with {' and '.join(modes)}" if modes else ""), bool(modes)))
    return out


def plot(per_seed: dict[int, dict[str, dict]], path: Path, title: str, split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"pirl": "tab:blue", "jigsaw": "tab:orange", "supervised": "tab:green"}
    for method, colour in colours.items():
        for i, seed in enumerate(per_seed):
            steps, top1 = zip(*per_seed[seed][method]["knn_curve"])
            ax.plot(steps, top1, "o-", color=colour, alpha=0.8, linewidth=1.5,
                    label=f"{LABELS[method]}" if i == 0 else None)
    for network, key, style, label, colour in (
            ("untrained", "knn_top1", "--", "untrained", "grey"),
            ("untrained", "bn_knn_top1", ":", "untrained, BN re-estimated", "grey"),
            ("pixels", "knn_top1", "-.", "raw pixels (mean-centred)", "black")):
        untrained = [per_seed[s][network][key] for s in per_seed]
        mean = sum(untrained) / len(untrained)
        ax.axhline(mean, color=colour, linestyle=style, label=f"{label} (mean {mean:.2f}%)")
        if max(untrained) > min(untrained):
            ax.axhspan(min(untrained), max(untrained), color=colour, alpha=0.12)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"kNN top-1 on the {split} (%)")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> list[dict]:
    from pirl_fast.eval.invariance import ViewConfig

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds or min(args.train_images, args.test_images, args.epochs, args.batch, args.evals) < 1:
        raise SystemExit("--seeds needs at least one seed; --train-images, --test-images, --epochs, --batch and "
                         "--evals must be >= 1")
    sizes = sorted({int(n) for n in args.curve.split(",") if n.strip()}) if args.curve else []
    if args.curve and (len(sizes) < 2 or sizes[0] < 1):
        raise SystemExit(f"--curve {args.curve}: give at least two numbers of images >= 1, e.g. --curve 500,1000,2000")
    check_dataset(args.idx_dir)
    if sizes:
        size_curve(args, sizes, seeds)
        return []
    out = Path(args.out)
    started = time.perf_counter()
    train_shards, test_shards = prepare_data(args, out)
    per_seed, config, pixels = {}, None, None
    for seed in seeds:
        runs = {m: out / "runs" / f"{m}_seed{seed}" for m in METHODS}
        for method in METHODS:
            pretrain(args, method, seed, train_shards, runs[method])
        if config is None:
            config = read_config(runs["pirl"])
        views = ViewConfig.from_run_config(config)
        evaluator = Evaluator(train_shards, test_shards, views.image_size, views)
        per_seed[seed] = cached_evaluation(out / f"evaluation_seed{seed}.json", runs,
                                           functools.partial(evaluate_seed, evaluator, runs, seed))
        if pixels is None:
            print("\n-- evaluate raw pixels (the same kNN and probe on the evaluation view's pixels)", flush=True)
            pixels = evaluator.pixels()
        per_seed[seed]["pixels"] = pixels
    rows = summarise(per_seed)
    shares = gap_shares(per_seed)
    verdicts = targets(rows)
    steps = per_seed[seeds[0]]["pirl"]["knn_curve"][-1][0]
    split = "test split" if args.eval_on == "test" else "held-out training images"
    title = (f"Fashion-MNIST, {args.train_images} train / {args.test_images} {split}, {config['model']['arch']} "
             f"stem={config['model']['stem']}, {steps} steps of {args.batch}, seeds {','.join(map(str, seeds))}")
    plot_path = Path(args.plot) if args.plot else out / "learn.png"
    plot(per_seed, plot_path, title, split)
    print(f"\n{title}\n")
    print(results_markdown(rows, shares))
    for text, met in verdicts:
        print(f"  [{'met' if met else 'NOT met'}] {text}")
    details = {"title": title, "eval_on": args.eval_on, "seeds": seeds, "steps": steps, "config": config,
               "per_seed": per_seed, "rows": rows, "gap_shares": shares,
               "targets": [{"target": t, "met": m} for t, m in verdicts], "plot": str(plot_path),
               "wall_s": time.perf_counter() - started}
    atomic.write_json(out / "learn.json", details)
    with atomic.atomic_write(out / "learn.md", "w") as fh:
        fh.write(learn_report(details) + "\n")
    print(f"wrote {plot_path} and {out / 'learn.json'} (per seed: kNN curves, all probe stages, distances)")
    return rows


def size_curve(args, sizes: list[int], seeds: list[int]) -> list[dict]:
    """PIRL (kNN and res5 probe, BN as is and re-estimated) and raw pixels at each number of pre-training
    images, all evaluated on one set of images (the test split, or held-out training images after the
    largest size), with the same epochs; one point per size, the mean over seeds."""
    from pirl_fast.eval.features import load_pretrained
    from pirl_fast.eval.invariance import ViewConfig

    out = Path(args.out)
    points = []
    for n in sizes:
        sized = argparse.Namespace(**{**vars(args), "train_images": n})
        train_shards, test_shards = prepare_data(sized, out, held_out_after=max(sizes))
        per_seed = {}
        for seed in seeds:
            run_dir = out / "runs" / f"curve_n{n}_pirl_seed{seed}"
            pretrain(sized, "pirl", seed, train_shards, run_dir)
            net = load_pretrained(run_dir)
            views = ViewConfig.from_run_config(net.config)
            evaluator = Evaluator(train_shards, test_shards, views.image_size, views)
            per_seed[seed] = cached_evaluation(out / f"curve_n{n}_seed{seed}.json", {"pirl": run_dir},
                                               functools.partial(curve_point, evaluator, net.model))
        pixels = evaluator.pixels()
        point = {"train_images": n, "pixels_knn": pixels["knn_top1"], "pixels_linear": pixels["linear_top1"]["res5"]}
        for key in ("knn", "bn_knn", "linear", "bn_linear"):
            values = [r[key] for r in per_seed.values()]
            point[f"pirl_{key}"], point[f"pirl_{key}_spread"] = spread(values)
        points.append(point)
        print(f"{n} images: PIRL kNN {point['pirl_knn']:.2f} (BN re-estimated {point['pirl_bn_knn']:.2f}) vs pixels "
              f"{point['pixels_knn']:.2f}; res5 probe {point['pirl_linear']:.2f} ({point['pirl_bn_linear']:.2f}) vs "
              f"pixels {point['pixels_linear']:.2f}", flush=True)
    atomic.write_json(out / "curve.json", {"seeds": seeds, "epochs": args.epochs, "eval_on": args.eval_on,
                                           "test_images": args.test_images, "points": points})
    plot_curve(points, out / "curve.png", f"Fashion-MNIST, {args.epochs} epochs, seeds {','.join(map(str, seeds))}, "
               f"{args.test_images} {'test' if args.eval_on == 'test' else 'held-out'} images")
    print(f"wrote {out / 'curve.json'} and {out / 'curve.png'}")
    return points


def curve_point(evaluator: Evaluator, model) -> dict:
    """kNN and res5 probe of a trained PIRL network, BN statistics as they are and re-estimated."""
    measured = evaluator.full(model, "pirl", invariance=False)
    return {f"{bn}{key}": value for bn in ("", "bn_") for key, value in
            (("knn", measured[f"{bn}knn_top1"]), ("linear", measured[f"{bn}linear_top1"]["res5"]))}


def plot_curve(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [p["train_images"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (name, key, pixels) in zip(axes, (("kNN top-1", "knn", "pixels_knn"),
                                              ("linear probe, res5", "linear", "pixels_linear"))):
        ax.plot(n, [p[f"pirl_{key}"] for p in points], "o-", color="tab:blue", label="PIRL, BN as is")
        ax.plot(n, [p[f"pirl_bn_{key}"] for p in points], "s--", color="tab:blue", alpha=0.6,
                label="PIRL, BN re-estimated")
        ax.plot(n, [p[pixels] for p in points], "^-.", color="black", label="raw pixels")
        ax.set_xscale("log")
        ax.set_xticks(n, [str(v) for v in n])
        ax.set_xlabel("pre-training images (= kNN memory / probe training set)")
        ax.set_ylabel(f"{name} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_config(run_dir: Path) -> dict:
    from pirl_fast.eval.features import read_checkpoint

    return read_checkpoint(run_dir)[2]

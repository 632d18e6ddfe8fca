"""The paper's analyses (PIRL, Sec. 5) on real images: five studies, a figure and a verdict each.

    python -m pirl_fast.bench analyses                                  # all five, seeds 0 and 1 (*)
    python -m pirl_fast.bench analyses --only lambda --seeds 0          # one study, one seed: a quick look
    python -m pirl_fast.bench analyses --only invariance,layers         # the two that share their runs

  study         paper      runs per seed                                     the paper's claim tested
  invariance    Sec 5.1.1  PIRL, Jigsaw                                      image vs its shuffle: PIRL closer
  layers        Sec 5.1.2  the same two                                      PIRL best at res5; Jigsaw peaks earlier
  lambda        Sec 5.2.1  PIRL at loss.lam 0, .25, .5, .75, 1               best at 0.5; 1 clearly worse
  permutations  Sec 5.2.2  PIRL at P = 1, 100, 9!; Jigsaw at P = 10, 1000    PIRL gains with P, Jigsaw does not
  negatives     Sec 5.2.3  PIRL at K = K0/64, K0/8, K0 (K0: the recipe's)    more negatives, better

Everything else is the learning benchmark's (pirl_fast/bench/learn.py, `bench learn`): its data
(`prepare_split`: class-balanced Fashion-MNIST subsets through the product's sharder), its training
recipe (`training_overrides`: `experiment=fmnist` plus the sizes and seeds), its `pretrain`
(PIRL and Jigsaw of a seed start from the same initial weights: trainer.seed) and its `Evaluator`
(kNN top-1, gap linear probes on conv1..res5, the invariance analysis of pirl_fast.eval.invariance).
The sweeps: each run adds its swept key as one more override on top of that recipe (the last value
wins), which is what `experiment=sweep_lambda|sweep_permutations|sweep_negatives` do; those files are
not composed because their grids live in hydra.sweeper.params, which only a `-m` multirun reads, and
are sized for ImageNet. The grids: sweep_lambda's exactly; from sweep_permutations' (1, 10, 100, 1000,
0 = all 9!) PIRL at 1, 100, 9! and Jigsaw at 10, 1000; sweep_negatives spans 32 to 32,000 for a
1.28M-row bank, here two decades below the recipe's K, which is about the whole 1,000-row bank.
A run shared by several studies (PIRL at the recipe's lambda, P and K; Jigsaw at bench learn's P) is
trained once. Accuracies are on --eval-on's split; every verdict uses the BatchNorm statistics
re-estimated on the training images (the fair comparison BENCHMARKS.md found for bench learn); the
JSON keeps both. The accuracy the sweeps are judged on is the res5 linear probe, the layer the paper
evaluates; the figures also show kNN.

Resumable: under --out, runs/<run>_seed<s>/ holds each run's checkpoints, runs/<run>_seed<s>.trained.json
says its training finished, results/<run>_seed<s>.json (written atomically after the evaluation) says
it is done. A rerun skips every done run and evaluates a trained one without training it again; a run
whose composed training config changed (other sizes, an edited experiment=fmnist, --override) is
redone. The report (report.md, analyses.json, one figure per study) is rebuilt from the results every
time.

(*) Budget: 12 distinct runs per seed (2 shared, 4 lambda, 4 permutations, 2 negatives), 24 with two
seeds. Measured on 2 CPU cores (BENCHMARKS.md, 2026-12-07): 3.0 min per run (2.9 training, 0.1
evaluation), 72 minutes for everything; with two seeds, invariance and layers 4 runs (12 min), negatives
6 counting the shared one (18 min), lambda and permutations 10 each (30 min). The report prints the
per-run times it measured and the estimate for the whole default grid from them.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from pirl_fast.bench import learn
from pirl_fast.runtime import atomic

STUDIES = ("invariance", "layers", "lambda", "permutations", "negatives")
METHODS = ("pirl", "jigsaw")  # the paper's two (bench learn may compare more networks)
LAMBDAS = "0,0.25,0.5,0.75,1"  # sweep_lambda.yaml's grid
PIRL_PERMUTATIONS = "1,100,0"  # 0: any of the 9! orders (the recipe's), as in sweep_permutations.yaml
JIGSAW_PERMUTATIONS = "10,1000"  # P >= 2 (it classifies the order); 9! classes is a 418M-weight head on a CPU
NEGATIVE_FRACTIONS = (64, 8, 1)  # default K grid: the recipe's K divided by these (16, 128, 1024 at K = 1024)
SHORT = {"loss.lam": "lam", "data.num_permutations": "P", "bank.num_negatives": "K"}  # run names


@dataclass(frozen=True)
class Run:
    """One training configuration: a method and the swept keys that differ from the recipe."""

    method: str
    changes: tuple[tuple[str, float | int], ...] = ()

    @property
    def name(self) -> str:
        return "_".join([self.method] + [f"{SHORT[k]}{v:g}" for k, v in self.changes])

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.changes]


@dataclass(frozen=True)
class Point:
    """One point of a study's figure: the run behind it, its series (a method) and its x value."""

    study: str
    series: str
    x: float | str
    run: Run


def numbers(text: str, kind=float) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if len(values) < 2:
        raise argparse.ArgumentTypeError(f"a sweep needs at least two values, got {text!r}")
    return values


def study_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STUDIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown study {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(STUDIES)} (comma-separated)")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    learn.add_arguments(p)  # data, sizes, seeds, workers, --override, --eval-on: bench learn's, same defaults
    p.set_defaults(out="runs/bench_analyses", evals=1)
    helps = {"out": "working folder: data, shards, every run's checkpoints and results, the report (default "
                    "runs/bench_analyses; a rerun skips the runs done there)",
             "evals": "checkpoints saved per run, one every steps/EVALS (default 1: the final one, the one evaluated)",
             "plot": argparse.SUPPRESS}  # bench learn's kNN-over-training plot: not made here
    for action in p._actions:  # argparse has no public way to re-word an inherited option's help
        action.help = helps.get(action.dest, action.help)
    p.add_argument("--only", type=study_list, default=list(STUDIES),
                   help=f"studies to run, comma-separated (default all: {', '.join(STUDIES)})")
    p.add_argument("--lambdas", type=numbers, default=numbers(LAMBDAS), help=f"lambda grid (default {LAMBDAS})")
    p.add_argument("--permutations", type=lambda t: numbers(t, int), default=numbers(PIRL_PERMUTATIONS, int),
                   help=f"PIRL's P grid, 0 = all 9! (default {PIRL_PERMUTATIONS})")
    p.add_argument("--jigsaw-permutations", type=lambda t: numbers(t, int), default=numbers(JIGSAW_PERMUTATIONS, int),
                   help=f"Jigsaw's P grid, each >= 2 (default {JIGSAW_PERMUTATIONS})")
    p.add_argument("--negatives", type=lambda t: numbers(t, int),
                   help="K grid (default: the recipe's K divided by " + ", ".join(map(str, NEGATIVE_FRACTIONS)) + ")")


# ---------------------------------------------------------------------------------------------- the plan
def recipe_values(args, shards: Path) -> dict[str, dict[str, float]]:
    """{method: {swept key: value}} of the learning benchmark's recipe, read from the composed config."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    out = {}
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        for method in METHODS:
            cfg = compose("config", overrides=learn.training_overrides(args, method, 0, shards, Path("unused")))
            out[method] = {k: OmegaConf.select(cfg, k) for k in SHORT}
    return out


def plan(args, recipe: dict[str, dict[str, float]]) -> list[Point]:
    """Every point of the studies asked for; a value equal to the recipe's is the shared run."""
    def run(method: str, key: str | None = None, value=None) -> Run:
        same = key is None or value == recipe[method][key]
        return Run(method) if same else Run(method, ((key, value),))

    k0 = int(recipe["pirl"]["bank.num_negatives"])
    negatives = args.negatives or sorted({max(1, k0 // f) for f in NEGATIVE_FRACTIONS})
    points = []
    for study in args.only:
        if study in ("invariance", "layers"):
            points += [Point(study, m, "-", run(m)) for m in METHODS]
        elif study == "lambda":
            points += [Point(study, "pirl", v, run("pirl", "loss.lam", v)) for v in args.lambdas]
        elif study == "permutations":
            points += [Point(study, "pirl", p, run("pirl", "data.num_permutations", p)) for p in args.permutations]
            points += [Point(study, "jigsaw", p, run("jigsaw", "data.num_permutations", p))
                       for p in args.jigsaw_permutations]
        elif study == "negatives":
            points += [Point(study, "pirl", k, run("pirl", "bank.num_negatives", k)) for k in negatives]
    return points


# ---------------------------------------------------------------------------------------------- one run
def run_args(args, run: Run) -> argparse.Namespace:
    """bench learn's arguments with this run's swept keys appended to --override (the last value wins)."""
    return argparse.Namespace(**{**vars(args), "override": list(args.override) + run.overrides()})


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Runner:
    """Trains and evaluates runs under `out`, skipping what is done (see the module docstring)."""

    def __init__(self, args, out: Path, train_shards: Path, test_shards: Path):
        self.args, self.out, self.train_shards, self.test_shards = args, out, train_shards, test_shards
        self.evaluator = None
        self.trained = self.evaluated = 0
        self.fingerprints: dict[tuple[Run, int], str] = {}

    def paths(self, run: Run, seed: int) -> tuple[Path, Path, Path]:
        stem = f"{run.name}_seed{seed}"
        return (self.out / "runs" / stem, self.out / "runs" / f"{stem}.trained.json",
                self.out / "results" / f"{stem}.json")

    def overrides(self, run: Run, seed: int) -> list[str]:
        run_dir = self.paths(run, seed)[0]
        return learn.training_overrides(run_args(self.args, run), run.method, seed, self.train_shards, run_dir)

    def fingerprint(self, run: Run, seed: int) -> str:
        if (run, seed) not in self.fingerprints:
            self.fingerprints[(run, seed)] = learn.fingerprint(self.overrides(run, seed))
        return self.fingerprints[(run, seed)]

    def is_done(self, run: Run, seed: int, marker: int = 2) -> bool:
        """Its evaluation (marker 2) or its training (marker 1) finished with the config it would have now, and
        the run folder's own record (bench learn's done file) says so too."""
        done = read_json(self.paths(run, seed)[marker])
        return (done is not None and done.get("config") == self.fingerprint(run, seed)
                and learn.finished_run(self.paths(run, seed)[0], self.overrides(run, seed)) is not None)

    def result(self, run: Run, seed: int) -> dict:
        """The run's evaluation: read if done, else trained (unless its training finished) and evaluated."""
        from pirl_fast.train.checkpoint import list_checkpoints

        run_dir, trained_path, result_path = self.paths(run, seed)
        overrides = self.overrides(run, seed)
        if self.is_done(run, seed):
            return read_json(result_path)
        if not (self.is_done(run, seed, marker=1) and list_checkpoints(run_dir)):
            trained_path.unlink(missing_ok=True)
            started = time.perf_counter()
            learn.pretrain(run_args(self.args, run), run.method, seed, self.train_shards, run_dir)
            atomic.write_json(trained_path, {"config": self.fingerprint(run, seed), "overrides": overrides,
                                             "train_s": time.perf_counter() - started})
            self.trained += 1
        trained = read_json(trained_path)
        print(f"\n-- evaluate {run.name}, seed {seed}", flush=True)
        started = time.perf_counter()
        result = self.evaluate(run, run_dir)
        result.update(run=run.name, method=run.method, seed=seed, overrides=overrides, train_s=trained["train_s"],
                      eval_s=time.perf_counter() - started, config=trained["config"])
        atomic.write_json(result_path, result)  # the done-marker: written last
        self.evaluated += 1
        return result

    def evaluate(self, run: Run, run_dir: Path) -> dict:
        """learn.Evaluator.full (kNN, the five probes, the invariance means; BN as is and re-estimated) and the
        per-image invariance distances behind the histograms (BN re-estimated)."""
        from pirl_fast.eval import invariance as inv
        from pirl_fast.eval.features import load_pretrained
        from pirl_fast.train.checkpoint import list_checkpoints

        if self.evaluator is None:  # the views come from a trained run's config (the same for every run)
            views = inv.ViewConfig.from_run_config(learn.read_config(run_dir))
            self.evaluator = learn.Evaluator(self.train_shards, self.test_shards, views.image_size, views)
        ev = self.evaluator
        final = load_pretrained(sorted(list_checkpoints(run_dir), key=lambda p: p.stem)[-1])
        result = ev.full(final.model, run.method, distances=True)
        del result["distances"]  # the histograms use BN re-estimated: bn_distances
        return result


# ---------------------------------------------------------------------------------------------- main
def run(args) -> list[dict]:
    from pirl_fast.bench import analyses_report as report

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds or min(args.train_images, args.test_images, args.epochs, args.batch, args.evals) < 1:
        raise SystemExit("--seeds needs at least one seed; --train-images, --test-images, --epochs, --batch and "
                         "--evals must be >= 1")
    if min(args.jigsaw_permutations) < 2:
        raise SystemExit(f"--jigsaw-permutations {args.jigsaw_permutations}: Jigsaw classifies the order among a "
                         "fixed set, so every P must be >= 2")
    learn.check_dataset(args.idx_dir)
    out = Path(args.out)
    started = time.perf_counter()
    train_shards, test_shards = learn.prepare_data(args, out)
    recipe = recipe_values(args, train_shards)
    points = plan(args, recipe)
    all_runs = len({p.run for p in plan(argparse.Namespace(**{**vars(args), "only": list(STUDIES)}), recipe)})
    runs = list(dict.fromkeys(p.run for p in points))  # distinct, in plan order
    runner = Runner(args, out, train_shards, test_shards)
    done = sum(runner.is_done(r, s) for r in runs for s in seeds)
    print(f"\nanalyses {', '.join(args.only)}: {len(runs)} runs x {len(seeds)} seeds, {done} of "
          f"{len(runs) * len(seeds)} already done under {out}", flush=True)
    results = {(r.name, s): runner.result(r, s) for r in runs for s in seeds}
    print(f"\ntrained {runner.trained}, evaluated {runner.evaluated}, reused {len(results) - runner.evaluated}")
    return report.write(args, out, points, seeds, results, time.perf_counter() - started, all_runs)

"""Linear SVMs on frozen features: the transfer protocol behind PIRL's VOC07 number (81.1 mAP).

As the reference runs it (facebookresearch/vissl configs/config/benchmark/linear_image_classification/
voc07/eval_resnet_8gpu_transfer_voc07_svm.yaml, its SVM trainer vissl/utils/svm_utils/svm_trainer.py
and tools/train_svm.py):

    features   one stage of the frozen trunk, Goyal-pooled (linear_probe.goyal_features; res5 is
               2048 x 2 x 2 = 8192 numbers at 224 px, res5avg the 2048 of the global pool),
               images resized to 256 then to 224 x 224 (no crop: the yaml's TRANSFORMS)
    normalise  x / (||x||_2 + 1e-5) per sample (SVM.normalize: True; _normalize_features)
    per class  one-vs-rest LinearSVC(C, loss squared_hinge, penalty l2, class_weight {+1: 2, -1: 1},
               intercept_scaling 1, tol 1e-4, max_iter 2000), targets +1 present / -1 otherwise
               ("difficult" VOC objects, stored as -1, count as negatives in training)
    costs      0.01, 0.1, 1, 2, 5, 10, 15, 20, 50, 100, 1000 (SVM.costs.costs_list); per class the cost
               with the best mean average precision over 3-fold cross-validation on the training set
               (cross_val_score(..., cv=3, scoring="average_precision"): StratifiedKFold, no shuffle)
    test       per class VOC AP (svm_utils/evaluate.py: area under the precision envelope, all
               points) over the samples that are not "difficult" for it; mAP = their mean.
               Single-label shards also get top-1: the argmax of the per-class decision values.

Low-shot (svm_low_shot_trainer.py, extra_scripts/create_low_shot_samples.py; the
low_shot_transfer/{voc07,places205} yamls): per independent draw (5: sample_inds [1..5]) and k,
    multi-label   per class its own k positives and (C-1)*k negatives, drawn at random
    single-label  k images of every class (class-balanced), one set for all classes
one SVM per class and cost, no cross-validation; the test metric averaged over draws per cost, and
the reported row is the cost with the best mean (the reference's aggregate_stats does exactly this:
the cost is chosen on the test set, so low-shot numbers are slightly optimistic by construction;
every cost's mean and spread is kept in the JSON).

Solver: scikit-learn's LinearSVC, i.e. liblinear, the reference's own solver, so the numbers are
comparable. dual="auto" (default) runs liblinear's dual coordinate descent where the reference does
(n_samples <= n_features: VOC07 is 5,011 x 8,192) and its primal trust-region Newton method when
there are more samples than features (ImageNet-scale, 1.28M x 2,048): the same strictly convex
objective, so the same optimum, reached in far fewer passes over the data in that regime
(liblinear's own advice). Classes x costs are independent fits spread over `jobs` processes
(joblib; large feature arrays are memory-mapped, not copied). Memory: liblinear works in float64,
8 bytes per number (1.28M x 2,048 is 21 GB: use res5avg there, not the 8,192-d res5). cuML's GPU
LinearSVC solves the same objective (L-BFGS/OWL-QN) much faster at that scale, but it is a
CUDA-only install no CI machine here can run, so it is not a dependency and not wired in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from pirl_fast.runtime.progress import progress

COSTS = (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)  # the voc07 svm yaml's costs_list
CV_FOLDS = 3  # SVM.cross_val_folds
MAX_ITER = 2000  # SVM.max_iter
TOL = 1e-4  # svm_trainer.py: LinearSVC(tol=0.0001)
CLASS_WEIGHT = {1: 2, -1: 1}  # svm_trainer.py: positives weigh twice
NORM_EPS = 1e-5  # _normalize_features: x / (||x|| + 1e-5)
LOW_SHOT_DRAWS = 5  # SVM.low_shot.sample_inds [1, 2, 3, 4, 5]


@dataclass
class SVMConfig:
    costs: tuple[float, ...] = COSTS
    folds: int = CV_FOLDS
    normalize: bool = True
    max_iter: int = MAX_ITER
    dual: str = "auto"  # auto | true (the reference's dual CD always) | false (primal Newton)
    jobs: int = 1  # processes for the independent (class, cost) fits
    seed: int = 0  # low-shot draws

    def as_dict(self) -> dict:
        return {**asdict(self), "costs": list(self.costs)}


@dataclass
class SVMResult:
    top1: float | None  # single-label only
    mAP: float
    ap_per_class: list[float]
    chosen_cost: list[float]  # per class
    cv_ap: list[list[float]] = field(default_factory=list)  # (classes, costs) mean CV average precision

    def as_dict(self) -> dict:
        return asdict(self)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by (their L2 norm + 1e-5), in float64 (liblinear's type)."""
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1) + NORM_EPS)[:, None]


def voc_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    """VOC average precision (svm_utils/evaluate.py calculate_ap): the precision envelope
    (max precision at any recall >= r) integrated over every recall step, scores descending."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(np.float64)
    if hits.sum() == 0:
        return 0.0  # no positive among the evaluated samples: the reference's recall is nan; count it 0
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / hits.sum()
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    previous = np.concatenate([[0.0], recall[:-1]])
    return float(np.sum((recall - previous) * envelope))


def _svc(cost: float, cfg: SVMConfig):
    from sklearn.svm import LinearSVC

    dual = {"true": True, "false": False}.get(str(cfg.dual).lower(), "auto")
    return LinearSVC(C=cost, class_weight=CLASS_WEIGHT, intercept_scaling=1.0, penalty="l2", loss="squared_hinge",
                     tol=TOL, dual=dual, max_iter=cfg.max_iter)


def _cv_ap(x: np.ndarray, y: np.ndarray, cost: float, cfg: SVMConfig) -> float:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import cross_val_score

    with warnings.catch_warnings():  # max_iter 2000 is the reference's; it does not always converge either
        warnings.simplefilter("ignore", ConvergenceWarning)
        return float(cross_val_score(_svc(cost, cfg), x, y, cv=cfg.folds, scoring="average_precision").mean())


def _fit(x: np.ndarray, y: np.ndarray, cost: float, cfg: SVMConfig) -> tuple[np.ndarray, float]:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = _svc(cost, cfg).fit(x, y)
    return clf.coef_[0].copy(), float(clf.intercept_[0])


def _parallel(tasks, cfg: SVMConfig, desc: str) -> list:
    """Run [(fn, args)] over cfg.jobs processes, in order, with a progress bar."""
    from joblib import Parallel, delayed

    bar = progress(total=len(tasks), desc=desc, unit="fit", enabled=len(tasks) >= 4)
    out = []
    for result in Parallel(n_jobs=cfg.jobs, return_as="generator")(delayed(fn)(*args) for fn, args in tasks):
        out.append(result)
        bar.update(1)
    bar.close()
    return out


def _check(features: np.ndarray, targets: np.ndarray, what: str) -> None:
    if features.ndim != 2 or targets.ndim != 2 or features.shape[0] != targets.shape[0]:
        raise ValueError(f"{what}: features must be (N, D) and targets (N, C); got {features.shape} and "
                         f"{targets.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{what}: features hold NaN or inf: the network's output is broken")


def evaluate(weights: np.ndarray, bias: np.ndarray, features: np.ndarray, targets: np.ndarray,
             single_label: bool, cfg: SVMConfig) -> tuple[float | None, float, list[float]]:
    """(top-1 or None, mAP, AP per class) of the SVMs (C, D), (C,) on test features and targets
    (N, C) in {1, 0, -1 = difficult: left out of that class's AP}."""
    x = l2_normalize(features) if cfg.normalize else np.asarray(features, np.float64)
    scores = x @ weights.T + bias  # (N, C)
    aps = [voc_ap(scores[targets[:, c] != -1, c], targets[targets[:, c] != -1, c] == 1)
           for c in range(targets.shape[1])]
    top1 = float(np.mean(scores.argmax(1) == targets.argmax(1))) if single_label else None
    return top1, float(np.mean(aps)), aps


def train_and_test(train_x: np.ndarray, train_t: np.ndarray, test_x: np.ndarray, test_t: np.ndarray,
                   single_label: bool, cfg: SVMConfig) -> SVMResult:
    """The full protocol: per class the cost with the best CV AP, refit on all training data, test."""
    _check(train_x, train_t, "SVM train")
    _check(test_x, test_t, "SVM test")
    x = l2_normalize(train_x) if cfg.normalize else np.asarray(train_x, np.float64)
    num_classes = train_t.shape[1]
    ys = [np.where(train_t[:, c] == 1, 1, -1) for c in range(num_classes)]
    for c, y in enumerate(ys):
        if (y == 1).sum() < cfg.folds or (y == -1).sum() < cfg.folds:
            raise ValueError(f"class {c} has {(y == 1).sum()} positive and {(y == -1).sum()} negative training "
                             f"samples; {cfg.folds}-fold cross-validation needs at least {cfg.folds} of each")
    cv = _parallel([(_cv_ap, (x, ys[c], cost, cfg)) for c in range(num_classes) for cost in cfg.costs], cfg,
                   "SVM cost sweep")
    cv_ap = np.array(cv).reshape(num_classes, len(cfg.costs))
    chosen = [cfg.costs[i] for i in cv_ap.argmax(1)]
    fits = _parallel([(_fit, (x, ys[c], chosen[c], cfg)) for c in range(num_classes)], cfg, "SVM final fits")
    weights, bias = np.stack([w for w, _ in fits]), np.array([b for _, b in fits])
    top1, mean_ap, aps = evaluate(weights, bias, test_x, test_t, single_label, cfg)
    return SVMResult(top1, mean_ap, aps, chosen, cv_ap.tolist())


# ---- low-shot ----------------------------------------------------------------------------------

def low_shot_draw(targets: np.ndarray, k: int, single_label: bool, rng: np.random.Generator) -> np.ndarray:
    """Training targets for one draw: same shape as `targets`, -1 (left out) except the drawn samples.

    single-label: k samples of every class; all classes train on that union.
    multi-label:  per class, k of its positives (1) and (C-1)*k of its negatives (0), independently.
    """
    num_classes = targets.shape[1]
    out = np.full(targets.shape, -1, np.int8)
    if single_label:
        labels = targets.argmax(1)
        for c in range(num_classes):
            pool = np.flatnonzero(labels == c)
            if pool.size < k:
                raise ValueError(f"low-shot k={k}: class {c} has only {pool.size} training samples")
            chosen = rng.choice(pool, size=k, replace=False)
            out[chosen] = 0
            out[chosen, c] = 1
        return out
    for c in range(num_classes):
        for symbol, count in ((1, k), (0, (num_classes - 1) * k)):
            pool = np.flatnonzero(targets[:, c] == symbol)
            if pool.size < count:
                raise ValueError(f"low-shot k={k}: class {c} has {pool.size} {'positive' if symbol else 'negative'} "
                                 f"training samples, the draw needs {count}")
            out[rng.choice(pool, size=count, replace=False), c] = symbol
    return out


def _fit_masked(x: np.ndarray, t: np.ndarray, cost: float, cfg: SVMConfig) -> tuple[np.ndarray, float]:
    keep = t != -1
    return _fit(x[keep], np.where(t[keep] == 1, 1, -1), cost, cfg)


def low_shot(train_x: np.ndarray, train_t: np.ndarray, test_x: np.ndarray, test_t: np.ndarray, ks: list[int],
             single_label: bool, cfg: SVMConfig, draws: int = LOW_SHOT_DRAWS) -> dict:
    """{k: {"metric", "mean", "std", "min", "max", "cost", "per_cost": [...], "per_draw": [...]}}, metric
    top-1 (single-label) or mAP, in [0, 1]; draw d of every k uses numpy's generator seeded (seed, d, k)."""
    _check(train_x, train_t, "low-shot train")
    x = l2_normalize(train_x) if cfg.normalize else np.asarray(train_x, np.float64)
    num_classes = train_t.shape[1]
    out = {}
    for k in ks:
        table = np.zeros((draws, len(cfg.costs)))  # test metric per (draw, cost)
        for d in range(draws):
            t = low_shot_draw(train_t, k, single_label, np.random.default_rng([cfg.seed, d, k]))
            fits = _parallel([(_fit_masked, (x, t[:, c], cost, cfg)) for cost in cfg.costs
                              for c in range(num_classes)], cfg, f"low-shot k={k} draw {d + 1}/{draws}")
            for j in range(len(cfg.costs)):
                part = fits[j * num_classes:(j + 1) * num_classes]
                top1, mean_ap, _ = evaluate(np.stack([w for w, _ in part]), np.array([b for _, b in part]),
                                            test_x, test_t, single_label, cfg)
                table[d, j] = top1 if single_label else mean_ap
        best = int(table.mean(0).argmax())  # the reference's aggregate_stats: best mean over draws
        out[k] = {"metric": "top1" if single_label else "mAP", "mean": float(table[:, best].mean()),
                  "std": float(table[:, best].std()), "min": float(table[:, best].min()),
                  "max": float(table[:, best].max()), "cost": cfg.costs[best],
                  "per_cost_mean": table.mean(0).tolist(), "per_draw": table[:, best].tolist()}
    return out

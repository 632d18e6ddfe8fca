"""Is the representation good, and is it invariant? (README.md, "Evaluation")

CHECKPOINT is a checkpoint file (run_dir/checkpoints/step_*.pt) or a run directory (its newest
checkpoint). Every command writes its numbers as JSON into --out, by default the run directory,
where `python -m pirl_fast.report` finds them. The validation shards default to the val, validation
or test split beside the checkpoint's data.shards; --train-shards / --val-shards (invariance:
--shards) override them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from pirl_fast.eval import finetune as ft
from pirl_fast.eval import finetune_data as ftd
from pirl_fast.eval import invariance as inv
from pirl_fast.eval import linear_probe as lp
from pirl_fast.eval import svm, vissl_import, vissl_layout
from pirl_fast.eval.features import (
    Pretrained,
    ShardImageDataset,
    eval_transform,
    extract,
    load_pretrained,
    make_loader,
    random_init,
    read_checkpoint,
    svm_transform,
    train_transform,
)
from pirl_fast.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_evaluate
from pirl_fast.model.batchnorm import reestimate_running_stats
from pirl_fast.model.network import ARCHS, apply_stem
from pirl_fast.runtime.atomic import write_json
from pirl_fast.runtime.cpus import cpus_per_rank
from pirl_fast.runtime.dist import pick_device
from pirl_fast.runtime.progress import progress
from pirl_fast.shard.format import ShardError
from pirl_fast.shard.splits import ShardPath, eval_split_beside, resolve_shards
from pirl_fast.train.checkpoint import list_checkpoints, save_atomic


def default_out(ckpt_path: Path | None) -> Path:
    """The run directory of a checkpoint: the parent of its checkpoints/ folder (else its folder)."""
    if ckpt_path is None:
        return Path.cwd()
    folder = ckpt_path.resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def save_result(out_dir: Path, name: str, payload: dict) -> Path:
    """OUT_DIR/NAME (JSON, written atomically: a reader never sees half a file), with the command."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    write_json(path, {**payload, "command": "python -m pirl_fast.eval " + " ".join(sys.argv[1:]),
                      "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"wrote {path}")
    return path


def load_network(args, device) -> Pretrained:
    """The checkpoint's network, or with --random-init the same arch untrained."""
    if getattr(args, "random_init", False):
        if args.checkpoint is None and args.arch is None:
            raise SystemExit("--random-init needs --arch or a CHECKPOINT to take the arch from")
        path, config = None, {}
        if args.checkpoint is not None:
            path, _, config = read_checkpoint(args.checkpoint)
        arch = args.arch or config["model"]["arch"]
        # Default seed: the run's trainer.seed, i.e. exactly the weights that run started from.
        seed = args.seed if args.seed is not None else int(config.get("trainer", {}).get("seed", 0))
        net = random_init(arch, seed, device, config.get("model") if not args.arch else None)
        # Evaluated like the checkpoint (its image size, its train shards); results go beside it.
        net.config, net.path = {**config, "model": {"arch": arch}, "random_init_seed": seed}, path
        return net
    if args.checkpoint is None:
        raise SystemExit("CHECKPOINT is required (a checkpoint file or a run directory), unless --random-init")
    return load_pretrained(args.checkpoint, device)


def image_size_of(args, net: Pretrained) -> int:
    return args.image_size or int(net.config.get("data", {}).get("image_size", 224))


def train_shards_of(args, net: Pretrained) -> ShardPath:
    shards = args.train_shards or net.config.get("data", {}).get("shards")
    if not shards or shards == "???":
        raise SystemExit("--train-shards is required (the checkpoint's config names no data.shards)")
    return resolve_shards(shards, "train")


def val_shards_of(given: str | None, train: ShardPath | None, flag: str = "--val-shards") -> str:
    """`given` (a shard folder, or a dataset root's shards: its val split), else the validation
    split beside the train shards; SystemExit saying what to pass when there is none."""
    if given:
        return str(resolve_shards(given, "eval").dir)
    beside = eval_split_beside(train) if train is not None else None
    if beside is None:
        why = (f"the train shards {train.dir} are not a split of a dataset root's shards with a val, validation or "
               "test split beside them" if train else "the checkpoint's config names no data.shards")
        raise SystemExit(f"{flag} is required: {why}. Pass {flag} DIR, a shard folder of validation images "
                         "(python -m pirl_fast.shard /imagenet shards/in1k writes shards/in1k/train and "
                         "shards/in1k/val)")
    print(f"validation shards: {beside.dir} (the {beside.split} split beside {train.dir}; {flag} overrides)")
    return str(beside.dir)


def open_splits(args, train_view, val_view, multi_label_ok: bool = False):
    """(device, network, image size, train dataset, val dataset) for the commands that read both splits;
    `train_view` / `val_view` map the image size to a transform. Multi-label shards are refused
    unless `multi_label_ok` (the commands that score one class per image cannot use them)."""
    device = pick_device(args.device)
    net = load_network(args, device)
    size = image_size_of(args, net)
    shards = train_shards_of(args, net)
    val_dir = val_shards_of(args.val_shards, shards)
    train = ShardImageDataset(shards.dir, train_view(size), limit=args.limit)
    val = ShardImageDataset(val_dir, val_view(size), limit=args.limit)
    if train.classes != val.classes:
        raise SystemExit(f"the val shards {val_dir} have classes {val.classes[:5]}... but the train shards "
                         f"{train.classes[:5]}...: shard both splits from ImageFolders with the same class folders")
    multi = [str(d.manifest.root) for d in (train, val) if d.manifest.multi_label]
    if multi and not multi_label_ok:
        raise SystemExit(f"{' and '.join(multi)} hold multi-label samples (several classes per image, "
                         f"KEY.mlb): `eval {args.cmd}` scores one class per image. Use `python -m pirl_fast.eval "
                         "svm` (mean AP over classes) on multi-label shards")
    if args.reestimate_bn:  # BatchNorm running statistics recomputed on the training images (evaluation view)
        images = (x for x, _, _ in progress(make_loader(train.with_transform(eval_transform(size)), args.batch_size,
                                                        args.workers), desc="BN statistics", unit="batch"))
        net.model = reestimate_running_stats(net.model, lambda m, x: m.features(x), images, device)
    return device, net, size, train, val


def result_stem(stem: str, args, net: Pretrained | None, seeded: bool = True) -> str:
    """The name (without .json) a command's result goes to: `stem`, `_random_init` for the untrained
    network, `_bn` with --reestimate-bn, and `_seed{S}` when --seed S differs from the command's default
    seed (the run's trainer.seed for --random-init weights, 0 otherwise), so results of different
    seeds never overwrite each other (knn_random_init_bn_seed1.json). seeded=False: the command's
    result does not depend on --seed."""
    random_init = getattr(args, "random_init", False) and net is not None
    default = int(net.config.get("trainer", {}).get("seed", 0)) if random_init else 0
    seed = args.seed if seeded and args.seed is not None else default
    bn = "_bn" if getattr(args, "reestimate_bn", False) else ""
    return f"{stem}{'_random_init' if random_init else ''}{bn}{f'_seed{seed}' if seed != default else ''}"


def describe(net: Pretrained) -> dict:
    out = {"checkpoint": str(net.path) if net.path else None, "method": net.method,
           "arch": net.config.get("model", {}).get("arch")}
    if "random_init_seed" in net.config:
        out["random_init_seed"] = net.config["random_init_seed"]
    return out


# ---- commands ----------------------------------------------------------------------------------

def cmd_export(args) -> int:
    net = load_pretrained(args.checkpoint, "cpu")
    arch = net.config["model"]["arch"]
    out = Path(args.out) if args.out else default_out(net.path)
    out.mkdir(parents=True, exist_ok=True)
    if args.format == "vissl":
        return export_vissl(net, out)
    trunk = {k: v.contiguous() for k, v in net.model.trunk.state_dict().items()}  # NCHW-contiguous copies
    heads = {k: v.contiguous() for k, v in net.model.state_dict().items() if not k.startswith("trunk.")}
    # Check before writing: torchvision's own constructor (with the run's stem) must take the trunk, missing only fc.
    stem = net.config["model"].get("stem", "imagenet")
    reference = apply_stem(getattr(torchvision.models, ARCHS[arch][0])(weights=None), stem)
    missing, unexpected = reference.load_state_dict(trunk, strict=False)
    if sorted(missing) != ["fc.bias", "fc.weight"] or unexpected:
        raise RuntimeError(f"export: the trunk does not match torchvision.models.{arch}: missing {missing}, "
                           f"unexpected {unexpected}")
    trunk_path, heads_path = out / f"trunk_{arch}.pth", out / "heads.pth"
    torch.save(trunk, trunk_path)
    torch.save({"method": net.method, "model": dict(net.config["model"]), "state_dict": heads}, heads_path)
    print(f"wrote {trunk_path}  ({len(trunk)} tensors, torchvision.models.{arch} keys without fc)")
    print(f"wrote {heads_path}  ({net.method} heads: {sorted({k.split('.')[0] for k in heads})})")
    small = ("m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); m.maxpool = torch.nn.Identity(); "
             if stem == "small" else "")
    print(f"load: m = torchvision.models.{arch}(); {small}m.fc = torch.nn.Identity(); "
          f"m.load_state_dict(torch.load('{trunk_path}'))")
    save_result(out, "export.json", {**describe(net), "stem": stem, "trunk": str(trunk_path), "heads": str(heads_path)})
    return 0


def export_vissl(net: Pretrained, out: Path) -> int:
    """export --format vissl: the run as the reference's checkpoint (pirl_fast/eval/vissl_layout.py)."""
    if net.config.get("imported", {}).get("heads") is False:
        raise SystemExit(f"{net.path} was imported without the reference's heads; its heads are a seeded "
                         "initialisation, so export --format vissl refuses (export without --format keeps the trunk)")
    _, ckpt, _ = read_checkpoint(net.path)
    state = {k: v.contiguous() for k, v in net.model.state_dict().items()}
    bank = ckpt.get("bank", {}).get("bank") if net.method == "pirl" else None
    z = ckpt.get("criterion", {}).get("z_jigsaw")
    try:
        ref = vissl_layout.reference_checkpoint(net.method, net.config, state, int(ckpt.get("step", 0)), bank,
                                                None if z is None else float(z))
    except vissl_layout.NoReferenceLayout as e:
        raise SystemExit(f"export: {e}") from e
    path = out / f"vissl_{net.method}_{net.config['model']['arch']}.torch"
    save_atomic(ref, path)
    model = ref["classy_state_dict"]["base_model"]["model"]
    layout = vissl_layout.layout_of(net.method, net.config["model"])
    print(f"wrote {path}  (the reference's checkpoint layout: trunk {len(model['trunk'])} tensors under "
          f"_feature_blocks, heads {sorted(model['heads'])} as {layout.source} names them"
          + (f"; memory bank {tuple(bank.shape)} as loss.nce_average.memory)" if bank is not None else ")"))
    print(f"load it in the reference: config.MODEL.WEIGHTS_INIT.PARAMS_FILE={path} "
          "config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME=classy_state_dict")
    save_result(out, "export.json", {**describe(net), "format": "vissl", "file": str(path), "layout": layout.name})
    return 0


def cmd_knn(args) -> int:
    device, net, size, train, val = open_splits(args, eval_transform, eval_transform)
    fn = net.model.features  # res5 after average pooling, (N, 2048 | 512)
    train_f, train_y, _ = extract(fn, make_loader(train, args.batch_size, args.workers), device, "features: train")
    val_f, val_y, _ = extract(fn, make_loader(val, args.batch_size, args.workers), device, "features: val")
    result = knn_evaluate(train_f, train_y, val_f, val_y, len(train.classes), args.k, args.temperature)
    name = f"{net.method} ({describe(net)['arch']})"
    print(f"kNN {name}: top-1 {100 * result.top1:.2f}%  top-5 {100 * result.top5:.2f}%  "
          f"(k={result.k}, tau={result.temperature}, {result.num_train} train -> {result.num_val} val, "
          f"{result.num_classes} classes; chance {100 / result.num_classes:.2f}%)")
    out = Path(args.out) if args.out else default_out(net.path)
    save_result(out, result_stem("knn", args, net, seeded=args.random_init) + ".json",
               {**describe(net), **result.as_dict(), "bn_reestimated": args.reestimate_bn, "image_size": size,
                "train_shards": str(train.manifest.root),
                "val_shards": str(val.manifest.root)})
    return 0


def cmd_linear(args) -> int:
    cfg = lp.ProbeConfig(protocol=args.protocol, epochs=args.epochs, lr=args.lr, batch_size=args.probe_batch,
                         weight_decay=args.weight_decay, momentum=args.momentum, nesterov=not args.no_nesterov,
                         augment=not args.no_augment, seed=args.seed or 0)
    device, net, size, train, val = open_splits(args, train_transform if cfg.augment else eval_transform,
                                                eval_transform)
    trunk = net.model.trunk
    torch.manual_seed(cfg.seed)
    probes = lp.build_probes(cfg.protocol, lp.stage_widths(trunk), len(train.classes))
    val_feats, val_y = lp.cache_stage_features(trunk, make_loader(val, args.batch_size, args.workers), device,
                                               "stage features: val", cfg.protocol)
    out = Path(args.out) if args.out else default_out(net.path)
    if cfg.augment:  # a fresh random crop per epoch: the trunk runs every epoch, once for all heads
        # The fine-tuning loaders: DALI (GPU decode + crop) where installed; the reference's train view
        # (RandomResizedCrop + flip), last partial batch dropped.
        loader = ftd.build_loader(args.backend, train, np.arange(len(train)), out / "linear_index", size,
                                  cfg.batch_size, True, args.workers, device, cfg.seed)
        batches, steps = (lambda epoch: lp.image_batches(trunk, loader, device, cfg.protocol)), len(loader)
    else:  # the same centre crop every epoch: run the trunk once
        feats, labels = lp.cache_stage_features(trunk, make_loader(train, args.batch_size, args.workers), device,
                                                "stage features: train", cfg.protocol)
        batches = lambda epoch: lp.cached_batches(feats, labels, cfg.batch_size, True, cfg.seed + epoch)  # noqa: E731
        steps = -(-labels.shape[0] // cfg.batch_size)
    history = lp.train_probes(probes, batches, cfg, steps, device)
    results = lp.evaluate_probes(probes, lp.cached_batches(val_feats, val_y, 1024, False, 0), device)
    dims = lp.head_in_features(probes)
    print(f"linear probes, protocol {cfg.protocol} ({net.method}, {describe(net)['arch']}, {size} px; "
          f"chance {100 / len(train.classes):.2f}%):")
    for head, r in results.items():
        print(f"  {head:10s} {dims[head]:6d} dims  top-1 {100 * r['top1']:6.2f}%  top-5 {100 * r['top5']:6.2f}%")
    best = max(results, key=lambda h: results[h]["top1"])
    save_result(out, result_stem("linear", args, net) + ".json",
               {**describe(net), "bn_reestimated": args.reestimate_bn, "stages": results,
                "best": {"head": best, **results[best]},
                "head_in_features": dims, "protocol": cfg.as_dict(), "loss_per_epoch": history,
                "train_loader": type(loader).__name__ if cfg.augment else "cached centre-crop features",
                "image_size": size, "num_train": len(train), "num_val": len(val), "num_classes": len(train.classes)})
    return 0


def cmd_invariance(args) -> int:
    device = pick_device(args.device)
    nets = [load_pretrained(c, device) for c in args.checkpoints]
    for net in nets:
        if net.config.get("imported", {}).get("heads") is False:
            raise SystemExit(f"{net.path} was imported with --trunk-only: its heads are not the reference's, so "
                             "the head distances would be meaningless; invariance needs a checkpoint with heads")
    labels = args.labels or [f"{n.method}:{n.path.parent.parent.name if n.path else '?'}" for n in nets]
    if len(labels) != len(nets) or len(set(labels)) != len(labels):
        raise SystemExit(f"--labels needs one distinct label per checkpoint ({len(nets)}); got {labels}")
    if args.random_init:
        config = nets[0].config
        nets.append(random_init(config["model"]["arch"], int(config.get("trainer", {}).get("seed", 0))
                                if args.seed is None else args.seed, device, config["model"]))
        labels.append("random-init")
    views = inv.ViewConfig.from_run_config(nets[0].config)
    if args.image_size:
        views = inv.ViewConfig(args.image_size, views.patch_crop_size, views.grid, views.patch_size)
    run_shards = nets[0].config.get("data", {}).get("shards")
    train = resolve_shards(run_shards, "train") if run_shards and run_shards != "???" and not args.shards else None
    data = ShardImageDataset(val_shards_of(args.shards, train, "--shards"), inv.InvarianceViews(views),
                             limit=args.limit)
    loader = make_loader(data, args.batch_size, args.workers)
    dists = {label: inv.invariance_distances(net.model, net.method, loader, views.grid, device, args.seed or 0)
             for label, net in zip(labels, nets)}
    out = Path(args.out) if args.out else default_out(nets[0].path)
    out.mkdir(parents=True, exist_ok=True)
    inv.plot_histograms(dists, out / f"{result_stem('invariance', args, None)}.png")
    print(f"wrote {out / result_stem('invariance', args, None)}.png")
    summary = {}
    for label, net in zip(labels, nets):
        stats = {m: inv.summarise(d) for m, d in dists[label].items()}
        summary[label] = {**describe(net), **stats, "gap": inv.gaps(stats)}
    for label, s in summary.items():
        parts = [f"{m} mean {s[m]['mean']:.4f} (median {s[m]['median']:.4f})" for m in inv.METRICS if m in s]
        parts += [f"gap({m}) {g:+.4f}" for m, g in s["gap"].items()]
        print(f"  {label}: " + "; ".join(parts))
    save_result(out, result_stem("invariance", args, None) + ".json",
               {"checkpoints": summary, "views": views.__dict__, "num_images": len(data),
                "seed": args.seed or 0, "shards": str(data.manifest.root),
                "definition": "Distances" + inv.__doc__.split("Distances", 1)[1].strip()})
    return 0


def cmd_svm(args) -> int:
    device, net, size, train, val = open_splits(args, svm_transform, svm_transform, multi_label_ok=True)
    if train.multi_label != val.multi_label:
        raise SystemExit(f"the train shards are {'multi' if train.multi_label else 'single'}-label but the val shards "
                         f"{val.manifest.root} are not: shard both splits the same way")
    trunk, stage = net.model.trunk, args.feature

    def fn(x):  # (N, 3, S, S) -> (N, D): one stage, Goyal-pooled and flattened
        return lp.goyal_features(trunk, x)[stage].flatten(1)

    train_x, _, _ = extract(fn, make_loader(train, args.batch_size, args.workers), device, f"{stage}: train")
    val_x, _, _ = extract(fn, make_loader(val, args.batch_size, args.workers), device, f"{stage}: val")
    cfg = svm.SVMConfig(costs=tuple(args.costs), folds=args.folds, normalize=not args.no_normalize, dual=args.dual,
                        jobs=args.jobs, seed=args.seed or 0)
    single = not train.multi_label
    info = {**describe(net), "feature": stage, "dims": int(train_x.shape[1]), "image_size": size,
            "label_kind": "single" if single else "multi", "num_train": len(train), "num_val": len(val),
            "num_classes": len(train.classes), "classes": train.classes, "svm": cfg.as_dict()}
    out = Path(args.out) if args.out else default_out(net.path)
    if args.low_shot:
        result = svm.low_shot(train_x.numpy(), train.targets, val_x.numpy(), val.targets, args.low_shot, single, cfg,
                              draws=args.draws)
        for k, r in result.items():
            print(f"low-shot k={k}: {r['metric']} {100 * r['mean']:.2f} +- {100 * r['std']:.2f} "
                  f"(min {100 * r['min']:.2f}, max {100 * r['max']:.2f}; {args.draws} draws, cost {r['cost']})")
        save_result(out, result_stem("svm_lowshot", args, net) + ".json",
                   {**info, "draws": args.draws, "low_shot": result})
        return 0
    result = svm.train_and_test(train_x.numpy(), train.targets, val_x.numpy(), val.targets, single, cfg)
    top1 = f"top-1 {100 * result.top1:.2f}%, " if single else ""
    print(f"SVM on {stage} ({info['dims']} dims, {net.method}): {top1}mAP {100 * result.mAP:.2f} over "
          f"{len(train.classes)} classes ({len(train)} train -> {len(val)} val)")
    save_result(out, result_stem("svm", args, net) + ".json", {**info, **result.as_dict()})
    return 0


def cmd_finetune(args) -> int:
    device, net, size, train_data, val_data = open_splits(args, train_transform, eval_transform)
    if (args.fraction is None) == (args.subset is None):
        raise SystemExit("finetune needs exactly one of --fraction F (a class-balanced subset) and --subset FILE")
    try:
        if args.subset:
            positions, tag = ftd.subset_from_file(args.subset, train_data), Path(args.subset).stem
        else:
            positions, tag = ftd.balanced_subset(train_data.labels.numpy(), args.fraction, args.seed or 0), \
                f"{100 * args.fraction:g}pct"
    except ValueError as e:
        raise SystemExit(f"finetune: {e}") from e
    cfg = ft.FinetuneConfig(epochs=args.epochs, lr=args.lr, milestones=tuple(args.milestones),
                            batch_size=args.ft_batch, weight_decay=args.weight_decay, freeze_trunk=args.freeze_trunk,
                            seed=args.seed or 0)
    out = Path(args.out) if args.out else default_out(net.path)
    name = result_stem(f"finetune_{tag}{'_frozen' if cfg.freeze_trunk else ''}", args, net)
    torch.manual_seed(cfg.seed)
    model = ft.Classifier(net.model.trunk, net.model.trunk_dim, len(train_data.classes))
    loaders = [ftd.build_loader(args.backend, data, pos, out / f"{name}_index" / split, size,
                                cfg.batch_size if split == "train" else args.batch_size, split == "train",
                                args.workers, device, cfg.seed)
               for data, pos, split in ((train_data, positions, "train"),
                                        (val_data, np.arange(len(val_data)), "val"))]
    counts = np.bincount(train_data.labels.numpy()[positions], minlength=len(train_data.classes))
    print(f"finetune on {positions.size} of {len(train_data)} labelled images ({tag}; {counts.min()}-{counts.max()} "
          f"per class), {type(loaders[0]).__name__}, {'trunk frozen' if cfg.freeze_trunk else 'whole network'}")
    history = ft.train(model, loaders[0], cfg, device)
    result = ft.evaluate(model, loaders[1], device)
    print(f"finetune {tag}: top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
          f"({len(val_data)} val images, chance {100 / len(train_data.classes):.2f}%)")
    save_atomic({"model": {k: v.contiguous() for k, v in model.state_dict().items()}, "classes": train_data.classes,
                 "arch": describe(net)["arch"]}, out / f"{name}.pt")
    save_result(out, f"{name}.json", {**describe(net), **result, "subset": tag, "num_labelled": int(positions.size),
                                     "per_class_min": int(counts.min()), "per_class_max": int(counts.max()),
                                     "loader": type(loaders[0]).__name__, "schedule": cfg.as_dict(),
                                     "loss_per_epoch": history, "image_size": size, "num_val": len(val_data),
                                     "num_classes": len(train_data.classes), "weights": str(out / f"{name}.pt")})
    return 0


def cmd_import_vissl(args) -> int:
    out = Path(args.out)
    if list_checkpoints(out) and not args.overwrite:
        raise SystemExit(f"{out} already holds checkpoints ({list_checkpoints(out)[0].name}); pass a new --out "
                         "folder, or --overwrite")
    try:
        path = vissl_import.import_checkpoint(args.checkpoint, out, trunk_only=args.trunk_only)
    except (vissl_import.ImportRefused, FileNotFoundError) as e:
        raise SystemExit(f"import-vissl: {e}") from e
    net = load_pretrained(path, "cpu")
    report = torch.load(path, map_location="cpu", weights_only=True)["import_report"]
    heads = f"{report['layout']}: {report['heads']}" if report["heads"] else \
        "none (heads at a seeded init, marked imported.heads=false)"
    print(f"wrote {path}\n  method {net.method}, arch {report['arch']}, trunk {report['trunk_tensors']} tensors "
          f"(torchvision keys), heads mapped: {heads}")
    for note in report["notes"]:
        print(f"  {note}")
    print(f"  evaluate it like any run: python -m pirl_fast.eval linear {out} --train-shards T --val-shards V")
    save_result(out, "import.json", {**describe(net), **report, "source": str(Path(args.checkpoint).resolve())})
    return 0


# ---- argument parsing --------------------------------------------------------------------------

CKPT_HELP = "checkpoint file or run directory (its newest checkpoints/step_*.pt)"


def _command(sub, name: str, fn, help: str, description: str | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(fn=fn)
    return p


def _common(p: argparse.ArgumentParser, *, shards: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda[:N]")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    workers = min(8, cpus_per_rank())
    p.add_argument("--workers", type=int, default=workers,
                   help=f"DataLoader worker processes decoding JPEGs (default: the CPU cores this process may use, "
                        f"at most 8: {workers} here)")
    p.add_argument("--image-size", type=int, default=0,
                   help="evaluation crop size; 0 (default) = the checkpoint's data.image_size")
    p.add_argument("--limit", type=int, default=0, help="use only the first N samples of each split (0 = all)")
    p.add_argument("--seed", type=int, default=None,
                   help="--random-init weights (default: the checkpoint's trainer.seed, i.e. the very weights the "
                        "run started from), invariance permutations, probe shuffling and subset draws (default 0). "
                        "A seed other than the default goes into the result's name (knn_random_init_seed1.json), "
                        "so seeds never overwrite each other; report averages them")
    p.add_argument("--out", default=None, help="folder for the JSON (default: the checkpoint's run directory)")
    if shards:
        p.add_argument("checkpoint", nargs="?", default=None, help=CKPT_HELP)
        p.add_argument("--train-shards", default=None, help="train shard dir (default: the checkpoint's data.shards; "
                       "a dataset root's shards mean their train split)")
        p.add_argument("--val-shards", default=None,
                       help="validation shard dir (default: the val, validation or test split beside the train shards "
                       "when those are a dataset root's train split; a dataset root's shards mean that split)")
        p.add_argument("--random-init", action="store_true",
                       help="evaluate the same arch untrained instead (the baseline); writes *_random_init.json")
        p.add_argument("--arch", choices=sorted(ARCHS), default=None, help="arch for --random-init without CHECKPOINT")
        p.add_argument("--reestimate-bn", action="store_true",
                       help="recompute the BatchNorm running statistics on the training images (evaluation view) "
                            "first, for trained and untrained networks alike; writes *_bn.json (see batchnorm.py)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pirl_fast.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = _command(sub, "export", cmd_export, "trunk as a torchvision ResNet .pth + heads.pth, or a vissl checkpoint")
    p.add_argument("checkpoint", help=CKPT_HELP)
    p.add_argument("--format", choices=("torchvision", "vissl"), default="torchvision",
                   help="torchvision (default): trunk_<arch>.pth with torchvision's keys + heads.pth; vissl: one "
                   "checkpoint in the reference's layout (trunk, heads and PIRL's bank), which its tools and "
                   "benchmark configs load")
    p.add_argument("--out", default=None, help="folder for the .pth files (default: the run directory)")

    p = _command(sub, "knn", cmd_knn, "weighted kNN top-1/top-5 on frozen res5 features (NPID protocol)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours (default 200, NPID's best on ImageNet)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="tau in the weight exp(sim/tau) (default 0.07, the pre-training NCE temperature)")
    _common(p)

    d = lp.ProbeConfig()
    p = _command(sub, "linear", cmd_linear, "linear classifiers on conv1, res2..res5 (+res5avg), trained together",
                 lp.__doc__)
    p.add_argument("--protocol", choices=lp.PROTOCOLS, default=d.protocol,
                   help="goyal (default): each stage average-pooled to ~9k dims + BatchNorm + Linear, as the "
                        "reference's benchmark; gap: global-average-pooled stages (quick, not comparable)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs} (Goyal et al. 2019)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help=f"SGD lr per 256 images, scaled linearly with --probe-batch-size; x0.1 at 8/28, 16/28, "
                        f"24/28 of training (default {d.lr})")
    p.add_argument("--probe-batch-size", dest="probe_batch", type=int, default=d.batch_size,
                   help=f"probe training batch (default {d.batch_size})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"on the Linear layers, not BatchNorm (default {d.weight_decay})")
    p.add_argument("--momentum", type=float, default=d.momentum, help=f"default {d.momentum}")
    p.add_argument("--no-nesterov", action="store_true", help="plain momentum instead of Nesterov's")
    p.add_argument("--no-augment", action="store_true",
                   help="centre crops only: runs the trunk once and trains the heads on stored features")
    p.add_argument("--backend", choices=ftd.BACKENDS, default="auto",
                   help="training images: auto (DALI when installed, else torch) | dali | torch")
    _common(p)

    p = _command(sub, "svm", cmd_svm, "one-vs-rest linear SVMs on a frozen stage: mAP / top-1, or low-shot",
                 svm.__doc__)
    p.add_argument("--feature", choices=lp.GOYAL_HEADS[:-1], default="res5",
                   help="stage, Goyal-pooled as in the reference (res5: 2048x2x2 = 8192 dims on a ResNet-50 at "
                        "224 px; res5avg: the 2048-d global pool, the one to use at ImageNet scale); default res5")
    p.add_argument("--costs", type=float, nargs="+", default=list(svm.COSTS),
                   help="SVM costs C swept per class (default: the reference's 0.01 ... 1000)")
    p.add_argument("--folds", type=int, default=svm.CV_FOLDS, help="cross-validation folds (default 3)")
    p.add_argument("--low-shot", type=int, nargs="+", default=None, metavar="K",
                   help="low-shot mode: K training samples per class (single-label) or K positives and (C-1)K "
                        "negatives per class (multi-label), e.g. --low-shot 1 2 4 8 16 32 64 96")
    p.add_argument("--draws", type=int, default=svm.LOW_SHOT_DRAWS, help="independent low-shot draws (default 5)")
    p.add_argument("--jobs", type=int, default=1, help="processes fitting (class, cost) SVMs in parallel")
    p.add_argument("--dual", choices=("auto", "true", "false"), default="auto",
                   help="liblinear formulation: auto (dual when samples <= features, as the reference; primal "
                        "Newton otherwise), true (always dual, the reference's setting), false (always primal)")
    p.add_argument("--no-normalize", action="store_true", help="skip the per-sample L2 normalisation")
    _common(p)

    d = ft.FinetuneConfig()
    p = _command(sub, "finetune", cmd_finetune, "fine-tune the whole network on a 1%% / 10%% labelled subset",
                 ft.__doc__ + "\n" + ftd.__doc__)
    p.add_argument("--fraction", type=float, default=None, help="class-balanced subset of this fraction, e.g. 0.01")
    p.add_argument("--subset", default=None, help="the reference's subset list (.txt of paths or .npy)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"lr per 256 images (default {d.lr}; SimCLR's lists: 0.05)")
    p.add_argument("--milestones", type=int, nargs="*", default=list(d.milestones),
                   help="epochs at which the lr drops x0.1 (default 30)")
    p.add_argument("--ft-batch-size", dest="ft_batch", type=int, default=d.batch_size,
                   help=f"training batch (default {d.batch_size})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    p.add_argument("--freeze-trunk", action="store_true", help="train the Linear only: the frozen-probe baseline")
    p.add_argument("--backend", choices=ftd.BACKENDS, default="auto",
                   help="auto (DALI when installed, else torch) | dali | torch")
    _common(p)

    p = _command(sub, "import-vissl", cmd_import_vissl,
                 "convert a reference (vissl) checkpoint into this project's layout", vissl_import.__doc__)
    p.add_argument("checkpoint", help="the reference's checkpoint file (model_final_checkpoint_phase*.torch)")
    p.add_argument("--out", required=True, help="run directory to create: OUT/checkpoints/step_*.pt + config.yaml")
    p.add_argument("--trunk-only", action="store_true",
                   help="import the trunk even when the heads are of a layout not mapped here (a file without "
                   "heads needs no flag: it imports as its trunk)")
    p.add_argument("--overwrite", action="store_true", help="replace checkpoints already in --out")

    p = _command(sub, "invariance", cmd_invariance,
                 "||f(v_I) - g(v_It)|| and res5 distances, checkpoints side by side", inv.__doc__)
    p.add_argument("checkpoints", nargs="+", help="one or more checkpoints (e.g. a PIRL run and a Jigsaw run)")
    p.add_argument("--shards", default=None, help="shard dir whose images are measured (default: the val, "
                   "validation or test split beside the first checkpoint's train shards, as --val-shards)")
    p.add_argument("--labels", nargs="+", default=None, help="a label per checkpoint (default method:run-name)")
    p.add_argument("--random-init", action="store_true", help="add the untrained network as a third column")
    _common(p, shards=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ShardError, FileNotFoundError) as e:  # a missing shard folder, run or checkpoint: the message names the fix
        print(f"error: {e}", file=sys.stderr)
        return 2

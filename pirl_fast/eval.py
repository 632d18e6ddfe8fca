"""python -m pirl_fast.eval {export,knn,linear,invariance} CHECKPOINT ... : is the representation good,
and is it invariant?

CHECKPOINT is a checkpoint file (run_dir/checkpoints/step_*.pt) or a run directory (its newest
checkpoint). Every command writes its numbers as JSON into --out, by default the run directory
(the folder holding checkpoints/), where `python -m pirl_fast.report` finds them.

    export      trunk as a torchvision ResNet state dict + the heads, separately
    knn         weighted kNN (k=200, tau=0.07, NPID) on res5 features, train shards -> val shards
    linear      linear classifiers on conv1, res2..res5 of the frozen trunk, trained together
    invariance  distance between the representation of an image and of its jigsaw-shuffled version
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
from tqdm import tqdm

from pirl_fast import invariance as inv
from pirl_fast import linear_probe as lp
from pirl_fast.batchnorm import reestimate_running_stats
from pirl_fast.features import (ShardImageDataset, Pretrained, eval_transform, extract, load_pretrained, make_loader,
                                pick_device, random_init, read_checkpoint, train_transform)
from pirl_fast.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_evaluate
from pirl_fast.model import ARCHS, apply_stem


def default_out(ckpt_path: Path | None) -> Path:
    """The run directory of a checkpoint: the parent of its checkpoints/ folder (else its folder)."""
    if ckpt_path is None:
        return Path.cwd()
    folder = ckpt_path.resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def write_json(out_dir: Path, name: str, payload: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    payload = {**payload, "command": "python -m pirl_fast.eval " + " ".join(sys.argv[1:]),
               "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.write_text(json.dumps(payload, indent=1) + "\n")
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


def train_shards_of(args, net: Pretrained) -> str:
    shards = args.train_shards or net.config.get("data", {}).get("shards")
    if not shards or shards == "???":
        raise SystemExit("--train-shards is required (the checkpoint's config names no data.shards)")
    return shards


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
    write_json(out, "export.json", {**describe(net), "stem": stem, "trunk": str(trunk_path), "heads": str(heads_path)})
    return 0


def cmd_knn(args) -> int:
    device = pick_device(args.device)
    net = load_network(args, device)
    size = image_size_of(args, net)
    train = ShardImageDataset(train_shards_of(args, net), eval_transform(size), limit=args.limit)
    val = ShardImageDataset(args.val_shards, eval_transform(size), limit=args.limit)
    check_same_classes(train.classes, val.classes, args.val_shards)
    reestimate_bn(args, net, train, device)
    fn = net.model.features  # res5 after average pooling, (N, 2048 | 512)
    train_f, train_y, _ = extract(fn, make_loader(train, args.batch_size, args.workers), device, "features: train")
    val_f, val_y, _ = extract(fn, make_loader(val, args.batch_size, args.workers), device, "features: val")
    result = knn_evaluate(train_f, train_y, val_f, val_y, len(train.classes), args.k, args.temperature)
    name = f"{net.method} ({describe(net)['arch']})"
    print(f"kNN {name}: top-1 {100 * result.top1:.2f}%  top-5 {100 * result.top5:.2f}%  "
          f"(k={result.k}, tau={result.temperature}, {result.num_train} train -> {result.num_val} val, "
          f"{result.num_classes} classes; chance {100 / result.num_classes:.2f}%)")
    out = Path(args.out) if args.out else default_out(net.path)
    write_json(out, result_name("knn", args),
               {**describe(net), **result.as_dict(), "bn_reestimated": args.reestimate_bn, "image_size": size, "train_shards": str(train.manifest.root),
                "val_shards": str(val.manifest.root)})
    return 0


def cmd_linear(args) -> int:
    device = pick_device(args.device)
    net = load_network(args, device)
    size = image_size_of(args, net)
    cfg = lp.ProbeConfig(epochs=args.epochs, lr=args.lr, batch_size=args.probe_batch, weight_decay=args.weight_decay,
                         momentum=args.momentum, augment=not args.no_augment, seed=args.seed or 0)
    shards = train_shards_of(args, net)
    train = ShardImageDataset(shards, train_transform(size) if cfg.augment else eval_transform(size), args.limit)
    val = ShardImageDataset(args.val_shards, eval_transform(size), limit=args.limit)
    check_same_classes(train.classes, val.classes, args.val_shards)
    reestimate_bn(args, net, ShardImageDataset(shards, eval_transform(size), args.limit), device)
    trunk = net.model.trunk
    val_feats, val_y = lp.cache_stage_features(trunk, make_loader(val, args.batch_size, args.workers), device,
                                               "stage features: val")
    if cfg.augment:  # a fresh random crop per epoch: the trunk runs every epoch, once for all five heads
        torch.manual_seed(cfg.seed)
        probes = lp.StageProbes(lp.stage_widths(trunk), len(train.classes))
        loader = make_loader(train, cfg.batch_size, args.workers, shuffle=True, seed=cfg.seed)
        history = lp.train_probes(probes, lambda epoch: lp.image_batches(trunk, loader, device), cfg, len(loader),
                                  device)
        results = lp.evaluate_probes(probes, lp.cached_batches(val_feats, val_y, 1024, False, 0), device)
    else:  # the same centre crop every epoch: run the trunk once
        feats, labels = lp.cache_stage_features(trunk, make_loader(train, args.batch_size, args.workers), device,
                                                "stage features: train")
        results, history = lp.probe_cached(feats, labels, val_feats, val_y, len(train.classes), cfg, device)
    print(f"linear probes ({net.method}, {describe(net)['arch']}; chance {100 / len(train.classes):.2f}%):")
    for stage, r in results.items():
        print(f"  {stage:5s}  top-1 {100 * r['top1']:6.2f}%  top-5 {100 * r['top5']:6.2f}%")
    out = Path(args.out) if args.out else default_out(net.path)
    write_json(out, result_name("linear", args),
               {**describe(net), "bn_reestimated": args.reestimate_bn, "stages": results, "protocol": cfg.as_dict(), "loss_per_epoch": history,
                "image_size": size, "num_train": len(train), "num_val": len(val), "num_classes": len(train.classes)})
    return 0


def cmd_invariance(args) -> int:
    device = pick_device(args.device)
    nets = [load_pretrained(c, device) for c in args.checkpoints]
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
    data = ShardImageDataset(args.shards, inv.InvarianceViews(views), limit=args.limit)
    loader = make_loader(data, args.batch_size, args.workers)
    dists = {label: inv.invariance_distances(net.model, net.method, loader, views.grid, device, args.seed or 0)
             for label, net in zip(labels, nets)}
    out = Path(args.out) if args.out else default_out(nets[0].path)
    out.mkdir(parents=True, exist_ok=True)
    inv.plot_histograms(dists, out / "invariance.png")
    print(f"wrote {out / 'invariance.png'}")
    summary = {}
    for label, net in zip(labels, nets):
        stats = {m: inv.summarise(d) for m, d in dists[label].items()}
        summary[label] = {**describe(net), **stats, "gap": inv.gaps(stats)}
    for label, s in summary.items():
        parts = [f"{m} mean {s[m]['mean']:.4f} (median {s[m]['median']:.4f})" for m in inv.METRICS if m in s]
        parts += [f"gap({m}) {g:+.4f}" for m, g in s["gap"].items()]
        print(f"  {label}: " + "; ".join(parts))
    write_json(out, "invariance.json", {"checkpoints": summary, "views": views.__dict__, "num_images": len(data),
                                        "seed": args.seed or 0, "shards": str(data.manifest.root),
                                        "definition": "Distances" + inv.__doc__.split("Distances", 1)[1].strip()})
    return 0


def reestimate_bn(args, net: Pretrained, train: ShardImageDataset, device) -> None:
    """--reestimate-bn: BatchNorm running statistics recomputed on the training images (evaluation view)."""
    if args.reestimate_bn:
        images = (x for x, _, _ in tqdm(make_loader(train, args.batch_size, args.workers), desc="BN statistics",
                                        unit="batch", dynamic_ncols=True))
        net.model = reestimate_running_stats(net.model, lambda m, x: m.features(x), images, device)


def result_name(command: str, args) -> str:
    """knn.json, knn_random_init.json, knn_bn.json, knn_random_init_bn.json (and linear_...)."""
    return f"{command}{'_random_init' if args.random_init else ''}{'_bn' if args.reestimate_bn else ''}.json"


def check_same_classes(train: list[str], val: list[str], val_dir: str) -> None:
    if train != val:
        raise SystemExit(f"the val shards {val_dir} have classes {val[:5]}... but the train shards "
                         f"{train[:5]}...: shard both splits from ImageFolders with the same class folders")


# ---- argument parsing --------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, *, shards: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda[:N]")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes decoding JPEGs (default min(8, cores))")
    p.add_argument("--image-size", type=int, default=0,
                   help="evaluation crop size; 0 (default) = the checkpoint's data.image_size")
    p.add_argument("--limit", type=int, default=0, help="use only the first N samples of each split (0 = all)")
    p.add_argument("--seed", type=int, default=None,
                   help="--random-init weights (default: the checkpoint's trainer.seed, i.e. the very weights the "
                        "run started from), invariance permutations and probe shuffling (default 0)")
    p.add_argument("--out", default=None, help="folder for the JSON (default: the checkpoint's run directory)")
    if shards:
        p.add_argument("--train-shards", default=None, help="train shard dir (default: the checkpoint's data.shards)")
        p.add_argument("--val-shards", required=True, help="validation shard dir (python -m pirl_fast.shard)")
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
    ckpt_help = "checkpoint file or run directory (its newest checkpoints/step_*.pt)"

    p = sub.add_parser("export", help="trunk as a torchvision ResNet .pth + heads.pth")
    p.add_argument("checkpoint", help=ckpt_help)
    p.add_argument("--out", default=None, help="folder for the .pth files (default: the run directory)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("knn", help="weighted kNN top-1/top-5 on frozen res5 features (NPID protocol)")
    p.add_argument("checkpoint", nargs="?", default=None, help=ckpt_help)
    p.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours (default 200, NPID's best on ImageNet)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help="tau in the weight exp(sim/tau) (default 0.07, the pre-training NCE temperature)")
    _common(p)
    p.set_defaults(fn=cmd_knn)

    d = lp.ProbeConfig()
    p = sub.add_parser("linear", help="linear classifiers on conv1, res2..res5, trained together",
                       description=lp.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=None, help=ckpt_help)
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs} (Goyal et al. 2019)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"SGD lr, x0.1 at 8/28, 16/28, 24/28 (default {d.lr})")
    p.add_argument("--probe-batch-size", dest="probe_batch", type=int, default=d.batch_size,
                   help=f"probe training batch (default {d.batch_size})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    p.add_argument("--momentum", type=float, default=d.momentum, help=f"default {d.momentum}")
    p.add_argument("--no-augment", action="store_true",
                   help="centre crops only: runs the trunk once and trains the heads on stored features")
    _common(p)
    p.set_defaults(fn=cmd_linear)

    p = sub.add_parser("invariance", help="||f(v_I) - g(v_It)|| and res5 distances, checkpoints side by side",
                       description=inv.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="one or more checkpoints (e.g. a PIRL run and a Jigsaw run)")
    p.add_argument("--shards", required=True, help="shard dir whose images are measured (e.g. the val shards)")
    p.add_argument("--labels", nargs="+", default=None, help="a label per checkpoint (default method:run-name)")
    p.add_argument("--random-init", action="store_true", help="add the untrained network as a third column")
    _common(p, shards=False)
    p.set_defaults(fn=cmd_invariance)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

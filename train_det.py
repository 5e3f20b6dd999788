"""Train and evaluate an object detector on COCO-layout data, or on the built-in synthetic set.

  python train_det.py --model retinanet_r18 --device cpu --epochs 2 --img-size 128  # synthetic shapes, no download
  python train_det.py --model retinanet_r50 --device npu --data-path /data/coco --backbone-weights r50.pth
  torchrun --nproc_per_node 8 train_det.py --model ssd300 --device npu --data-path /data/coco

Every model brings its recipe from the mmdet config the seed names (RECIPES in det/models/<family>.py): canvas,
batch per device, base LR and the global batch it is for (--blr / --lr-batch, scaled linearly to yours unless --lr
gives the LR itself), momentum, weight decay, epochs, LR drops, warmup, data-set repeats. A flag overrides the
recipe's value; `--model M --help` shows M's. SIGTERM or Ctrl-C finishes the step, writes OUTPUT_DIR/last.pth and
exits 0; --resume auto continues exactly there. With no --data-path a
synthetic COCO-layout set (coloured shapes, 10 classes) is written once to $PLAINVISION_CACHE or ~/.cache/plainvision.
"""
import argparse
import contextlib
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from common import checkpoint as ckpt
from common import cli
from common.cli import HelpFormatter, add_runtime_args, setup_runtime
from common.compile import full_batch, graphs_compiled
from common.device import autocast, grad_scaler
from common.dist import all_gather_objects, cleanup, is_main_process, print0, stop_if_not_finite
from common.logger import elapsed, log_every, new_meters
from common.loop import (
    after_optimizer_step,
    evaluate_and_log,
    optimizer_step,
    stop_requested,
    stopped_message,
    wrap_model,
)
from common.optim import build_optimizer, epoch_schedule
from common.sampling import set_epoch
from det import data
from det.eval import coco_evaluate, save_results, to_coco_results
from det.models import MODELS, RECIPES, build_model, load_backbone_weights, to_our_names
from det.yolox_data import MosaicMixUpDataset

# recipe key -> flag destination: the recipe's values are the flags' defaults (and what --help shows); every recipe
# has the first keys, the optional ones (from norm_weight_decay on) only where its config departs from the default
RECIPE_FLAGS = {"lr": "blr", "schedule": "lr_scheduler"} | {key: key for key in (
    "img_size", "batch_size", "lr_batch", "momentum", "weight_decay", "epochs", "lr_steps", "warmup_iters",
    "warmup_factor", "repeat", "clip_grad", "norm_weight_decay", "bias_weight_decay", "bias_lr_mult", "nesterov",
    "warmup", "min_lr_ratio", "hold_epochs", "ema", "ema_eval", "ema_decay", "ema_gamma", "multiscale",
    "multiscale_interval", "no_aug_epochs")}


def get_args_parser(model: str = "ssd300") -> argparse.ArgumentParser:
    """The flags, with `model`'s recipe as the defaults of the recipe group (`parse_args` picks the model first)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="ssd300", choices=MODELS, metavar="MODEL", help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--data-path", help="COCO folder (annotations/instances_*2017.json, *2017/); omit: synthetic set")
    p.add_argument("--train-ann", help="training annotation file (default: DATA/annotations/instances_train2017.json)")
    p.add_argument("--val-ann", help="validation annotation file (default: ..._val2017.json)")
    p.add_argument("--train-images", help="training image folder (default: DATA/train2017)")
    p.add_argument("--val-images", help="validation image folder (default: DATA/val2017)")
    p.add_argument("--synthetic-size", type=cli.positive_int, default=2000,
                   help="training images of the synthetic set (val: 1/4)")
    p.add_argument("--backbone-weights", "--weights-backbone",
                   help="ImageNet classification checkpoint for the backbone (ours, torchvision's or mmpretrain's): "
                        "real detection training starts there")
    p.add_argument("--trainable-backbone-layers", type=int, choices=range(6), metavar="{0..5}",
                   help="ResNet detectors: backbone stages that train, from the top (torchvision's flag; default: "
                        "5 from scratch, the recipe's 3 over --backbone-weights / --weights)")
    p.add_argument("--norm-eval", action=argparse.BooleanOptionalAction,
                   help="ResNet and Darknet detectors: keep the backbone's BatchNorm statistics fixed (default: on "
                        "over pretrained weights, as mmdet; off from scratch)")
    p.add_argument("--max-gt", type=cli.positive_int, help="objects per image the targets are padded to (default: per "
                   "batch, the smallest of 32, 64, 128, ... that fits); an image with more is an error")
    g = p.add_argument_group(f"recipe (defaults: {model}'s mmdet recipe; run --model M --help for another's)")
    g.add_argument("--img-size", type=cli.positive_int, help="canvas: SSD's, YOLO's and CenterNet's square side / "
                   "RetinaNet's, FCOS's and SOLOv2's short side (1333:800 long)")
    g.add_argument("-b", "--batch-size", type=cli.positive_int, help="images per device per step")
    g.add_argument("--epochs", type=cli.positive_int, help="passes over the (repeated) training set")
    g.add_argument("--lr", type=cli.positive_float, help="the learning rate, as given (default: --blr x global batch / "
                   "--lr-batch, linear scaling)")
    g.add_argument("--blr", type=cli.positive_float, help="the recipe's LR for --lr-batch images per step")
    g.add_argument("--lr-batch", type=cli.positive_int, help="the global batch --blr is for")
    g.add_argument("--opt", default="sgd", choices=["sgd", "adamw"],
                   help="the recipes' SGD; AdamW (--lr ~3e-4) learns faster in short runs from weak backbones")
    g.add_argument("--momentum", type=cli.non_negative_float, help="SGD momentum")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=cli.non_negative_float,
                   help="weight decay of conv and linear weights")
    g.add_argument("--norm-weight-decay", type=cli.non_negative_float,
                   help="weight decay of norm layers and biases (default: --wd's, as mmdet decays every parameter "
                        "unless a config says otherwise)")
    g.add_argument("--bias-weight-decay", type=cli.non_negative_float,
                   help="weight decay of every bias, norm layers' too (default: --norm-weight-decay's; FCOS: 0, "
                        "mmdet's bias_decay_mult)")
    g.add_argument("--bias-lr-mult", type=cli.positive_float, default=1.0,
                   help="LR factor of the biases outside norm layers (FCOS: 2, mmdet's bias_lr_mult)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False, help="Nesterov SGD")
    g.add_argument("--lr-scheduler", "--schedule", type=cli.scheduler_name, choices=["multistep", "cosine"],
                   help="multistep: x0.1 at each of --lr-steps; cosine: down to 0 at the end (torchvision's "
                        "multisteplr, cosineannealinglr too)")
    g.add_argument("--lr-steps", type=cli.positive_int, nargs="+", help="multistep: epochs where the LR drops x0.1")
    g.add_argument("--warmup-iters", type=cli.non_negative_int, help="warmup iterations")
    g.add_argument("--warmup", default="linear", choices=["linear", "quadratic"],
                   help="warmup shape: linear from --warmup-factor, or quadratic from 0 (mmdet's YOLOX)")
    g.add_argument("--lr-warmup-epochs", type=cli.non_negative_int,
                   help="warmup over this many epochs instead of --warmup-iters")
    g.add_argument("--warmup-factor", type=cli.non_negative_float, help="LR factor at the first warmup iteration")
    g.add_argument("--min-lr-ratio", type=cli.non_negative_float, default=0.0,
                   help="cosine: the final LR as a fraction of the LR")
    g.add_argument("--hold-epochs", type=cli.non_negative_int, default=0,
                   help="cosine: the last epochs stay at the final LR (YOLOX: 15)")
    g.add_argument("--multiscale", type=cli.positive_float, nargs=2, metavar=("LOW", "HIGH"),
                   help="every --multiscale-interval iterations resize the batch to a short side drawn from LOW-HIGH x "
                        "--img-size in steps of 32 (mmdet's BatchSyncRandomResize; YOLOX: 0.75 1.25, 480-800 px)")
    g.add_argument("--multiscale-interval", type=cli.positive_int, default=10, help="iterations per --multiscale size")
    g.add_argument("--no-aug-epochs", type=cli.non_negative_int, default=0,
                   help="YOLOX: Mosaic, RandomAffine and MixUp off and the L1 loss on from epoch epochs - N - 1 on "
                        "(mmdet's YOLOXModeSwitchHook and its epoch + 1 test)")
    g.add_argument("--repeat", type=cli.positive_int, help="passes over the data set per epoch (mmdet's RepeatDataset)")
    g.add_argument("--clip-grad", "--clip-grad-norm", type=cli.non_negative_float,
                   help="clip the gradient norm to this (None, 0: off)")
    g.add_argument("--accum-steps", type=cli.positive_int, default=1, help="micro-batches per optimizer step")
    add_runtime_args(p, output_dir="output/det")
    # after every add_argument: an explicit default given later would win over set_defaults
    p.set_defaults(**{flag: RECIPES[model][key] for key, flag in RECIPE_FLAGS.items() if key in RECIPES[model]})
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """--model first, then every flag with that model's recipe as defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="ssd300")
    model = pre.parse_known_args(argv)[0].model
    return get_args_parser(model if model in MODELS else "ssd300").parse_args(argv)


def backbone_settings(args: argparse.Namespace, recipe: dict, resume: dict | None) -> dict:
    """`frozen_stages` / `norm_eval` for a ResNet backbone (`norm_eval` alone for Darknet), decided as torchvision's
    detection builders decide (`_validate_trainable_layers`): over pretrained weights (--backbone-weights or
    --weights) the recipe's (mmdet's frozen stem + stage 1, BatchNorm statistics kept), from scratch the whole
    backbone trains with ordinary BatchNorm: frozen random filters and statistics of mean 0 / variance 1 never
    learn. --trainable-backbone-layers (ResNet stages trained, from the top: 5 all, 3 = mmdet's frozen_stages 1, 0
    none) and --norm-eval override either; a resumed run keeps what its checkpoint used. {} for backbones without
    these settings (VGG, MobileNet)."""
    keys = [k for k in ("frozen_stages", "norm_eval") if k in recipe]
    if args.trainable_backbone_layers is not None and "frozen_stages" not in keys:
        raise SystemExit(f"error: --trainable-backbone-layers counts ResNet stages; {args.model}'s backbone has no "
                         "such setting" + (" (--norm-eval applies)" if keys else ""))
    if args.norm_eval is not None and not keys:
        raise SystemExit(f"error: --norm-eval is for the ResNet and Darknet detectors; {args.model}'s backbone "
                         "trains whole")
    if not keys:
        return {}
    if resume is not None:  # checkpoints from before these settings were recorded used the recipe's
        settings = resume["state"].get("extra", {}).get("backbone", {k: recipe[k] for k in keys})
        print0(f"backbone: {', '.join(f'{k} {v}' for k, v in settings.items())}, as the resumed checkpoint was trained")
        return settings
    pretrained = bool(args.backbone_weights or args.weights)
    settings = {"frozen_stages": recipe["frozen_stages"] if pretrained else -1} if "frozen_stages" in keys else {}
    if args.trainable_backbone_layers is not None:
        settings["frozen_stages"] = 4 - args.trainable_backbone_layers
    settings["norm_eval"] = (recipe["norm_eval"] if pretrained else False) if args.norm_eval is None else args.norm_eval
    why = ("over pretrained weights, the recipe's" if pretrained else
           "no --backbone-weights or --weights: random filters and BatchNorm statistics must learn, as in "
           "torchvision's detection builders without weights")
    if args.trainable_backbone_layers is not None or args.norm_eval is not None:
        why = "set by flags"
    stages = f"{4 - settings['frozen_stages']} of 5 stages train, " if "frozen_stages" in settings else ""
    batch_norm = "statistics frozen (norm_eval)" if settings["norm_eval"] else "in train mode"
    print0(f"backbone: {stages}BatchNorm {batch_norm} ({why})")
    return settings


def train_one_epoch(model, optimizer, scaler, loader, device, epoch: int, step: int, lr_of, args,
                    model_ema=None, *, start_batch: int = 0, save) -> tuple[int, bool]:
    """One pass over `loader` (the data set `repeat` times) from batch `start_batch` (a run resumed mid-epoch);
    returns (the global optimizer step reached, whether a stop signal ended the epoch early). `save(epoch=, batch=,
    step=)` writes a mid-epoch checkpoint when after_optimizer_step asks for one."""
    model.train()
    meters, finite = new_meters(), torch.ones((), dtype=torch.bool, device=device)
    optimizer.zero_grad(set_to_none=True)
    ddp = isinstance(model, DistributedDataParallel)
    batches = log_every(loader, meters, print_freq=args.print_freq, header=f"Epoch [{epoch}]", device=device,
                        images_per_iter=args.batch_size * args.world_size, log_file=args.log_file,
                        tags={"mode": "train", "epoch": epoch}, start=start_batch, run_done=epoch * len(loader),
                        run_total=args.epochs * len(loader), tensorboard=args.tensorboard)
    for i, (images, targets, _) in enumerate(batches, start=start_batch):
        images = images.to(device, non_blocking=True).contiguous(memory_format=args.memory_format)
        targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
        if args.multiscale:  # YOLOX's batch resize: a few canvases, each one graph
            size = data.multiscale_canvas(epoch * len(loader) + i, args.seed, tuple(images.shape[-2:]),
                                          args.multiscale, args.img_size, args.multiscale_interval)
            images, targets = data.resize_batch(images, targets, size)
        boundary = (i + 1) % args.accum_steps == 0
        with model.no_sync() if ddp and not boundary else contextlib.nullcontext():
            with autocast(device, args.amp):
                losses = model(images, targets)  # {name: weighted loss}, computed in fp32 by the model
            loss = sum(losses.values())
            scaler.scale(loss / args.accum_steps).backward()
        finite &= torch.isfinite(loss)
        for name, value in losses.items():
            meters[name].append(value.detach())
        lr = lr_of(step)  # the LR this micro-batch's optimizer step uses
        meters["lr"].append(lr)
        if boundary:
            step = optimizer_step(model, optimizer, scaler, model_ema, step=step, lr=lr, args=args)
            if after_optimizer_step(finite, epoch=epoch, batch=i + 1, step=step, args=args, save=save):
                return step, True
        if (i + 1) % args.print_freq == 0:  # the host syncs here anyway, to print
            stop_if_not_finite(finite, epoch, step, args.output_dir)
    stop_if_not_finite(finite, epoch, step, args.output_dir)  # before the epoch's checkpoint is written
    return step, False


@torch.no_grad()
def evaluate(model, loader, device, args, header: str = "Test") -> dict[str, float]:
    """COCO AP (of the recipe's iou_type) over the whole validation set: every rank predicts its shard, rank 0 runs
    COCOeval and writes OUTPUT_DIR/detections_val.json (COCO results format: what COCO's evaluation server and
    pycocotools' loadRes take) and the 12-number summary to coco_<iou_type>_summary.json (`_ema` before `.json` for
    the EMA model's). An instance-segmentation recipe (iou_type "segm") returns mask AP under the usual names (its
    metric picks best.pth) and also evaluates the boxes of the same masks: coco_bbox_summary.json, "bbox_AP", ..."""
    model.eval()
    dataset = loader.dataset
    results = []
    batches = log_every(loader, new_meters(), print_freq=args.print_freq, header=header, device=device,
                        images_per_iter=args.batch_size * args.world_size)
    for images, targets, metas in batches:
        images = images.to(device, non_blocking=True).contiguous(memory_format=args.memory_format)
        image_size, n = targets["image_size"].to(device), len(images)
        if args.compile:  # the full batch's graph, not one more for each orientation's last batch
            images, image_size = full_batch(images, args.batch_size), full_batch(image_size, args.batch_size)
        with autocast(device, args.amp):
            out = model(images, image_size=image_size)
        out = {k: (v.float() if v.is_floating_point() else v)[:n].cpu() for k, v in out.items()}
        results += to_coco_results(out["boxes"], out["scores"], out["labels"], out["valid"], metas,
                                   dataset.label_to_cat, out.get("masks"), targets["image_size"])
    results = [r for part in all_gather_objects(results) for r in part]
    iou_type, suffix = RECIPES[args.model]["iou_type"], "_ema" if "EMA" in header else ""
    stats = {}
    if is_main_process():
        out_dir = Path(args.output_dir)
        save_results(results, out_dir / f"detections_val{suffix}.json")
        if iou_type == "segm":
            print0("masks (segm):")
        stats = coco_evaluate(dataset.coco, results, out_dir / f"coco_{iou_type}_summary{suffix}.json",
                              iou_type=iou_type)
        if iou_type == "segm":  # the masks' extents, as box AP
            print0("boxes of the masks (bbox):")
            boxes = coco_evaluate(dataset.coco, results, out_dir / f"coco_bbox_summary{suffix}.json")
            stats |= {f"bbox_{name}": value for name, value in boxes.items()}
    return all_gather_objects(stats)[0]  # every rank agrees on "best"


def main(args: argparse.Namespace) -> None:
    recipe = RECIPES[args.model]
    if args.img_size < recipe.get("min_img_size", 1):
        raise SystemExit(f"error: {args.model}'s layers need --img-size {recipe['min_img_size']} or more")
    device, rank = setup_runtime(args)

    try:
        train_set, val_set = data.build_datasets(
            args.data_path, recipe["preset"], args.img_size, synthetic_train=args.synthetic_size,
            synthetic_val=max(args.synthetic_size // 4, 8), train_ann=args.train_ann, val_ann=args.val_ann,
            train_images=args.train_images, val_images=args.val_images)
    except (FileNotFoundError, ValueError) as e:  # their messages name the file and the annotation
        raise SystemExit(f"error: {e}") from None
    mixing = None
    if recipe["preset"] == "yolox":  # mmdet's MultiImageMixDataset: Mosaic, RandomAffine, MixUp, then the preset's rest
        train_set = mixing = MosaicMixUpDataset(train_set, args.img_size)
    elif args.no_aug_epochs:
        raise SystemExit(f"error: --no-aug-epochs switches YOLOX's mixing off; {args.model} has none")
    if args.repeat > 1:
        train_set = data.RepeatDataset(train_set, args.repeat)
    train_loader, val_loader = data.build_loaders(
        train_set, val_set, preset=recipe["preset"], img_size=args.img_size, batch_size=args.batch_size,
        workers=args.workers, rank=rank, world_size=args.world_size, seed=args.seed, max_gt=args.max_gt,
        pin_memory=device.type != "cpu")

    resume = ckpt.load_resume(args.resume, args.output_dir, {"model": args.model})
    backbone = backbone_settings(args, recipe, resume)
    model = build_model(args.model, num_classes=len(val_set.classes), **backbone)
    if args.backbone_weights:
        load_backbone_weights(args.model, model, ckpt.load_checkpoint(args.backbone_weights))
    if args.weights:
        weights = ckpt.load_checkpoint(args.weights)
        ckpt.load_model_weights(model, to_our_names(args.model, weights), source=args.weights,
                                holds=ckpt.describe(weights))
    model, model_without_ddp, model_ema = wrap_model(model, args, device)

    global_batch = args.batch_size * args.world_size * args.accum_steps
    if args.lr is None:
        args.lr = args.blr * global_batch / args.lr_batch
        print0(f"{args.model}: canvas {args.img_size}, LR {args.lr:g} = --blr {args.blr} for {args.lr_batch} images "
               f"x global batch {global_batch} / {args.lr_batch} (linear scaling; --lr sets the LR itself)")
    else:
        print0(f"{args.model}: canvas {args.img_size}, LR {args.lr:g} (--lr, as given), global batch {global_batch}")
    norm_weight_decay = args.weight_decay if args.norm_weight_decay is None else args.norm_weight_decay
    optimizer = build_optimizer(args.opt, model_without_ddp, args.lr, args.momentum, args.weight_decay,
                                norm_weight_decay, nesterov=args.nesterov, bias_weight_decay=args.bias_weight_decay,
                                bias_lr_mult=args.bias_lr_mult)
    scaler = grad_scaler(device, args.amp)
    steps_per_epoch = len(train_loader) // args.accum_steps
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_set)} training images make no full step of {global_batch} images")
    if args.lr_warmup_epochs is not None:
        args.warmup_iters = args.lr_warmup_epochs * steps_per_epoch
    if args.warmup_iters >= args.epochs * steps_per_epoch:
        print0(f"warning: the warmup ({args.warmup_iters} iterations) is as long as the whole run "
               f"({args.epochs * steps_per_epoch} steps): the LR never reaches {args.lr:g}; shorten it with "
               "--warmup-iters N (or --lr-warmup-epochs N)")
    # YOLOX's 15 of 300 epochs in a short run (the mixing ends at mmdet's epoch + 1 >= epochs - N)
    for flag, value, whole, what in (("--hold-epochs", args.hold_epochs, args.epochs, "the LR stays at its last value"),
                                     ("--no-aug-epochs", args.no_aug_epochs, args.epochs - 1, "Mosaic/MixUp are off")):
        if value and value >= whole:
            print0(f"warning: {flag} {value} of {args.epochs} epochs: {what} for the whole run; set {flag} "
                   "smaller (or 0)")
    lr_of = epoch_schedule(base_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                           schedule=args.lr_scheduler, lr_steps=args.lr_steps or (), warmup_steps=args.warmup_iters,
                           warmup_factor=args.warmup_factor, warmup=args.warmup, min_lr=args.min_lr_ratio * args.lr,
                           hold_epochs=args.hold_epochs)

    resumed = ckpt.restore_training_state(resume, model=model_without_ddp, optimizer=optimizer, scaler=scaler,
                                          model_ema=model_ema, rank=rank, world_size=args.world_size, device=device,
                                          start_epoch=args.start_epoch, steps_per_epoch=steps_per_epoch)
    step, best = resumed["step"], resumed["best_metric"]

    run_eval = partial(evaluate, loader=val_loader, device=device, args=args)
    if args.test_only:
        evaluate_and_log(run_eval, model, model_ema, args)
        cleanup()
        return

    extra = {"model": args.model, "img_size": args.img_size, "classes": val_set.classes,
             "label_to_cat": val_set.label_to_cat, "backbone": backbone}

    def save(*, epoch: int, batch: int, step: int, is_best: bool = False) -> None:
        state = ckpt.training_state(model=model_without_ddp, optimizer=optimizer, scaler=scaler, model_ema=model_ema,
                                    epoch=epoch, batch=batch, step=step, best=best, args=args, device=device,
                                    extra=extra)
        ckpt.save_checkpoint(state, args.output_dir, is_best=is_best, keep=args.keep)

    for epoch in range(resumed["epoch"], args.epochs):
        start = resumed["batch"] if epoch == resumed["epoch"] else 0
        set_epoch(train_loader, epoch, start)
        if args.no_aug_epochs and epoch + 1 >= args.epochs - args.no_aug_epochs:  # a function of the epoch: a resumed
            mixing.mix, model_without_ddp.bbox_head.use_l1 = False, True  # run is in the same mode (mmdet PR #10116)
        step, stopped = train_one_epoch(model, optimizer, scaler, train_loader, device, epoch, step, lr_of, args,
                                        model_ema, start_batch=start, save=save)
        if stopped:
            print0(stopped_message(args, step))
            break
        is_best = False
        if (epoch + 1) % args.eval_interval == 0 or epoch + 1 == args.epochs:
            stats = evaluate_and_log(run_eval, model, model_ema, args, epoch=epoch, step=step)
            is_best, best = stats[recipe["metric"]] > best, max(best, stats[recipe["metric"]])
        save(epoch=epoch + 1, batch=0, step=step, is_best=is_best)
        if stop_requested():  # the signal came during evaluation: the epoch's checkpoint is written
            print0(stopped_message(args, step))
            break
    else:
        print0(f"done in {elapsed()}: best {recipe['iou_type']} {recipe['metric']} {best:.3f}; "
               f"checkpoints in {args.output_dir}" + (f"; torch.compile made {graphs_compiled()} graphs"
                                                     if args.compile else ""))
    cleanup()


if __name__ == "__main__":
    main(parse_args())

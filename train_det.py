"""Train and evaluate an object detector on COCO-layout data, or on the built-in synthetic set.

  python train_det.py --model ssd300 --device cpu --epochs 2 --img-size 160       # synthetic shapes, no download
  python train_det.py --model retinanet_r50 --device npu --data-path /data/coco --backbone-weights r50.pth
  torchrun --nproc_per_node 8 train_det.py --model ssd300 --device npu --data-path /data/coco

Every model brings its recipe from the mmdet config the seed names (RECIPES in det/models/<family>.py): canvas,
batch per device, base LR and the global batch it is for (scaled linearly to yours), momentum, weight decay, epochs,
LR drops, 500 warmup iterations, data-set repeats. A flag overrides the recipe's value. With no --data-path a
synthetic COCO-layout set (coloured shapes, 10 classes) is written once to $PLAINVISION_CACHE or ~/.cache/plainvision.
"""
import argparse
import contextlib
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from common import checkpoint as ckpt
from common.cli import HelpFormatter, add_runtime_args, setup_runtime
from common.device import autocast, grad_scaler
from common.dist import all_gather_objects, cleanup, is_main_process, print0, stop_if_not_finite
from common.logger import log_every, new_meters
from common.loop import evaluate_and_log, optimizer_step, wrap_model
from common.optim import build_optimizer, epoch_schedule
from det import data
from det.eval import coco_evaluate, to_coco_results
from det.models import MODELS, RECIPES, build_model, load_backbone_weights, to_our_names

RECIPE_KEYS = ("img_size", "batch_size", "lr", "lr_batch", "momentum", "weight_decay", "epochs", "schedule",
               "lr_steps", "warmup_iters", "warmup_factor", "repeat", "clip_grad")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="ssd300", choices=MODELS, metavar="MODEL", help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--data-path", help="COCO folder (annotations/instances_*2017.json, *2017/); omit: synthetic set")
    p.add_argument("--train-ann", help="training annotation file (default: DATA/annotations/instances_train2017.json)")
    p.add_argument("--val-ann", help="validation annotation file (default: ..._val2017.json)")
    p.add_argument("--train-images", help="training image folder (default: DATA/train2017)")
    p.add_argument("--val-images", help="validation image folder (default: DATA/val2017)")
    p.add_argument("--synthetic-size", type=int, default=2000, help="training images of the synthetic set (val: 1/4)")
    p.add_argument("--backbone-weights", help="ImageNet classification checkpoint for the backbone (ours, "
                   "torchvision's or mmpretrain's): real detection training starts there")
    p.add_argument("--max-gt", type=int, help="objects per image the targets are padded to (default: per batch, "
                   "the smallest of 32, 64, 128, ... that fits); an image with more is an error")
    g = p.add_argument_group("recipe overrides (default: the model's mmdet recipe)")
    g.add_argument("--img-size", type=int, help="canvas: SSD's square side / RetinaNet's short side (1333:800 long)")
    g.add_argument("--batch-size", type=int, help="images per device per step")
    g.add_argument("--epochs", type=int, help="passes over the (repeated) training set")
    g.add_argument("--lr", type=float, help="base LR for --lr-batch images per step; scaled to the global batch")
    g.add_argument("--lr-batch", type=int, help="the global batch --lr is for")
    g.add_argument("--opt", default="sgd", choices=["sgd", "adamw"],
                   help="the recipes' SGD; AdamW (--lr ~3e-4) learns faster in short runs from weak backbones")
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", "--wd", type=float, help="weight decay (never on norm layers and biases)")
    g.add_argument("--schedule", choices=["multistep", "cosine"])
    g.add_argument("--lr-steps", type=int, nargs="+", help="multistep: epochs where the LR drops x0.1")
    g.add_argument("--warmup-iters", type=int, help="linear warmup iterations")
    g.add_argument("--warmup-factor", type=float, help="LR factor at the first warmup iteration")
    g.add_argument("--repeat", type=int, help="passes over the data set per epoch (mmdet's RepeatDataset)")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this (0: off)")
    g.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    add_runtime_args(p, output_dir="output/det")
    return p


def train_one_epoch(model, optimizer, scaler, loader, device, epoch: int, step: int, lr_of, args,
                    model_ema=None) -> int:
    """One pass over `loader` (the data set `repeat` times); returns the global optimizer step reached."""
    model.train()
    meters, finite = new_meters(), torch.ones((), dtype=torch.bool, device=device)
    optimizer.zero_grad(set_to_none=True)
    ddp = isinstance(model, DistributedDataParallel)
    batches = log_every(loader, meters, print_freq=args.print_freq, header=f"Epoch [{epoch}]", device=device,
                        images_per_iter=args.batch_size * args.world_size, log_file=args.log_file,
                        tags={"mode": "train", "epoch": epoch})
    for i, (images, targets, _) in enumerate(batches):
        images = images.to(device, non_blocking=True).contiguous(memory_format=args.memory_format)
        targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
        boundary = (i + 1) % args.accum_steps == 0
        with model.no_sync() if ddp and not boundary else contextlib.nullcontext():
            with autocast(device, args.amp):
                losses = model(images, targets)  # {name: weighted loss}, computed in fp32 by the model
            loss = sum(losses.values())
            scaler.scale(loss / args.accum_steps).backward()
        finite &= torch.isfinite(loss)
        if boundary:
            step = optimizer_step(model, optimizer, scaler, model_ema, step=step, lr=lr_of(step), args=args)
        for name, value in losses.items():
            meters[name].append(value.detach())
        meters["lr"].append(optimizer.param_groups[0]["lr"])
        if (i + 1) % args.print_freq == 0 or i + 1 == len(loader):  # the host syncs here anyway, to print
            stop_if_not_finite(finite, epoch, step, args.output_dir)
    return step


@torch.no_grad()
def evaluate(model, loader, device, args, header: str = "Test") -> dict[str, float]:
    """COCO AP (of the recipe's iou_type) over the whole validation set: every rank predicts its shard, rank 0 runs
    COCOeval."""
    model.eval()
    dataset = loader.dataset
    results = []
    batches = log_every(loader, new_meters(), print_freq=args.print_freq, header=header, device=device,
                        images_per_iter=args.batch_size * args.world_size)
    for images, targets, metas in batches:
        images = images.to(device, non_blocking=True).contiguous(memory_format=args.memory_format)
        with autocast(device, args.amp):
            out = model(images, image_size=targets["image_size"].to(device))
        out = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}
        results += to_coco_results(out["boxes"], out["scores"], out["labels"], out["valid"], metas,
                                   dataset.label_to_cat)
    results = [r for part in all_gather_objects(results) for r in part]
    iou_type = RECIPES[args.model]["iou_type"]
    out_file = Path(args.output_dir) / f"coco_{iou_type}.json"
    stats = coco_evaluate(dataset.coco, results, out_file, iou_type=iou_type) if is_main_process() else {}
    return all_gather_objects(stats)[0]  # every rank agrees on "best"


def main(args: argparse.Namespace) -> None:
    recipe = RECIPES[args.model]
    for key in RECIPE_KEYS:  # flags override the recipe
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    if args.img_size < recipe.get("min_img_size", 1):
        raise SystemExit(f"error: {args.model}'s layers need --img-size {recipe['min_img_size']} or more")
    device, rank = setup_runtime(args)

    train_set, val_set = data.build_datasets(
        args.data_path, recipe["preset"], args.img_size, synthetic_train=args.synthetic_size,
        synthetic_val=max(args.synthetic_size // 4, 8), train_ann=args.train_ann, val_ann=args.val_ann,
        train_images=args.train_images, val_images=args.val_images)
    if args.repeat > 1:
        train_set = data.RepeatDataset(train_set, args.repeat)
    train_loader, val_loader = data.build_loaders(
        train_set, val_set, preset=recipe["preset"], img_size=args.img_size, batch_size=args.batch_size,
        workers=args.workers, rank=rank, world_size=args.world_size, seed=args.seed, max_gt=args.max_gt,
        pin_memory=device.type != "cpu")

    model = build_model(args.model, num_classes=len(val_set.classes))
    if args.backbone_weights:
        load_backbone_weights(args.model, model, ckpt.load_checkpoint(args.backbone_weights))
    if args.weights:
        ckpt.load_model_weights(model, to_our_names(args.model, ckpt.load_checkpoint(args.weights)))
    model, model_without_ddp, model_ema = wrap_model(model, args, device)

    global_batch = args.batch_size * args.world_size * args.accum_steps
    lr = args.lr * global_batch / args.lr_batch
    print0(f"{args.model}: canvas {args.img_size}, LR {args.lr} for {args.lr_batch} images x global batch "
           f"{global_batch} / {args.lr_batch} = {lr:g}")
    optimizer = build_optimizer(args.opt, model_without_ddp, lr, args.momentum, args.weight_decay)
    scaler = grad_scaler(device, args.amp)
    steps_per_epoch = len(train_loader) // args.accum_steps
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_set)} training images make no full step of {global_batch} images")
    lr_of = epoch_schedule(base_lr=lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, schedule=args.schedule,
                           lr_steps=args.lr_steps or (), warmup_steps=args.warmup_iters,
                           warmup_factor=args.warmup_factor)

    start_epoch, step, best = ckpt.restore_training_state(
        args.resume, args.output_dir, model=model_without_ddp, optimizer=optimizer, scaler=scaler,
        model_ema=model_ema, rank=rank, world_size=args.world_size, device=device)

    run_eval = partial(evaluate, loader=val_loader, device=device, args=args)
    if args.test_only:
        evaluate_and_log(run_eval, model, model_ema, args)
        cleanup()
        return

    extra = {"model": args.model, "img_size": args.img_size, "classes": val_set.classes,
             "label_to_cat": val_set.label_to_cat}
    for epoch in range(start_epoch, args.epochs):
        train_loader.batch_sampler.set_epoch(epoch)
        step = train_one_epoch(model, optimizer, scaler, train_loader, device, epoch, step, lr_of, args, model_ema)
        is_best = False
        if (epoch + 1) % args.eval_interval == 0 or epoch + 1 == args.epochs:
            stats = evaluate_and_log(run_eval, model, model_ema, args, epoch=epoch, step=step)
            is_best, best = stats[recipe["metric"]] > best, max(best, stats[recipe["metric"]])
        state = ckpt.training_state(model=model_without_ddp, optimizer=optimizer, scaler=scaler, model_ema=model_ema,
                                    epoch=epoch + 1, step=step, best=best, args=args, device=device, extra=extra)
        ckpt.save_checkpoint(state, args.output_dir, is_best=is_best, keep=args.keep)
    print0(f"done: best box AP {best:.3f}; checkpoints in {args.output_dir}")
    cleanup()


if __name__ == "__main__":
    main(get_args_parser().parse_args())

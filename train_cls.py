"""Train and evaluate an image classifier on ImageNet-layout folders, or on the built-in synthetic set.

  python train_cls.py --arch resnet18 --device cpu --epochs 1            # synthetic shapes, no download
  python train_cls.py --arch resnet50 --device npu --data-path /data/imagenet
  torchrun --nproc_per_node 8 train_cls.py --arch resnet50 --device npu --data-path /data/imagenet

Defaults reproduce mmcls's ResNet-50 recipe (resnet50_8xb32_in1k): batch 32 per device on 8 devices, SGD with
LR 0.1 for 256 images (--blr, scaled linearly to the global batch unless --lr gives the LR itself), momentum 0.9,
weight decay 1e-4, 100 epochs, LR x0.1 at epochs 30, 60 and 90.
SIGTERM or Ctrl-C finishes the step, writes OUTPUT_DIR/last.pth and exits 0; --resume auto continues exactly there.
"""
import argparse
import contextlib
from functools import partial

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import InterpolationMode

from cls import data
from cls.convert import to_our_names
from cls.models import MODELS, build_model
from cls.models.efficientnet import ADVPROP_MEAN, ADVPROP_STD
from common import checkpoint as ckpt
from common import cli
from common.cli import HelpFormatter, add_runtime_args, setup_runtime
from common.compile import full_batch, graphs_compiled
from common.device import autocast, grad_scaler
from common.dist import all_reduce_sum, cleanup, print0, stop_if_not_finite
from common.logger import elapsed, log_every, new_meters
from common.loop import (
    after_optimizer_step,
    evaluate_and_log,
    optimizer_step,
    stop_requested,
    stopped_message,
    wrap_model,
)
from common.optim import build_optimizer, epoch_schedule, scaled_lr
from common.sampling import set_epoch


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--arch", "--model", default="resnet50", choices=MODELS, metavar="ARCH",
                   help=f"architecture, one of: {', '.join(MODELS)}")
    p.add_argument("--data-path", help="folder with train/<class>/* and val/<class>/*; omit for the synthetic set")
    p.add_argument("--synthetic-size", type=cli.positive_int, default=2000,
                   help="training images of the synthetic set (val: 1/4)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images, don't fail")
    p.add_argument("-b", "--batch-size", type=cli.positive_int, default=32,
                   help="images per device per step (recipe: 32 x 8 devices)")
    p.add_argument("--epochs", type=cli.positive_int, default=100, help="passes over the training set")
    g = p.add_argument_group("optimisation")
    g.add_argument("--opt", default="sgd", choices=["sgd", "adamw", "rmsprop"],
                   help="rmsprop: with TensorFlow's alpha / eps, as the MobileNet / EfficientNet recipes")
    g.add_argument("--lr", type=cli.positive_float,
                   help="the learning rate, as given (default: --blr x global batch / 256)")
    g.add_argument("--blr", type=cli.positive_float, default=0.1,
                   help="base LR for 256 images per step, scaled linearly to the global batch when --lr is not given")
    g.add_argument("--momentum", type=cli.non_negative_float, default=0.9, help="SGD / RMSprop momentum")
    g.add_argument("--wd", "--weight-decay", type=cli.non_negative_float, default=1e-4,
                   help="weight decay of conv and linear weights")
    g.add_argument("--norm-weight-decay", type=cli.non_negative_float, default=0.0,
                   help="weight decay of norm layers and biases")
    g.add_argument("--lr-scheduler", default="multistep", type=cli.scheduler_name,
                   choices=["multistep", "step", "cosine", "poly"],
                   help="multistep: x gamma at --lr-steps; step: every --lr-step-size epochs; "
                        "cosine, poly: down to --min-lr (torchvision's steplr, multisteplr, cosineannealinglr too)")
    g.add_argument("--lr-steps", type=cli.positive_int, nargs="+", default=[30, 60, 90],
                   help="multistep: epochs where LR drops")
    g.add_argument("--lr-step-size", type=cli.positive_int, default=30, help="step: drop the LR every this many epochs")
    g.add_argument("--lr-gamma", type=cli.non_negative_float, default=0.1, help="LR factor at each drop")
    g.add_argument("--min-lr", "--lr-min", type=cli.non_negative_float, default=0.0, help="cosine, poly: final LR")
    g.add_argument("--warmup-epochs", "--lr-warmup-epochs", type=cli.non_negative_int, default=0,
                   help="linear warmup from 0.001 x LR (mmcls ResNet: none)")
    g.add_argument("--label-smoothing", type=cli.non_negative_float, default=0.0, help="cross-entropy label smoothing")
    g.add_argument("--clip-grad", "--clip-grad-norm", type=cli.non_negative_float, default=0.0,
                   help="clip the gradient norm to this (0: off)")
    g.add_argument("--accum-steps", type=cli.positive_int, default=1, help="micro-batches per optimizer step")
    g = p.add_argument_group("augmentation and input")
    g.add_argument("--auto-augment", choices=["ra", "ta_wide", "augmix", "imagenet"],
                   help="RandAugment, TrivialAugmentWide, AugMix or AutoAugment's ImageNet policy")
    g.add_argument("--random-erase", type=cli.non_negative_float, default=0.0, help="probability of random erasing")
    g.add_argument("--mixup-alpha", type=cli.non_negative_float, default=0.0,
                   help="MixUp's Beta(alpha, alpha) (0: off)")
    g.add_argument("--cutmix-alpha", type=cli.non_negative_float, default=0.0,
                   help="CutMix's Beta(alpha, alpha) (0: off)")
    g.add_argument("--train-crop-size", type=cli.positive_int,
                   help="default: the architecture's (224; EfficientNet its own)")
    g.add_argument("--val-resize-size", type=cli.positive_int, help="default: the architecture's (256)")
    g.add_argument("--val-crop-size", type=cli.positive_int, help="default: the architecture's (224)")
    g.add_argument("--interpolation", choices=["bilinear", "bicubic"], help="default: the architecture's")
    g.add_argument("--advprop", action="store_true",
                   help="EfficientNet: TF 'SAME' padding and [-1, 1] inputs, as the seed's B4 AA+AdvProp weights need")
    add_runtime_args(p, output_dir="output/cls")
    return p


def train_one_epoch(model, criterion, optimizer, scaler, loader, device, epoch: int, step: int, lr_of, args,
                    model_ema=None, *, start_batch: int = 0, mix=None, save) -> tuple[int, bool]:
    """One pass over `loader` from batch `start_batch` (a run resumed mid-epoch); returns (the global optimizer step
    reached, whether a stop signal ended the epoch early). `mix`: MixUp/CutMix on the device batch; `save(epoch=,
    batch=, step=)` writes a mid-epoch checkpoint when after_optimizer_step asks for one."""
    model.train()
    meters, finite = new_meters(), torch.ones((), dtype=torch.bool, device=device)
    optimizer.zero_grad(set_to_none=True)
    batches = log_every(loader, meters, print_freq=args.print_freq, header=f"Epoch [{epoch}]", device=device,
                        images_per_iter=args.batch_size * args.world_size, log_file=args.log_file,
                        tags={"mode": "train", "epoch": epoch}, start=start_batch, run_done=epoch * len(loader),
                        run_total=args.epochs * len(loader), tensorboard=args.tensorboard)
    ddp = isinstance(model, DistributedDataParallel)
    for i, (images, targets) in enumerate(batches, start=start_batch):
        images = images.to(device, non_blocking=True, memory_format=args.memory_format)
        targets = targets.to(device, non_blocking=True)
        if mix is not None:
            images, targets = mix(images, targets)  # targets become class probabilities [B, C]
        boundary = (i + 1) % args.accum_steps == 0
        # DDP: all-reduce gradients only on the micro-batch that ends an accumulation
        with model.no_sync() if ddp and not boundary else contextlib.nullcontext():
            with autocast(device, args.amp):
                loss = criterion(model(images), targets)
            scaler.scale(loss / args.accum_steps).backward()
        finite &= torch.isfinite(loss)
        meters["loss"].append(loss.detach())
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
    """Top-1 / top-5 accuracy (%) and mean loss over the whole validation set, each image counted once; images
    that --skip-bad-images dropped are counted apart, as "skipped"."""
    model.eval()
    skipped_before = data.skipped_images(loader.dataset)  # the counter lives on across evaluations
    totals = torch.zeros(5, device=device)  # [sum of losses, top-1 hits, top-5 hits, images, unreadable images]
    batches = log_every(loader, new_meters(), print_freq=args.print_freq, header=header, device=device,
                        images_per_iter=args.batch_size * args.world_size)
    for batch in batches:
        if batch is None:  # every image of this batch was unreadable (--skip-bad-images)
            continue
        images, targets = batch
        images = images.to(device, non_blocking=True, memory_format=args.memory_format)
        targets = targets.to(device, non_blocking=True)
        if args.compile:  # the full batch's graph, not one more for the last batch
            images = full_batch(images, args.batch_size)
        with autocast(device, args.amp):
            logits = model(images).float()[:len(targets)]
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]  # [B, 5]
        loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
        n = torch.tensor(len(targets), device=device)
        totals[:4] += torch.stack([loss, hits[:, 0].sum(), hits.any(dim=1).sum(), n])
    totals[4] = data.skipped_images(loader.dataset) - skipped_before
    loss, top1, top5, n, skipped = all_reduce_sum(totals).tolist()
    if skipped:
        print0(f"warning: {int(skipped)} unreadable validation images skipped")
    if n == 0:
        raise SystemExit("error: no readable validation image")
    stats = {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "images": int(n),
             "skipped": int(skipped)}
    print0(f"{header}: top-1 {stats['top1']:.3f}  top-5 {stats['top5']:.3f}  loss {stats['loss']:.4f}  "
           f"({int(n)} images)")
    return stats


def main(args: argparse.Namespace) -> None:
    device, rank = setup_runtime(args)

    synthetic = args.data_path is None
    train_crop, val_resize, val_crop, interpolation = data.default_sizes(args.arch, synthetic)
    interpolation = InterpolationMode(args.interpolation) if args.interpolation else interpolation
    mean, std = (ADVPROP_MEAN, ADVPROP_STD) if args.advprop else (data.IMAGENET_MEAN, data.IMAGENET_STD)
    train_tf = data.train_transform(args.train_crop_size or train_crop, interpolation, args.auto_augment,
                                    args.random_erase, mean, std)
    val_tf = data.eval_transform(args.val_resize_size or val_resize, args.val_crop_size or val_crop, interpolation,
                                 mean, std)
    try:
        train_set, val_set, classes = data.build_datasets(args.data_path, train_tf, val_tf,
                                                          skip_bad=args.skip_bad_images,
                                                          synthetic_size=args.synthetic_size, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:  # their messages name the folder
        raise SystemExit(f"error: {e}") from None
    train_loader, val_loader = data.build_loaders(
        train_set, val_set, batch_size=args.batch_size, workers=args.workers, rank=rank, world_size=args.world_size,
        seed=args.seed, pin_memory=device.type != "cpu")
    print0(f"{'synthetic shapes' if synthetic else args.data_path}: {len(train_set)} train / {len(val_set)} val "
           f"images, {len(classes)} classes")

    model = build_model(args.arch, num_classes=len(classes), **({"tf_same_padding": True} if args.advprop else {}))
    if args.weights:
        weights = ckpt.load_checkpoint(args.weights)
        ckpt.load_model_weights(model, to_our_names(args.arch, weights), source=args.weights,
                                holds=ckpt.describe(weights))
    model, model_without_ddp, model_ema = wrap_model(model, args, device)

    global_batch = args.batch_size * args.world_size * args.accum_steps
    if args.lr is None:
        args.lr = scaled_lr(args.blr, global_batch)
        print0(f"LR {args.lr:g} = --blr {args.blr} x global batch {global_batch} / 256 (linear scaling; --lr sets "
               "the LR itself)")
    else:
        print0(f"LR {args.lr:g} (--lr, as given), global batch {global_batch}")
    optimizer = build_optimizer(args.opt, model_without_ddp, args.lr, args.momentum, args.wd, args.norm_weight_decay)
    scaler = grad_scaler(device, args.amp)
    steps_per_epoch = len(train_loader) // args.accum_steps
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_set)} training images make no full step of {global_batch} images")
    drops = args.lr_steps if args.lr_scheduler == "multistep" else range(args.lr_step_size, args.epochs,
                                                                         args.lr_step_size)
    lr_of = epoch_schedule(base_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                           schedule="multistep" if args.lr_scheduler == "step" else args.lr_scheduler, lr_steps=drops,
                           gamma=args.lr_gamma, warmup_steps=args.warmup_epochs * steps_per_epoch, min_lr=args.min_lr)
    if args.warmup_epochs and args.warmup_epochs >= args.epochs:
        print0(f"warning: the warmup ({args.warmup_epochs} epochs) is as long as the whole run: the LR never reaches "
               f"{args.lr:g}; shorten it with --warmup-epochs N")
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    mix = data.mixup_cutmix(len(classes), args.mixup_alpha, args.cutmix_alpha)

    resumed = ckpt.restore_training_state(
        ckpt.load_resume(args.resume, args.output_dir, {"arch": args.arch}), model=model_without_ddp,
        optimizer=optimizer, scaler=scaler, model_ema=model_ema, rank=rank, world_size=args.world_size, device=device,
        start_epoch=args.start_epoch, steps_per_epoch=steps_per_epoch)
    step, best = resumed["step"], resumed["best_metric"]

    run_eval = partial(evaluate, loader=val_loader, device=device, args=args)
    if args.test_only:
        evaluate_and_log(run_eval, model, model_ema, args)
        cleanup()
        return

    def save(*, epoch: int, batch: int, step: int, is_best: bool = False) -> None:
        state = ckpt.training_state(model=model_without_ddp, optimizer=optimizer, scaler=scaler, model_ema=model_ema,
                                    epoch=epoch, batch=batch, step=step, best=best, args=args, device=device,
                                    extra={"arch": args.arch, "classes": classes})
        ckpt.save_checkpoint(state, args.output_dir, is_best=is_best, keep=args.keep)

    for epoch in range(resumed["epoch"], args.epochs):
        start = resumed["batch"] if epoch == resumed["epoch"] else 0
        set_epoch(train_loader, epoch, start)
        step, stopped = train_one_epoch(model, criterion, optimizer, scaler, train_loader, device, epoch, step, lr_of,
                                        args, model_ema, start_batch=start, mix=mix, save=save)
        if stopped:
            print0(stopped_message(args, step))
            break
        if hasattr(train_set, "skipped") and (skipped := int(all_reduce_sum(train_set.skipped).sum())):
            print0(f"warning: {skipped} unreadable training images skipped so far")
        is_best = False
        if (epoch + 1) % args.eval_interval == 0 or epoch + 1 == args.epochs:
            stats = evaluate_and_log(run_eval, model, model_ema, args, epoch=epoch, step=step)
            is_best, best = stats["top1"] > best, max(best, stats["top1"])
        save(epoch=epoch + 1, batch=0, step=step, is_best=is_best)
        if stop_requested():  # the signal came during evaluation: the epoch's checkpoint is written
            print0(stopped_message(args, step))
            break
    else:
        print0(f"done in {elapsed()}: best top-1 {best:.3f}; checkpoints in {args.output_dir}"
               + (f"; torch.compile made {graphs_compiled()} graphs" if args.compile else ""))
    cleanup()


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""One detection training step: ours eager, ours compiled, torchvision's twin (where one exists), against this
machine's roofline and the data loader that feeds it, and the share of our step spent in target assignment + loss.

  python -m det.bench --model ssd300 --device cpu --batch-size 2
  python -m det.bench --model retinanet_r50 --device cuda --batch-size 8 --img-size 800 --amp --json
  python -m det.bench --model all --no-compile       (every model of det.models.MODELS)
  python -m det.bench --decode        (only: PIL's JPEG decode against torchvision.io.decode_jpeg)

A step is forward, loss, backward and an SGD step on random images with `--num-gt` random objects each, on the
model's canvas (SOLOv2: with each box's inscribed ellipse as its mask). Every measurement runs in a fresh child
process, so peak memory (the device allocator's; on CPU the resident set) is our eager step's alone: our eager step,
our step compiled (common.compile.compile_model on the whole training forward, (images, targets) -> losses: network,
assignment and loss; the first, compiling step is timed apart as compile_s, then --warmup untimed steps), and the
twin's, alternating for --repeats rounds so that machine noise hits each alike; the medians of --iters steps per
child and then of the rounds are reported. "assignment + loss" is our loss function's forward and backward alone, on
fixed head outputs, timed in our eager child.
The twins: torchvision's ssd300_vgg16 (81 classes: the same network as mmdet's SSD300), retinanet_resnet50_fpn and
fcos_resnet50_fpn, both built in mmdet's style (frozen BatchNorm, stem and layer1 frozen; RetinaNet's P6 comes from
P5, so it is 4.1 M parameters lighter; FCOS's backbone is pytorch-style, its head has GN(16), centerness on the box
tower, GIoU loss and centre sampling), all with their internal resize turned off, as the images are already on the
canvas.

The loader is train_det.py's (det.data.build_datasets
and build_loaders with the recipe's preset at --img-size, YOLOX's MosaicMixUpDataset, common.cli.default_workers()
workers) over the synthetic set (96-192 px pictures: faster to read than COCO's) or --data-path, timed over
--loader-batches batches after its first.

--json prints one object per model per line, with the keys:
  model, batch_size, img_size, canvas [H, W], num_gt, num_classes, device, amp, channels_last, iters, warmup,
  repeats, loader_batches, data_path;
  loss_share: assignment + loss seconds / our eager step;
  loader_img_s, loader_workers, step_img_s (batch / our eager step);
  (and those every bench row has: see below)
"""
import argparse

import torch
from torch import nn

from common.bench import (
    SHARED_HELP,
    add_bench_args,
    bench_main,
    expand_models,
    loader_speed,
    measure_step,
    timed,
    train_step,
)
from common.cli import HelpFormatter, default_workers, positive_int
from common.device import autocast, resolve_device
from det import data
from det.masks import center_of_mass, downsample_masks
from det.models import MODELS, RECIPES, build_model
from det.presets import get_preset
from det.yolox_data import MosaicMixUpDataset

TWINS = ("ssd300", "retinanet_r50", "fcos_r50")
NOTES = ("targets: ours compiled <= 0.8x twin eager (comp/twin) or within 10 % of the roofline (comp roof % >= 90); "
         "ours eager <= 1.0x twin (eager/twin); assignment + loss <= 5 % of our eager step (loss %)")


def torchvision_twin(name: str, num_classes: int) -> nn.Module:
    from torchvision.models import resnet50
    from torchvision.models.detection import FCOS, retinanet, ssd300_vgg16
    from torchvision.ops import FrozenBatchNorm2d

    if name == "ssd300":
        model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes + 1)  # + background
    else:  # fcos_resnet50_fpn's and retinanet_resnet50_fpn's backbone with pretrained weights: 3 layers train
        backbone = retinanet._resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3, returned_layers=[2, 3, 4],
                                                   extra_blocks=retinanet.LastLevelP6P7(256, 256))
        model = (FCOS if name == "fcos_r50" else retinanet.RetinaNet)(backbone, num_classes)
    model.transform.resize = lambda image, target=None: (image, target)  # images arrive on the canvas
    return model


def random_batch(batch: int, height: int, width: int, num_gt: int, num_classes: int, device: torch.device,
                 mask_stride: int | None = None):
    """Random images and boxes; with `mask_stride` (SOLOv2) also each box's inscribed ellipse as its mask, in the
    batch format of det/data.py (masks at the stride, centres of mass at full resolution)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, height, width), generator=g, dtype=torch.uint8).float()
    xy = torch.rand(batch, num_gt, 2, generator=g) * torch.tensor([width, height]) * 0.7
    wh = (torch.rand(batch, num_gt, 2, generator=g) * 0.25 + 0.05) * torch.tensor([width, height])
    targets = {"boxes": torch.cat([xy, xy + wh], -1), "labels": torch.randint(0, num_classes, (batch, num_gt)),
               "valid": torch.ones(batch, num_gt, dtype=torch.bool),
               "image_size": torch.tensor([[height, width]]).repeat(batch, 1)}
    if mask_stride:
        centre, half = (xy + wh / 2)[..., None, None, :], (wh / 2)[..., None, None, :]  # [B, N, 1, 1, 2] (x, y)
        grid = torch.stack(torch.meshgrid(torch.arange(width) + 0.5, torch.arange(height) + 0.5, indexing="xy"), -1)
        masks = (((grid - centre) / half) ** 2).sum(-1) <= 1  # [B, N, H, W]
        targets |= {"masks": downsample_masks(masks, mask_stride), "mask_centers": center_of_mass(masks)}
    return images.to(device), {k: v.to(device) for k, v in targets.items()}


def loss_seconds(model: nn.Module, images: torch.Tensor, targets: dict, device: torch.device, amp: bool,
                 iters: int, warmup: int) -> float:
    """Median seconds of our assignment + loss, forward and backward, on fixed head outputs."""
    with autocast(device, amp):
        heads = model.head_outputs(images)
    for key, value in heads.items():  # the loss alone: leaves in place of the network's outputs
        if isinstance(value, torch.Tensor) and value.requires_grad:
            heads[key] = value.detach().float().requires_grad_()
    return timed(lambda: sum(model.loss(heads, targets).values()).backward(), iters, warmup, device)


def measure_loader(model: str, img_size: int, batch_size: int, loader_batches: int, data_path: str | None,
                   device: torch.device) -> dict:
    """Images/s of train_det.py's training loader (synthetic set, or COCO at `data_path`)."""
    preset, pictures = RECIPES[model]["preset"], max(64, batch_size * (loader_batches + 1))  # enough for the batches
    train, val = data.build_datasets(data_path, preset, img_size, synthetic_train=pictures, synthetic_val=16)
    if preset == "yolox":  # as train_det.py: mmdet's MultiImageMixDataset
        train = MosaicMixUpDataset(train, img_size)
    loader, _ = data.build_loaders(train, val, preset=preset, img_size=img_size, batch_size=batch_size,
                                   workers=default_workers(), rank=0, world_size=1, seed=0, max_gt=None,
                                   pin_memory=device.type != "cpu")
    return {"img_s": loader_speed(loader, loader_batches), "workers": default_workers()}


def measure(kind: str, model: str, device_name: str, batch_size: int, img_size: int, canvas: list[int], num_gt: int,
            num_classes: int, iters: int, warmup: int, amp: bool, channels_last: bool, loader_batches: int,
            data_path: str | None, flops: bool) -> dict:
    """One child's measurement: kind "ours" (also its assignment + loss), "compiled", "twin" (see
    common.bench.measure_step) or "loader"."""
    device = resolve_device(device_name)
    if kind == "loader":
        return measure_loader(model, img_size, batch_size, loader_batches, data_path, device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images, targets = random_batch(batch_size, *canvas, num_gt, num_classes, device,
                                   get_preset(RECIPES[model]["preset"]).get("mask_stride"))
    images = images.contiguous(memory_format=fmt)
    torch.manual_seed(0)
    if kind == "twin":
        net = torchvision_twin(model, num_classes).to(device, memory_format=fmt).train()
        tv_targets = [{"boxes": b, "labels": lab + (model == "ssd300")}  # SSD: label 0 is torchvision's background
                      for b, lab in zip(targets["boxes"], targets["labels"], strict=True)]
        step = train_step(net, lambda: sum(net(list(images), tv_targets).values()), device, amp, lr=1e-4)
    else:
        net = build_model(model, num_classes).to(device, memory_format=fmt).train()
        step = train_step(net, lambda: sum(net(images, targets).values()), device, amp, lr=1e-4)
    out = measure_step(kind, net, step, device, iters=iters, warmup=warmup, flops=flops)
    if kind == "ours":
        out["loss_s"] = loss_seconds(net, images, targets, device, amp, iters, warmup)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__ + SHARED_HELP, formatter_class=HelpFormatter)
    p.add_argument("--model", nargs="+", default=["ssd300"], choices=[*MODELS, "all"], metavar="MODEL",
                   help="one or more of: " + ", ".join(MODELS) + "; or all")
    p.add_argument("--img-size", type=positive_int, help="canvas (default: the recipe's; RetinaNet: the short side)")
    p.add_argument("--num-gt", type=positive_int, default=8,
                   help="objects per image (padded targets hold exactly these)")
    p.add_argument("--num-classes", type=positive_int, default=80, help="COCO's")
    p.add_argument("--data-path", help="a COCO folder whose training loader is timed (default: the synthetic set)")
    add_bench_args(p, batch_size=2)
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)

    def settings_of(model: str) -> dict:
        recipe = RECIPES[model]
        img_size = args.img_size or recipe["img_size"]
        return dict(model=model, device_name=args.device, batch_size=args.batch_size, img_size=img_size,
                    canvas=get_preset(recipe["preset"])["canvas_size"](img_size, True), num_gt=args.num_gt,
                    num_classes=args.num_classes, iters=args.iters, warmup=args.warmup, amp=args.amp,
                    channels_last=args.channels_last, loader_batches=args.loader_batches, data_path=args.data_path)

    bench_main("det.bench", args, expand_models(args.model, tuple(MODELS)), settings_of, lambda m: m in TWINS,
               measure, NOTES)


if __name__ == "__main__":
    main()

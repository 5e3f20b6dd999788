"""One detection training step, ours against torchvision's twin in the same run (where one exists), and the share of
ours spent in target assignment + loss.

  python -m det.bench --model ssd300 --device cpu --batch-size 2
  python -m det.bench --model retinanet_r50 --device cuda --batch-size 8 --img-size 800 --amp
  python -m det.bench --model yolov3_d53 --img-size 320   (no twin: our step and its loss share)

A step is forward, loss, backward and an SGD step on random images with `--num-gt` random objects each, on the
model's canvas (SOLOv2: with each box's inscribed ellipse as its mask). "assignment + loss" is our loss function's
forward and backward alone, on fixed head outputs. Peak memory is read after our first round, before the twin runs.
The twins: torchvision's ssd300_vgg16 (81 classes: the same network as mmdet's SSD300), retinanet_resnet50_fpn and
fcos_resnet50_fpn, both built in mmdet's style (frozen BatchNorm, stem and layer1 frozen; RetinaNet's P6 comes from
P5, so it is 4.1 M parameters lighter; FCOS's backbone is pytorch-style, its head has GN(16), centerness on the box
tower, GIoU loss and centre sampling), all with their internal resize turned off, as the images are already on the
canvas.
"""
import argparse
import statistics
import time

import torch
from torch import nn

from common.device import autocast, grad_scaler, max_memory_mb, resolve_device, synchronize
from det.masks import center_of_mass, downsample_masks
from det.models import MODELS, RECIPES, build_model
from det.presets import get_preset

TWINS = ("ssd300", "retinanet_r50", "fcos_r50")


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


def timed(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `iters` calls, after `warmup` untimed ones."""
    times = []
    for i in range(warmup + iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ssd300", choices=MODELS)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--img-size", type=int, help="canvas (default: the recipe's; RetinaNet: the short side)")
    p.add_argument("--num-gt", type=int, default=8, help="objects per image (padded targets hold exactly these)")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of ours / torchvision")
    p.add_argument("--amp", action="store_true")
    args = p.parse_args()

    device = resolve_device(args.device)
    recipe = RECIPES[args.model]
    preset = get_preset(recipe["preset"])
    height, width = preset["canvas_size"](args.img_size or recipe["img_size"], True)
    images, targets = random_batch(args.batch_size, height, width, args.num_gt, args.num_classes, device,
                                   preset.get("mask_stride"))
    tv_targets = [{"boxes": b, "labels": lab + (args.model == "ssd300")}  # SSD: label 0 is torchvision's background
                  for b, lab in zip(targets["boxes"], targets["labels"], strict=True)]
    torch.manual_seed(0)
    ours = build_model(args.model, args.num_classes).to(device).train()
    theirs = torchvision_twin(args.model, args.num_classes).to(device).train() if args.model in TWINS else None
    scaler = grad_scaler(device, args.amp)

    def step(model: nn.Module, optimizer: torch.optim.Optimizer, run) -> None:
        with autocast(device, args.amp):
            loss = sum(run().values())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    opt_ours = torch.optim.SGD([q for q in ours.parameters() if q.requires_grad], lr=1e-4, momentum=0.9)
    opt_theirs = (None if theirs is None else
                  torch.optim.SGD([q for q in theirs.parameters() if q.requires_grad], lr=1e-4, momentum=0.9))
    with autocast(device, args.amp):
        heads = ours.head_outputs(images)
    for key, value in heads.items():  # the loss alone: leaves in place of the network's outputs
        if isinstance(value, torch.Tensor) and value.requires_grad:
            heads[key] = value.detach().float().requires_grad_()

    def loss_only() -> None:
        sum(ours.loss(heads, targets).values()).backward()

    runs = {"ours": [], "torchvision": [], "loss": []}
    for repeat in range(args.repeats):
        runs["ours"].append(timed(lambda: step(ours, opt_ours, lambda: ours(images, targets)), args.iters,
                                  args.warmup, device))
        if repeat == 0:  # before the twin has run a step
            peak_mb = max_memory_mb(device)
        if theirs is not None:
            runs["torchvision"].append(timed(lambda: step(theirs, opt_theirs,
                                                          lambda: theirs(list(images), tv_targets)),
                                             args.iters, args.warmup, device))
        runs["loss"].append(timed(loss_only, args.iters, args.warmup, device))
    ours_s, loss_s = statistics.median(runs["ours"]), statistics.median(runs["loss"])
    print(f"{args.model}  device {device}  batch {args.batch_size}  canvas {height}x{width}  {args.num_gt} objects "
          f"per image  amp {args.amp}  (median of {args.repeats} rounds x {args.iters} steps)")
    print(f"  ours         step {ours_s:8.4f} s  (network forward/backward {ours_s - loss_s:.4f} s, "
          f"assignment + loss {loss_s:.4f} s)")
    where = "the device allocator's"
    if device.type == "cpu":
        where = "the process's resident set" + (", with the twin's weights" if theirs is not None else "")
    print(f"  ours         peak memory {peak_mb:.0f} MB after our first round ({where})")
    if theirs is not None:
        tv_s = statistics.median(runs["torchvision"])
        print(f"  torchvision  step {tv_s:8.4f} s")
        print(f"  ratio ours/torchvision step: {ours_s / tv_s:.3f} (target <= 1.0)")
    print(f"  assignment + loss: {100 * loss_s / ours_s:.1f} % of our step (target <= 5 %)")


if __name__ == "__main__":
    main()

"""Training throughput of our classifiers: eager, compiled, against torchvision's twin, against this machine's roofline,
and against the data loader that feeds them.

  python -m cls.bench --model resnet50 --device cpu --batch-size 8
  python -m cls.bench --model all --device cuda --batch-size 128 --amp --channels-last --json
  python -m cls.bench --decode        (only: PIL's JPEG decode against torchvision.io.decode_jpeg)

A step is forward, cross-entropy, backward and an SGD step on random images. Every measurement runs in a fresh child
process, so peak memory (the device allocator's; on CPU the resident set) belongs to one model: our eager step, our
step compiled (common.compile.compile_model: inductor; the first, compiling step is timed apart as compile_s, then
--warmup untimed steps), and torchvision's twin (torchvision.models.get_model; only for the models in
cls.models.TORCHVISION_TWINS), alternating for --repeats rounds so that machine noise hits each alike; the medians of
--iters steps per child and then of the rounds are reported. `--model all` is the 12 seed classifiers and
efficientnet_b0; any name of cls.models.MODELS works.

The loader is train_cls.py's for --data-path (ImageFolder,
the recipe's training transforms, common.cli.default_workers() workers) over a temporary folder of 500 x 375 JPEGs
(or --data-path), timed over --loader-batches batches after its first.

--json prints one object per model per line, with the keys:
  model, batch_size, image_size, device, amp, channels_last, iters, warmup, repeats, loader_batches, data_path;
  loader_img_s, loader_workers, step_img_s (batch / our eager step); loss_share: null (det.bench's);
  (and those every bench row has: see below)
"""
import argparse
import tempfile
from pathlib import Path

import torch
import torchvision
from torch import nn

from cls import data
from cls.models import MODELS, TORCHVISION_TWINS, build_model
from common.bench import (
    SHARED_HELP,
    add_bench_args,
    bench_main,
    expand_models,
    loader_speed,
    measure_step,
    train_step,
    write_jpegs,
)
from common.cli import HelpFormatter, default_workers, positive_int
from common.device import resolve_device

SEED_MODELS = ("resnet50", "resnext50_32x4d", "hrnet_w18", "resnetv1d152", "seresnet50", "vgg11", "shufflenet_v2_x1_0",
               "mobilenet_v2", "mobilenet_v3_small", "cspresnext50", "efficientnet_b4", "densenet121",
               "efficientnet_b0")  # the 12 seed classifiers, and the B0 that the speed targets name
NOTES = ("targets: ours compiled <= 0.85x twin eager (comp/twin), or within 10 % of the roofline (comp roof % >= 90); "
         "twin: torchvision.models.get_model of the same name")


def measure_loader(model: str, image_size: int, batch_size: int, loader_batches: int, data_path: str | None,
                   device: torch.device) -> dict:
    """Images/s of train_cls.py's training loader for --data-path `data_path`; without one, over 2 class folders
    of 500 x 375 JPEGs (ImageNet's typical picture) written to a temporary folder."""
    _, val_resize, val_crop, interpolation = data.default_sizes(model, synthetic=False)
    train_tf = data.train_transform(image_size, interpolation)
    val_tf = data.eval_transform(val_resize, val_crop, interpolation)
    with tempfile.TemporaryDirectory() as tmp:
        if data_path is None:
            data_path, count = tmp, batch_size * (loader_batches + 1)
            for label in range(2):
                write_jpegs(Path(tmp) / "train" / f"class_{label}", (count + 1) // 2, 500, 375)
            (Path(tmp) / "val").symlink_to(Path(tmp) / "train")
        train, val, _ = data.build_datasets(data_path, train_tf, val_tf)
        loader, _ = data.build_loaders(train, val, batch_size=batch_size, workers=default_workers(), rank=0,
                                       world_size=1, seed=0, pin_memory=device.type != "cpu")
        return {"img_s": loader_speed(loader, loader_batches), "workers": default_workers()}


def measure(kind: str, model: str, device_name: str, batch_size: int, image_size: int, iters: int, warmup: int,
            amp: bool, channels_last: bool, loader_batches: int, data_path: str | None, flops: bool) -> dict:
    """One child's measurement: kind "ours", "compiled", "twin" (see common.bench.measure_step) or "loader"."""
    device = resolve_device(device_name)
    if kind == "loader":
        return measure_loader(model, image_size, batch_size, loader_batches, data_path, device)
    torch.manual_seed(0)
    net = torchvision.models.get_model(model) if kind == "twin" else build_model(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net.to(device, memory_format=fmt).train()
    images = torch.randn(batch_size, 3, image_size, image_size, device=device).to(memory_format=fmt)
    targets = torch.randint(0, 1000, (batch_size,), device=device)
    step = train_step(net, lambda: nn.functional.cross_entropy(net(images), targets), device, amp, lr=0.01)
    return measure_step(kind, net, step, device, iters=iters, warmup=warmup, flops=flops)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__ + SHARED_HELP, formatter_class=HelpFormatter)
    p.add_argument("--model", "--arch", nargs="+", default=["resnet50"], choices=[*MODELS, "all"], metavar="MODEL",
                   help="one or more of cls.models.MODELS, or all: " + ", ".join(SEED_MODELS))
    p.add_argument("--image-size", type=positive_int,
                   help="square training crop (default: the recipe's, 224; EfficientNet its own, B4: 380)")
    p.add_argument("--data-path", help="an ImageNet-layout folder whose training loader is timed (default: a "
                                       "temporary folder of 500 x 375 JPEGs)")
    add_bench_args(p, batch_size=16)
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)

    def settings_of(model: str) -> dict:
        return dict(model=model, device_name=args.device, batch_size=args.batch_size,
                    image_size=args.image_size or data.default_sizes(model, synthetic=False)[0], iters=args.iters,
                    warmup=args.warmup, amp=args.amp, channels_last=args.channels_last,
                    loader_batches=args.loader_batches, data_path=args.data_path)

    bench_main("cls.bench", args, expand_models(args.model, SEED_MODELS), settings_of,
               lambda model: model in TORCHVISION_TWINS, measure, NOTES)


if __name__ == "__main__":
    main()

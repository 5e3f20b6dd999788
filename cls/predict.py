"""Classify pictures with a trained checkpoint: print the most likely classes with their probabilities.

  python -m cls.predict --weights output/cls/best.pth cat.jpg dog.png --topk 5

The checkpoint (written by train_cls.py) names its architecture, input sizes and classes, so no data set is
needed. A picture that cannot be read is reported on stderr and skipped; the exit code is then 1.
"""
import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from cls import data
from cls.models import build_model
from cls.models.efficientnet import ADVPROP_MEAN, ADVPROP_STD
from common.checkpoint import load_checkpoint
from common.device import resolve_device
from common.images import to_rgb


def _top_classes(model: torch.nn.Module, images: torch.Tensor, classes: list[str],
                 k: int) -> list[list[tuple[str, float]]]:
    """Per image of `images` [B, 3, H, W] (normalised, on the model's device): its k likeliest
    [(class name, probability), ...], most likely first."""
    with torch.no_grad():
        probs = model(images).float().softmax(dim=1)  # [B, num_classes]
    top = probs.topk(min(k, len(classes)), dim=1)
    return [[(classes[i], p) for p, i in zip(ps, ids, strict=True)]
            for ps, ids in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def load(weights: str) -> tuple[torch.nn.Module, list[str], v2.Compose]:
    """(model in eval mode on CPU, class names, the validation transform) as train_cls.py built them."""
    state = load_checkpoint(weights)
    extra, args = state.get("extra") or {}, state.get("args") or {}
    arch = extra.get("arch") or args.get("arch")
    if arch is None or not extra.get("classes"):
        raise SystemExit(f"error: {weights} has no architecture or class names: pass a checkpoint of train_cls.py")
    classes = extra["classes"]
    _, resize, crop, interpolation = data.default_sizes(arch, synthetic=args.get("data_path") is None)
    if args.get("interpolation"):
        interpolation = InterpolationMode(args["interpolation"])
    advprop = bool(args.get("advprop"))
    mean, std = (ADVPROP_MEAN, ADVPROP_STD) if advprop else (data.IMAGENET_MEAN, data.IMAGENET_STD)
    transform = data.eval_transform(args.get("val_resize_size") or resize, args.get("val_crop_size") or crop,
                                    interpolation, mean, std)
    model = build_model(arch, num_classes=len(classes), **({"tf_same_padding": True} if advprop else {}))
    model.load_state_dict(state["model"])
    return model.eval(), classes, transform


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="picture files")
    p.add_argument("--weights", required=True, help="a checkpoint written by train_cls.py")
    p.add_argument("--topk", type=int, default=5, help="print this many classes per picture")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    device = resolve_device(args.device)
    model, classes, transform = load(args.weights)
    model.to(device)
    failed = 0
    for path in map(Path, args.images):
        try:
            with Image.open(path) as image:
                pixels = transform(to_rgb(image))  # [3, H, W]
        except (OSError, SyntaxError, ValueError) as e:  # missing, corrupt or truncated: what PIL raises
            print(f"error: cannot read image {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}:")
        for name, prob in _top_classes(model, pixels[None].to(device), classes, args.topk)[0]:
            print(f"  {name:<20} {prob:.4f}")
    if failed:
        print(f"{failed} of {len(args.images)} picture(s) could not be read", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

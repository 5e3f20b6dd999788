"""Classify pictures with a trained checkpoint: print the most likely classes with their probabilities.

  python -m cls.predict --weights output/cls/best.pth cat.jpg dog.png --topk 5

The checkpoint (written by train_cls.py) names its architecture, input sizes and classes, so no data set is
needed. A picture that cannot be read is reported on stderr and skipped; the exit code is then 1.

In Python: `model = load("output/cls/best.pth")`, then `classify(model, "cat.jpg")` -> [{"class", "label", "score"},
...] (also for PIL images, tensors and lists of them).
"""
import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from cls import data
from cls.models import build_model
from cls.models.efficientnet import ADVPROP_MEAN, ADVPROP_STD
from common.checkpoint import load_checkpoint, state_dict_of
from common.device import resolve_device
from common.images import to_rgb


def _top_classes(model: torch.nn.Module, images: torch.Tensor, classes: list[str], k: int) -> list[list[dict]]:
    """Per image of `images` [B, 3, H, W] (normalised, on the model's device): its k likeliest classes
    [{"class": name, "label": int, "score": probability}, ...], most likely first."""
    with torch.no_grad():
        probs = model(images).float().softmax(dim=1)  # [B, num_classes]
    top = probs.topk(min(k, len(classes)), dim=1)
    return [[{"class": classes[i], "label": i, "score": p} for p, i in zip(ps, ids, strict=True)]
            for ps, ids in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def load(weights: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The classifier of a train_cls.py checkpoint, in eval mode on `device`, carrying `model.predict_info` =
    {"arch": name, "classes": [names], "transform": the validation transform train_cls.py built (PIL image or
    [3, H, W] uint8 / float 0-1 tensor -> normalised float [3, h, w])}: all `classify` needs. A ValueError in one
    sentence for other files."""
    state = load_checkpoint(weights)
    extra, args = state.get("extra") or {}, state.get("args") or {}
    arch = extra.get("arch") or args.get("arch")
    if arch is None or not extra.get("classes"):
        raise ValueError(f"{weights} has no architecture or class names: pass a checkpoint of train_cls.py")
    _, resize, crop, interpolation = data.default_sizes(arch, synthetic=args.get("data_path") is None)
    if args.get("interpolation"):
        interpolation = InterpolationMode(args["interpolation"])
    advprop = bool(args.get("advprop"))
    mean, std = (ADVPROP_MEAN, ADVPROP_STD) if advprop else (data.IMAGENET_MEAN, data.IMAGENET_STD)
    transform = data.eval_transform(args.get("val_resize_size") or resize, args.get("val_crop_size") or crop,
                                    interpolation, mean, std)
    model = build_model(arch, num_classes=len(extra["classes"]), **({"tf_same_padding": True} if advprop else {}))
    model.load_state_dict(state_dict_of(state))
    model.predict_info = {"arch": arch, "classes": list(extra["classes"]), "transform": transform}
    return model.to(device).eval()


def _pixels(image) -> torch.Tensor | Image.Image:
    """A PIL image, a file path or a [3, H, W] tensor as what the validation transform takes."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return to_rgb(opened)  # decodes: an unreadable file raises here (OSError, SyntaxError, ValueError)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be [3, H, W] or [B, 3, H, W] (RGB), not {list(image.shape)}")
        if image.is_floating_point() and image.numel() and image.max().item() > 1 + 1e-3:
            raise ValueError("float image tensors are 0-1 (torchvision's convention), this one reaches "
                             f"{image.max().item():.4g}: divide it by 255 or pass it as uint8")
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise ValueError(f"an image tensor must be uint8 (0-255) or float (0-1), not {image.dtype}")
        return image.detach().cpu()
    raise TypeError(f"cannot classify a {type(image).__name__}: pass a PIL image, a file path, "
                    "a [3, H, W] / [B, 3, H, W] tensor or a list of these")


def classify(model: torch.nn.Module, images, *, topk: int = 5) -> list[dict] | list[list[dict]]:
    """The `topk` likeliest classes of `images`: a PIL image, a file path (str or Path), a tensor [3, H, W] or
    [B, 3, H, W] (RGB, uint8 0-255 or float 0-1 as torchvision's float images), or a list of any of these.

    `model` comes from `load` (it carries `model.predict_info`: class names and the validation transform, applied to
    each picture as in training's evaluation). Returns for one picture its list, for a list or a batch one list per
    picture, of {"class": name, "label": int, "score": softmax probability}, most likely first.
    """
    info = getattr(model, "predict_info", None)
    if info is None:
        raise ValueError("this model has no predict_info (classes, transform): load it with "
                         "cls.predict.load(weights)")
    if model.training:
        raise ValueError("the model is in training mode: call model.eval() before classify")
    single = not isinstance(images, (list, tuple)) and not (isinstance(images, torch.Tensor) and images.dim() == 4)
    items = []
    for item in [images] if single else images:  # a [B, 3, H, W] tensor, alone or in a list, is B pictures
        items.extend(item if isinstance(item, torch.Tensor) and item.dim() == 4 else [item])
    if not items:
        return []
    batch = torch.stack([info["transform"](_pixels(x)) for x in items])  # [B, 3, h, w]
    top = _top_classes(model, batch.to(next(model.parameters()).device), info["classes"], topk)
    return top[0] if single else top


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="picture files")
    p.add_argument("--weights", required=True, help="a checkpoint written by train_cls.py")
    p.add_argument("--topk", type=int, default=5, help="print this many classes per picture")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    try:
        model = load(args.weights, resolve_device(args.device))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    failed = 0
    for path in map(Path, args.images):
        try:
            top = classify(model, path, topk=args.topk)
        except (OSError, SyntaxError, ValueError) as e:  # missing, corrupt or truncated: what PIL raises
            print(f"error: cannot read image {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}:")
        for row in top:
            print(f"  {row['class']:<20} {row['score']:.4f}")
    if failed:
        print(f"{failed} of {len(args.images)} picture(s) could not be read", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

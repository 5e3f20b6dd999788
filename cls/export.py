"""Export a classifier to one file of static shapes: ONNX (ONNX Runtime, Ascend's ATC) or torch.export's .pt2.

  python -m cls.export --weights output/cls/best.pth --out classifier.onnx
  python -m cls.export --model resnet50 --batch-size 8 --out resnet50.pt2     # random weights: to try a runtime

The file's input: images float32 [B, 3, S, S], normalised as cls.predict prepares a picture:
`cls.predict.load(weights).predict_info["transform"](picture)` (resize the short side, centre-crop S, 0-1, minus the
mean over the std of the checkpoint's recipe: ImageNet's, AdvProp's for --advprop). Its output: logits float32
[B, num_classes] in the checkpoint's class order (softmax them for probabilities). After writing, the command runs
the file (torch.export.load, or ONNX Runtime when it is installed) and the eager model on a random input and prints
the largest difference.
"""
import argparse
import sys

import torch
from torch import Tensor, nn

from cls import data, predict
from cls.models import MODELS, build_model
from common.cli import HelpFormatter, positive_int
from common.export import add_export_args, export_and_check


class Logits(nn.Module):
    """A classifier as its exported file runs: images -> {"logits": [B, num_classes]}, so the output has a name."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return {"logits": self.model(images)}


def load_classifier(weights: str | None, arch: str | None, num_classes: int) -> tuple[nn.Module, str, int]:
    """(model in eval mode on the CPU, its architecture, the side of its validation crop): a train_cls.py
    checkpoint's, or without `weights` `arch` with random weights at its recipe's crop (224; EfficientNet its own)."""
    if weights is not None:
        model = predict.load(weights)
        picture = torch.zeros(3, 64, 64, dtype=torch.uint8)  # the transform's resize + crop give its input side
        return model, model.predict_info["arch"], model.predict_info["transform"](picture).shape[-1]
    return build_model(arch, num_classes=num_classes).eval(), arch, data.default_sizes(arch, synthetic=False)[2]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m cls.export", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--weights", help="a checkpoint written by train_cls.py (it names its architecture, sizes and "
                                     "classes)")
    p.add_argument("--model", "--arch", choices=list(MODELS), metavar="ARCH",
                   help="without --weights: this architecture with random weights (a warning says so), one of "
                        f"{', '.join(MODELS)}")
    p.add_argument("--img-size", type=positive_int,
                   help="input side S (default: the checkpoint's validation crop, else the recipe's)")
    p.add_argument("--num-classes", type=positive_int, default=1000, help="classes of a random-weight model")
    add_export_args(p)
    args = p.parse_args()
    if args.weights is None and args.model is None:
        p.error("give --weights (a train_cls.py checkpoint) or --model (random weights)")
    if args.weights is not None and args.model is not None:
        p.error("--model is for random weights: a train_cls.py checkpoint names its own architecture")

    try:
        model, arch, side = load_classifier(args.weights, args.model, args.num_classes)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.weights is None:
        print(f"warning: no --weights: exporting {arch} with random weights", file=sys.stderr)
    side = args.img_size or side
    print(f"exporting {arch}: images [{args.batch_size}, 3, {side}, {side}] float32, normalised")
    inputs, check = ({"images": torch.randn(args.batch_size, 3, side, side, generator=torch.Generator().manual_seed(s))}
                     for s in (0, 1))
    print(export_and_check(Logits(model), inputs, check, args.out, opset=args.opset))


if __name__ == "__main__":
    main()

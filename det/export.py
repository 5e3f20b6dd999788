"""Export a detector, decoding and NMS included, to one file of static shapes: ONNX (ONNX Runtime, Ascend's ATC) or
torch.export's .pt2.

  python -m det.export --weights output/det/best.pth --out detector.onnx
  python -m det.export --weights output/det/best.pth --batch-size 8 --out detector.pt2
  python -m det.export --model yolox_s --img-size 320 --out yolox_s.onnx     # random weights: to try a runtime

The file's inputs, in this order:
  images      float32 [B, 3, H, W]: RGB 0-255 on the canvas H x W (printed; the preset's eval canvas for the
              checkpoint's img_size). Make it as det.predict does: resize the picture with the preset's eval transform,
              det.presets.get_preset(preset)["eval_transforms"](img_size), and paste it at the top left of a canvas
              filled with the preset's "fill" colour (det.data.collate(..., evaluation=True) does both). The model
              normalises it itself.
  image_size  int64 [B, 2]: (h, w) of each picture on the canvas; boxes are clipped to it.
Its outputs, by name: boxes float32 [B, K, 4] (x1, y1, x2, y2 in canvas pixels: divide by the resize's scale for the
picture's), scores float32 [B, K], labels int64 [B, K] (0..C-1 in the checkpoint's class order), valid bool [B, K];
SOLOv2 also masks float32 [B, K, H/4, W/4] (soft masks at stride 4, as det/masks.py pastes them). Rows are sorted by
score and padding rows (valid False) are all zeros. K is the model's detections per image (100; SSD 200, YOLOX 1000).

RetinaNet-style presets (retinanet, fcos, solov2) have a landscape and a portrait canvas: export each orientation to
its own file (--portrait). After writing, the command runs the file (torch.export.load, or ONNX Runtime when it is
installed) and the eager model on a random input and prints the largest difference of each output.
"""
import argparse
import sys

import torch
from torch import Tensor, nn

from common.cli import HelpFormatter, positive_int
from common.export import add_export_args, export_and_check
from det import predict
from det.models import MODELS, RECIPES, build_model
from det.presets import get_preset


class CanvasDetector(nn.Module):
    """A detector as its exported file runs: (images, image_size) positionally, padding rows zeroed. Their boxes and
    labels are otherwise whatever the final top-k picks among equal -inf scores, which differs between runtimes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, image_size: Tensor) -> dict[str, Tensor]:
        out = self.model(images, image_size=image_size)
        valid = out["valid"]  # [B, K]
        return {k: v if k == "valid" else v.masked_fill(~valid.view(valid.shape + (1,) * (v.dim() - 2)), 0)
                for k, v in out.items()}


def canvas_size(model_name: str, img_size: int, portrait: bool = False) -> tuple[int, int]:
    """(H, W) of the evaluation canvas of `model_name` at `img_size`, as det/data.py's evaluation batches have it."""
    preset = get_preset(RECIPES[model_name]["preset"])
    return preset.get("eval_canvas_size", preset["canvas_size"])(img_size, not portrait)


def random_inputs(canvas: tuple[int, int], batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
    """{"images": float32 [B, 3, H, W] random 0-255, "image_size": int64 [B, 2] from half the canvas to all of it}."""
    h, w = canvas
    images = torch.rand(batch_size, 3, h, w, generator=generator) * 255
    image_size = torch.stack([torch.randint(h // 2, h + 1, (batch_size,), generator=generator),
                              torch.randint(w // 2, w + 1, (batch_size,), generator=generator)], dim=1)
    return {"images": images, "image_size": image_size}


def load_detector(weights: str | None, model_name: str | None, img_size: int | None,
                  num_classes: int) -> tuple[nn.Module, str, int]:
    """(model in eval mode on the CPU, its name, its img_size): a train_det.py checkpoint's (`model_name` and
    `img_size` override its own, as in det.predict), or without `weights` `model_name` with random weights."""
    if weights is not None:
        model = predict.load(weights, model_name=model_name, img_size=img_size)
        return model, model.predict_info["model"], model.predict_info["img_size"]
    model = build_model(model_name, num_classes=num_classes).eval()
    return model, model_name, img_size or RECIPES[model_name]["img_size"]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m det.export", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--weights", help="a checkpoint written by train_det.py (it names its model, canvas and classes)")
    p.add_argument("--model", choices=list(MODELS), metavar="MODEL",
                   help="the checkpoint's detector (default: its own name) or, without --weights, this one with "
                        f"random weights (a warning says so): one of {', '.join(MODELS)}")
    p.add_argument("--img-size", type=positive_int, help="canvas as train_det.py's --img-size (default: the "
                                                         "checkpoint's, else the recipe's)")
    p.add_argument("--portrait", action="store_true", help="the portrait canvas instead of the landscape one")
    p.add_argument("--num-classes", type=positive_int, default=80, help="classes of a random-weight model")
    add_export_args(p)
    args = p.parse_args()
    if args.weights is None and args.model is None:
        p.error("give --weights (a train_det.py checkpoint) or --model (random weights)")

    try:
        model, name, img_size = load_detector(args.weights, args.model, args.img_size, args.num_classes)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if img_size < RECIPES[name].get("min_img_size", 1):
        raise SystemExit(f"error: {name}'s layers need --img-size {RECIPES[name]['min_img_size']} or more")
    if args.weights is None:
        print(f"warning: no --weights: exporting {name} with random weights", file=sys.stderr)
    canvas = canvas_size(name, img_size, args.portrait)
    print(f"exporting {name}: images [{args.batch_size}, 3, {canvas[0]}, {canvas[1]}] float32 0-255, "
          f"image_size [{args.batch_size}, 2] int64")
    inputs, check = (random_inputs(canvas, args.batch_size, torch.Generator().manual_seed(s)) for s in (0, 1))
    print(export_and_check(CanvasDetector(model), inputs, check, args.out, opset=args.opset))


if __name__ == "__main__":
    main()

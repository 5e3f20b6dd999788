"""Detect objects in pictures with a trained checkpoint: draw boxes, class names and scores, and print them.

  python -m det.predict --weights output/det/best.pth street.jpg dog.jpg --out predictions/

The checkpoint (written by train_det.py) names its model, canvas and classes, so no data set is needed.
A picture that is missing or unreadable gets one line on stderr and the rest are still done; the exit status is
then 1. Inputs with the same name from different folders (a/x.jpg, b/x.jpg) are drawn to x.png, x_1.png, ...
"""
import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from common.checkpoint import load_checkpoint
from common.device import resolve_device
from common.images import to_rgb
from det import data
from det.eval import to_coco_results
from det.models import RECIPES, build_model
from det.presets import get_preset

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def detect(model: torch.nn.Module, image: Image.Image, *, preset: str, img_size: int, num_classes: int,
           device: torch.device) -> list[dict]:
    """Detections of one picture in its own pixel coordinates: [{"bbox": [x, y, w, h], "score", "label"}, ...]."""
    pixels = tv_tensors.Image(F.pil_to_tensor(to_rgb(image)))
    no_boxes = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=pixels.shape[-2:]),
                "labels": torch.zeros(0, dtype=torch.int64)}
    pixels, _ = get_preset(preset)["eval_transforms"](img_size)(pixels, no_boxes)
    h0, w0 = image.height, image.width
    meta = {"image_id": 0, "file_name": "", "orig_size": (h0, w0),
            "scale": (pixels.shape[-2] / h0, pixels.shape[-1] / w0)}
    images, targets, metas = data.collate([(pixels, no_boxes, meta)], max_gt=None, preset=preset, img_size=img_size)
    with torch.no_grad():
        out = model(images.to(device), image_size=targets["image_size"].to(device))
    out = {k: v.cpu() for k, v in out.items()}
    identity = list(range(num_classes))  # keep contiguous labels as the "category ids"
    results = to_coco_results(out["boxes"], out["scores"], out["labels"], out["valid"], metas, identity)
    return [{"bbox": r["bbox"], "score": r["score"], "label": r["category_id"]} for r in results]


def read_picture(path: Path) -> Image.Image:
    """The picture at `path`, decoded; a ValueError that names the file and says why when it cannot be."""
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a picture")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not halfway through drawing
            return image.copy()
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not a picture PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for corrupt or truncated files
        raise ValueError(f"cannot read {path}: {e}") from e


def unique_stem(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem_1`, `stem_2`, ... when an earlier input already took it; the result joins `taken`."""
    name, k = stem, 0
    while name in taken:
        k += 1
        name = f"{stem}_{k}"
    taken.add(name)
    return name


def draw(image: Image.Image, detections: list[dict], classes: list[str]) -> Image.Image:
    """The picture with one coloured rectangle and a "name score" tag per detection."""
    image = to_rgb(image)
    canvas = ImageDraw.Draw(image)
    for det in sorted(detections, key=lambda d: d["score"]):  # the best tag is drawn last, on top
        x, y, w, h = det["bbox"]
        color = PALETTE[det["label"] % len(PALETTE)]
        canvas.rectangle([x, y, x + w, y + h], outline=color, width=max(1, round(min(image.size) / 150)))
        tag = f"{classes[det['label']]} {det['score']:.2f}"
        left, top, right, bottom = canvas.textbbox((x, y), tag)
        lift = bottom - top + 2 if top > bottom - top + 2 else 0  # above the box, or inside it at the picture's edge
        canvas.rectangle([left, top - lift, right + 2, bottom - lift], fill=color)
        canvas.text((x + 1, y - lift), tag, fill=(0, 0, 0))
    return image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="picture files")
    p.add_argument("--weights", required=True, help="a checkpoint written by train_det.py")
    p.add_argument("--model", help="model name (default: the checkpoint's)")
    p.add_argument("--img-size", type=int, help="canvas (default: the checkpoint's)")
    p.add_argument("--score-thr", type=float, default=0.3, help="draw and print detections scoring at least this")
    p.add_argument("--out", default="predictions", help="folder for the drawn pictures")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    device = resolve_device(args.device)
    state = load_checkpoint(args.weights)
    extra = state.get("extra", {})
    name = args.model or extra.get("model")
    if name is None or "classes" not in extra:
        raise SystemExit(f"error: {args.weights} has no model name or class names: pass a checkpoint of train_det.py")
    img_size = args.img_size or extra["img_size"]
    classes = extra["classes"]
    model = build_model(name, num_classes=len(classes))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken, failed = set(), []
    for path in map(Path, args.images):
        try:
            image = read_picture(path)
        except ValueError as e:
            print(f"error: {e}; skipped", file=sys.stderr)
            failed.append(path)
            continue
        found = detect(model, image, preset=RECIPES[name]["preset"], img_size=img_size, num_classes=len(classes),
                       device=device)
        detections = [d for d in found if d["score"] >= args.score_thr]
        out_file = out_dir / f"{unique_stem(path.stem, taken)}.png"
        draw(image, detections, classes).save(out_file)
        print(f"{path}: {len(detections)} detection(s) -> {out_file}")
        for det in detections:
            x, y, w, h = det["bbox"]
            print(f"  {classes[det['label']]:<12} {det['score']:.3f}  [{x:.1f}, {y:.1f}, {x + w:.1f}, {y + h:.1f}]")
    if failed:
        print(f"error: {len(failed)} of {len(args.images)} picture(s) could not be read: "
              f"{', '.join(map(str, failed))}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()

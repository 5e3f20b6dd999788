"""Detect objects in pictures with a trained checkpoint: draw boxes (or masks), class names and scores, and print them.

  python -m det.predict --weights output/det/best.pth street.jpg dog.jpg --out predictions/
  python -m det.predict --weights best.pth val2017/000001.jpg --scale 3 --gt annotations/instances_val2017.json

In Python, `load` gives the model with what it needs attached and `detect` takes pictures as people have them:

  model = load("output/det/best.pth")
  for d in detect(model, "street.jpg"):
      print(d["class"], d["score"], d["box"])

The checkpoint (written by train_det.py) names its model, canvas and classes, so no data set is needed.
A picture that is missing or unreadable gets one line on stderr and the rest are still done; the exit status is
then 1. Inputs with the same name from different folders (a/x.jpg, b/x.jpg) are drawn to x.png, x_1.png, ...
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from common.checkpoint import load_checkpoint, state_dict_of
from common.device import resolve_device
from common.images import to_rgb
from det import data
from det.eval import to_coco_results
from det.masks import decode_segmentation
from det.models import RECIPES, build_model
from det.presets import get_preset

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def load(weights: str | Path, device: str | torch.device = "cpu", *, model_name: str | None = None,
         img_size: int | None = None) -> nn.Module:
    """The detector of a train_det.py checkpoint, in eval mode on `device`, carrying `model.predict_info` =
    {"model": name, "preset": its data preset, "img_size": canvas, "classes": [names]}: all `detect` needs.
    `model_name` and `img_size` override the checkpoint's. A ValueError in one sentence for other files."""
    state = load_checkpoint(weights)
    extra = state.get("extra") or {}
    name = model_name or extra.get("model")
    if name is None or "classes" not in extra:
        raise ValueError(f"{weights} has no model name or class names: pass a checkpoint of train_det.py")
    model = build_model(name, num_classes=len(extra["classes"]))
    model.load_state_dict(state_dict_of(state))
    model.predict_info = {"model": name, "preset": RECIPES[name]["preset"],
                          "img_size": img_size or extra.get("img_size") or RECIPES[name]["img_size"],
                          "classes": list(extra["classes"])}
    return model.to(device).eval()


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


def _uint8(pixels: Tensor) -> Tensor:
    """[3, H, W] uint8 0-255 or float 0-1 -> uint8 [3, H, W] on the CPU (the canvas is uint8, as in training)."""
    if pixels.dim() != 3 or pixels.shape[0] != 3:
        raise ValueError(f"an image tensor must be [3, H, W] or [B, 3, H, W] (RGB), not {list(pixels.shape)}")
    if pixels.dtype == torch.uint8:
        return pixels.cpu()
    if not pixels.is_floating_point():
        raise ValueError(f"an image tensor must be uint8 (0-255) or float (0-1), not {pixels.dtype}")
    top = pixels.max().item() if pixels.numel() else 0.0
    if top > 1.0 + 1e-3:  # a 0-255 float image would be clipped to white without a word
        raise ValueError(f"float image tensors are 0-1 (torchvision's convention), this one reaches {top:.4g}: "
                         "divide it by 255 or pass it as uint8")
    return (pixels.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)


def as_pictures(images) -> tuple[list[Tensor], bool]:
    """`images` (a PIL image, a file path, a [3, H, W] or [B, 3, H, W] tensor, or a list of these) -> (uint8 RGB
    [3, H, W] per picture, whether a single picture was given rather than a list or a batch)."""
    if isinstance(images, (list, tuple)):
        return [p for item in images for p in as_pictures(item)[0]], False
    if isinstance(images, (str, Path)):
        images = read_picture(Path(images))
    if isinstance(images, Image.Image):
        return [F.pil_to_tensor(to_rgb(images))], True
    if isinstance(images, Tensor):
        if images.dim() == 4:
            return [_uint8(x) for x in images], False
        return [_uint8(images)], True
    raise TypeError(f"cannot detect objects in a {type(images).__name__}: pass a PIL image, a file path, "
                    "a [3, H, W] / [B, 3, H, W] tensor or a list of these")


def _detect_one(model: nn.Module, pixels: Tensor, info: dict, device: torch.device) -> list[dict]:
    """uint8 [3, H0, W0] -> every detection the model keeps, in the picture's pixels (see `detect`)."""
    h0, w0 = pixels.shape[-2:]
    no_boxes = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h0, w0)),
                "labels": torch.zeros(0, dtype=torch.int64)}
    resized, _ = get_preset(info["preset"])["eval_transforms"](info["img_size"])(tv_tensors.Image(pixels), no_boxes)
    meta = {"image_id": 0, "file_name": "", "orig_size": (h0, w0),
            "scale": (resized.shape[-2] / h0, resized.shape[-1] / w0)}
    batch, targets, metas = data.collate([(resized, no_boxes, meta)], max_gt=None, preset=info["preset"],
                                         img_size=info["img_size"], evaluation=True)
    with torch.no_grad():
        out = model(batch.to(device), image_size=targets["image_size"].to(device))
    classes = info["classes"]
    identity = list(range(len(classes)))  # keep contiguous labels as the "category ids"
    found = to_coco_results(out["boxes"], out["scores"], out["labels"], out["valid"], metas, identity,
                            out.get("masks"), targets["image_size"])  # with masks: pasted, boxes from them
    detections = [{"box": [x, y, x + w, y + h], "score": r["score"], "label": r["category_id"],
                   "class": classes[r["category_id"]]} for r in found for x, y, w, h in [r["bbox"]]]
    for d, r in zip(detections, found, strict=True):
        if "segmentation" in r:  # the RLE evaluation scores, decoded: the same mask
            d["mask"] = torch.from_numpy(decode_segmentation(r["segmentation"], h0, w0, "predicted")).bool()
    return detections


def detect(model: nn.Module, images, *, score_thr: float = 0.3,
           max_det: int | None = None) -> list[dict] | list[list[dict]]:
    """Objects in `images`, a PIL image, a file path (str or Path), a tensor [3, H, W] or [B, 3, H, W] (RGB, uint8
    0-255 or float 0-1 as torchvision's float images), or a list of any of these.

    `model` comes from `load` (it carries `model.predict_info`: preset, canvas, class names). Each picture goes through
    the model's evaluation preset onto its canvas, as in training. Returns for one picture its detections, for a list
    or a batch one list per picture; a detection is {"box": [x1, y1, x2, y2] in the picture's own pixels, "score":
    float, "label": int (0..C-1), "class": name}, best first, those scoring at least `score_thr`, at most `max_det`.
    An instance-segmentation model's detections also hold "mask", bool [H, W] at the picture's size (pasted as in
    mmdet), and their "box" is that mask's extent.
    """
    info = getattr(model, "predict_info", None)
    if info is None:
        raise ValueError("this model has no predict_info (preset, img_size, classes): load it with "
                         "det.predict.load(weights)")
    if model.training:
        raise ValueError("the model is in training mode: call model.eval() before detect")
    pictures, single = as_pictures(images)
    device = next(model.parameters()).device
    per_picture = []
    for pixels in pictures:  # one at a time: the canvas follows each picture's orientation
        found = sorted((d for d in _detect_one(model, pixels, info, device) if d["score"] >= score_thr),
                       key=lambda d: -d["score"])
        per_picture.append(found[:max_det])
    return per_picture[0] if single else per_picture


def unique_stem(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem_1`, `stem_2`, ... when an earlier input already took it; the result joins `taken`."""
    name, k = stem, 0
    while name in taken:
        k += 1
        name = f"{stem}_{k}"
    taken.add(name)
    return name


def _overlap(a: tuple, b: tuple) -> float:
    """Area shared by two (x1, y1, x2, y2) rectangles."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def place_labels(boxes: list[list[float]], sizes: list[tuple[float, float]],
                 picture_size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """Where each box's label goes, (x1, y1, x2, y2), greedily in the given order (best detection first): above the
    box, below it, inside its top, inside its bottom; the first spot that overlaps no label placed so far, else the
    least overlapping. Labels of `sizes` (w, h) are shifted to stay inside the picture (W, H)."""
    width, height = picture_size
    placed = []
    for (x1, y1, _, y2), (w, h) in zip(boxes, sizes, strict=True):
        spots = []
        for x, y in [(x1, y1 - h), (x1, y2), (x1, y1), (x1, y2 - h)]:
            x, y = min(max(x, 0), max(width - w, 0)), min(max(y, 0), max(height - h, 0))
            spots.append((x, y, x + w, y + h))
        cover = [sum(_overlap(s, p) for p in placed) for s in spots]
        placed.append(spots[cover.index(min(cover))])  # index of the first minimum: the first free spot if any
    return placed


def _font(picture_size: tuple[int, int]) -> ImageFont.ImageFont:
    size = min(32, max(11, round(min(picture_size) / 24)))  # readable on 128 px pictures and on photos
    try:
        return ImageFont.load_default(size=size)
    except (AttributeError, TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _dashed_rectangle(canvas: ImageDraw.ImageDraw, box: list[float], color: tuple, width: int) -> None:
    x1, y1, x2, y2 = box
    dash, gap = 4 * width + 2, 3 * width + 1
    for a, b in [((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))]:
        length = max(abs(b[0] - a[0]), abs(b[1] - a[1]))
        t = 0.0
        while t < length:
            s, e = t / max(length, 1e-9), min(t + dash, length) / max(length, 1e-9)
            canvas.line([(a[0] + (b[0] - a[0]) * s, a[1] + (b[1] - a[1]) * s),
                         (a[0] + (b[0] - a[0]) * e, a[1] + (b[1] - a[1]) * e)], fill=color, width=width)
            t += dash + gap


def paint_masks(image: Image.Image, masks: list[Tensor], colors: list[tuple], line: int,
                alpha: float = 0.45) -> Image.Image:
    """`image` with each bool [h, w] mask (any size: resized to the picture, nearest) blended in its colour at
    `alpha` and its `line`-px inner border in the full colour; the first mask (the best detection) painted last, on
    top."""
    pixels = F.pil_to_tensor(image).float()  # [3, H, W]
    size = list(pixels.shape[-2:])
    for mask, color in reversed(list(zip(masks, colors, strict=True))):
        mask = F.resize(mask[None].to(torch.uint8), size, interpolation=F.InterpolationMode.NEAREST).bool()  # [1,H,W]
        # pixels of the mask within `line` of one outside it: an erosion by max-pooling the outside
        border = mask & (torch.nn.functional.max_pool2d((~mask).float()[None], 2 * line + 1, 1, line)[0] > 0)
        color = torch.tensor(color, dtype=torch.float32).view(3, 1, 1)
        pixels = torch.where(mask, pixels * (1 - alpha) + color * alpha, pixels)
        pixels = torch.where(border, color, pixels)
    return F.to_pil_image(pixels.round().to(torch.uint8))


def draw(image: Image.Image, detections: list[dict], *, scale: float = 1.0, dashed: bool = False) -> Image.Image:
    """The picture enlarged `scale` times with a rectangle per detection ({"box", "label", "class"} and, unless it is
    ground truth, "score"; best first), or where it has a "mask" the mask painted translucent with its outline
    (`paint_masks`), and a "class score" label placed by `place_labels`; `dashed` outlines mark ground truth."""
    image = to_rgb(image)
    if scale != 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    line = max(1, round(min(image.size) / 150))
    masked = [d for d in detections if "mask" in d]
    if masked:
        image = paint_masks(image, [d["mask"] for d in masked], [PALETTE[d["label"] % len(PALETTE)] for d in masked],
                            min(line, 2))
    canvas = ImageDraw.Draw(image)
    font = _font(image.size)
    # by their corners: a CenterNet size can come out negative, and mmdet keeps such boxes (PIL refuses them)
    boxes = [[v * scale for v in (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))]
             for x1, y1, x2, y2 in (d["box"] for d in detections)]
    tags = [d["class"] if "score" not in d else f"{d['class']} {d['score']:.2f}" for d in detections]
    sizes = []
    for tag in tags:
        left, top, right, bottom = canvas.textbbox((0, 0), tag, font=font)
        sizes.append((right - left + 4, bottom - top + 4))
    for d, box in zip(detections, boxes, strict=True):  # every outline first: no box is drawn over a label
        color = PALETTE[d["label"] % len(PALETTE)]
        if "mask" in d:  # its outline is painted
            continue
        if dashed:
            _dashed_rectangle(canvas, box, color, line)
        else:
            canvas.rectangle(box, outline=color, width=line)
    for d, tag, spot in zip(detections, tags, place_labels(boxes, sizes, image.size), strict=True):
        canvas.rectangle(spot, fill=PALETTE[d["label"] % len(PALETTE)])
        left, top, _, _ = canvas.textbbox((0, 0), tag, font=font)
        canvas.text((spot[0] + 2 - left, spot[1] + 2 - top), tag, fill=(0, 0, 0), font=font)
    return image


def side_by_side(left: Image.Image, right: Image.Image, titles: tuple[str, str]) -> Image.Image:
    """Two pictures of one size next to each other under a white strip holding their titles (width: twice one)."""
    font = _font(left.size)
    strip = font.getbbox("Ag")[3] + 8
    out = Image.new("RGB", (left.width + right.width, left.height + strip), (255, 255, 255))
    out.paste(left, (0, strip))
    out.paste(right, (left.width, strip))
    canvas = ImageDraw.Draw(out)
    for x, title in [(0, titles[0]), (left.width, titles[1])]:
        canvas.text((x + 4, 4), title, fill=(0, 0, 0), font=font)
    return out


def load_ground_truth(ann_file: str | Path) -> dict[str, list[dict]]:
    """A COCO annotation file -> {file name (no folder): [{"box": [x1, y1, x2, y2], "label", "class"}, ...]}, crowd
    regions left out, labels 0..C-1 in category id order (as det/data.py numbers them, so colours match)."""
    try:
        coco = json.loads(Path(ann_file).read_text())
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        label_of = {c["id"]: label for label, c in enumerate(cats)}
        names = {c["id"]: c["name"] for c in cats}
        by_id = {im["id"]: Path(im["file_name"]).name for im in coco["images"]}
        truth = {name: [] for name in by_id.values()}
        for a in coco.get("annotations", []):
            if a.get("iscrowd"):
                continue
            x, y, w, h = a["bbox"]
            truth[by_id[a["image_id"]]].append({"box": [x, y, x + w, y + h], "label": label_of[a["category_id"]],
                                                "class": names[a["category_id"]]})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{ann_file} is not a readable COCO annotation file ({type(e).__name__}: {e})") from None
    return truth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="picture files")
    p.add_argument("--weights", required=True, help="a checkpoint written by train_det.py")
    p.add_argument("--model", help="model name (default: the checkpoint's)")
    p.add_argument("--img-size", type=int, help="canvas (default: the checkpoint's)")
    p.add_argument("--score-thr", type=float, default=0.3, help="draw and print detections scoring at least this")
    p.add_argument("--max-det", type=int, default=20, help="draw and print at most this many (the best) per picture")
    p.add_argument("--scale", type=float, default=1.0,
                   help="enlarge pictures this many times before drawing (e.g. 3 for 128 px ones), boxes with them")
    p.add_argument("--gt", metavar="ANNOTATION_FILE",
                   help="a COCO json: draw the picture's ground truth (dashed) left of the prediction, matched by "
                        "file name")
    p.add_argument("--out", default="predictions", help="folder for the drawn pictures")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.max_det < 1 or not args.scale > 0:
        p.error("--max-det must be 1 or more and --scale above 0")

    try:
        model = load(args.weights, resolve_device(args.device), model_name=args.model, img_size=args.img_size)
        truth = load_ground_truth(args.gt) if args.gt else None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
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
        detections = detect(model, image, score_thr=args.score_thr, max_det=args.max_det)
        picture = draw(image, detections, scale=args.scale)
        if truth is not None:
            if path.name not in truth:
                print(f"warning: {path.name} is not among {args.gt}'s images: no ground truth drawn", file=sys.stderr)
            gt = draw(image, truth.get(path.name, []), scale=args.scale, dashed=True)
            picture = side_by_side(gt, picture, ("ground truth", "prediction"))
        out_file = out_dir / f"{unique_stem(path.stem, taken)}.png"
        picture.save(out_file)
        print(f"{path}: {len(detections)} detection(s) -> {out_file}")
        for det in detections:
            x1, y1, x2, y2 = det["box"]
            print(f"  {det['class']:<12} {det['score']:.3f}  [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")
    if failed:
        print(f"error: {len(failed)} of {len(args.images)} picture(s) could not be read: "
              f"{', '.join(map(str, failed))}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""The built-in detection data set: coloured shapes on textured backgrounds, written once as a real COCO-layout
folder (jpg images, instances_{train,val}2017.json with boxes and polygon masks), so runs without a download go
through exactly the code path of COCO itself. The instance-segmentation models reuse its polygons."""
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from common.dist import print0
from common.synthetic import SHAPES, class_color, draw_polygon, shape_polygon, textured_background

SYNTHETIC_CAT_IDS = (1, 2, 4, 5, 7, 9, 12, 13, 16, 20)  # one per shape in SHAPES, with gaps as COCO's ids have


def default_cache() -> Path:
    return Path(os.environ.get("PLAINVISION_CACHE") or Path.home() / ".cache" / "plainvision")


def _synthetic_image(rng: np.random.Generator) -> tuple[Image.Image, list[tuple[int, list, int]]]:
    """A 96-192 px image (a quarter of them portrait) with 0-6 shapes that do not overlap, each 15-50 % of the short
    side across; returns the image and (label, polygon, iscrowd) per shape."""
    short, long = sorted(int(s) for s in rng.integers(96, 193, size=2))
    width, height = (short, long) if rng.random() < 0.25 else (long, short)
    image = textured_background(rng, width, height)
    objects, placed = [], []  # placed: (cx, cy, radius); every shape lies inside its circle, circles stay apart
    for _ in range(0 if rng.random() < 0.08 else rng.integers(1, 7)):
        for _attempt in range(20):
            radius = rng.uniform(0.075, 0.25) * short
            cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
            if all(math.hypot(cx - x, cy - y) > radius + r + 2 for x, y, r in placed):
                break
        else:
            continue
        label = int(rng.integers(len(SHAPES)))
        polygon = shape_polygon(SHAPES[label], cx, cy, radius, rng.uniform(0, 2 * math.pi))
        draw_polygon(image, polygon, class_color(rng, label, len(SHAPES)))
        placed.append((cx, cy, radius))
        objects.append((label, polygon, int(rng.random() < 0.03)))
    return image, objects


def _progress(total: int, interval: float = 5.0) -> Callable[[int], None]:
    """A function of the images written so far that prints a line (rank 0) every 10 % or `interval` seconds."""
    last = [time.perf_counter(), 0]  # time and count of the last line

    def report(done: int) -> None:
        if done == total or done - last[1] >= total / 10 or time.perf_counter() - last[0] >= interval:
            print0(f"writing synthetic set: {done}/{total} images")
            last[:] = time.perf_counter(), done
    return report


def _write_split(root: Path, split: str, num_images: int, seed: int, first_id: int,
                 report: Callable[[int], None]) -> None:
    (root / f"{split}2017").mkdir(parents=True)
    images, annotations = [], []
    for i in range(num_images):
        image_id = first_id + i
        image, objects = _synthetic_image(np.random.default_rng([seed, first_id, i]))
        file_name = f"{image_id:012d}.jpg"
        image.save(root / f"{split}2017" / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for label, polygon, iscrowd in objects:
            xy = np.clip(np.array(polygon), 0, [image.width, image.height])  # [V, 2]
            x1, y1 = xy.min(0)
            x2, y2 = xy.max(0)
            area = 0.5 * abs(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": SYNTHETIC_CAT_IDS[label],
                "bbox": [round(float(v), 2) for v in (x1, y1, x2 - x1, y2 - y1)], "area": round(float(area), 2),
                "segmentation": [[round(float(v), 2) for v in xy.ravel()]],
                "iscrowd": iscrowd,
            })
        report(first_id + i)  # ids count from 1 over both splits: the images written so far
    categories = [{"id": cat, "name": name, "supercategory": "shape"} for cat, name in zip(SYNTHETIC_CAT_IDS, SHAPES,
                                                                                            strict=True)]
    (root / "annotations").mkdir(exist_ok=True)
    with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump({"info": {"description": f"plainvision synthetic shapes, {split}"}, "images": images,
                   "annotations": annotations, "categories": categories}, f)


def synthetic_coco(root: Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    """Write the synthetic detection set to `root` in the COCO layout, once; return `root`.

    Images of 96-192 px with 0-6 coloured shapes on textured backgrounds (common/synthetic.py), ten categories named
    after the shapes with gapped ids, polygon masks, ~3 % of objects marked iscrowd, ~8 % of images empty. A copy is
    complete when root/synthetic.json holds the same arguments; otherwise it is written to a side folder and renamed
    into place, so an interrupted write is never mistaken for a complete one and is redone by the next call.
    """
    root = Path(root)
    params = {"num_train": num_train, "num_val": num_val, "seed": seed, "version": 1}  # version: of the drawing
    marker = root / "synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    if root.exists() and not marker.is_file():
        raise FileExistsError(f"{root} exists and is not a synthetic set written by plainvision: choose another path")
    partial_root = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial_root, ignore_errors=True)
    try:
        report = _progress(num_train + num_val)
        _write_split(partial_root, "train", num_train, seed, first_id=1, report=report)
        _write_split(partial_root, "val", num_val, seed, first_id=num_train + 1, report=report)  # ids unique, as COCO's
        (partial_root / "synthetic.json").write_text(json.dumps(params))
        shutil.rmtree(root, ignore_errors=True)  # a copy with other arguments
        partial_root.rename(root)
    except BaseException:
        shutil.rmtree(partial_root, ignore_errors=True)
        raise
    return root

"""Data presets: how a detector family's images reach its canvas, as plain functions per preset.

A preset is three functions and a colour, in a plain dict: "canvas_size" (img_size, landscape) -> (H, W) of the
canvas a batch lies on, "train_transforms" img_size -> the training transforms and "eval_transforms" img_size -> the
evaluation transforms of (image, {"boxes", "labels"}), in torchvision transforms v2 (boxes follow the image), and
"fill": the RGB colour of the canvas around a smaller image (what the model's preprocessing maps padding to in
mmdet); optionally "eval_canvas_size", the evaluation canvas where it differs from the training one (CenterNet),
"mask_stride", the stride of the instance-mask targets of training batches (SOLOv2: 4, det/data.py collate), and
"check_targets", a function (targets, metas) -> None that collate calls on every training batch and that raises a
ValueError naming the image when a batch does not fit the model.
`PRESETS` maps a recipe's "preset" name to them; a new family adds its functions and one entry.
"""
import math
from collections.abc import Callable
from functools import partial

from torchvision import tv_tensors
from torchvision.transforms import v2

from det import centernet_data, yolox_data
from det.models import solov2

MEAN_COLOR = (124, 116, 104)  # mmdet's pixel mean (123.675, 116.28, 103.53), rounded: a pad normalises to ~0


# ssd (configs/ssd/ssd300_coco.py): every image resized onto the whole square canvas.
def ssd_canvas_size(img_size: int, landscape: bool) -> tuple[int, int]:
    return img_size, img_size


def ssd_train_transforms(img_size: int) -> v2.Compose:
    """Expand onto the mean colour, MinIoURandomCrop, resize to the square, flip, PhotoMetricDistortion (mmdet's
    order); then boxes the crop cut away or the resize shrank under 1 px are dropped with their labels."""
    return v2.Compose([
        v2.RandomZoomOut(fill={tv_tensors.Image: MEAN_COLOR, "others": 0}, side_range=(1.0, 4.0), p=0.5),
        # min IoU with the boxes one of 0.1..0.9, or 0 or no crop (the 1.0); crop sides 0.3-1, aspect 0.5-2: mmdet's
        # options. torchvision asks one box to reach the IoU where mmdet asks all, both keep centred-in boxes.
        v2.RandomIoUCrop(min_scale=0.3, sampler_options=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0], trials=50),
        v2.Resize((img_size, img_size), antialias=True),
        v2.RandomHorizontalFlip(0.5),
        photometric_distortion(),
        v2.SanitizeBoundingBoxes(),
    ])


def photometric_distortion() -> v2.RandomPhotometricDistort:
    """mmdet's PhotoMetricDistortion defaults: brightness +-32 of 255 (added; here a factor of 1 +- 32/255),
    contrast and saturation 0.5-1.5, hue +-18 degrees (0.05 of the circle), channel swap; each with p 0.5."""
    return v2.RandomPhotometricDistort(brightness=(1 - 32 / 255, 1 + 32 / 255), contrast=(0.5, 1.5),
                                       saturation=(0.5, 1.5), hue=(-0.05, 0.05), p=0.5)


def ssd_eval_transforms(img_size: int) -> v2.Compose:
    return v2.Compose([v2.Resize((img_size, img_size), antialias=True)])


# retinanet (configs/_base_/datasets/coco_detection.py): keep-ratio resize, flip at training; `img_size` is the short
# side and the long side follows it as 1333 follows 800.
def _long_side(short: int) -> int:
    return round(short * 1333 / 800)  # mmdet Resize(scale=(1333, 800), keep_ratio=True), scaled with the short side


def _keep_ratio_resize(short: int) -> v2.Resize:
    # short side to `short` unless the long side would pass _long_side: mmdet's min(1333 / long, 800 / short) scale
    # (torchvision truncates sizes where mmdet rounds: they can differ by a pixel)
    return v2.Resize(short, max_size=_long_side(short), antialias=True)


def retinanet_canvas_size(img_size: int, landscape: bool) -> tuple[int, int]:
    """(short, long) side rounded up to multiples of 32 (mmdet's pad_size_divisor, the stride of P5), transposed for
    portrait images (800 -> 1333 -> canvas 800 x 1344)."""
    short, long = (32 * math.ceil(s / 32) for s in (img_size, _long_side(img_size)))
    return (short, long) if landscape else (long, short)


def retinanet_train_transforms(img_size: int) -> v2.Compose:
    return v2.Compose([_keep_ratio_resize(img_size), v2.RandomHorizontalFlip(0.5)])


def retinanet_eval_transforms(img_size: int) -> v2.Compose:
    return v2.Compose([_keep_ratio_resize(img_size)])


# yolov3 (configs/yolo/yolov3_d53_8xb8-ms-608-273e_coco.py): keep-ratio resize so the long side is img_size (608) at
# test, and a random 320-608 (scaled with img_size) at training, on a fixed square canvas: mmdet pads each batch to
# its largest image, we pad to the largest possible one, so every step has the same shape.
def square_canvas_size(img_size: int, landscape: bool) -> tuple[int, int]:
    """YOLOv3's and YOLOX's canvas: the square rounded up to a multiple of 32, their last stride (the necks
    concatenate maps of exactly 2x)."""
    side = 32 * math.ceil(img_size / 32)
    return side, side


def _long_side_resize(long: int) -> v2.Resize:
    return v2.Resize(size=None, max_size=long, antialias=True)  # keep ratio, longer side = `long`


def yolov3_train_transforms(img_size: int) -> v2.Compose:
    """Expand onto black up to 2x (mmdet's mean 0), MinIoURandomCrop (min IoU 0.4-0.9 or none), keep-ratio resize
    to a long side among 10 scales from 320/608 x img_size to img_size (mmdet draws the scale uniformly from
    320-608), flip, PhotoMetricDistortion; boxes cut away or shrunk under 1 px are dropped."""
    longs = sorted({round(img_size * k / 19) for k in range(10, 20)})  # 320 / 32 = 10 ... 608 / 32 = 19
    return v2.Compose([
        v2.RandomZoomOut(fill={tv_tensors.Image: (0, 0, 0), "others": 0}, side_range=(1.0, 2.0), p=0.5),
        v2.RandomIoUCrop(min_scale=0.3, sampler_options=[0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], trials=50),
        v2.RandomChoice([_long_side_resize(long) for long in longs]),
        v2.RandomHorizontalFlip(0.5),
        photometric_distortion(),
        v2.SanitizeBoundingBoxes(),
    ])


def yolov3_eval_transforms(img_size: int) -> v2.Compose:
    return v2.Compose([_long_side_resize(img_size)])


# yolox (configs/yolox/yolox_s_8xb8-300e_coco.py): keep-ratio resize so the long side is img_size (640), padded to
# the square with 114 (the canvas). Training mixes images first (det/yolox_data.py's MosaicMixUpDataset
# wraps the training set: Mosaic, RandomAffine, MixUp); the per-image rest of mmdet's pipeline (HSV jitter, flip,
# resize, box filter) is these train_transforms, and all of it in mmdet's last 15 epochs. mmcv's resize rounding and
# cv2's bilinear interpolation (no antialiasing) in both.
def yolox_train_transforms(img_size: int) -> Callable:
    return partial(yolox_data.transforms, img_size=img_size)


def yolox_eval_transforms(img_size: int) -> Callable:
    return partial(yolox_data.transforms, img_size=img_size, train=False)


# centernet (configs/centernet/centernet_r18_8xb16-crop512-140e_coco.py): training crops of img_size x 0.6-1.3 from the
# image at its own resolution, resized to the img_size square (det/centernet_data.py); testing at the image's own
# resolution, so the evaluation canvas is larger than the training one: COCO's images are at most 640 px, 1.25 x the
# recipe's 512, and every one of them is tested unresized. The model centres each image on mmdet's test canvas.
def centernet_eval_canvas_size(img_size: int, landscape: bool) -> tuple[int, int]:
    return square_canvas_size(img_size * 5 // 4, landscape)


def centernet_train_transforms(img_size: int) -> v2.Compose:
    return v2.Compose([photometric_distortion(), partial(centernet_data.train_transforms, img_size=img_size)])


def centernet_eval_transforms(img_size: int) -> Callable:
    return partial(centernet_data.eval_transforms, canvas=centernet_eval_canvas_size(img_size, True)[0])


PRESETS = {
    "ssd": {"canvas_size": ssd_canvas_size, "train_transforms": ssd_train_transforms,
            "eval_transforms": ssd_eval_transforms, "fill": MEAN_COLOR},
    "retinanet": {"canvas_size": retinanet_canvas_size, "train_transforms": retinanet_train_transforms,
                  "eval_transforms": retinanet_eval_transforms, "fill": MEAN_COLOR},
    # FCOS's caffe-style data: RetinaNet's resize and flip, the padding 0 after subtracting Detectron's mean
    # (122.77, 115.95, 102.98 in RGB), rounded
    "fcos": {"canvas_size": retinanet_canvas_size, "train_transforms": retinanet_train_transforms,
             "eval_transforms": retinanet_eval_transforms, "fill": (123, 116, 103)},
    # mmdet normalises YOLOv3's images to RGB / 255 and pads them with 0: black
    "yolov3": {"canvas_size": square_canvas_size, "train_transforms": yolov3_train_transforms,
               "eval_transforms": yolov3_eval_transforms, "fill": (0, 0, 0)},
    # mmdet pads YOLOX's images with 114 and feeds them unnormalised (BGR 0-255)
    "yolox": {"canvas_size": square_canvas_size, "train_transforms": yolox_train_transforms,
              "eval_transforms": yolox_eval_transforms, "fill": (114, 114, 114)},
    # mmdet pads CenterNet's batches after normalisation with 0: the mean colour (its crops' black is the image's own)
    "centernet": {"canvas_size": square_canvas_size, "eval_canvas_size": centernet_eval_canvas_size,
                  "train_transforms": centernet_train_transforms, "eval_transforms": centernet_eval_transforms,
                  "fill": MEAN_COLOR},
    # SOLOv2 (configs/_base_/datasets/coco_instance.py): RetinaNet's resize and flip, masks moved with them;
    # mmdet pads after normalising with 0: the mean colour
    "solov2": {"canvas_size": retinanet_canvas_size, "train_transforms": retinanet_train_transforms,
               "eval_transforms": retinanet_eval_transforms, "fill": MEAN_COLOR, "mask_stride": 4,
               "check_targets": solov2.check_targets},
}
# SOLOv2-light: the same pipeline; its smaller scale ranges in the pair budget's check
PRESETS["solov2_light"] = dict(PRESETS["solov2"],
                               check_targets=partial(solov2.check_targets, scale_ranges=solov2.LIGHT_SCALE_RANGES))


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose {', '.join(PRESETS)}")
    return PRESETS[name]

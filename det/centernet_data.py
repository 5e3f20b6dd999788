"""CenterNet's data as mmdet 3.3.0 builds it for centernet_r18_8xb16-crop512-140e_coco: PhotoMetricDistortion ->
RandomCenterCropPad -> Resize (512, keep ratio) -> RandomFlip for training, and for testing the image unresized
(its centring on the test canvas is the model's: det/models/centernet.py, centre_on_test_canvas).

Images are uint8 RGB [3, H, W], boxes float32 [N, 4] xyxy pixels, labels int64 [N]. The crop draws from a numpy
RandomState with mmdet's calls in mmdet's order (mmdet draws from numpy's global one: seeded alike, the crops are the
same), box arithmetic in float32 as mmdet's; the resize and flip are det/yolox_data.py's (cv2's bilinear).
"""
import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors

from det.yolox_data import Rng, _target, hflip, resize_keep_ratio

RATIOS = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)  # the config's RandomCenterCropPad ratios
CROP = 512  # its crop_size (and the Resize scale after it): the recipe's img_size
BORDER = 128  # RandomCenterCropPad's default border, for CROP; scaled with img_size here
MAX_SCALES = 10  # crop sizes tried before giving up on finding an object (mmdet: forever)


def _border(border: int, size: int) -> float:
    """RandomCenterCropPad._get_border: `border` halved until the centre range [border, size - border) is not
    empty (a float, as numpy's arithmetic leaves it)."""
    k = 2 * border / size
    i = pow(2, np.ceil(np.log2(np.ceil(k))) + (k == int(k)))
    return border // i


def _crop_window(size: tuple[int, int], centres: Tensor, rng: Rng, crop_size: int, ratios: tuple[float, ...],
                 border: int) -> tuple[int, int, int, tuple[int, int, int, int], Tensor]:
    """RandomCenterCropPad._train_aug's draws: a side int(crop_size x ratio) and a centre (cx, cy) in the range
    `_border` leaves, redrawn (50 centres per ratio) until some object's centre lies strictly inside the window the
    image gives (x0, y0, x1, y1). mmdet redraws forever; after MAX_SCALES ratios the last draw is kept without
    objects (only windows far smaller than the image get there: never mmdet's 512 on COCO). -> (side, cx, cy,
    window, keep [N])."""
    h, w = size
    h_border, w_border = _border(border, h), _border(border, w)
    for _ in range(MAX_SCALES):
        side = int(crop_size * rng.choice(ratios))
        for _ in range(50):
            cx, cy = rng.randint(low=w_border, high=w - w_border), rng.randint(low=h_border, high=h - h_border)
            x0, x1 = max(0, cx - side // 2), min(cx + side // 2, w)  # _crop_image_and_paste's patch
            y0, y1 = max(0, cy - side // 2), min(cy + side // 2, h)
            keep = (centres[:, 0] > x0) & (centres[:, 1] > y0) & (centres[:, 0] < x1) & (centres[:, 1] < y1)
            if len(centres) == 0 or keep.any():  # an image without objects takes the first window
                return side, cx, cy, (x0, y0, x1, y1), keep
    return side, cx, cy, (x0, y0, x1, y1), keep


def random_center_crop_pad(image: Tensor, boxes: Tensor, labels: Tensor, rng: Rng, crop_size: int,
                           ratios: tuple[float, ...] = RATIOS, border: int = BORDER) -> tuple[Tensor, Tensor, Tensor]:
    """mmdet's RandomCenterCropPad in training mode (mean 0, bbox_clip_border): the `_crop_window` square cut from
    the image, pasted centred into black where it leaves the image; the objects whose centres lie inside it, moved
    and clipped to the square, those clipped to nothing dropped. -> (uint8 [3, side, side], boxes, labels)."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # HorizontalBoxes.centers
    side, cx, cy, (x0, y0, x1, y1), keep = _crop_window(image.shape[-2:], centres, rng, crop_size, ratios, border)
    out = torch.zeros(3, side, side, dtype=image.dtype)  # mean 0: black
    mid = side // 2
    out[:, mid - (cy - y0):mid + (y1 - cy), mid - (cx - x0):mid + (x1 - cx)] = image[:, y0:y1, x0:x1]
    moved = boxes[keep] + boxes.new_tensor([mid - cx, mid - cy]).repeat(2)  # HorizontalBoxes.translate_
    moved = torch.stack([moved[:, 0].clamp(0, side), moved[:, 1].clamp(0, side), moved[:, 2].clamp(0, side),
                         moved[:, 3].clamp(0, side)], dim=1)  # clip_
    inside = (moved[:, 0] < side) & (moved[:, 1] < side) & (moved[:, 2] > 0) & (moved[:, 3] > 0)  # is_inside
    return out, moved[inside], labels[keep][inside]


def train_transforms(image: Tensor, target: dict, rng: Rng | None = None, *,
                     img_size: int) -> tuple[tv_tensors.Image, dict]:
    """The geometric end of the training pipeline on (image, {"boxes", "labels"}) -> the same (the photometric
    distortion comes before it, det/presets.py): random_center_crop_pad with crop img_size and border
    BORDER x img_size / CROP (mmdet's at 512; scaled, so a smaller canvas crops a like part of a like smaller image),
    resize to img_size x img_size, flip with 0.5. Without `rng` it draws from a RandomState seeded from numpy's global
    generator, which common.sampling.SeededDataset seeds per (seed, epoch, index)."""
    image, boxes, labels = image.as_subclass(Tensor), target["boxes"].as_subclass(Tensor), target["labels"]
    rng = Rng(np.random.randint(2**32)) if rng is None else rng
    image, boxes, labels = random_center_crop_pad(image, boxes, labels, rng, img_size, border=BORDER * img_size // CROP)
    image, boxes = resize_keep_ratio(image, boxes, img_size)
    if rng.random_sample() < 0.5:  # mmdet RandomFlip(prob=0.5): one draw
        image, boxes = hflip(image, boxes)
    return _target(image, boxes, labels)


def eval_transforms(image: Tensor, target: dict, *, canvas: int) -> tuple[tv_tensors.Image, dict]:
    """The image as it is (mmdet's test pipeline has no resize) unless a side exceeds `canvas`, the evaluation
    canvas; then it is resized to fit, keeping its ratio: the one departure from mmdet."""
    image, boxes, labels = image.as_subclass(Tensor), target["boxes"].as_subclass(Tensor), target["labels"]
    if max(image.shape[-2:]) > canvas:
        image, boxes = resize_keep_ratio(image, boxes, canvas)
    return _target(image, boxes, labels)

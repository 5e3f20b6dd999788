"""YOLOX's training data as mmdet 3.3.0 builds it for yolox_s_8xb8-300e_coco: MultiImageMixDataset running Mosaic ->
RandomAffine -> MixUp -> YOLOXHSVRandomAug -> RandomFlip -> Resize -> Pad -> FilterAnnotations, here as plain functions
of tensors and an explicit generator, and one data set wrapper that feeds them.

Images are uint8 RGB [3, H, W] (mmdet's are BGR [H, W, 3]: only the HSV jitter depends on the order, and it reads the
channels by name), boxes float32 [N, 4] xyxy pixels, labels int64 [N]. Box arithmetic is mmdet's, in float32 torch
ops in mmdet's order: boxes come out bit-equal. The generator is a numpy RandomState drawn from with mmdet's calls in
mmdet's order; mmdet draws from numpy's global RandomState, so one seeded like it gives the same draws. Pixels: see
`resize` and `warp` for how close they come to cv2's; the HSV conversion is OpenCV's 8-bit one (tests: equal).
Padding to the square is the canvas's (det/data.py's collate pads bottom/right with the preset's fill, 114).
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

PAD = 114  # mmdet's pad_val / border_val of every transform here

Rng = np.random.RandomState


def _taps(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """cv2.resize INTER_LINEAR along one axis: output i reads inputs (lo, hi) [n_out] at half-pixel centres with
    11-bit weights (w_lo, w_hi) [n_out], the source position in float32 and clamped to the edges as cv2 has it."""
    pos = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (1 / (n_out / n_in)) - 0.5).float()
    lo = pos.floor()
    frac = torch.where((lo < 0) | (lo >= n_in - 1), 0.0, pos - lo)
    lo = lo.clamp(0, n_in - 1).long()
    return lo, (lo + 1).clamp(max=n_in - 1), ((1 - frac) * 2048).round().long(), (frac * 2048).round().long()


def resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """[C, H, W] -> [C, *size] as mmcv.imresize (cv2.resize INTER_LINEAR): bilinear, half-pixel centres, no
    antialiasing. uint8 in cv2's fixed point (11-bit weights, its SIMD rounding): ~0.3% of pixels differ by 1 where
    cv2 rounds otherwise, and a downscale by exactly 2 (cv2 switches to INTER_AREA) by up to 1 more often. Float
    (mmdet MixUp resizes a float64 canvas) in float64, as cv2: equal to ~1e-13."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image.clone()
    if image.dtype != torch.uint8:
        return F.interpolate(image[None].double(), size=size, mode="bilinear", align_corners=False)[0].to(image.dtype)
    x_lo, x_hi, wx_lo, wx_hi = _taps(image.shape[-1], size[1])
    y_lo, y_hi, wy_lo, wy_hi = _taps(image.shape[-2], size[0])
    rows = image.long()[..., x_lo] * wx_lo + image.long()[..., x_hi] * wx_hi  # [C, H, w] x 2048
    top, bottom = rows[:, y_lo] >> 4, rows[:, y_hi] >> 4  # cv2's VResizeLinearVec_32s8u: 16-bit high products
    out = ((top * wy_lo[:, None] >> 16) + (bottom * wy_hi[:, None] >> 16) + 2) >> 2
    return out.clamp(0, 255).to(torch.uint8)


def _scale(boxes: Tensor, sx: float, sy: float) -> Tensor:
    return boxes * boxes.new_tensor([sx, sy, sx, sy])  # HorizontalBoxes.rescale_: float32 factors


def _clip(boxes: Tensor, height: int, width: int) -> Tensor:
    return torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height), boxes[:, 2].clamp(0, width),
                        boxes[:, 3].clamp(0, height)], dim=1)  # HorizontalBoxes.clip_


def _inside(boxes: Tensor, height: int, width: int) -> Tensor:
    """HorizontalBoxes.is_inside: [N] True where the box overlaps the image at all (degenerate boxes clipped onto
    its left or top edge are out, as in mmdet)."""
    return (boxes[:, 0] < width) & (boxes[:, 1] < height) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """mmcv's imflip + HorizontalBoxes.flip_('horizontal')."""
    width = image.shape[-1]
    return image.flip(-1), torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def mosaic(images: list[Tensor], boxes: list[Tensor], labels: list[Tensor], rng: Rng, img_scale: int = 640,
           center_ratio_range: tuple[float, float] = (0.5, 1.5), prob: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """mmdet Mosaic(img_scale=(s, s), pad_val=114, bbox_clip_border=True): 4 images (the item first, then the 3 that
    MultiImageMixDataset drew), each keep-ratio resized to fit s x s, meet at a random centre of a 2s x 2s canvas of
    114 (top-left, top-right, bottom-left, bottom-right), cropped where they pass the canvas. Boxes follow, are
    clipped to the canvas and dropped where nothing of them is left. -> (uint8 [3, 2s, 2s], [M, 4], [M])."""
    if rng.uniform(0, 1) > prob:
        return images[0], boxes[0], labels[0]
    s2 = 2 * img_scale
    out = torch.full((3, s2, s2), PAD, dtype=torch.uint8)
    cx, cy = (int(rng.uniform(*center_ratio_range) * img_scale) for _ in range(2))
    all_boxes = []
    for loc, (image, box) in enumerate(zip(images, boxes, strict=True)):
        h0, w0 = image.shape[-2:]
        ratio = min(img_scale / h0, img_scale / w0)
        image = resize(image, (int(h0 * ratio), int(w0 * ratio)))
        h, w = image.shape[-2:]
        # Mosaic._mosaic_combine: where the patch goes (x1, y1, x2, y2) and which part of it (crop)
        x1, x2 = (max(cx - w, 0), cx) if loc in (0, 2) else (cx, min(cx + w, s2))
        y1, y2 = (max(cy - h, 0), cy) if loc in (0, 1) else (cy, min(cy + h, s2))
        cx1, cx2 = (w - (x2 - x1), w) if loc in (0, 2) else (0, min(w, x2 - x1))
        cy1, cy2 = (h - (y2 - y1), h) if loc in (0, 1) else (0, min(y2 - y1, h))
        out[:, y1:y2, x1:x2] = image[:, cy1:cy2, cx1:cx2]
        pad_w, pad_h = x1 - cx1, y1 - cy1
        all_boxes.append(_scale(box, ratio, ratio) + box.new_tensor([pad_w, pad_h, pad_w, pad_h]))
    all_boxes = _clip(torch.cat(all_boxes), s2, s2)
    keep = _inside(all_boxes, s2, s2)
    return out, all_boxes[keep], torch.cat(labels)[keep]


def affine_matrix(rng: Rng, height: int, width: int, max_rotate_degree: float = 10.0,
                  max_translate_ratio: float = 0.1, scaling_ratio_range: tuple[float, float] = (0.1, 2.0),
                  max_shear_degree: float = 2.0) -> np.ndarray:
    """RandomAffine._get_random_homography_matrix: float32 [3, 3] translate @ shear @ rotate @ scale, about the
    top-left corner (mmdet's; the output window is the top-left (height, width) of the warped input)."""
    def matrix(*rows):
        return np.array(rows, dtype=np.float32)

    rad = np.deg2rad(rng.uniform(-max_rotate_degree, max_rotate_degree))
    rotate = matrix([np.cos(rad), -np.sin(rad), 0.0], [np.sin(rad), np.cos(rad), 0.0], [0.0, 0.0, 1.0])
    ratio = rng.uniform(*scaling_ratio_range)
    scale = matrix([ratio, 0.0, 0.0], [0.0, ratio, 0.0], [0.0, 0.0, 1.0])
    shear_x, shear_y = (np.deg2rad(rng.uniform(-max_shear_degree, max_shear_degree)) for _ in range(2))
    shear = matrix([1, np.tan(shear_x), 0.0], [np.tan(shear_y), 1, 0.0], [0.0, 0.0, 1.0])
    tx = rng.uniform(-max_translate_ratio, max_translate_ratio) * width
    ty = rng.uniform(-max_translate_ratio, max_translate_ratio) * height
    translate = matrix([1, 0.0, tx], [0.0, 1, ty], [0.0, 0.0, 1.0])
    return translate @ shear @ rotate @ scale


def warp(image: Tensor, matrix: np.ndarray, size: tuple[int, int], fill: int = PAD) -> Tensor:
    """cv2.warpPerspective(image, matrix, dsize=size[::-1], borderValue=fill) (INTER_LINEAR, BORDER_CONSTANT):
    output pixel (x, y) reads the input at matrix^-1 (x, y, 1) (integer pixel coordinates, no half-pixel shift),
    bilinear, taps outside the input read `fill`. Source positions in float64, as cv2; the bilinear sum in float32
    (grid_sample) where cv2's is its own: see tests/test_det_yolox_data.py for the measured difference."""
    h, w = size
    inv = torch.from_numpy(np.linalg.inv(matrix.astype(np.float64)))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    src = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ inv.T  # [h, w, 3]
    src = src[..., :2] / src[..., 2:]
    in_h, in_w = image.shape[-2:]
    grid = src / src.new_tensor([max(in_w - 1, 1), max(in_h - 1, 1)]) * 2 - 1  # align_corners: pixel i at i
    out = F.grid_sample(image[None].float() - fill, grid[None].float(), mode="bilinear", padding_mode="zeros",
                        align_corners=True)[0] + fill  # zero padding of image - fill: outside taps read fill
    return out.round().clamp(0, 255).to(torch.uint8)


def random_affine(image: Tensor, boxes: Tensor, labels: Tensor, rng: Rng, border: tuple[int, int] = (-320, -320),
                  **ranges: float | tuple[float, float]) -> tuple[Tensor, Tensor, Tensor]:
    """mmdet RandomAffine(scaling_ratio_range=(0.1, 2), border=(-320, -320)), other arguments its defaults
    (`ranges`: affine_matrix's): the image warped onto (H + 2 border_y, W + 2 border_x) filled with 114; box corners
    projected, the enclosing boxes clipped to the output and dropped where nothing is left. mmdet 3.3 filters boxes
    no further here (mmdet 2.x's min_bbox_size / min_area_ratio / max_aspect_ratio filter is gone: FilterAnnotations
    at the end of the pipeline drops boxes up to 1 px). -> (uint8 [3, h, w], [M, 4], [M])."""
    height, width = image.shape[-2] + 2 * border[1], image.shape[-1] + 2 * border[0]
    matrix = affine_matrix(rng, height, width, **ranges)
    image = warp(image, matrix, (height, width))
    if len(boxes) == 0:
        return image, boxes, labels
    x1, y1, x2, y2 = boxes.split(1, dim=-1)  # HorizontalBoxes.project_: the 4 corners, homogeneous
    corners = torch.cat([x1, y1, x2, y1, x1, y2, x2, y2], -1).reshape(-1, 4, 2)
    corners = torch.cat([corners, corners.new_ones(len(boxes), 4, 1)], -1)  # [N, 4, 3]
    corners = torch.matmul(boxes.new_tensor(matrix), corners.transpose(-1, -2)).transpose(-1, -2)
    corners = corners[..., :2] / corners[..., 2:3]
    boxes = _clip(torch.cat([corners.min(-2)[0], corners.max(-2)[0]], -1), height, width)
    keep = _inside(boxes, height, width)
    return image, boxes[keep], labels[keep]


def mixup(image: Tensor, boxes: Tensor, labels: Tensor, other: Tensor, other_boxes: Tensor, other_labels: Tensor,
          rng: Rng, img_scale: int = 640, ratio_range: tuple[float, float] = (0.8, 1.6),
          flip_ratio: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """mmdet MixUp(img_scale=(s, s), ratio_range=(0.8, 1.6), pad_val=114): `other` (loaded, not mosaicked) keep-ratio
    resized into the top-left of s x s, the whole s x s scaled by a random jitter, flipped with 1 - flip_ratio, a
    random window of the image's size cut from it (padded with 114 where smaller), averaged with `image` (truncated
    to uint8, as mmdet) and the boxes of both kept where they overlap the image. An `other` without boxes leaves
    everything as it is (no draws). -> (uint8 [3, H, W], [M, 4], [M])."""
    if len(other_boxes) == 0:
        return image, boxes, labels
    jit = rng.uniform(*ratio_range)
    flip = rng.uniform(0, 1) > flip_ratio
    h0, w0 = other.shape[-2:]
    ratio = min(img_scale / h0, img_scale / w0)
    other = resize(other, (int(h0 * ratio), int(w0 * ratio)))
    canvas = torch.full((3, img_scale, img_scale), float(PAD), dtype=torch.float64)  # mmdet's is float64 too
    canvas[:, :other.shape[-2], :other.shape[-1]] = other
    ratio *= jit
    canvas = resize(canvas, (int(img_scale * jit), int(img_scale * jit)))
    if flip:
        canvas = canvas.flip(-1)
    oh, ow = canvas.shape[-2:]
    th, tw = image.shape[-2:]
    padded = torch.full((3, max(oh, th), max(ow, tw)), PAD, dtype=torch.uint8)
    padded[:, :oh, :ow] = canvas.trunc().to(torch.uint8)  # numpy's float -> uint8 assignment truncates
    y_off = rng.randint(0, padded.shape[-2] - th) if padded.shape[-2] > th else 0
    x_off = rng.randint(0, padded.shape[-1] - tw) if padded.shape[-1] > tw else 0
    window = padded[:, y_off:y_off + th, x_off:x_off + tw]
    other_boxes = _clip(_scale(other_boxes, ratio, ratio), oh, ow)
    if flip:
        _, other_boxes = hflip(canvas, other_boxes)
    other_boxes = _clip(other_boxes + other_boxes.new_tensor([-x_off, -y_off, -x_off, -y_off]), th, tw)
    mixed = (0.5 * image.float() + 0.5 * window.float()).to(torch.uint8)
    boxes, labels = torch.cat([boxes, other_boxes]), torch.cat([labels, other_labels])
    keep = _inside(boxes, th, tw)
    return mixed, boxes[keep], labels[keep]


HSV_SHIFT = 12  # OpenCV's RGB2HSV_b fixed point: 255 / v and 180 / (6 diff) as integer tables
_SDIV = torch.tensor([0] + [round((255 << HSV_SHIFT) / i) for i in range(1, 256)], dtype=torch.int32)
_HDIV = torch.tensor([0] + [round((180 << HSV_SHIFT) / (6 * i)) for i in range(1, 256)], dtype=torch.int32)
_SECTORS = torch.tensor([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])  # (b, g, r) per sector


def rgb_to_hsv(image: Tensor) -> Tensor:
    """cv2.cvtColor(bgr, COLOR_BGR2HSV) of the same colours, 8-bit: uint8 [3, H, W] RGB -> int32 [3, H, W] with
    h in 0..179 (degrees / 2), s and v in 0..255; OpenCV's integer arithmetic."""
    r, g, b = image.int().unbind(0)
    v, vmin = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    diff = v - vmin
    round_half = 1 << (HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + round_half) >> HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + round_half) >> HSV_SHIFT
    return torch.stack([torch.where(h < 0, h + 180, h), s, v])


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """cv2.cvtColor(hsv, COLOR_HSV2BGR) read as RGB, 8-bit, as OpenCV 5.0 computes it: int [3, H, W] -> uint8
    [3, H, W]; float32 h x 6/180 split into sector and fraction, the 4 candidate values v, v(1 - s), v(1 - s f),
    v(1 - s(1 - f)), x 255. OpenCV converts each row 32 pixels at a time in SIMD code (1 - s f fused: one rounding,
    emulated in float64; x 255 truncated) and the last width % 32 pixels in scalar code (unfused, rounded); 32 is
    what its AVX2/AVX-512 dispatch does on x86, other builds may split rows elsewhere."""
    h = hsv[0].float() * torch.tensor(6 / 180, dtype=torch.float32)
    s, v = (c.float() * torch.tensor(1 / 255, dtype=torch.float32) for c in hsv[1:])
    sector = h.floor()  # h < 6: hue 0..179
    h = h - sector
    width = hsv.shape[-1]
    simd = torch.arange(width) < width - width % 32  # [W]
    fused = [torch.where(simd, (1 - s.double() * f.double()).float(), 1 - s * f) for f in (h, 1 - h)]
    tab = torch.stack([v, v * (1 - s), v * fused[0], v * fused[1]])  # [4, H, W]
    rgb = tab.gather(0, _SECTORS[sector.long()].permute(2, 0, 1)).flip(0) * 255  # [3, H, W]
    return torch.where(simd, rgb.floor(), rgb.round()).clamp(0, 255).to(torch.uint8)


def hsv_jitter(image: Tensor, rng: Rng, hue_delta: int = 5, saturation_delta: int = 30,
               value_delta: int = 30) -> Tensor:
    """mmdet YOLOXHSVRandomAug: each of h, s, v shifted (in OpenCV's 8-bit HSV) with probability 1/2 by an integer
    gain up to its delta, h cyclically (mod 180), s and v clipped to 0..255. uint8 RGB [3, H, W] -> same."""
    gains = rng.uniform(-1, 1, 3) * [hue_delta, saturation_delta, value_delta]
    gains *= rng.randint(0, 2, 3)
    gain_h, gain_s, gain_v = gains.astype(np.int16).tolist()  # truncated towards 0
    h, s, v = rgb_to_hsv(image)
    return hsv_to_rgb(torch.stack([(h + gain_h) % 180, (s + gain_s).clamp(0, 255), (v + gain_v).clamp(0, 255)]))


def resize_keep_ratio(image: Tensor, boxes: Tensor, img_scale: int) -> tuple[Tensor, Tensor]:
    """mmdet Resize(scale=(s, s), keep_ratio=True): the long side to s (mmcv.rescale_size rounds the other), boxes
    scaled by new / old size per axis and clipped (clip_object_border). -> (uint8 [3, h, w], [N, 4])."""
    h, w = image.shape[-2:]
    factor = min(img_scale / max(h, w), img_scale / min(h, w))
    new_w, new_h = int(w * factor + 0.5), int(h * factor + 0.5)
    return resize(image, (new_h, new_w)), _clip(_scale(boxes, new_w / w, new_h / h), new_h, new_w)


def filter_boxes(boxes: Tensor, labels: Tensor, min_wh: tuple[float, float] = (1, 1)) -> tuple[Tensor, Tensor]:
    """mmdet FilterAnnotations(min_gt_bbox_wh=(1, 1), keep_empty=False): keep boxes wider and higher than min_wh
    (strictly). mmdet 3.3's keep_empty is inverted: False keeps an image whose boxes all fail, with none left (True
    would return None, and MultiImageMixDataset would rerun the same deterministic transform 15 times and raise);
    so images leave this stage with zero boxes, as here."""
    keep = (boxes[:, 2] - boxes[:, 0] > min_wh[0]) & (boxes[:, 3] - boxes[:, 1] > min_wh[1])
    return boxes[keep], labels[keep]


def _target(image: Tensor, boxes: Tensor, labels: Tensor) -> tuple[tv_tensors.Image, dict]:
    return tv_tensors.Image(image), {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY",
                                                                       canvas_size=tuple(image.shape[-2:])),
                                     "labels": labels}


def transforms(image: Tensor, target: dict, rng: Rng | None = None, *, img_size: int,
               train: bool = True) -> tuple[tv_tensors.Image, dict]:
    """The per-image end of the pipeline, hsv_jitter -> flip with 0.5 (mmdet RandomFlip) -> resize_keep_ratio ->
    filter_boxes (Pad is the canvas's), on (image, {"boxes", "labels"}) -> the same: with functools.partial the
    "yolox" preset's train_transforms, and all of the pipeline in mmdet's last epochs. Without `rng` it draws from a
    RandomState seeded from numpy's global generator, which common.sampling.SeededDataset seeds per (seed, epoch,
    index). `train=False`: the resize alone (mmdet's test pipeline)."""
    image, boxes, labels = image.as_subclass(Tensor), target["boxes"].as_subclass(Tensor), target["labels"]
    if train:
        rng = Rng(np.random.randint(2**32)) if rng is None else rng
        image = hsv_jitter(image, rng)
        if rng.random_sample() < 0.5:  # np.random.choice(["horizontal", None], p=[0.5, 0.5]): one draw
            image, boxes = hflip(image, boxes)
    image, boxes = resize_keep_ratio(image, boxes, img_size)
    if train:
        boxes, labels = filter_boxes(boxes, labels)
    return _target(image, boxes, labels)


class MosaicMixUpDataset(Dataset):
    """mmdet's MultiImageMixDataset with YOLOX's pipeline over a det/data.py CocoDetection (its `load`: images and
    boxes before its transforms). Item i: mosaic of i and 3 random others -> random_affine -> mixup with a random
    image that has objects (mmdet MixUp.get_indexes: up to 15 tries, then the last one), only loaded -> transforms.
    With `mix` False (mmdet's YOLOXModeSwitchHook, the last 15 epochs): `transforms` alone. Items are
    CocoDetection's (image, {"boxes", "labels"}, meta), so det/data.py's collate batches them; no item is dropped
    (an image left without boxes comes with none, as mmdet's FilterAnnotations(keep_empty=False) leaves it).

    Every draw, the other indices too, comes from one RandomState per item, seeded from numpy's global generator:
    wrapped in common.sampling.SeededDataset (build_loaders does) that is a function of (seed, epoch, index), so
    workers and resumed runs see the same items. `item(index, rng)` takes the generator explicitly; mmdet's draws
    come in the same order, so RandomState(k) here is mmdet's pipeline after np.random.seed(k)."""

    def __init__(self, dataset: Dataset, img_size: int = 640, mix: bool = True, max_iters: int = 15) -> None:
        self.dataset, self.img_size, self.mix, self.max_iters = dataset, img_size, mix, max_iters
        self.landscape = dataset.landscape

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict, dict]:
        return self.item(index, Rng(np.random.randint(2**32)))

    def _load(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        image, target = self.dataset.load(index)
        return image.as_subclass(Tensor), target["boxes"].as_subclass(Tensor), target["labels"]

    def item(self, index: int, rng: Rng) -> tuple[tv_tensors.Image, dict, dict]:
        image, boxes, labels = self._load(index)
        if self.mix:
            s, n = self.img_size, len(self.dataset)
            parts = [(image, boxes, labels)] + [self._load(rng.randint(0, n)) for _ in range(3)]
            image, boxes, labels = mosaic(*map(list, zip(*parts, strict=True)), rng, img_scale=s)
            image, boxes, labels = random_affine(image, boxes, labels, rng, border=(-s // 2, -s // 2))
            for _ in range(self.max_iters):
                other = rng.randint(0, n)
                if len(self.dataset.labels[other]):
                    break
            image, boxes, labels = mixup(image, boxes, labels, *self._load(other), rng, img_scale=s)
        image, target = transforms(image, {"boxes": boxes, "labels": labels}, rng, img_size=self.img_size)
        return image, target, self.dataset.meta(index, image)

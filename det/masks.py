"""Instance masks: COCO segmentations to bitmaps, mmdet's stride-4 down-sampling and centre of mass (SOLOv2's
targets), pasting predicted soft masks back onto the file, their boxes and COCO's RLE.

Pure functions of tensors (or of one annotation), testable alone; det/data.py, det/eval.py and det/predict.py call
them, and SOLOv2's inference takes its boxes from `mask_boxes`.
"""
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor


def check_segmentation(segmentation, height: int, width: int, ann_id) -> bool:
    """Cheap checks of one annotation's "segmentation" (lengths and sizes, no decoding): True when it holds a mask,
    False for a polygon list with no polygon of 3 or more points (mmdet's LoadAnnotations then ignores the object);
    a ValueError naming the annotation for an RLE whose "size" is not the image's [height, width] or an entry that is
    neither a list of polygons nor an RLE dict."""
    if isinstance(segmentation, list):
        if not all(isinstance(p, list) for p in segmentation):
            raise ValueError(f"annotation {ann_id} has a segmentation that is neither a list of polygons [x1, y1, "
                             f"x2, y2, ...] nor an RLE dict: {str(segmentation)[:200]}")
        return any(len(p) >= 6 and len(p) % 2 == 0 for p in segmentation)
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (list, str, bytes)):
        if list(segmentation.get("size", ())) != [height, width]:
            raise ValueError(f"annotation {ann_id} has an RLE of size {segmentation.get('size')}, but its image is "
                             f"[{height}, {width}] (height, width)")
        return True
    raise ValueError(f"annotation {ann_id} has a segmentation that is neither a list of polygons nor an RLE dict "
                     f"with 'counts' and 'size': {str(segmentation)[:200]}")


def decode_segmentation(segmentation, height: int, width: int, ann_id) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed RLE with a list of counts, or compressed RLE) -> uint8 [H, W] 0/1,
    as mmdet's LoadAnnotations._poly2mask (pycocotools frPyObjects / merge / decode). Polygons of fewer than 3
    points (under 6 numbers or an odd count) are dropped, as mmdet's _process_masks drops them; none left, or any
    entry `check_segmentation` refuses, is a ValueError naming the annotation."""
    if not check_segmentation(segmentation, height, width, ann_id):
        raise ValueError(f"annotation {ann_id} has no polygon of 3 or more points: {str(segmentation)[:200]}")
    try:
        if isinstance(segmentation, list):  # the parts of one object, merged into one mask
            polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        mask = mask_utils.decode(rle)
    except (TypeError, ValueError, OverflowError) as e:  # numbers that are not numbers, counts past the image
        raise ValueError(f"annotation {ann_id} has a segmentation pycocotools cannot decode: {e}") from e
    if mask.shape != (height, width):
        raise ValueError(f"annotation {ann_id} decodes to {mask.shape}, not its image's ({height}, {width})")
    return mask


def downsample_masks(masks: Tensor, stride: int = 4) -> Tensor:
    """bool or 0/1 uint8 [..., H, W] (H, W multiples of `stride`) -> bool [..., H/stride, W/stride], as mmdet's
    SOLOv2 targets (`mmcv.imrescale(mask, 1 / stride)`: cv2's INTER_LINEAR on the uint8 0/1 mask, no antialiasing).

    For an even stride cv2 samples each output cell at source (stride * i + stride / 2 - 0.5), halfway between
    pixels stride * i + stride / 2 - 1 and stride * i + stride / 2 in each axis: the mean of those 2 x 2 pixels,
    rounded with 0.5 up, so a cell is set iff at least 2 of the 4 are. Checked equal to cv2 for strides 2, 4 and 8
    (tests/test_det_masks.py and its fixture of cv2's outputs); stride 4 is what SOLOv2 uses."""
    if stride % 2 or masks.shape[-2] % stride or masks.shape[-1] % stride:
        raise ValueError(f"downsample_masks takes an even stride that divides the mask size, not {stride} for "
                         f"{list(masks.shape[-2:])}")
    first = stride // 2 - 1
    rows = masks[..., first::stride, :].to(torch.uint8) + masks[..., first + 1::stride, :]  # [..., H/s, W] 0-2
    return rows[..., first::stride] + rows[..., first + 1::stride] >= 2  # [..., H/s, W/s]


def center_of_mass(masks: Tensor) -> Tensor:
    """bool / uint8 [..., H, W] -> float32 [..., 2], the (y, x) mean pixel index of each mask, as mmdet's
    `models.utils.center_of_mass` (integer sums, float32 division by the count clamped at 1e-6: an empty mask gives
    (0, 0)). Sums of the row and column counts: no [H, W] index grid per mask."""
    flat = masks.reshape(-1, *masks.shape[-2:])  # [K, H, W]
    rows = torch.zeros(len(flat), flat.shape[-2], dtype=torch.int64, device=masks.device)
    cols = torch.zeros(len(flat), flat.shape[-1], dtype=torch.int64, device=masks.device)
    for k, mask in enumerate(flat):  # one at a time: torch sums a bool tensor through an int64 copy of it
        rows[k], cols[k] = mask.sum(-1), mask.sum(-2)
    count = rows.sum(-1).float().clamp(min=1e-6)
    y = (rows * torch.arange(rows.shape[-1], device=masks.device)).sum(-1) / count
    x = (cols * torch.arange(cols.shape[-1], device=masks.device)).sum(-1) / count
    return torch.stack([y, x], -1).reshape(*masks.shape[:-2], 2)


def paste_masks(probs: Tensor, image_size: tuple[int, int], orig_size: tuple[int, int],
                threshold: float = 0.5, chunk: int = 16) -> Tensor:
    """Soft masks float [K, Hc/4, Wc/4] at stride 4 of the canvas -> bool [K, H0, W0] at the file's resolution, as
    mmdet's SOLOv2Head._predict_by_feat_single: bilinear (align_corners=False) up to the canvas (4 x the map), the
    image's (h, w) cropped from its top left, bilinear to (H0, W0), `> threshold`. `chunk` masks at a time (each is
    interpolated alone, so the result does not depend on it): 100 at once would hold 100 canvases of floats."""
    (h, w), (h0, w0) = image_size, orig_size
    canvas = (probs.shape[-2] * 4, probs.shape[-1] * 4)
    out = torch.zeros(len(probs), h0, w0, dtype=torch.bool)
    for start in range(0, len(probs), chunk):
        part = F.interpolate(probs[None, start:start + chunk].float(), size=canvas, mode="bilinear",
                             align_corners=False)[:, :, :h, :w]  # [1, k, h, w]
        part = F.interpolate(part, size=(h0, w0), mode="bilinear", align_corners=False)[0]
        out[start:start + chunk] = part.cpu() > threshold
    return out


def mask_boxes(masks: Tensor) -> Tensor:
    """bool [K, H, W] -> float32 [K, 4] xyxy enclosing each mask, mmdet's `mask2bbox` convention (x2, y2 = last
    column / row + 1); zeros for an empty mask."""
    cols, rows = masks.any(-2), masks.any(-1)  # [K, W], [K, H]
    x1, y1 = cols.int().argmax(-1), rows.int().argmax(-1)  # first True
    x2, y2 = cols.shape[-1] - cols.flip(-1).int().argmax(-1), rows.shape[-1] - rows.flip(-1).int().argmax(-1)
    boxes = torch.stack([x1, y1, x2, y2], -1).float()
    return boxes * cols.any(-1, keepdim=True)


def encode_rle(masks: Tensor) -> list[dict]:
    """bool [K, H, W] -> COCO compressed RLE per mask, {"size": [H, W], "counts": str} (str, not pycocotools'
    bytes, so the results are JSON)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))  # [H, W, K]
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]

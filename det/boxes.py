"""Box arithmetic shared by every detector: areas, IoU for whole batches, the anchor delta coder and the point
distance coder.

Boxes are (x1, y1, x2, y2) in pixels, last dimension 4; leading dimensions broadcast, so one call serves a single
image ([N, 4] vs [M, 4]) or a padded batch ([B, N, 4] vs [B, M, 4]).
"""
import math
from collections.abc import Sequence

import torch
from torch import Tensor


def box_area(boxes: Tensor) -> Tensor:
    """[..., 4] -> [...]; degenerate boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of every box in `boxes1` [..., N, 4] with every box in `boxes2` [..., M, 4] -> [..., N, M].

    `eps` keeps 0/0 (two empty boxes, e.g. padding rows) at 0 instead of NaN, as mmdet's bbox_overlaps does.
    """
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # [..., N, M, 2]
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)  # [..., N, M]
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return inter / union.clamp(min=eps)


def encode_deltas(
    anchors: Tensor, boxes: Tensor, means: Sequence[float] = (0, 0, 0, 0), stds: Sequence[float] = (1, 1, 1, 1)
) -> Tensor:
    """Regression targets of `boxes` relative to `anchors` (same shape [..., 4]): R-CNN's parametrisation
    (Girshick et al. 2014, eq. 6-9), dx = (gx - ax) / aw, dw = log(gw / aw), then normalised by means/stds
    (mmdet's DeltaXYWHBBoxCoder)."""
    anchor_wh = anchors[..., 2:] - anchors[..., :2]
    anchor_xy = (anchors[..., :2] + anchors[..., 2:]) * 0.5
    box_wh = boxes[..., 2:] - boxes[..., :2]
    box_xy = (boxes[..., :2] + boxes[..., 2:]) * 0.5
    deltas = torch.cat([(box_xy - anchor_xy) / anchor_wh, torch.log(box_wh / anchor_wh)], dim=-1)
    return (deltas - deltas.new_tensor(means)) / deltas.new_tensor(stds)


def decode_deltas(
    anchors: Tensor,
    deltas: Tensor,
    means: Sequence[float] = (0, 0, 0, 0),
    stds: Sequence[float] = (1, 1, 1, 1),
    wh_ratio_clip: float = 16 / 1000,
) -> Tensor:
    """Inverse of `encode_deltas`: boxes [..., 4] from anchors and predicted deltas (broadcasting).

    log-scale deltas are clamped to |log(wh_ratio_clip)| so exp() cannot overflow on a wild prediction
    (mmdet's delta2bbox); clipping to the image is the caller's, as it knows each image's size.
    """
    deltas = deltas * deltas.new_tensor(stds) + deltas.new_tensor(means)
    max_ratio = abs(math.log(wh_ratio_clip))
    anchor_wh = anchors[..., 2:] - anchors[..., :2]
    anchor_xy = (anchors[..., :2] + anchors[..., 2:]) * 0.5
    xy = anchor_xy + anchor_wh * deltas[..., :2]
    wh = anchor_wh * deltas[..., 2:].clamp(min=-max_ratio, max=max_ratio).exp()
    return torch.cat([xy - wh * 0.5, xy + wh * 0.5], dim=-1)


def distance_to_box(points: Tensor, distances: Tensor) -> Tensor:
    """Boxes from points [..., 2] (x, y) and their distances [..., 4] (left, top, right, bottom) to the box's sides,
    broadcasting: the anchor-free heads' coder (mmdet's DistancePointBBoxCoder.decode, clipping left to the caller)."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def clip_boxes(boxes: Tensor, image_size: Tensor) -> Tensor:
    """Clip boxes [B, N, 4] to each image's (h, w) given as [B, 2]."""
    h = image_size[:, 0, None].to(boxes.dtype)  # [B, 1]
    w = image_size[:, 1, None].to(boxes.dtype)
    x1, y1, x2, y2 = boxes.unbind(-1)
    zero = torch.zeros_like(x1)
    return torch.stack([x1.clamp(zero, w), y1.clamp(zero, h), x2.clamp(zero, w), y2.clamp(zero, h)], dim=-1)

"""What every dense single-stage detector shares: input normalisation, flattening per-level head outputs, and
turning class scores + box deltas over anchors into padded detections."""
from collections.abc import Sequence

import torch
from torch import Tensor

from det.boxes import box_area, clip_boxes, decode_deltas
from det.nms import batched_nms, topk_candidates


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 or float 0-255 images [B, 3, H, W] -> (x - mean) / std with per-channel [3] statistics (RGB order)."""
    return (images.float() - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def flatten_levels(maps: Sequence[Tensor], channels: int) -> Tensor:
    """Head outputs per level [B, K*channels, H, W] -> [B, sum(H*W*K), channels], in anchor order
    (level, row, column, base anchor: det/anchors.py)."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, channels) for m in maps], dim=1)


def image_size_or_canvas(images: Tensor, image_size: Tensor | None) -> Tensor:
    """Each image's (h, w) inside the canvas [B, 2]; the whole canvas when not given."""
    if image_size is not None:
        return image_size
    return torch.tensor(images.shape[-2:], device=images.device).expand(images.shape[0], 2)


def predict_boxes(
    scores: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    level_sizes: list[int],
    image_size: Tensor,
    *,
    stds: Sequence[float],
    nms_pre: int,
    score_thr: float,
    iou_thr: float,
    max_det: int,
    max_candidates: int = 1000,
) -> dict[str, Tensor]:
    """mmdet's `predict_by_feat` for anchor heads, batched and static in shape.

    scores [B, A, C] class probabilities (no background column), deltas [B, A, 4], anchors [A, 4],
    image_size [B, 2] (h, w) to clip to. Per level the `nms_pre` best (anchor, class) pairs above `score_thr`,
    decoded and clipped; zero-size boxes dropped (mmdet's min_bbox_size 0); class-wise NMS over the `max_candidates`
    best of those; the `max_det` best.
    Returns {"boxes": [B, max_det, 4], "scores", "labels", "valid": [B, max_det]}.
    """
    boxes = clip_boxes(decode_deltas(anchors[None], deltas, stds=stds), image_size)  # [B, A, 4]
    cand = topk_candidates(scores, boxes, level_sizes, nms_pre=nms_pre, score_thr=score_thr)
    valid = cand[3] & (box_area(cand[0]) > 0)  # positive width and height
    boxes, scores, labels, valid = batched_nms(cand[0], cand[1], cand[2], valid, iou_thr=iou_thr, max_det=max_det,
                                               max_candidates=max_candidates)
    return {"boxes": boxes, "scores": scores, "labels": labels, "valid": valid}

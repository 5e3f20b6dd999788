"""What every dense single-stage detector shares: input normalisation, flattening per-level head outputs, and
turning class scores + box deltas over anchors into padded detections."""
from collections.abc import Sequence

import torch
from torch import Tensor

from det.boxes import decode_deltas
from det.nms import select_and_nms


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 or float 0-255 images [B, 3, H, W] -> (x - mean) / std with per-channel [3] statistics (RGB order)."""
    if not isinstance(images, Tensor):  # every detector's forward starts here: a picture or list fails with a hint
        raise TypeError(f"a detector expects a uint8/float 0-255 tensor [B, 3, H, W] on its canvas, not "
                        f"{type(images).__name__}; for pictures, files or lists use det.predict.detect(model, images)")
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
    """mmdet's `predict_by_feat` for anchor heads: deltas decoded on their anchors, then `select_and_nms`.

    scores [B, A, C] class probabilities (no background column), deltas [B, A, 4], anchors [A, 4],
    image_size [B, 2] (h, w) to clip to; the rest as det/nms.py's select_and_nms.
    Returns {"boxes": [B, max_det, 4], "scores", "labels", "valid": [B, max_det]}.
    """
    boxes = decode_deltas(anchors[None], deltas, stds=stds)  # [B, A, 4]
    return select_and_nms(boxes, scores, level_sizes, image_size, nms_pre=nms_pre, score_thr=score_thr,
                          iou_thr=iou_thr, max_det=max_det, max_candidates=max_candidates)

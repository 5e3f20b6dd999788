"""Which anchor learns which object: the max-IoU assigner and SSD's hard-negative mining, for a whole batch.

Both work on ground truth padded to M boxes per image (`valid [B, M]` marks the real ones) and return masks, never
index lists: no `.nonzero()`, boolean indexing, `.item()` or Python loop over images, so the shapes do not depend
on the data and a training step compiles to one graph. Per-image loop references live in tests/test_det_assign.py.
"""
import torch
from torch import Tensor


def max_iou_assign(
    iou: Tensor,
    gt_valid: Tensor,
    *,
    pos_iou_thr: float,
    neg_iou_thr: float,
    min_pos_iou: float = 0.0,
    match_low_quality: bool = True,
    gt_max_assign_all: bool = True,
    anchor_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """mmdet's MaxIoUAssigner over a batch.

    iou: [B, A, M] IoU of every anchor with every padded gt box; gt_valid: [B, M]; anchor_valid: [B, A] or None
    (anchors over an image's padding take part in nothing, as mmdet's valid flags).
    Returns (matched [B, A] gt index, pos [B, A], neg [B, A]); `matched` is meaningful where `pos`.

    An anchor is negative if its best IoU < neg_iou_thr, positive if >= pos_iou_thr (matched to its best gt),
    else ignored. Low-quality matches (Ren et al. 2015) then make each gt's best anchor(s) positive even below the
    threshold; where several gts claim one anchor, the gt listed last wins, as in mmdet's loop over gts.
    """
    iou = iou.masked_fill(~gt_valid[:, None, :], 0.0)  # padding overlaps nothing; zero-gt images: all negative
    if anchor_valid is not None:  # mmdet assigns among valid anchors only: an invalid one is no gt's best match
        iou = iou.masked_fill(~anchor_valid[:, :, None], -1.0)
    max_iou, matched = iou.max(dim=2)  # [B, A]
    neg = max_iou < neg_iou_thr
    pos = max_iou >= pos_iou_thr
    if match_low_quality:
        gt_max = iou.max(dim=1, keepdim=True).values  # [B, 1, M]: each gt's best IoU over anchors
        if gt_max_assign_all:
            is_best = iou == gt_max  # every anchor tying for the best
        else:
            best_anchor = iou.argmax(dim=1, keepdim=True)  # [B, 1, M], the first best anchor
            is_best = torch.arange(iou.shape[1], device=iou.device)[None, :, None] == best_anchor
        is_best &= gt_valid[:, None, :] & (gt_max >= min_pos_iou)  # [B, A, M]
        # "last gt wins": the highest gt index among those claiming the anchor
        order = torch.arange(1, iou.shape[2] + 1, device=iou.device)
        claim = (is_best * order).amax(dim=2)  # [B, A], 0 = no claim
        matched = torch.where(claim > 0, claim - 1, matched)
        pos = pos | (claim > 0)
    neg = neg & ~pos
    if anchor_valid is not None:  # their IoU of -1 made them "negative" above
        neg = neg & anchor_valid
    return matched, pos, neg


def gather_gt(values: Tensor, matched: Tensor) -> Tensor:
    """values [B, M, ...] picked per anchor by matched [B, A] -> [B, A, ...]."""
    index = matched.reshape(*matched.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return values.gather(1, index)


def hard_negative_mask(loss: Tensor, pos: Tensor, neg: Tensor, neg_pos_ratio: int = 3) -> Tensor:
    """SSD's hard-negative mining (Liu et al. 2016, sec. 2.2): per image keep the `neg_pos_ratio * num_pos`
    negatives with the highest classification loss (all negatives if there are fewer).

    loss, pos, neg: [B, A]. A rank per anchor replaces mmdet's per-image `topk(k)` with a varying k: the kept set
    is the same up to ties, whose losses are equal, so the summed loss is identical.
    """
    num_neg = torch.minimum(neg_pos_ratio * pos.sum(dim=1), neg.sum(dim=1))  # [B]
    neg_loss = loss.detach().masked_fill(~neg, -1.0)  # cross-entropy >= 0, so non-negatives sort last
    rank = neg_loss.argsort(dim=1, descending=True).argsort(dim=1)  # [B, A]: 0 = hardest negative
    return neg & (rank < num_neg[:, None])

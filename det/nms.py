"""Inference post-processing with static shapes: candidate selection and exact class-aware greedy NMS, batched.
`select_and_nms` takes boxes already decoded (from anchors and deltas, or from points and distances), so every
dense head shares it.

`torchvision.ops.nms` has no NPU kernel (it falls back to the CPU) and returns a data-dependent number of boxes.
Here every step is a dense tensor op over a fixed number of candidates, and results come back padded to
`max_det` boxes per image with a `valid` mask.
"""
import torch
from torch import Tensor
from torch._higher_order_ops import while_loop

from det.boxes import box_area, box_iou, clip_boxes

Detections = tuple[Tensor, Tensor, Tensor, Tensor]  # boxes [B, K, 4], scores [B, K], labels [B, K], valid [B, K]


def pad_detections(k: int, boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor) -> Detections:
    """Detections [B, N, ...] padded to [B, k, ...] with invalid zero rows when N < k (as they are when N >= k)."""
    missing = k - scores.shape[1]
    if missing <= 0:
        return boxes, scores, labels, valid
    pad = (0, missing)
    return (torch.nn.functional.pad(boxes, (0, 0) + pad), torch.nn.functional.pad(scores, pad),
            torch.nn.functional.pad(labels, pad), torch.nn.functional.pad(valid, pad))


def topk_candidates(
    scores: Tensor, boxes: Tensor, level_sizes: list[int], *, nms_pre: int, score_thr: float
) -> Detections:
    """mmdet's `filter_scores_and_topk`, per level and for a whole batch: the `nms_pre` highest (anchor, class)
    scores above `score_thr` of each level, concatenated.

    scores [B, A, C] (class probabilities), boxes [B, A, D] decoded (D = 4, or more where a head carries a
    per-anchor factor along, as YOLOv3 its objectness), A = sum(level_sizes).
    Returns candidates [B, K, ...] with K = sum over levels of min(nms_pre, A_l * C); `valid` marks the real ones.
    """
    num_classes = scores.shape[2]
    out = []
    for level_scores, level_boxes in zip(scores.split(level_sizes, 1), boxes.split(level_sizes, 1), strict=True):
        flat = level_scores.flatten(1)  # [B, A_l * C], anchor-major as mmdet flattens it
        top, index = flat.topk(min(nms_pre, flat.shape[1]), dim=1)
        anchor = torch.div(index, num_classes, rounding_mode="floor")
        picked = level_boxes.gather(1, anchor[..., None].expand(-1, -1, level_boxes.shape[2]))
        out.append((picked, top, index % num_classes, top > score_thr))
    return tuple(torch.cat(parts, dim=1) for parts in zip(*out, strict=True))


def cluster_nms_keep(suppresses: Tensor, valid: Tensor) -> Tensor:
    """Greedy NMS's survivors, as Cluster-NMS finds them (Zheng et al. 2021, "Enhancing Geometric Factors in Model
    Learning and Inference", sec. 4). suppresses [B, K, K] bool: [j, i] where j ranks above i and would suppress it;
    valid [B, K]. Survivors satisfy keep_i = valid_i & not any_j(suppresses_ji & keep_j).

    Iterate that rule from "all valid survive". After pass t the first t boxes in rank order hold their final value
    (box 1 has no box above it; box t depends only on boxes above it, final after pass t - 1), so the greedy result
    is reached after at most K passes and is then a fixed point; the loop stops at the first pass that changes
    nothing, usually after a few. Traced (torch.compile, torch.export) the loop is a `while_loop`, a higher-order op:
    one graph with fullgraph=True, and an ONNX `Loop`. Eager it is a Python loop over the same pass (an eager
    while_loop would compile itself for every new shape, ~3 s each). Returns keep [B, K] bool.
    """
    def changed(keep: Tensor, previous: Tensor) -> Tensor:
        return (keep != previous).any()

    def one_pass(keep: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
        return valid & ~(suppresses & keep[:, :, None]).any(dim=1), keep.clone()  # [B, K]

    state = (valid & ~(suppresses & valid[:, :, None]).any(dim=1), valid.clone())  # after one pass, and before it
    if torch.compiler.is_compiling():
        return while_loop(changed, one_pass, state)[0]
    while changed(*state):
        state = one_pass(*state)
    return state[0]


def batched_nms(
    boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor, *, iou_thr: float, max_det: int,
    max_candidates: int = 1000,
) -> Detections:
    """Greedy NMS per image and class (torchvision's `batched_nms`), exactly, over the `max_candidates` best-scored
    valid candidates, then the `max_det` best. mmdet runs NMS over all nms_pre x levels candidates (5000 for
    RetinaNet); the cap only matters when more than `max_candidates` pass the score threshold, and it keeps the
    [B, K, K] overlap matrix small enough for CPUs.

    Sorted by score, box i survives iff no *surviving* higher-scored box of its class overlaps it by more than
    iou_thr: `cluster_nms_keep` solves that rule exactly. Inputs [B, K, ...]; outputs [B, max_det, ...] sorted by
    score, padding rows marked invalid.
    """
    order = scores.masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True)[:, :max_candidates]  # [B, K]
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    scores, labels, valid = scores.gather(1, order), labels.gather(1, order), valid.gather(1, order)
    k = scores.shape[1]
    higher = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(diagonal=1)  # [j, i]: j ranks above i
    suppresses = (box_iou(boxes, boxes) > iou_thr) & (labels[:, :, None] == labels[:, None, :]) & higher
    keep = cluster_nms_keep(suppresses, valid)
    boxes, scores, labels, keep = pad_detections(max_det, boxes, scores, labels, keep)
    top, index = scores.masked_fill(~keep, float("-inf")).topk(max_det, dim=1)
    return (boxes.gather(1, index[..., None].expand(-1, -1, 4)), top.masked_fill(top == float("-inf"), 0.0),
            labels.gather(1, index), keep.gather(1, index))


def select_and_nms(
    boxes: Tensor, scores: Tensor, level_sizes: list[int], image_size: Tensor, *, nms_pre: int, score_thr: float,
    iou_thr: float, max_det: int, max_candidates: int = 1000, score_factors: Tensor | None = None,
) -> dict[str, Tensor]:
    """mmdet's `predict_by_feat` after decoding, batched and static in shape.

    boxes [B, A, 4] decoded xyxy (one per anchor or point), scores [B, A, C] class probabilities (no background
    column), level_sizes: A per level (sum = A), image_size [B, 2] (h, w) to clip to. Per level the `nms_pre` best
    (location, class) pairs above `score_thr`, clipped; zero-size boxes dropped (mmdet's min_bbox_size 0);
    class-wise NMS over the `max_candidates` best of those; the `max_det` best. score_factors [B, A] (FCOS's
    centerness, or None): mmdet's `with_score_factors`, which picks the candidates by class score alone and then
    multiplies each candidate's score by its location's factor, before NMS ranks them.
    Returns {"boxes": [B, max_det, 4], "scores", "labels", "valid": [B, max_det]}.
    """
    if score_factors is not None:  # rides along as a fifth box column, so the candidates keep their own
        boxes = torch.cat([boxes, score_factors[..., None]], dim=-1)
    cand_boxes, cand_scores, cand_labels, cand_valid = topk_candidates(scores, boxes, level_sizes, nms_pre=nms_pre,
                                                                       score_thr=score_thr)
    if score_factors is not None:
        cand_boxes, cand_scores = cand_boxes[..., :4], cand_scores * cand_boxes[..., 4]
    cand_boxes = clip_boxes(cand_boxes, image_size)  # elementwise: the same as clipping all A boxes first
    valid = cand_valid & (box_area(cand_boxes) > 0)  # positive width and height
    boxes, scores, labels, valid = batched_nms(cand_boxes, cand_scores, cand_labels, valid, iou_thr=iou_thr,
                                               max_det=max_det, max_candidates=max_candidates)
    return {"boxes": boxes, "scores": scores, "labels": labels, "valid": valid}


def matrix_nms(
    masks: Tensor, scores: Tensor, labels: Tensor, valid: Tensor, *, sigma: float, filter_thr: float, max_det: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SOLOv2's Matrix NMS (Wang et al. 2020, "SOLOv2", sec. 3.3.2) with the Gaussian kernel, label-specific, as
    mmdet's mask_matrix_nms, for a whole batch: every score decays by how much its mask overlaps higher-scored masks
    of its class, in one pass over the [N, N] IoU matrix instead of greedy suppression.

    masks [B, N, ...] bool, scores [B, N], labels [B, N], valid [B, N]. Candidate j ranked below i (by score) decays
    by min over i of exp(-sigma (iou_ij^2 - c_i^2)), c_i the largest IoU of i with a mask of its class ranked above
    it (0 for none); decayed scores below filter_thr are dropped, the max_det best are kept. Invalid
    candidates rank last and their IoUs are masked to 0, so they neither decay others nor are kept.
    Returns (scores [B, max_det] decayed, labels, index [B, max_det] into N, valid), sorted by decayed score,
    padding rows invalid with score 0.
    """
    flat = masks.flatten(2).float()  # [B, N, D]
    area = flat.sum(-1)  # [B, N]
    with torch.autocast(masks.device.type, enabled=False):  # pixel counts: fp16 rounds them past 2048, ends at 65504
        inter = flat @ flat.transpose(1, 2)  # [B, N, N]
    order = scores.masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True)  # [B, N]
    n = order.shape[1]
    inter = inter.gather(1, order[:, :, None].expand(-1, -1, n)).gather(2, order[:, None, :].expand(-1, n, -1))
    area, scores, labels, valid = (t.gather(1, order) for t in (area, scores, labels, valid))
    union = area[:, :, None] + area[:, None, :] - inter
    # [B, i, j]: i ranks above j, same class, both real; the clamp only guards 0 / 0 between two empty masks
    pairs = torch.ones(n, n, dtype=torch.bool, device=masks.device).triu(diagonal=1) & (
        labels[:, :, None] == labels[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    decay_iou = torch.where(pairs, inter / union.clamp(min=1e-6), 0.0)  # [B, N, N]
    compensate_iou = decay_iou.amax(dim=1)  # [B, N]: each candidate's largest IoU with a higher-ranked one
    # mmdet: min over rows i of exp(-sigma iou_ij^2) / exp(-sigma c_i^2)
    coefficient = (torch.exp(-sigma * decay_iou**2) / torch.exp(-sigma * compensate_iou**2)[:, :, None]).amin(dim=1)
    scores = scores * coefficient
    keep = valid & (scores >= filter_thr)
    top, index = scores.masked_fill(~keep, float("-inf")).topk(min(max_det, n), dim=1)
    out = (top.masked_fill(top == float("-inf"), 0.0), labels.gather(1, index), order.gather(1, index),
           keep.gather(1, index))
    return tuple(torch.nn.functional.pad(t, (0, max_det - n)) for t in out) if n < max_det else out

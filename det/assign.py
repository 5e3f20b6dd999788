"""Which anchor learns which object: the max-IoU assigner, YOLOv3's grid assigner, YOLOX's SimOTA, FCOS's point
assignment, SSD's hard-negative mining and SOLO's grid cells, for a whole batch.

All work on ground truth padded to M boxes per image (`valid [B, M]` marks the real ones) and return masks, never
index lists: no `.nonzero()`, boolean indexing, `.item()` or Python loop over images, so the shapes do not depend
on the data and a training step compiles to one graph. Per-image loop references live in the tests
(tests/test_det_core.py, tests/test_det_yolov3.py, tests/test_det_yolox.py, tests/test_det_fcos.py,
tests/test_det_solov2.py).
"""
from collections.abc import Sequence

import torch
from torch import Tensor

from det.boxes import box_iou


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
        claim = _last_claim(is_best)
        matched = torch.where(claim > 0, claim - 1, matched)
        pos = pos | (claim > 0)
    neg = neg & ~pos
    if anchor_valid is not None:  # their IoU of -1 made them "negative" above
        neg = neg & anchor_valid
    return matched, pos, neg


def _last_claim(is_best: Tensor) -> Tensor:
    """is_best [B, A, M] (gt m claims anchor a) -> [B, A]: 1 + the highest claiming gt index, 0 for none. mmdet
    loops over the gts in order, so where several claim one anchor the gt listed last wins."""
    order = torch.arange(1, is_best.shape[2] + 1, device=is_best.device)
    return (is_best * order).amax(dim=2)


def grid_assign(
    iou: Tensor,
    responsible: Tensor,
    gt_valid: Tensor,
    *,
    pos_iou_thr: float = 0.5,
    neg_iou_thr: float = 0.5,
    min_pos_iou: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """mmdet's GridAssigner (YOLOv3) over a batch, gt_max_assign_all as its default.

    iou: [B, A, M] IoU of every anchor with every padded gt; responsible: [B, A], the anchors of every grid cell
    that holds some gt's centre on the anchor's level (YOLOv3's "responsible" cells, Redmon & Farhadi 2018 sec.
    2.1); gt_valid: [B, M]. Returns (matched [B, A], pos [B, A], neg [B, A]) as max_iou_assign.

    Negative: best IoU with any gt <= neg_iou_thr (responsible or not). Positive: a responsible anchor whose best
    IoU > pos_iou_thr, and every responsible anchor tying for a gt's best responsible IoU (if that is
    > min_pos_iou; the last gt wins). Non-responsible anchors above neg_iou_thr are ignored.
    """
    max_iou = iou.masked_fill(~gt_valid[:, None, :], 0.0).amax(dim=2)  # [B, A]; zero-gt images: all negative
    neg = max_iou <= neg_iou_thr
    iou = iou.masked_fill(~responsible[:, :, None] | ~gt_valid[:, None, :], -1.0)  # mmdet: overlaps[:, ~flags] = -1
    max_iou, matched = iou.max(dim=2)  # [B, A]
    pos = max_iou > pos_iou_thr
    gt_max = iou.amax(dim=1, keepdim=True)  # [B, 1, M], each gt's best responsible IoU (-1: none)
    claim = _last_claim((iou == gt_max) & (gt_max > min_pos_iou))  # padding and non-responsible sit at -1
    matched = torch.where(claim > 0, claim - 1, matched)
    pos = pos | (claim > 0)
    return matched, pos, neg & ~pos


def point_assign(points: Tensor, regress_ranges: Tensor, gt_boxes: Tensor,
                 gt_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """FCOS's assignment (Tian et al. 2019, sec. 3.1-3.2): mmdet 3.3.0's FCOSHead._get_targets_single without centre
    sampling, for a whole batch.

    points [A, 2] (x, y), regress_ranges [A, 2] (low, high) of each point's level, gt_boxes [B, M, 4], gt_valid
    [B, M]. Returns (matched [B, A] gt index, pos [B, A], distances [B, A, 4] (left, top, right, bottom) from each
    point to its gt's sides, meaningful where pos).

    A gt can claim a point that lies strictly inside it (all four distances > 0) and whose largest distance lies in
    the point's range (both ends included); of those, the gt of smallest area takes the point, the first listed on
    ties (mmdet's areas.min). Padding gts and non-claims get an infinite area, so a point nobody claims stays
    background and an image without objects has no positives.
    """
    x, y = points[None, :, None, 0], points[None, :, None, 1]  # [1, A, 1]
    x1, y1, x2, y2 = gt_boxes[:, None].unbind(-1)  # [B, 1, M] each
    left, top, right, bottom = x - x1, y - y1, x2 - x, y2 - y  # [B, A, M] each: never stacked into [B, A, M, 4]
    inside = torch.minimum(torch.minimum(left, top), torch.minimum(right, bottom)) > 0
    largest = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
    in_range = (largest >= regress_ranges[:, 0, None]) & (largest <= regress_ranges[:, 1, None])  # [B, A, M]
    claims = inside & in_range & gt_valid[:, None, :]
    area = torch.where(claims, (x2 - x1) * (y2 - y1), float("inf"))  # [B, A, M]
    min_area, matched = area.min(dim=2)  # [B, A]; torch, as mmdet, returns the first of equal minima
    gt = gather_gt(gt_boxes, matched)  # [B, A, 4] the matched gt, distances recomputed as mmdet computes them
    distances = torch.cat([points - gt[..., :2], gt[..., 2:] - points], dim=-1)
    return matched, min_area < float("inf"), distances


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


def simota_assign(
    pred_boxes: Tensor,
    pred_scores: Tensor,
    priors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
    *,
    center_radius: float = 2.5,
    candidate_topk: int = 10,
    iou_weight: float = 3.0,
    cls_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """YOLOX's SimOTA (Ge et al. 2021, sec. 2.2) for a whole batch: mmdet 3.3.0's SimOTAAssigner, image by image.

    pred_boxes [B, A, 4] decoded predictions, pred_scores [B, A, C] class probabilities in (0, 1) (YOLOX passes
    sqrt(sigmoid(cls) * sigmoid(obj))), priors [A, 4] (x, y, stride_w, stride_h): the points tested against the
    boxes, gt_boxes [B, M, 4], gt_labels [B, M], gt_valid [B, M]. Returns (matched [B, A] gt index, pos [B, A],
    pos_iou [B, A] IoU of each positive's prediction with its gt, 0 elsewhere).

    Candidates are the priors inside some gt box or inside some gt's centre square (+-center_radius strides), both
    strictly. Cost of a candidate for a gt: cls_weight x the BCE of its scores against the gt's one-hot label +
    iou_weight x -log(IoU + 1e-7) + 1e5 unless it lies in both the box and the centre square of that gt. Each gt
    takes its k cheapest candidates, k = int(sum of its `candidate_topk` best candidate IoUs), at least 1; a prior
    taken by several gts goes to its cheapest gt among all of them (mmdet's rule, which may be one that did not
    take it). mmdet's per-gt topk(k) with a data-dependent k becomes a rank mask over the `candidate_topk` cheapest
    (k never exceeds it: IoUs are at most 1), padded gts cost +inf and take nobody, non-candidates are never taken.
    The result is mmdet's up to exact ties: its BCE sums 80 terms in another order, which can only reorder costs
    within float32 rounding.
    """
    inf = 100000.0  # mmdet sim_ota_assigner.py INF
    xy, stride = priors[None, :, None, :2], priors[None, :, None, 2:]  # [1, A, 1, 2]
    top_left, bottom_right = gt_boxes[:, None, :, :2], gt_boxes[:, None, :, 2:]  # [B, 1, M, 2]
    # get_in_gt_and_in_center_info: min(l, t, r, b) > 0 is each difference > 0, i.e. each comparison strict
    in_gt = (xy > top_left).all(-1) & (bottom_right > xy).all(-1)  # [B, A, M]
    centre = (top_left + bottom_right) / 2.0
    in_centre = (xy > centre - center_radius * stride).all(-1) & (centre + center_radius * stride > xy).all(-1)
    in_gt, in_centre = in_gt & gt_valid[:, None, :], in_centre & gt_valid[:, None, :]
    candidate = (in_gt | in_centre).any(dim=2)  # [B, A] mmdet's valid_mask

    iou = box_iou(pred_boxes, gt_boxes)  # [B, A, M]
    # BCE summed over classes against a one-hot label = sum over all classes of -log(1 - p), then the label's term
    # swapped for -log(p); logs clamped at -100 as F.binary_cross_entropy clamps them
    log_p, log_not_p = pred_scores.log().clamp(min=-100), (1 - pred_scores).log().clamp(min=-100)  # [B, A, C]
    labels = gt_labels[:, None, :].expand(-1, pred_scores.shape[1], -1)  # [B, A, M]
    cls_cost = -log_not_p.sum(-1, keepdim=True) - log_p.gather(2, labels) + log_not_p.gather(2, labels)
    cost = cls_cost * cls_weight + -torch.log(iou + 1e-7) * iou_weight + (~(in_gt & in_centre)) * inf
    cost = cost.masked_fill(~(candidate[:, :, None] & gt_valid[:, None, :]), float("inf"))  # [B, A, M]

    # dynamic_k_matching: k from each gt's best candidate IoUs (non-candidates add 0, as if absent)
    topk = min(candidate_topk, iou.shape[1])
    best_ious = iou.masked_fill(~candidate[:, :, None], 0.0).topk(topk, dim=1).values  # [B, topk, M]
    dynamic_k = best_ious.sum(1).int().clamp(min=1) * gt_valid  # [B, M], 0 for padding
    cheapest = cost.topk(topk, dim=1, largest=False).indices  # [B, topk, M]
    rank = torch.arange(topk, device=cost.device)[None, :, None]
    matching = torch.zeros_like(cost, dtype=torch.bool).scatter(1, cheapest, rank < dynamic_k[:, None, :])
    matching &= candidate[:, :, None]  # a gt with k=1 in an image without candidates would take an +inf prior
    num_matches = matching.sum(dim=2)  # [B, A]
    matched = torch.where(num_matches > 1, cost.argmin(dim=2), matching.int().argmax(dim=2))
    pos = num_matches > 0
    pos_iou = iou.gather(2, matched[..., None]).squeeze(2) * pos  # [B, A]
    return matched, pos, pos_iou


def _grid_cell(value: Tensor, extent: int, grid: int) -> Tensor:
    """mmdet's int(floordiv(value / extent, 1 / grid, rounding_mode='trunc')) in float32: the cell of a canvas
    coordinate (truncated towards 0, so a centre region reaching past the top-left edge ends at cell 0)."""
    return torch.div(value / extent, 1.0 / grid, rounding_mode="trunc").long()


def _solo_pairs(boxes: Tensor, centers: Tensor, valid: Tensor, canvas: tuple[int, int], *, num_grids: Sequence[int],
                scale_ranges: Sequence[tuple[float, float]], pos_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Every (gt, level, cell of the 3 x 3 window around the gt's centre cell) SOLO could make positive: (pair
    [B, M, L, 9] whether it is, cell [B, M, L, 9] its index among all levels' cells, row-major level by level,
    cover [B, M, G] which cells each gt covers), G = sum of S^2."""
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]  # [B, M]
    size = (width * height).sqrt()
    # mmdet's 0.5 * (x2 - x1) * pos_scale, in this order: float32 rounding decides the edge cells
    half_w, half_h = 0.5 * width * pos_scale, 0.5 * height * pos_scale
    center_y, center_x = centers.unbind(-1)  # [B, M] canvas pixels
    offsets = torch.arange(-1, 2, device=boxes.device)
    pairs, cells, covers, first = [], [], [], 0
    for grid, (low, high) in zip(num_grids, scale_ranges, strict=True):
        row, col = _grid_cell(center_y, canvas[0], grid), _grid_cell(center_x, canvas[1], grid)  # [B, M] centre
        # the centre region (pos_scale of the half box), at most one cell beyond the centre cell each way
        top = torch.maximum(_grid_cell(center_y - half_h, canvas[0], grid).clamp(min=0), row - 1)
        down = torch.minimum(_grid_cell(center_y + half_h, canvas[0], grid).clamp(max=grid - 1), row + 1)
        left = torch.maximum(_grid_cell(center_x - half_w, canvas[1], grid).clamp(min=0), col - 1)
        right = torch.minimum(_grid_cell(center_x + half_w, canvas[1], grid).clamp(max=grid - 1), col + 1)
        hit = valid & (size >= low) & (size <= high)  # [B, M]; both ends inclusive, so ranges overlap
        rows, cols = row[..., None, None] + offsets[:, None], col[..., None, None] + offsets  # [B, M, 3, 1], [.., 1, 3]
        pair = (hit[..., None, None] & (rows >= top[..., None, None]) & (rows <= down[..., None, None])
                & (cols >= left[..., None, None]) & (cols <= right[..., None, None]))  # [B, M, 3, 3]
        pairs.append(pair.flatten(2))
        cells.append((first + rows * grid + cols).flatten(2))  # off-grid window cells are never pairs
        grid_range = torch.arange(grid, device=boxes.device)
        in_rows = (grid_range >= top[..., None]) & (grid_range <= down[..., None])  # [B, M, S]
        in_cols = (grid_range >= left[..., None]) & (grid_range <= right[..., None])
        covers.append((hit[..., None, None] & in_rows[..., :, None] & in_cols[..., None, :]).flatten(2))  # [B, M, S^2]
        first += grid * grid
    return torch.stack(pairs, 2), torch.stack(cells, 2), torch.cat(covers, 2)


def solo_pair_counts(boxes: Tensor, centers: Tensor, valid: Tensor, canvas: tuple[int, int], *,
                     num_grids: Sequence[int], scale_ranges: Sequence[tuple[float, float]],
                     pos_scale: float) -> Tensor:
    """int64 [B]: each image's positive (gt, grid cell) pairs under `solo_assign`, the number its fixed pair budget
    must hold (arguments as there)."""
    pair, _, _ = _solo_pairs(boxes, centers, valid, canvas, num_grids=num_grids, scale_ranges=scale_ranges,
                             pos_scale=pos_scale)
    return pair.flatten(1).sum(1)


def solo_assign(boxes: Tensor, labels: Tensor, centers: Tensor, valid: Tensor, canvas: tuple[int, int], *,
                num_grids: Sequence[int], scale_ranges: Sequence[tuple[float, float]], pos_scale: float,
                num_classes: int, max_pairs: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SOLO's targets (Wang et al. 2020, "SOLO", sec. 3.2; SOLOv2 keeps them): mmdet 3.3.0's
    SOLOV2Head._get_targets_single for a whole batch.

    boxes [B, M, 4], labels [B, M], centers [B, M, 2] (y, x) each gt's mask centre of mass in canvas pixels, valid
    [B, M] (False also for a gt with an empty mask, which mmdet skips), canvas (Hc, Wc) = 4 x the mask-feature map
    (mmdet's upsampled_size). Returns (cell_labels [B, G] with num_classes for background, pos [B, G], pair_cell
    [B, P], pair_gt [B, P], pair_valid [B, P]) over the G = sum of S^2 cells of all levels, row-major level by
    level, P = max_pairs.

    A gt goes to every level whose (low, high) range holds sqrt of its box area (ends included: up to 3 levels);
    there it covers the cells of its centre region, pos_scale x the half box around the mask's centre, clipped to
    the centre cell +- 1, in mmdet's float32 arithmetic. A cell covered by several gts takes the label of the last
    listed (mmdet's loop). Each (gt, covered cell) pair learns that gt's mask from that cell's kernel: mmdet keeps a
    list of them, here the first `max_pairs` in (gt, level, cell) order are packed into P slots with cumsum and
    scatter (pair_valid marks the filled ones), so the shapes stay fixed; `solo_pair_counts` says how many an image
    needs, and more than P would drop pairs, which the caller must rule out.
    """
    pair, cell, cover = _solo_pairs(boxes, centers, valid, canvas, num_grids=num_grids, scale_ranges=scale_ranges,
                                    pos_scale=pos_scale)
    batch, num_gt, per_gt = pair.shape[0], pair.shape[1], pair.shape[2] * pair.shape[3]  # per_gt = L x 9
    claim = _last_claim(cover.transpose(1, 2))  # [B, G] 1 + the last gt covering each cell, 0 for none
    pos = claim > 0
    cell_labels = torch.where(pos, labels.gather(1, (claim - 1).clamp(min=0)), num_classes)
    pair, cell = pair.flatten(1), cell.flatten(1)  # [B, M * L * 9] in (gt, level, cell) order
    gt = torch.arange(num_gt, device=boxes.device).repeat_interleave(per_gt).expand(batch, -1)
    slot = torch.where(pair, pair.cumsum(1) - 1, max_pairs).clamp(max=max_pairs)  # non-pairs and overflow: slot P
    pair_cell = cell.new_zeros(batch, max_pairs + 1).scatter(1, slot, cell)[:, :max_pairs]
    pair_gt = gt.new_zeros(batch, max_pairs + 1).scatter(1, slot, gt)[:, :max_pairs]
    pair_valid = torch.arange(max_pairs, device=boxes.device) < pair.sum(1, keepdim=True)
    return cell_labels, pos, pair_cell, pair_gt, pair_valid

"""SOLOv2-R50: parameter and multiply-accumulate counts, the targets against a per-image port of mmdet's loop,
Matrix NMS and the Dice loss against mmdet's formulas, the pair budget's check, the train/eval contract, one graph for
the training forward and for inference's post-processing, the recipe, and equality with mmdet 3.3.0 recorded as a
fixture (/tmp/solov2_fixture/record_solov2.py, run once with mmdet in its own environment)."""
import base64
import hashlib
import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import train_det
from det.assign import solo_assign, solo_pair_counts
from det.losses import dice_loss
from det.masks import center_of_mass, downsample_masks, mask_boxes, paste_masks
from det.models import solov2
from det.nms import matrix_nms
from tests.det_compare import LOSS_REL, SCORE_TOL, assert_same_detections, assert_same_losses, load_mmdet_fixture
from tests.graph_check import compiled_outputs
from tests.mmpretrain_fixture import seeded_state_dict
from tests.scripts import run_script

CANVAS = (96, 128)  # (h, w) of the fixture's canvas, a multiple of 32 as mmdet's preprocessor pads


def ellipse(canvas: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> torch.Tensor:
    """bool [H, W]: the pixels whose centre lies inside the ellipse."""
    y, x = torch.meshgrid(torch.arange(canvas[0]) + 0.5, torch.arange(canvas[1]) + 0.5, indexing="ij")
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def fixture_batch(max_gt: int = 8) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Three random uint8 images on a 96 x 128 canvas: a full-canvas image with three objects (an ellipse, an L that
    overlaps it, so they share cells, and a small one), an 80 x 100 image with two (one reaching its bottom-right
    corner, so the canvas padding matters) and a 64 x 80 image with none, junk in the padding rows. Returns (images,
    targets as the data loader gives them: boxes are the masks' extents, masks at stride 4, centres, image_size;
    the full-resolution masks [3, max_gt, 96, 128] mmdet reads). On this small canvas the grid cells are 2-8 px, so
    objects of 48-96 px cover 3 x 3 cells on two levels: image 0 needs 40 pairs, more than 9 x 4, hence 8 rows."""
    images = torch.randint(0, 256, (3, 3, *CANVAS), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    full = torch.zeros(3, max_gt, *CANVAS, dtype=torch.bool)
    full[0, 0] = ellipse(CANVAS, 40, 45, 30, 38)
    full[0, 1, 30:90, 60:80] = True
    full[0, 1, 70:90, 60:120] = True
    full[0, 2] = ellipse(CANVAS, 12, 110, 6, 9)
    full[1, 0] = ellipse(CANVAS, 30, 30, 20, 14)
    full[1, 1, 50:80, 64:100] = ellipse(CANVAS, 70, 85, 25, 25)[50:80, 64:100]
    valid = full.flatten(2).any(-1)
    boxes = torch.where(valid[..., None], mask_boxes(full.flatten(0, 1)).view(3, max_gt, 4),
                        torch.tensor([10.0, 10, 60, 50]))
    labels = torch.full((3, max_gt), 79)
    labels[0, :3], labels[1, :2] = torch.tensor([0, 17, 79]), torch.tensor([5, 5])
    targets = {"boxes": boxes, "labels": labels, "valid": valid, "masks": downsample_masks(full),
               "mask_centers": center_of_mass(full), "image_size": torch.tensor([[96, 128], [80, 100], [64, 80]])}
    return images, targets, full


# per recorded model (tests/data/mmdet_<name>.json.gz): the class-logit shift of fixture_state_dict, and what mmdet
# recorded (parameter counts, positive cells per image, detections per image) as a check that the right fixture is read
FIXTURES = {
    "solov2_r50": dict(cls_shift=-4.6, params=(46_592_912, 46_367_568),
                       cells=[40, 18, 0], detections=[47, 60, 100]),
    "solov2_light_r18": dict(cls_shift=-4.2, params=(18_271_760, 18_114_256), cells=[40, 36, 0],
                             detections=[7, 15, 4]),
}


def fixture_state_dict(keys: list[tuple[str, list[int]]], cls_shift: float = -4.6) -> dict[str, torch.Tensor]:
    """Seeded weights (tests/mmpretrain_fixture.py) with the head moved to look like a segmenter's: class logits
    `cls_shift` lower (4.6 for R50: 195-235 (cell, class) local maxima per image pass the 0.1 threshold; 4.2 for
    the light head: 429-478), under the 500 candidates, where the static selection is mmdet's, and kernels 0.04
    lower, so the masks cover from 1 to ~670 of the 768 stride-4 cells instead of nearly all (the area filter and
    Matrix NMS both have work to do)."""
    state = seeded_state_dict(keys)
    state["mask_head.conv_cls.bias"] = state["mask_head.conv_cls.bias"] + cls_shift
    state["mask_head.conv_kernel.bias"] = state["mask_head.conv_kernel.bias"] - 0.04
    return state


# the picture sizes the fixture's images were resized from (mmdet's ori_shape), so pasting also rescales
ORIG_SIZES = ((120, 160), (100, 125), (64, 80))


def unpack_masks(packed: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A base64 string of np.packbits' bytes -> bool [shape]."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(packed), dtype=np.uint8))[:int(np.prod(shape))]
    return torch.from_numpy(bits.reshape(shape).astype(bool))


def count(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def test_parameter_counts_macs_names_and_frozen_backbone():
    """figures.md: mmdet 3.3.0's solov2_r50_fpn_1x_coco, 80 classes; trainable with the recipe's frozen stem +
    stage 1 (the other BatchNorms' affine parameters train, their statistics stay: norm_eval); the network's
    multiply-accumulates at 800 x 1344 (convolutions and matrix products, counted on the meta device). mmdet's
    names."""
    model = solov2.solov2_r50()
    assert (count(model), count(model, trainable=True)) == (46_592_912, 46_367_568)
    with torch.device("meta"), FlopCounterMode(display=False) as flops:
        solov2.solov2_r50().eval().head_outputs(torch.zeros(1, 3, 800, 1344))
    assert round(flops.get_total_flops() / 2e9, 3) == 252.557
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1."))}
    model.train()
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert {k: v for k, v in load_mmdet_fixture("solov2_r50")["keys"]} == ours
    assert solov2.from_mmdet(model.state_dict()).keys() == model.state_dict().keys()
    assert solov2.solov2_r50(num_classes=3).mask_head.conv_cls.out_channels == 3
    recipe = solov2.RECIPES["solov2_r50"]
    assert (recipe["frozen_stages"], recipe["norm_eval"], recipe["iou_type"]) == (1, True, "segm")


def assert_same_masks(ours: dict[str, torch.Tensor], expected: dict, image_size: tuple[int, int],
                      orig_size: tuple[int, int]) -> None:
    """mmdet's best instances, each found among ours (pasted to the picture) with its label, its score within
    SCORE_TOL and its mask within MASK_TOL pixels, in any order (near-equal scores may swap on another CPU)."""
    shape = tuple(expected["mask_shape"])
    theirs = unpack_masks(expected["masks"], shape)
    k = min(2 * shape[0], int(ours["valid"].sum()))  # ours ranked 2 x as deep, for swaps at the fixture's cut
    pasted = paste_masks(ours["masks"][:k], image_size, orig_size)
    for i in range(shape[0]):
        label, score = expected["labels"][i], expected["scores"][i]
        diffs = [int((pasted[j] != theirs[i]).sum()) for j in range(k)
                 if ours["labels"][j] == label and abs(ours["scores"][j] - score) <= SCORE_TOL]
        assert diffs and min(diffs) <= MASK_TOL, (i, label, score, diffs)


# A pasted mask is the soft mask upsampled twice and thresholded at 0.5: the last-bit differences between CPUs
# (tests/det_compare.py) can flip only pixels whose probability lies within ~1e-6 of 0.5, a few along an edge;
# recorded here, no pixel of the 30 masks (0 to 18677 pixels) differs, and a wrong mask misses hundreds.
MASK_TOL = 8


def test_light_r18_counts_and_names_are_mmdets():
    """solov2-light_r18_fpn_ms-3x_coco as mmdet 3.3.0 builds it (80 classes): 18,271,760 parameters, 18,114,256
    trainable with frozen_stages 1; the sha256 of its sorted (name, shape) list, recorded from that build in the
    throw-away venv, equals ours: mmdet's light checkpoints load by name."""
    model = solov2.solov2_light_r18()
    assert (count(model), count(model, trainable=True)) == (18_271_760, 18_114_256)
    names = sorted((k, list(v.shape)) for k, v in model.state_dict().items())
    assert hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16] == "b277b09cf6784ccb"
    assert model.scale_ranges == solov2.LIGHT_SCALE_RANGES


@pytest.mark.parametrize("name", FIXTURES)
def test_equals_mmdet(name):
    """The head's outputs, targets, losses and predictions of mmdet 3.3.0 (recorded once) on seeded weights, with
    padded targets, an image without objects and pictures of another size than the images (mmdet's ori_shape):
    mmdet's positive cells, labels and (cell, mask) pairs; both losses; every kept instance's score and label, and
    the best ten's masks pasted at the picture's size (det/masks.py's paste_masks)."""
    fixture, expect = load_mmdet_fixture(name), FIXTURES[name]
    assert (fixture["params"], fixture["trainable"]) == expect["params"]
    model = getattr(solov2, name)()
    model.load_state_dict(solov2.from_mmdet(fixture_state_dict(fixture["keys"], expect["cls_shift"])),
                          strict=True)  # mmdet's names
    images, targets, full = fixture_batch()
    assert (int(images.long().sum()), int(full.sum())) == (fixture["image_sum"], fixture["mask_sum"])
    outputs = model.train().head_outputs(images)
    for key, value in fixture["output_sums"].items():  # the network alone
        assert outputs[key].sum().item() == pytest.approx(value, rel=LOSS_REL), key
    cell_labels, pos, pair_cell, pair_gt, pair_valid = solo_assign(
        targets["boxes"], targets["labels"], targets["mask_centers"], targets["valid"], CANVAS,
        num_grids=solov2.NUM_GRIDS, scale_ranges=model.scale_ranges, pos_scale=solov2.POS_SCALE, num_classes=80,
        max_pairs=solov2.PAIRS_PER_GT * targets["boxes"].shape[1])
    for b, expected in enumerate(fixture["assigned"]):  # mmdet's positive cells, labels and pairs (cell, mask area)
        assert pos[b].nonzero().squeeze(1).tolist() == expected["cells"], b
        assert cell_labels[b][pos[b]].tolist() == expected["labels"], b
        pairs = [(int(c), int(targets["masks"][b, g].sum())) for c, g in zip(pair_cell[b][pair_valid[b]],
                                                                              pair_gt[b][pair_valid[b]], strict=True)]
        assert sorted(pairs) == sorted(tuple(p) for level in expected["pairs"] for p in level), b
    assert [len(e["cells"]) for e in fixture["assigned"]] == expect["cells"]
    losses = solov2.solov2_loss(outputs, targets, scale_ranges=model.scale_ranges)
    assert_same_losses(losses, fixture["losses"])
    with torch.no_grad():
        out = model.eval()(images, image_size=targets["image_size"])
    assert [len(d["scores"]) for d in fixture["detections"]] == expect["detections"]
    for b, expected in enumerate(fixture["detections"]):
        ours = {k: v[b] for k, v in out.items()}
        # scores and labels as sets (mmdet's SOLOv2 gives no boxes: both sides' are zeros here)
        assert_same_detections({**ours, "boxes": torch.zeros(100, 4)}, {**expected, "boxes": [[0] * 4] * len(
            expected["scores"])}, max_det=100, canvas=CANVAS)
        assert_same_masks(ours, expected, tuple(targets["image_size"][b].tolist()), ORIG_SIZES[b])


def mmdet_center_of_mass(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mmdet.models.utils.center_of_mass, as written there."""
    h, w = mask.shape
    grid_h = torch.arange(h, device=mask.device)[:, None]
    grid_w = torch.arange(w, device=mask.device)
    normalizer = mask.sum().float().clamp(min=1e-6)
    center_h = (mask * grid_h).sum() / normalizer
    center_w = (mask * grid_w).sum() / normalizer
    return center_h, center_w


def reference_targets(gt_bboxes: torch.Tensor, gt_labels: torch.Tensor, gt_masks: torch.Tensor,
                      num_classes: int = 80) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """mmdet 3.3.0 SOLOV2Head._get_targets_single for one image, as written there, on full-resolution canvas masks
    [n, Hc, Wc] (mmcv.imrescale(mask, 1 / 4), cv2's, is det.masks.downsample_masks: tests/test_det_masks.py checks
    them equal; the mask targets are then each pair's gt's, so the pairs name their gt instead). Returns (labels [G]
    over all levels' cells, num_classes for background; the (cell, gt index) of every mask target, in mmdet's
    order)."""
    upsampled_size = gt_masks.shape[-2:]  # featmap_sizes * mask_stride
    gt_areas = torch.sqrt((gt_bboxes[:, 2] - gt_bboxes[:, 0]) * (gt_bboxes[:, 3] - gt_bboxes[:, 1]))
    mlvl_labels, pairs, first = [], [], 0
    for (lower_bound, upper_bound), num_grid in zip(solov2.SCALE_RANGES, solov2.NUM_GRIDS, strict=True):
        labels = torch.zeros([num_grid, num_grid], dtype=torch.int64) + num_classes
        gt_inds = ((gt_areas >= lower_bound) & (gt_areas <= upper_bound)).nonzero().flatten()
        hit_gt_bboxes, hit_gt_labels, hit_gt_masks = gt_bboxes[gt_inds], gt_labels[gt_inds], gt_masks[gt_inds]
        pos_w_ranges = 0.5 * (hit_gt_bboxes[:, 2] - hit_gt_bboxes[:, 0]) * solov2.POS_SCALE
        pos_h_ranges = 0.5 * (hit_gt_bboxes[:, 3] - hit_gt_bboxes[:, 1]) * solov2.POS_SCALE
        valid_mask_flags = hit_gt_masks.sum(dim=-1).sum(dim=-1) > 0
        for gt_ind, gt_mask, gt_label, pos_h_range, pos_w_range, valid_mask_flag in zip(
                gt_inds, hit_gt_masks, hit_gt_labels, pos_h_ranges, pos_w_ranges, valid_mask_flags, strict=True):
            if not valid_mask_flag:
                continue
            center_h, center_w = mmdet_center_of_mass(gt_mask)
            coord_w = int(torch.div((center_w / upsampled_size[1]), (1. / num_grid), rounding_mode="trunc"))
            coord_h = int(torch.div((center_h / upsampled_size[0]), (1. / num_grid), rounding_mode="trunc"))
            top_box = max(0, int(torch.div((center_h - pos_h_range) / upsampled_size[0], (1. / num_grid),
                                           rounding_mode="trunc")))
            down_box = min(num_grid - 1, int(torch.div((center_h + pos_h_range) / upsampled_size[0],
                                                       (1. / num_grid), rounding_mode="trunc")))
            left_box = max(0, int(torch.div((center_w - pos_w_range) / upsampled_size[1], (1. / num_grid),
                                            rounding_mode="trunc")))
            right_box = min(num_grid - 1, int(torch.div((center_w + pos_w_range) / upsampled_size[1],
                                                        (1. / num_grid), rounding_mode="trunc")))
            top, down = max(top_box, coord_h - 1), min(down_box, coord_h + 1)
            left, right = max(coord_w - 1, left_box), min(right_box, coord_w + 1)
            labels[top:(down + 1), left:(right + 1)] = gt_label
            for i in range(top, down + 1):
                for j in range(left, right + 1):
                    pairs.append((first + int(i * num_grid + j), int(gt_ind)))
        mlvl_labels.append(labels.flatten())
        first += num_grid ** 2
    return torch.cat(mlvl_labels), pairs


def random_masks(seed: int, batch: int = 4, max_gt: int = 8,
                 canvas: tuple[int, int] = (128, 160)) -> tuple[torch.Tensor, ...]:
    """Random ellipses and rectangles from 2 px to past the canvas (image 0 with 3-8, image 1 with hand-made edge
    cases, image 2 with one, the last none) and their annotation boxes (the masks' extents +- up to 1 px, floats, as
    COCO's polygon boxes are); junk boxes and masks in every padding row. Returns (full-resolution masks [B, M, H,
    W], boxes [B, M, 4], labels [B, M], the real rows' count per image [B])."""
    g = torch.Generator().manual_seed(seed)
    full = torch.zeros(batch, max_gt, *canvas, dtype=torch.bool)
    for b in range(batch):
        for m in range(max_gt):
            cy, cx = (torch.rand(2, generator=g) * torch.tensor(canvas)).tolist()
            ry, rx = (torch.rand(2, generator=g) ** 2 * torch.tensor(canvas) * 0.6 + 1).tolist()
            if m % 2:
                full[b, m] = ellipse(canvas, cy, cx, ry, rx)
            else:
                full[b, m, max(0, int(cy - ry)):int(cy + ry) + 1, max(0, int(cx - rx)):int(cx + rx) + 1] = True
    boxes = mask_boxes(full.flatten(0, 1)).view(batch, max_gt, 4) + torch.rand(batch, max_gt, 4, generator=g) * 2 - 1
    # image 1: two overlapping objects with nearby centres (they share cells; the later one labels them), a 96 x 96
    # box (sqrt(area) exactly 96: in the first three ranges), an object whose mask is empty (mmdet skips it) and one
    # whose centre of mass lies on a cell edge, y = 2080 / 50 = 41.6 = 13 x 128 / 40, which in mmdet's float32
    # (41.599998 / 128 / 0.025000000373 = 12.99999905) falls in row 12
    full[1, :5] = False
    full[1, 0, 20:70, 30:90] = True
    full[1, 1, 24:74, 34:94] = True
    full[1, 2] = ellipse(canvas, 70, 70, 48, 48)
    full[1, 4, 10:73, 130:150] = True
    full[1, 4, 41:81, 150] = True
    boxes[1, :5] = torch.tensor([[30.0, 20, 90, 70], [34, 24, 94, 74], [22, 22, 118, 118], [5, 5, 40, 40],
                                 [130, 10, 151, 81]])
    labels = torch.randint(0, 80, (batch, max_gt), generator=g)
    counts = torch.tensor([int(torch.randint(3, max_gt + 1, (), generator=g)), 5, 1] + [0] * (batch - 3))
    return full, boxes, labels, counts


@pytest.mark.parametrize("seed", range(3))
def test_solo_assign_equals_per_image_mmdet_loop(seed):
    """Labels per cell, positive cells, the multiset of (cell, gt) mask targets, the positive count and the pair
    count equal mmdet's loop, image by image; padding rows (valid False) take no part whatever they hold."""
    full, boxes, labels, counts = random_masks(seed)
    has_mask = full.flatten(2).any(-1)  # the data loader's valid: a real row whose mask is not empty
    valid = (torch.arange(full.shape[1]) < counts[:, None]) & has_mask
    canvas = full.shape[-2:]
    kwargs = dict(num_grids=solov2.NUM_GRIDS, scale_ranges=solov2.SCALE_RANGES, pos_scale=solov2.POS_SCALE)
    cell_labels, pos, pair_cell, pair_gt, pair_valid = solo_assign(
        boxes, labels, center_of_mass(full), valid, canvas, num_classes=80, max_pairs=27 * full.shape[1], **kwargs)
    pair_counts = solo_pair_counts(boxes, center_of_mass(full), valid, canvas, **kwargs)
    for b in range(len(full)):
        n = int(counts[b])
        expected_labels, expected_pairs = reference_targets(boxes[b, :n], labels[b, :n], full[b, :n])
        assert torch.equal(cell_labels[b], expected_labels), b
        assert torch.equal(pos[b], expected_labels < 80), b
        ours = sorted(zip(pair_cell[b][pair_valid[b]].tolist(), pair_gt[b][pair_valid[b]].tolist(), strict=True))
        assert ours == sorted(expected_pairs), b
        assert int(pair_counts[b]) == len(expected_pairs), b
    # the edge cases happened: image 1's 96 x 96 box learns on three levels, its first two objects share cells,
    # the empty-mask object has no pairs, the one on a cell edge is where mmdet puts it; the last image has none
    pairs_1 = list(zip(pair_cell[1][pair_valid[1]].tolist(), pair_gt[1][pair_valid[1]].tolist(), strict=True))
    level_starts = torch.tensor([0] + [g * g for g in solov2.NUM_GRIDS[:-1]]).cumsum(0)
    assert len({int((level_starts <= c).sum()) for c, g in pairs_1 if g == 2}) == 3
    shared = {c for c, g in pairs_1 if g == 0} & {c for c, g in pairs_1 if g == 1}
    assert shared and all(int(cell_labels[1, c]) == int(labels[1, 1]) for c in shared)
    assert not valid[1, 3] and all(g != 3 for _, g in pairs_1)
    assert {c // 40 for c, g in pairs_1 if g == 4} == {11, 12, 13}  # about row 12, not 13
    assert not pos[-1].any() and not pair_valid[-1].any()
    # a budget too small keeps the first pairs in (gt, level, cell) order, all slots filled
    few = solo_assign(boxes, labels, center_of_mass(full), valid, canvas, num_classes=80, max_pairs=5, **kwargs)
    assert few[4][:2].all() and torch.equal(few[2][:2], pair_cell[:2, :5]) and torch.equal(few[3][:2], pair_gt[:2, :5])


def mmdet_mask_matrix_nms(masks, labels, scores, filter_thr=-1, nms_pre=-1, max_num=-1, sigma=2.0):
    """mmdet 3.3.0 models/layers/matrix_nms.py mask_matrix_nms, kernel 'gaussian', as written there (returns
    scores, labels, keep_inds)."""
    if len(labels) == 0:
        return scores.new_zeros(0), labels.new_zeros(0), labels.new_zeros(0)
    mask_area = masks.sum((1, 2)).float()
    scores, sort_inds = torch.sort(scores, descending=True)
    keep_inds = sort_inds
    if nms_pre > 0 and len(sort_inds) > nms_pre:
        sort_inds, keep_inds, scores = sort_inds[:nms_pre], keep_inds[:nms_pre], scores[:nms_pre]
    masks, mask_area, labels = masks[sort_inds], mask_area[sort_inds], labels[sort_inds]
    num_masks = len(labels)
    flatten_masks = masks.reshape(num_masks, -1).float()
    inter_matrix = torch.mm(flatten_masks, flatten_masks.transpose(1, 0))
    expanded_mask_area = mask_area.expand(num_masks, num_masks)
    iou_matrix = (inter_matrix / (expanded_mask_area + expanded_mask_area.transpose(1, 0) - inter_matrix)).triu(
        diagonal=1)
    expanded_labels = labels.expand(num_masks, num_masks)
    label_matrix = (expanded_labels == expanded_labels.transpose(1, 0)).triu(diagonal=1)
    compensate_iou, _ = (iou_matrix * label_matrix).max(0)
    compensate_iou = compensate_iou.expand(num_masks, num_masks).transpose(1, 0)
    decay_iou = iou_matrix * label_matrix
    decay_matrix = torch.exp(-1 * sigma * (decay_iou**2))
    compensate_matrix = torch.exp(-1 * sigma * (compensate_iou**2))
    decay_coefficient, _ = (decay_matrix / compensate_matrix).min(0)
    scores = scores * decay_coefficient
    if filter_thr > 0:
        keep = scores >= filter_thr
        keep_inds = keep_inds[keep]
        if not keep.any():
            return scores.new_zeros(0), labels.new_zeros(0), labels.new_zeros(0)
        scores, labels = scores[keep], labels[keep]
    scores, sort_inds = torch.sort(scores, descending=True)
    keep_inds = keep_inds[sort_inds]
    if max_num > 0 and len(sort_inds) > max_num:
        sort_inds, keep_inds, scores = sort_inds[:max_num], keep_inds[:max_num], scores[:max_num]
    return scores, labels[sort_inds], keep_inds


@pytest.mark.parametrize("seed", range(3))
def test_matrix_nms_equals_mmdet(seed):
    """Random overlapping rectangles of 3 classes, 60 candidates per image of which a quarter are padding (junk
    masks, any score): the batched Matrix NMS keeps mmdet's candidates in mmdet's order with its decayed scores,
    padding neither decays nor is kept; the decay, filter_thr and the max_det cut all take effect."""
    g = torch.Generator().manual_seed(seed)
    batch, n, size = 3, 60, 24
    corners = torch.randint(0, size - 4, (batch, n, 2), generator=g)
    extents = torch.randint(4, 14, (batch, n, 2), generator=g)
    grid = torch.arange(size)
    masks = ((grid[:, None] >= corners[..., 0, None, None]) & (grid[:, None] < (corners + extents)[..., 0, None, None])
             & (grid >= corners[..., 1, None, None]) & (grid < (corners + extents)[..., 1, None, None]))  # [B, N, S, S]
    scores = torch.rand(batch, n, generator=g) * 0.95 + 0.05
    labels = torch.randint(0, 3, (batch, n), generator=g)
    valid = torch.rand(batch, n, generator=g) < 0.75
    valid[2] = False  # an image without candidates
    cfg = dict(sigma=2.0, filter_thr=0.05, max_det=30)
    kept_scores, kept_labels, index, keep = matrix_nms(masks, scores, labels, valid, **cfg)
    assert kept_scores.shape == kept_labels.shape == index.shape == keep.shape == (batch, 30)
    decayed = filtered = 0
    for b in range(batch):
        v = valid[b].nonzero().squeeze(1)
        want_scores, want_labels, want_index = mmdet_mask_matrix_nms(
            masks[b][v], labels[b][v], scores[b][v], filter_thr=cfg["filter_thr"], max_num=cfg["max_det"])
        k = int(keep[b].sum())
        assert k == len(want_scores) and not keep[b, k:].any() and (kept_scores[b, k:] == 0).all(), b
        torch.testing.assert_close(kept_scores[b, :k], want_scores, rtol=1e-6, atol=1e-7)
        assert kept_labels[b, :k].tolist() == want_labels.tolist(), b
        assert index[b, :k].tolist() == v[want_index].tolist(), b
        decayed += int((kept_scores[b, :k] < scores[b, index[b, :k]] - 1e-6).sum())
        filtered += len(v) - len(mmdet_mask_matrix_nms(masks[b][v], labels[b][v], scores[b][v], filter_thr=0.05)[0])
    assert decayed > 0 and filtered > 0 and keep[:2].all()  # both images had more than max_det left
    # label-specific: the same mask twice decays its lower copy only when both have one class
    same = masks[:1, :1].expand(1, 2, size, size)
    two = torch.tensor([[0.9, 0.8]])
    for pair_labels, decays in (([1, 1], True), ([1, 2], False)):
        out = matrix_nms(same, two, torch.tensor([pair_labels]), torch.ones(1, 2, dtype=torch.bool), **cfg)[0]
        assert (out[0, 1] < 0.8 - 1e-3) == decays


def test_dice_loss_equals_mmdet():
    """mmdet's dice_loss (naive_dice False, eps 1e-3) per mask, as written there, on soft predictions against
    masks, an empty target and an all-zero prediction (finite: the eps); the naive form differs."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 6, 7, generator=g)
    target = torch.rand(5, 6, 7, generator=g) > 0.6
    target[1], probs[2] = False, 0.0
    pred, tgt, eps = probs.flatten(1), target.flatten(1).float(), 1e-3
    a = torch.sum(pred * tgt, 1)
    b = torch.sum(pred * pred, 1) + eps
    c = torch.sum(tgt * tgt, 1) + eps
    want = 1 - (2 * a) / (b + c)
    got = dice_loss(probs.flatten(1), target.flatten(1))
    assert torch.equal(got, want) and torch.isfinite(got).all() and got[2] == 1
    naive = 1 - (2 * a + eps) / (pred.sum(1) + tgt.sum(1) + eps)
    assert not torch.allclose(got, naive, atol=1e-3)


def test_check_targets_names_an_image_over_the_pair_budget():
    """The fixture's first image needs 40 pairs: over 9 x 4 padded rows the loader's hook stops with its name, at 8
    rows (budget 72) the batch passes."""
    metas = [{"file_name": f"{i:012d}.jpg", "image_id": i} for i in (139, 285, 632)]
    _, targets, _ = fixture_batch(max_gt=4)
    with pytest.raises(ValueError, match=r"image 000000000139.jpg \(id 139\) has 40 .* budget of 36 .*--max-gt"):
        solov2.check_targets(targets, metas)
    _, targets, _ = fixture_batch()
    solov2.check_targets(targets, metas)


def small_batch() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A training batch on a 128 x 128 canvas: an image with two overlapping objects (padded to three rows) and a
    96 x 112 image without."""
    images = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    full = torch.zeros(2, 3, 128, 128, dtype=torch.bool)
    full[0, 0], full[0, 1, 60:120, 20:100] = ellipse((128, 128), 40, 50, 30, 40), True
    valid = full.flatten(2).any(-1)
    boxes = torch.where(valid[..., None], mask_boxes(full.flatten(0, 1)).view(2, 3, 4), 0.0)
    return images, {"boxes": boxes, "labels": torch.tensor([[3, 7, 0], [0, 0, 0]]), "valid": valid,
                    "masks": downsample_masks(full), "mask_centers": center_of_mass(full),
                    "image_size": torch.tensor([[128, 128], [96, 112]])}


def test_no_objects_trains_the_classifier_alone():
    """An image without objects trains the classifier towards background alone: loss_mask 0 and still in the graph
    (every head parameter gets a finite gradient, as mmdet's mask_feats.sum() * 0)."""
    model = solov2.solov2_r50().train()
    images, targets = small_batch()
    losses = model(images[1:], {k: v[1:] for k, v in targets.items()})
    assert losses["loss_mask"].item() == 0.0 and losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    for name, p in model.mask_head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_train_and_eval_contract_in_one_graph():
    """Training returns the two losses; eval 100 padded rows with soft masks at stride 4, zeros in the invalid rows,
    boxes inside the image. Neither the training forward (backbone, targets, pairs, losses) nor inference's
    post-processing (candidates, masks, Matrix NMS, boxes; its network is training's) breaks the graph: no host
    sync or data-dependent shape for an accelerator to stall on."""
    model = solov2.solov2_r50().train()
    images, targets = small_batch()
    got, want = compiled_outputs(model, images, targets), model(images, targets)
    assert set(want) == {"loss_mask", "loss_cls"} and all(v.shape == () and v > 0 for v in want.values())
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    with torch.no_grad():
        model.mask_head.conv_cls.bias.fill_(0.0)  # random heads score ~0.01, under the 0.1 threshold
        out = model.eval()(images, image_size=targets["image_size"])
        got = compiled_outputs(solov2.solov2_predict, model.head_outputs(images), targets["image_size"],
                               **solov2.TEST_CFG)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"boxes": (2, 100, 4), "scores": (2, 100),
                                                           "labels": (2, 100), "valid": (2, 100),
                                                           "masks": (2, 100, 32, 32)}
    valid = out["valid"]
    assert valid.any() and (out["scores"][~valid] == 0).all() and (out["masks"][~valid] == 0).all()
    assert ((out["masks"][valid] > 0.5).flatten(1).sum(1) > 8).all()  # the area filter: above the stride
    assert (out["boxes"][1, ..., 2] <= 112).all() and (out["boxes"][1, ..., 3] <= 96).all()
    assert torch.equal(got["valid"], valid)
    torch.testing.assert_close(got["scores"], out["scores"])


def test_recipe_reaches_the_flags_and_backbone_weights_load(tmp_path):
    """mmdet's 8 x 2 recipe as train_det.py's defaults (LR 0.01 for 16 images, warmup 500 from 0.001, clipping at
    35); torchvision's ResNet-50 (what the config starts from) loads into the backbone, the classifier unused."""
    args = train_det.parse_args(["--model", "solov2_r50"])
    assert (args.blr, args.lr_batch, args.batch_size, args.warmup_iters, args.warmup_factor, args.clip_grad,
            args.lr_steps, args.epochs) == (0.01, 16, 2, 500, 0.001, 35.0, (8, 11), 12)
    model = solov2.solov2_r50()
    donor = torchvision.models.resnet50()
    torch.save(donor.state_dict(), tmp_path / "resnet50.pth")
    report = solov2.load_backbone_weights(model, torch.load(tmp_path / "resnet50.pth", weights_only=True))
    assert report == {"missing": [], "unexpected": ["fc.weight", "fc.bias"], "shape_mismatch": []}
    assert torch.equal(model.backbone.layer4[2].conv3.weight, donor.layer4[2].conv3.weight)
    assert not model.backbone.conv1.weight.requires_grad


def test_matrix_nms_counts_pixels_in_float32_under_autocast():
    """Evaluation runs under autocast with --amp: the masks' overlaps are pixel counts (here up to 1600), which
    bfloat16 (fp16 on accelerators) would round; they stay float32, so the decay is the same."""
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(1, 20, 40, 40, generator=g) < torch.rand(1, 20, 1, 1, generator=g)
    scores, labels, valid = torch.rand(1, 20, generator=g), torch.zeros(1, 20, dtype=torch.long), torch.ones(1, 20,
                                                                                                           dtype=bool)
    cfg = dict(sigma=2.0, filter_thr=0.0, max_det=20)
    want = matrix_nms(masks, scores, labels, valid, **cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = matrix_nms(masks, scores, labels, valid, **cfg)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.convergence
def test_light_learns_synthetic_masks(tmp_path, tmp_path_factory, monkeypatch, synthetic_resnet18):
    """SOLOv2-light-R18 from the session's synthetic ResNet-18 backbone (as real training starts from ImageNet
    weights), the whole path: polygons decoded, masks resized and flipped with the image, stride-4 targets, the pair
    budget's check, Dice + focal loss, Matrix NMS, pasted masks in COCOeval. One epoch, 31 steps of 8 images on a
    128 px canvas (~2 min here: SOLOv2's grid branches cost the same at any canvas, ~0.5 s per image for the light
    head; the R50 head would take 5x longer). AdamW 2e-4 for the short run: at 5e-4 one of our runs saturated the
    masks (its Dice loss stayed at 2.8 from step 16 to the end of the epoch, whose checkpoint has 99.99 % of the mask
    probabilities above 0.99: the dynamic kernels grew too fast under AdamW's per-weight steps). Our runs reached
    mask AP 0.080 / AP50 0.234 after this epoch and 0.130 / 0.343 after a second (box AP of the masks 0.096 / AP50
    0.186); the assertion asks for AP50 0.12, where an untrained head scores 0.000. (It trained 2 epochs until the
    compile and export tests needed the CI minutes.)"""
    monkeypatch.setenv("PLAINVISION_CACHE", str(tmp_path_factory.getbasetemp() / "plainvision-cache"))
    run_script("train_det.py", "--model", "solov2_light_r18", "--device", "cpu", "--epochs", "1", "--img-size", "128",
               "--synthetic-size", "256", "--batch-size", "8", "--opt", "adamw", "--lr", "2e-4", "--warmup-iters", "20",
               "--lr-steps", "3", "--print-freq", "64", "--workers", "1",
               "--backbone-weights", str(synthetic_resnet18 / "best.pth"), "--output-dir", str(tmp_path))
    masks = json.loads((tmp_path / "coco_segm_summary.json").read_text())
    boxes = json.loads((tmp_path / "coco_bbox_summary.json").read_text())
    print("synthetic SOLOv2-light-R18, masks:", {k: round(v, 3) for k, v in masks.items()})
    print("boxes of the masks:", {k: round(v, 3) for k, v in boxes.items()})
    assert masks["AP50"] > 0.12


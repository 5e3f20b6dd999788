"""YOLOX-s: parameter count, the train/eval contract, empty and padded targets, SimOTA against a per-image port of
mmdet's loop, one graph for the whole training forward, checkpoint names, and equality with mmdet 3.3.0 recorded as
a fixture."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from det.assign import simota_assign
from det.models import yolox
from tests.det_compare import (
    CANVAS,
    LOSS_REL,
    assert_same_detections,
    assert_same_losses,
    fixture_batch,
    load_mmdet_fixture,
    losses_on_two_ranks,
    small_batch,
)
from tests.graph_check import compiled_outputs
from tests.mmpretrain_fixture import seeded_state_dict

PARAMS = 8_968_255  # mmdet 3.3.0's YOLOX built from yolox_s_8xb8-300e_coco.py


def fixture_state_dict(keys: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Seeded weights with the prediction biases moved so outputs look like a detector's: objectness around the
    0.01 score threshold (a hundred-odd points above it, not all near 0.5) and boxes about 96 px wide, so they
    overlap the objects and SimOTA takes more than one point for some of them."""
    state = seeded_state_dict(keys)
    for level, stride in enumerate(yolox.STRIDES):
        state[f"bbox_head.multi_level_conv_obj.{level}.bias"] -= 5.0
        state[f"bbox_head.multi_level_conv_reg.{level}.bias"][2:] += torch.log(torch.tensor(96.0 / stride))
    return state


def statistics_from_one_batch(model: nn.Module) -> None:
    """BatchNorms take the next training batch's statistics as their running ones (cumulative average of one
    batch): the seeded running statistics would flatten every evaluation score to nearly one value."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None


def test_parameter_count():
    model = yolox.yolox_s()
    assert sum(p.numel() for p in model.parameters()) == PARAMS
    assert all(p.requires_grad for p in model.parameters())  # mmdet trains YOLOX whole, from scratch
    assert yolox.yolox_s(num_classes=3).bbox_head.multi_level_conv_cls[2].out_channels == 3


def test_equals_mmdet():
    """Losses (without and with the L1 term), the assignment and detections of mmdet 3.3.0's YOLOX-s (recorded once
    against mmdet, mmcv's NMS replaced by torchvision's) on seeded weights, with padded targets and an image
    without objects; mmdet was fed the images in BGR."""
    fixture = load_mmdet_fixture("yolox_s")
    assert fixture["params"] == PARAMS
    model = yolox.yolox_s()
    model.load_state_dict(yolox.from_mmdet(fixture_state_dict(fixture["keys"])), strict=True)  # mmdet's names
    statistics_from_one_batch(model)
    images, targets = fixture_batch()
    assert int(images.long().sum()) == fixture["image_sum"]
    with torch.no_grad():  # training mode: BatchNorm on this batch's statistics, which become the running ones
        outputs = model.train().head_outputs(images)
    for key, value in fixture["output_sums"].items():  # the network alone, before assignment and losses
        assert outputs[key].sum().item() == pytest.approx(value, rel=LOSS_REL), key
    matched, pos, _ = yolox.assign(outputs, targets)
    for b, expected in enumerate(fixture["assigned"]):  # mmdet's indices per image; our gts are padded in order
        assert pos[b].nonzero().squeeze(1).tolist() == expected["priors"], b
        assert matched[b][pos[b]].tolist() == expected["gts"], b
    for use_l1, expected in ((False, fixture["losses"]), (True, fixture["losses_l1"])):
        model.bbox_head.use_l1 = use_l1
        losses = model.loss(outputs, targets)
        assert_same_losses(losses, expected)
    with torch.no_grad():
        out = model.eval()(images, image_size=targets["image_size"])
    assert all(0 < len(d["scores"]) <= yolox.TEST_CFG["max_candidates"] for d in fixture["detections"])
    for b, expected in enumerate(fixture["detections"]):
        assert_same_detections({k: v[b] for k, v in out.items()}, expected, max_det=yolox.TEST_CFG["max_det"],
                               canvas=CANVAS)


def test_train_and_eval_contract():
    model = yolox.yolox_s().train()
    images, targets = small_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_obj"} and not model.bbox_head.use_l1
    assert all(v.shape == () and torch.isfinite(v) and v > 0 for v in losses.values())
    with torch.no_grad():
        outputs = model.head_outputs(images)
    a = 8 * 12 + 4 * 6 + 2 * 3  # points at strides 8, 16, 32 of a 64 x 96 canvas
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "cls_logits": (2, a, 80), "objectness": (2, a), "box_preds": (2, a, 4), "priors": (a, 4), "boxes": (2, a, 4)}
    # mmdet's MlvlPointGenerator(offset=0): cell corners, row-major per level, with the level's stride
    assert outputs["priors"][:2].tolist() == [[0, 0, 8, 8], [8, 0, 8, 8]]
    assert outputs["priors"][12].tolist() == [0, 8, 8, 8]
    assert outputs["priors"][8 * 12 + 6 + 3].tolist() == [48, 16, 16, 16]
    assert outputs["priors"][-1].tolist() == [64, 32, 32, 32]
    model.bbox_head.use_l1 = True  # what mmdet's YOLOXModeSwitchHook does for the last epochs
    assert set(model.loss(outputs, targets)) == {"loss_cls", "loss_bbox", "loss_obj", "loss_l1"}
    with torch.no_grad():
        out = model.eval()(images, image_size=targets["image_size"])
    k = yolox.TEST_CFG["max_det"]
    assert {k: tuple(v.shape) for k, v in out.items()} == {"boxes": (2, k, 4), "scores": (2, k), "labels": (2, k),
                                                           "valid": (2, k)}
    with pytest.raises(ValueError, match="multiples of 32"):
        model(images[..., :80])


def test_no_objects_trains_and_padding_rows_change_nothing():
    """An image without objects: objectness learns background everywhere, the other losses are 0 and every head
    parameter still gets a finite gradient, even with junk (an inverted box) in its padding. Junk in padding rows
    changes no loss."""
    model = yolox.yolox_s().train()
    model.bbox_head.use_l1 = True
    images, targets = small_batch()
    empty = {k: v[1:].clone() for k, v in targets.items()}
    empty["boxes"][0, 0] = torch.tensor([50.0, 60, 20, 10])
    losses = model(images[1:], empty)
    assert losses["loss_cls"].item() == losses["loss_bbox"].item() == losses["loss_l1"].item() == 0.0
    assert losses["loss_obj"].item() > 0
    sum(losses.values()).backward()
    for name, p in model.bbox_head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    junk = {k: v.clone() for k, v in targets.items()}
    junk["boxes"][:, 2:] = torch.tensor([[[50.0, 60, 20, 10]], [[0, 0, 96, 64]]])  # inverted, and the canvas
    junk["labels"][:, 2:] = 79
    with torch.no_grad():
        outputs = model.head_outputs(images)
        a, b = model.loss(outputs, targets), model.loss(outputs, junk)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


INF = 100000.0


def reference_simota(priors: torch.Tensor, pred_boxes: torch.Tensor, pred_scores: torch.Tensor, gt_boxes: torch.Tensor,
                     gt_labels: torch.Tensor, center_radius: float = 2.5,
                     candidate_topk: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """mmdet 3.3.0 SimOTAAssigner.assign for one image, its loops and boolean indexing as written there (iou and
    cls weights 3 and 1). Returns (assigned gt index + 1 per prior, 0 for background; IoU of the positives)."""
    num_gt, num_priors = len(gt_boxes), len(priors)
    assigned = torch.zeros(num_priors, dtype=torch.long)
    max_overlaps = torch.zeros(num_priors)
    if num_gt == 0:
        return assigned, max_overlaps
    x, y = priors[:, 0:1].repeat(1, num_gt), priors[:, 1:2].repeat(1, num_gt)
    sx, sy = priors[:, 2:3].repeat(1, num_gt), priors[:, 3:4].repeat(1, num_gt)
    deltas = torch.stack([x - gt_boxes[:, 0], y - gt_boxes[:, 1], gt_boxes[:, 2] - x, gt_boxes[:, 3] - y], dim=1)
    is_in_gts = deltas.min(dim=1).values > 0
    cx, cy = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2.0, (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2.0
    ct = torch.stack([x - (cx - center_radius * sx), y - (cy - center_radius * sy), (cx + center_radius * sx) - x,
                      (cy + center_radius * sy) - y], dim=1)
    is_in_cts = ct.min(dim=1).values > 0
    valid = is_in_gts.sum(1).gt(0) | is_in_cts.sum(1).gt(0)
    in_both = is_in_gts[valid, :] & is_in_cts[valid, :]
    num_valid = int(valid.sum())
    if num_valid == 0:
        return assigned, max_overlaps
    ious = torchvision.ops.box_iou(pred_boxes[valid], gt_boxes)
    onehot = F.one_hot(gt_labels, pred_scores.shape[-1]).float().unsqueeze(0).repeat(num_valid, 1, 1)
    scores = pred_scores[valid].unsqueeze(1).repeat(1, num_gt, 1)
    cls_cost = F.binary_cross_entropy(scores, onehot, reduction="none").sum(-1)
    cost = cls_cost * 1.0 + -torch.log(ious + 1e-7) * 3.0 + (~in_both) * INF
    matching = torch.zeros_like(cost, dtype=torch.uint8)
    topk_ious, _ = torch.topk(ious, min(candidate_topk, num_valid), dim=0)
    dynamic_ks = torch.clamp(topk_ious.sum(0).int(), min=1)
    for g in range(num_gt):
        _, pos_idx = torch.topk(cost[:, g], k=int(dynamic_ks[g]), largest=False)
        matching[:, g][pos_idx] = 1
    multiple = matching.sum(1) > 1
    if multiple.sum() > 0:
        _, cost_argmin = torch.min(cost[multiple, :], dim=1)
        matching[multiple, :] *= 0
        matching[multiple, cost_argmin] = 1
    fg = matching.sum(1) > 0
    valid_fg = valid.clone()
    valid_fg[valid.clone()] = fg
    assigned[valid_fg] = matching[fg, :].argmax(1) + 1
    max_overlaps[valid_fg] = (matching * ious).sum(1)[fg]
    return assigned, max_overlaps


def random_simota_inputs(seed: int, batch: int = 3, max_gt: int = 6,
                         canvas: tuple[int, int] = (192, 256)) -> tuple[torch.Tensor, ...]:
    """Random objects from 2 px to most of the canvas (image 0 with 2-6, image 1 with one, the last without; padding
    rows hold boxes too), the real grid's points, and half the predictions scattered around the objects, so IoUs
    run high and dynamic k grows past 1."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(canvas[0] // s, canvas[1] // s) for s in yolox.STRIDES]
    priors = yolox.grid_priors(sizes, yolox.STRIDES, torch.device("cpu"))
    priors = priors + torch.cat([priors[:, 2:] * 0.5, torch.zeros(len(priors), 2)], 1)  # centres, as the head
    a = len(priors)
    xy = torch.rand(batch, max_gt, 2, generator=g) * torch.tensor([canvas[1], canvas[0]]) * 0.8
    wh = torch.rand(batch, max_gt, 2, generator=g) ** 2 * torch.tensor([canvas[1], canvas[0]]) * 0.6 + 2
    gt_boxes = torch.cat([xy, xy + wh], -1)
    gt_labels = torch.randint(0, 80, (batch, max_gt), generator=g)
    counts = [int(torch.randint(2, max_gt + 1, (), generator=g)), 1] + [0] * (batch - 2)
    gt_valid = torch.arange(max_gt)[None] < torch.tensor(counts)[:, None]
    near = gt_boxes.gather(1, torch.randint(0, max_gt, (batch, a, 1), generator=g).expand(-1, -1, 4))
    jitter = torch.randn(batch, a, 4, generator=g) * (near[..., 2:] - near[..., :2]).repeat(1, 1, 2) * 0.15
    wild = torch.cat([priors[:, :2] - 20, priors[:, :2] + 20], 1).expand(batch, -1, -1)  # boxes around the point
    pred_boxes = torch.where(torch.rand(batch, a, 1, generator=g) < 0.5, near + jitter, wild)
    pred_boxes = torch.cat([pred_boxes[..., :2], torch.maximum(pred_boxes[..., 2:], pred_boxes[..., :2] + 1)], -1)
    pred_scores = torch.rand(batch, a, 80, generator=g) * 0.98 + 0.01
    return priors, pred_boxes, pred_scores, gt_boxes, gt_labels, gt_valid


@pytest.mark.parametrize("seed", range(4))
def test_simota_equals_per_image_mmdet_loop(seed):
    priors, pred_boxes, pred_scores, gt_boxes, gt_labels, gt_valid = random_simota_inputs(seed)
    matched, pos, pos_iou = simota_assign(pred_boxes, pred_scores, priors, gt_boxes, gt_labels, gt_valid)
    assert pos[0].sum() > gt_valid[0].sum()  # some gt took several points
    assert not pos[-1].any()  # the image without objects
    for b in range(len(pos)):
        n = int(gt_valid[b].sum())
        assigned, overlaps = reference_simota(priors, pred_boxes[b], pred_scores[b], gt_boxes[b, :n], gt_labels[b, :n])
        assert torch.equal(pos[b], assigned > 0), b
        assert torch.equal(matched[b][pos[b]], assigned[pos[b]] - 1), b
        torch.testing.assert_close(pos_iou[b], torch.where(pos[b], overlaps, 0.0), rtol=0, atol=0)


def test_simota_candidates_are_strictly_inside():
    """Points on a box edge or on the border of the centre square (+-2.5 strides) are no candidates (mmdet's `> 0`).
    Every prediction equals the object, so its k is its candidate count and it takes all of them."""
    gt = torch.tensor([[[0.0, 0, 100, 20]]])  # centre square x in (30, 70), y in (-10, 30) at stride 8
    points = [[50, 10], [0, 10], [100, 10], [0.5, 10], [10, 20], [30, 25], [30.5, 25], [50, 30]]
    priors = torch.cat([torch.tensor(points), torch.full((len(points), 2), 8.0)], 1)
    _, pos, pos_iou = simota_assign(gt.expand(1, len(points), 4), torch.full((1, len(points), 2), 0.5), priors, gt,
                                    torch.tensor([[1]]), torch.tensor([[True]]))
    assert pos[0].tolist() == [True, False, False, True, False, False, True, False]
    assert pos_iou[0].tolist() == [1, 0, 0, 1, 0, 0, 1, 0]
    reference, _ = reference_simota(priors, gt[0].expand(len(points), 4), torch.full((len(points), 2), 0.5), gt[0],
                                    torch.tensor([1]))
    assert torch.equal(reference > 0, pos[0])


def test_simota_prior_claimed_twice_goes_to_the_cheapest_of_all_gts():
    """Gts 0 and 1 both take point 0; gt 2 takes point 1, yet point 0 is cheapest for gt 2, which gets it (mmdet:
    argmin of the cost over all gts, not only those that took the point)."""
    gts = torch.tensor([[[0.0, 0, 40, 41], [0, 0, 40.8, 40.4], [0, 0, 40, 40]]])
    pred_boxes = torch.tensor([[[0.0, 0, 40, 40.4], [0, 0, 40, 40]]])
    priors, scores = torch.tensor([[20.0, 20, 8, 8], [21, 20, 8, 8]]), torch.full((1, 2, 4), 0.5)
    matched, pos, _ = simota_assign(pred_boxes, scores, priors, gts, torch.tensor([[1, 1, 1]]), torch.ones(1, 3).bool())
    assert pos[0].tolist() == [True, True] and matched[0].tolist() == [2, 2]
    reference, _ = reference_simota(priors, pred_boxes[0], scores[0], gts[0], torch.tensor([1, 1, 1]))
    assert reference.tolist() == [3, 3]


def test_train_forward_compiles_as_one_graph():
    """The whole training forward (backbone, neck, head, priors, SimOTA, losses with L1) is one graph without a host
    sync or a data-dependent shape (tests/graph_check.py)."""
    model = yolox.yolox_s().train()
    model.bbox_head.use_l1 = True
    images, targets = small_batch()
    got = compiled_outputs(model, images, targets)
    want = model(images, targets)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_checkpoint_names_and_backbone_weights():
    """`ema_*` buffers, which mmdet 2.x's EMA hook leaves beside the averaged weights, are dropped. The backbone
    loads from a YOLOX checkpoint's `backbone.*`; an ImageNet ResNet is refused."""
    source = yolox.yolox_s()
    state = source.state_dict()
    mmdet = {"state_dict": state | {"ema_backbone_stem_conv_conv_weight": state["backbone.stem.conv.conv.weight"]}}
    assert set(yolox.from_mmdet(mmdet["state_dict"])) == set(state)
    model = yolox.yolox_s()
    report = yolox.load_backbone_weights(model, mmdet)
    assert report == {"missing": [], "unexpected": [], "shape_mismatch": []}
    assert torch.equal(model.backbone.stage4[1].conv2.conv.weight, source.backbone.stage4[1].conv2.conv.weight)
    with pytest.raises(SystemExit, match="does not fit"):
        yolox.load_backbone_weights(model, torchvision.models.resnet18().state_dict())


def head_outputs_for(batch: int, seed: int = 7) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random YOLOX head outputs on a 64 x 64 canvas (84 points, 5 classes) and padded targets with 0-3 objects."""
    g = torch.Generator().manual_seed(seed)
    priors = yolox.grid_priors([(8, 8), (4, 4), (2, 2)], yolox.STRIDES, torch.device("cpu"))
    box_preds = torch.randn(batch, len(priors), 4, generator=g) * 0.5
    outputs = {"cls_logits": torch.randn(batch, len(priors), 5, generator=g), "priors": priors,
               "objectness": torch.randn(batch, len(priors), generator=g), "box_preds": box_preds,
               "boxes": yolox.decode_boxes(priors, box_preds)}
    xy = torch.rand(batch, 3, 2, generator=g) * 40
    targets = {"boxes": torch.cat([xy, xy + 8 + torch.rand(batch, 3, 2, generator=g) * 16], -1),
               "labels": torch.randint(0, 5, (batch, 3), generator=g),
               "valid": torch.arange(3)[None] < torch.randint(0, 4, (batch, 1), generator=g)}
    return outputs, targets


def test_positive_count_is_averaged_over_ranks(tmp_path):
    """mmdet's reduce_mean: each rank divides its sums by the positives averaged over ranks, so the ranks' mean loss
    (what DistributedDataParallel's averaged gradients follow) equals one process's loss on the whole batch."""
    whole, ranks = losses_on_two_ranks(tmp_path, head_outputs_for, partial(yolox.yolox_loss, use_l1=True),
                                       shared=("priors",))
    for key, value in whole.items():
        torch.testing.assert_close((ranks[0][key] + ranks[1][key]) / 2, value, msg=key)
    assert whole["loss_bbox"] > 0 and ranks[0]["loss_bbox"] != ranks[1]["loss_bbox"]  # the halves differ

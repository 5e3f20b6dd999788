"""YOLOv3-D53: parameter count, the grid assigner and responsible cells against per-image ports of mmdet's loops,
empty and padded targets, one graph for the whole training forward, Darknet's frozen stages / norm_eval, and
equality with mmdet 3.3.0 recorded as a fixture."""

import pytest
import torch
from torch import nn

from det.assign import grid_assign
from det.boxes import box_iou
from det.darknet import Darknet
from det.models import yolov3
from tests.det_compare import assert_matches_fixture, empty_targets, load_mmdet_fixture
from tests.graph_check import compiled_outputs
from tests.mmpretrain_fixture import seeded_state_dict

PARAMS = 61_949_149  # ../shared/reference/figures.md, and mmdet's own model


def adjust_fixture_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Seeded weights with the prediction biases moved so scores look like a detector's: objectness around the
    0.005 confidence threshold and class probabilities around the 0.05 score threshold, not all near 0.5."""
    for level in range(3):
        bias = state[f"bbox_head.convs_pred.{level}.bias"].view(3, -1)
        bias[:, 4] -= 5.0
        bias[:, 5:] -= 3.0
    return state


def test_parameter_count():
    assert sum(p.numel() for p in yolov3.yolov3_d53().parameters()) == PARAMS
    model = yolov3.yolov3_d53(num_classes=3)
    assert model.bbox_head.convs_pred[0].out_channels == 3 * (5 + 3)


def test_equals_mmdet():
    """Losses and detections of mmdet 3.3.0's YOLOv3 (recorded once against mmdet, mmcv's NMS replaced by
    torchvision's) on seeded weights, with padded targets and an image without objects."""
    fixture = load_mmdet_fixture("yolov3_d53")
    assert fixture["params"] == PARAMS
    model = yolov3.yolov3_d53()
    model.load_state_dict(adjust_fixture_state(seeded_state_dict(fixture["keys"])), strict=True)  # mmdet's names
    assert_matches_fixture(model, fixture, max_det=yolov3.TEST_CFG["max_det"])


def reference_responsible(gt_boxes: torch.Tensor, feature_sizes, strides=yolov3.STRIDES) -> torch.Tensor:
    """mmdet 3.3.0 YOLOV3Head.responsible_flags for one image, as written there."""
    flags = []
    for (h, w), stride in zip(feature_sizes, strides, strict=True):
        cx, cy = (gt_boxes[:, 0] + gt_boxes[:, 2]) * 0.5, (gt_boxes[:, 1] + gt_boxes[:, 3]) * 0.5
        index = torch.floor(cy / stride).long() * w + torch.floor(cx / stride).long()
        grid = torch.zeros(h * w, dtype=torch.uint8)
        grid[index] = 1
        flags.append(grid[:, None].expand(h * w, 3).contiguous().view(-1))
    return torch.cat(flags).bool()


def reference_grid_assign(iou: torch.Tensor, responsible: torch.Tensor, pos_thr=0.5, neg_thr=0.5, min_pos=0.0):
    """mmdet 3.3.0 GridAssigner.assign for one image: iou [A, M] -> assigned gt index + 1 per anchor (0 negative,
    -1 ignored), as written there (its loop over gts included)."""
    overlaps = iou.t().clone()  # [M, A], mmdet's layout
    num_gts, num_priors = overlaps.shape
    assigned = torch.full((num_priors,), -1, dtype=torch.long)
    if num_gts == 0:
        return torch.zeros(num_priors, dtype=torch.long)
    max_overlaps, _ = overlaps.max(dim=0)
    assigned[(max_overlaps >= 0) & (max_overlaps <= neg_thr)] = 0
    overlaps[:, ~responsible] = -1.0
    max_overlaps, argmax_overlaps = overlaps.max(dim=0)
    gt_max_overlaps, _ = overlaps.max(dim=1)
    pos = (max_overlaps > pos_thr) & responsible
    assigned[pos] = argmax_overlaps[pos] + 1
    for i in range(num_gts):
        if gt_max_overlaps[i] > min_pos:
            assigned[(overlaps[i, :] == gt_max_overlaps[i]) & responsible] = i + 1
    return assigned


def random_gts(g: torch.Generator, batch: int, max_gt: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """Random boxes of many sizes, some images with no object, padding rows filled with junk boxes."""
    xy = torch.rand(batch, max_gt, 2, generator=g) * torch.tensor([width, height]) * 0.8
    wh = (torch.rand(batch, max_gt, 2, generator=g) * 0.6 + 0.02) * torch.tensor([width, height])
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([width, height]) - 1)], dim=-1)
    counts = torch.randint(0, max_gt + 1, (batch,), generator=g)
    counts[0] = 0  # always one image without objects
    valid = torch.arange(max_gt)[None] < counts[:, None]
    return {"boxes": boxes, "labels": torch.randint(0, 80, (batch, max_gt), generator=g), "valid": valid,
            "image_size": torch.tensor([[height, width]]).repeat(batch, 1)}


@pytest.mark.parametrize("seed", range(4))
def test_grid_assign_equals_mmdet_loop(seed):
    """The batched assigner (and responsible cells) against mmdet's per-image code on random boxes, with padding
    and images without objects."""
    g = torch.Generator().manual_seed(seed)
    height, width = 160, 224
    sizes = [(height // s, width // s) for s in yolov3.STRIDES]
    anchors = torch.cat(yolov3.grid_anchors(yolov3.yolo_base_anchors(), sizes, yolov3.STRIDES))  # [A, 4]
    targets = random_gts(g, 5, 6, height, width)
    responsible = yolov3.responsible_anchors(targets["boxes"], targets["valid"], sizes)
    iou = box_iou(anchors, targets["boxes"])  # [B, A, M]
    matched, pos, neg = grid_assign(iou, responsible, targets["valid"])
    for b in range(5):
        n = int(targets["valid"][b].sum())
        want_flags = reference_responsible(targets["boxes"][b, :n], sizes)
        assert torch.equal(responsible[b], want_flags)
        want = reference_grid_assign(iou[b, :, :n], want_flags)
        assert torch.equal(pos[b], want > 0) and torch.equal(neg[b], want == 0)
        assert torch.equal(matched[b][pos[b]], want[want > 0] - 1)
    assert pos.any() and (~pos & ~neg).any()  # positives and ignored anchors were exercised


def test_no_objects_and_padding():
    """An image without objects trains on the objectness alone; padding rows change nothing."""
    model = yolov3.yolov3_d53(num_classes=5, norm_eval=False).train()
    images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    losses = model(images, empty_targets(2, 4, (96, 128)))
    assert losses["loss_conf"] > 0 and all(losses[k] == 0 for k in ("loss_cls", "loss_xy", "loss_wh"))
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    few, many = empty_targets(2, 1, (96, 128)), empty_targets(2, 8, (96, 128))
    for t in (few, many):
        t["boxes"][1, 0], t["labels"][1, 0], t["valid"][1, 0] = torch.tensor([10.0, 20, 70, 90]), 3, True
    many["boxes"][1, 1:] = torch.tensor([5.0, 5, 50, 50])  # junk in padding rows
    model.eval()  # fixed BatchNorm statistics, so the two calls see the same network
    with torch.no_grad():
        a, b = model.head_outputs(images), model.head_outputs(images)
    la, lb = model.loss(a, few), model.loss(b, many)
    for key in la:
        torch.testing.assert_close(la[key], lb[key])
    assert la["loss_cls"] > 0


def test_train_forward_compiles_as_one_graph():
    """Backbone, neck, head, anchors, responsible cells, assignment and losses: no graph break, no host sync."""
    model = yolov3.yolov3_d53(num_classes=4).train()
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    targets = empty_targets(2, 2, (64, 96))
    targets["boxes"][0, 0], targets["labels"][0, 0], targets["valid"][0, 0] = torch.tensor([4.0, 6, 60, 50]), 2, True
    got = compiled_outputs(model, images, targets)
    want = model(images, targets)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_darknet_frozen_stages_and_norm_eval():
    """mmdet's meanings: frozen_stages k freezes the first k of (stem, stage 1..5); norm_eval keeps BatchNorm
    statistics; from scratch (norm_eval False) they update."""
    frozen = Darknet(frozen_stages=2, norm_eval=False).train()
    grads = {n.split(".")[0] for n, p in frozen.named_parameters() if not p.requires_grad}
    assert grads == {"conv1", "conv_res_block1"}
    assert not frozen.conv_res_block1.conv.bn.training and frozen.conv_res_block2.conv.bn.training
    scratch = Darknet(norm_eval=False).train()
    assert all(m.training for m in scratch.modules() if isinstance(m, nn.BatchNorm2d))
    before = scratch.conv1.bn.running_var.clone()
    outs = scratch(torch.rand(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs] == [(256, 8, 8), (512, 4, 4), (1024, 2, 2)]
    assert not torch.equal(scratch.conv1.bn.running_var, before)


def test_backbone_weights_load_from_a_detector_or_a_darknet_checkpoint():
    donor = yolov3.yolov3_d53(num_classes=3)
    model = yolov3.yolov3_d53()
    report = yolov3.load_backbone_weights(model, {"state_dict": donor.state_dict()})
    assert report["missing"] == [] and report["shape_mismatch"] == []
    assert len(report["unexpected"]) > 0  # the neck and head are not the backbone's
    torch.testing.assert_close(model.backbone.conv1.conv.weight, donor.backbone.conv1.conv.weight)
    report = yolov3.load_backbone_weights(model, Darknet().state_dict())
    assert report == {"missing": [], "unexpected": [], "shape_mismatch": []}


def test_bench_runs_a_model_without_twin(monkeypatch, capsys):
    """det.bench times our step and its assignment + loss share for a detector torchvision has no twin of."""
    from det import bench
    monkeypatch.setattr("sys.argv", ["bench", "--model", "yolov3_d53", "--img-size", "64", "--iters", "1",
                                     "--warmup", "0", "--repeats", "1", "--num-classes", "3", "--no-compile",
                                     "--no-loader"])
    bench.main()
    out = capsys.readouterr().out
    assert "yolov3_d53" in out and "assignment + loss" in out and "torchvision" not in out

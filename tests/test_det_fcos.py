"""FCOS-R50: parameter counts, the caffe-style backbone, the train/eval contract, empty and padded targets, the
point assignment against a per-image port of mmdet's loop, one graph for the whole training forward, checkpoint
names, the normalisers averaged over ranks, and equality with mmdet 3.3.0 recorded as a fixture."""
import math

import pytest
import torch
from PIL import Image
from torch import nn

import train_det
from det import predict
from det.assign import point_assign
from det.backbones import ResNetBackbone
from det.models import fcos
from det.presets import get_preset
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


def fixture_state_dict(keys: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Seeded weights with the head's outputs moved to look like a detector's: class logits so that about 200
    (point, class) pairs per image pass the 0.05 threshold (not all near 0.5; after NMS 100, 90 and 55 are left),
    per-level scales of 1 (seeded scalars would be N(0, 1), some negative) and distances around 32 px, so boxes
    overlap the objects and each other (the IoU loss and NMS have work to do)."""
    state = seeded_state_dict(keys)
    state["bbox_head.conv_cls.bias"] = state["bbox_head.conv_cls.bias"] - 4.8
    state["bbox_head.conv_reg.bias"] = state["bbox_head.conv_reg.bias"] + math.log(32.0)
    for level in range(len(fcos.STRIDES)):
        state[f"bbox_head.scales.{level}.scale"] = torch.tensor(1.0)
    return state


def count(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def test_parameter_counts_and_frozen_backbone():
    """figures.md: mmdet 3.3.0's fcos_r50-caffe_fpn_gn-head_1x_coco, 80 classes; trainable with the recipe's frozen
    stem + stage 1 and BatchNorms frozen whole (norm_cfg requires_grad=False). From scratch everything trains."""
    model = fcos.fcos_r50()
    assert (count(model), count(model, trainable=True)) == (32_295_322, 32_019_802)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    norms = {f"backbone.{n}.{p}" for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)
             for p in ("weight", "bias")}
    stem_and_stage1 = {n for n, _ in model.named_parameters()
                       if n.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1."))}
    assert frozen == norms | stem_and_stage1
    model.train()
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(p.requires_grad for p in fcos.fcos_r50(frozen_stages=-1, norm_eval=False).parameters())
    assert fcos.fcos_r50(num_classes=3).bbox_head.conv_cls.out_channels == 3
    assert (fcos.RECIPES["fcos_r50"]["frozen_stages"], fcos.RECIPES["fcos_r50"]["norm_eval"]) == (1, True)


def test_caffe_style_moves_the_stride_to_the_first_1x1_conv():
    caffe, pytorch = ResNetBackbone(50, style="caffe"), ResNetBackbone(50)
    for name in ("layer2", "layer3", "layer4"):
        first = getattr(caffe, name)[0]
        assert (first.conv1.stride, first.conv2.stride, first.downsample[0].stride) == ((2, 2), (1, 1), (2, 2))
        assert (getattr(pytorch, name)[0].conv1.stride, getattr(pytorch, name)[0].conv2.stride) == ((1, 1), (2, 2))
    assert caffe.layer1[0].conv1.stride == caffe.layer1[0].conv2.stride == (1, 1)
    feats = caffe.eval()(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(256, 16, 24), (512, 8, 12), (1024, 4, 6), (2048, 2, 3)]
    with pytest.raises(ValueError, match="style must be"):
        ResNetBackbone(50, style="tf")


def test_equals_mmdet():
    """The head's outputs, the assignment, losses and detections of mmdet 3.3.0 (recorded once against mmdet, mmcv's
    NMS replaced by torchvision's) on seeded weights, with padded targets and an image without objects; mmdet was
    fed the images in BGR minus its mean."""
    fixture = load_mmdet_fixture("fcos_r50")
    assert (fixture["params"], fixture["trainable"]) == (32_295_322, 32_019_802)
    model = fcos.fcos_r50()
    model.load_state_dict(fcos.from_mmdet(fixture_state_dict(fixture["keys"])), strict=True)  # mmdet's names
    images, targets = fixture_batch()
    assert int(images.long().sum()) == fixture["image_sum"]
    outputs = model.train().head_outputs(images)
    for key, value in fixture["output_sums"].items():  # the network alone
        assert outputs[key].sum().item() == pytest.approx(value, rel=LOSS_REL), key
    matched, pos, _ = point_assign(outputs["points"], outputs["regress_ranges"], targets["boxes"], targets["valid"])
    for b, expected in enumerate(fixture["assigned"]):  # mmdet's positive points and their labels, per image
        assert pos[b].nonzero().squeeze(1).tolist() == expected["points"], b
        assert targets["labels"][b][matched[b][pos[b]]].tolist() == expected["labels"], b
    losses = model.loss(outputs, targets)
    assert_same_losses(losses, fixture["losses"])
    with torch.no_grad():
        out = model.eval()(images, image_size=targets["image_size"])
    assert [len(d["scores"]) for d in fixture["detections"]] == [100, 90, 55]
    # the 0.05 threshold is on the class score alone: detections score class x centerness, many below it
    assert min(min(d["scores"]) for d in fixture["detections"]) < fcos.TEST_CFG["score_thr"]
    for b, expected in enumerate(fixture["detections"]):
        assert_same_detections({k: v[b] for k, v in out.items()}, expected, max_det=fcos.TEST_CFG["max_det"],
                               canvas=CANVAS)


def test_train_and_eval_contract_and_points():
    model = fcos.fcos_r50().train()
    images, targets = small_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_centerness"}
    assert all(v.shape == () and torch.isfinite(v) and v > 0 for v in losses.values())
    with torch.no_grad():
        outputs = model.head_outputs(images)
    a = 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2 + 1 * 1  # strides 8-128 on 64 x 96 (the stride-2 convs round up)
    assert outputs["level_sizes"] == [96, 24, 6, 2, 1]
    assert {k: tuple(v.shape) for k, v in outputs.items() if k != "level_sizes"} == {
        "cls_logits": (2, a, 80), "box_preds": (2, a, 4), "centerness": (2, a), "points": (a, 2),
        "regress_ranges": (a, 2)}
    assert (outputs["box_preds"] > 0).all()  # exp: distances
    # mmdet's MlvlPointGenerator(offset=0.5): cell centres, row-major per level, with the level's range
    assert outputs["points"][:2].tolist() == [[4, 4], [12, 4]] and outputs["points"][12].tolist() == [4, 12]
    assert outputs["points"][96].tolist() == [8, 8] and outputs["points"][-1].tolist() == [64, 64]
    assert outputs["regress_ranges"][[0, 96, 120, 126, 128]].tolist() == [list(r) for r in fcos.REGRESS_RANGES]
    with torch.no_grad():
        out = model.eval()(images, image_size=targets["image_size"])
    assert {k: tuple(v.shape) for k, v in out.items()} == {"boxes": (2, 100, 4), "scores": (2, 100),
                                                           "labels": (2, 100), "valid": (2, 100)}


def test_no_objects_trains_and_padding_rows_change_nothing():
    """An image without objects (junk in its padding rows): the class loss learns background everywhere, the box
    and centerness losses are 0, every head parameter gets a finite gradient. Junk padding changes no loss."""
    model = fcos.fcos_r50().train()
    images, targets = small_batch()
    empty = {k: v[1:].clone() for k, v in targets.items()}
    empty["boxes"][0, 0] = torch.tensor([50.0, 60, 20, 10])
    losses = model(images[1:], empty)
    assert losses["loss_bbox"].item() == losses["loss_centerness"].item() == 0.0 and losses["loss_cls"].item() > 0
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


def reference_targets(points: torch.Tensor, regress_ranges: torch.Tensor, gt_boxes: torch.Tensor,
                      gt_labels: torch.Tensor, num_classes: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """mmdet 3.3.0 FCOSHead._get_targets_single for one image (center_sampling False), as written there. Returns
    (labels [A], num_classes for background; bbox_targets [A, 4] (left, top, right, bottom))."""
    num_points, num_gts = len(points), len(gt_boxes)
    if num_gts == 0:
        return gt_labels.new_full((num_points,), num_classes), gt_boxes.new_zeros((num_points, 4))
    areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    areas = areas[None].repeat(num_points, 1)
    regress_ranges = regress_ranges[:, None, :].expand(num_points, num_gts, 2)
    gt_boxes = gt_boxes[None].expand(num_points, num_gts, 4)
    xs = points[:, 0][:, None].expand(num_points, num_gts)
    ys = points[:, 1][:, None].expand(num_points, num_gts)
    left, right = xs - gt_boxes[..., 0], gt_boxes[..., 2] - xs
    top, bottom = ys - gt_boxes[..., 1], gt_boxes[..., 3] - ys
    bbox_targets = torch.stack((left, top, right, bottom), -1)
    inside_gt_bbox_mask = bbox_targets.min(-1)[0] > 0
    max_regress_distance = bbox_targets.max(-1)[0]
    inside_regress_range = ((max_regress_distance >= regress_ranges[..., 0])
                            & (max_regress_distance <= regress_ranges[..., 1]))
    areas[inside_gt_bbox_mask == 0] = fcos.INF
    areas[inside_regress_range == 0] = fcos.INF
    min_area, min_area_inds = areas.min(dim=1)
    labels = gt_labels[min_area_inds]
    labels[min_area == fcos.INF] = num_classes
    bbox_targets = bbox_targets[range(num_points), min_area_inds]
    return labels, bbox_targets


def random_targets(seed: int, batch: int = 4, max_gt: int = 8,
                   canvas: tuple[int, int] = (256, 320)) -> tuple[torch.Tensor, ...]:
    """Random objects from 2 px to past the canvas (image 0 with 3-8, image 1 with one, image 2 with hand-made
    edge cases, the last without), junk in every padding row, and the real grid's points and ranges."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(-(-canvas[0] // s), -(-canvas[1] // s)) for s in fcos.STRIDES]
    points, ranges = fcos.grid_points(sizes, torch.device("cpu"))
    xy = torch.rand(batch, max_gt, 2, generator=g) * torch.tensor([canvas[1], canvas[0]]) - 20
    wh = torch.rand(batch, max_gt, 2, generator=g) ** 2 * torch.tensor([canvas[1], canvas[0]]) * 1.2 + 2
    gt_boxes = torch.cat([xy, xy + wh], -1)
    # edges through points (x = 4 + 8k: strictly inside only), an equal-area pair (the first listed wins), the same
    # box twice, largest distances of exactly 64 at a P3 point (its range's top) and a P4 point (its bottom)
    gt_boxes[2, :7] = torch.tensor([[4.0, 4, 36, 28], [4, 20, 132, 60], [100, 100, 140, 120], [110, 95, 130, 135],
                                    [200, 30, 260, 90], [200, 30, 260, 90], [8, 150, 136, 190]])
    gt_labels = torch.randint(0, 80, (batch, max_gt), generator=g)
    counts = [int(torch.randint(3, max_gt + 1, (), generator=g)), 1, 7] + [0] * (batch - 3)
    gt_valid = torch.arange(max_gt)[None] < torch.tensor(counts)[:, None]
    return points, ranges, gt_boxes, gt_labels, gt_valid


@pytest.mark.parametrize("seed", range(3))
def test_point_assign_equals_per_image_mmdet_loop(seed):
    points, ranges, gt_boxes, gt_labels, gt_valid = random_targets(seed)
    matched, pos, distances = point_assign(points, ranges, gt_boxes, gt_valid)
    assert pos[0].sum() > 0 and pos[2].sum() > 0 and not pos[-1].any()
    for b in range(len(pos)):
        n = int(gt_valid[b].sum())
        labels, bbox_targets = reference_targets(points, ranges, gt_boxes[b, :n], gt_labels[b, :n])
        assert torch.equal(pos[b], labels < 80), b
        assert torch.equal(gt_labels[b][matched[b]][pos[b]], labels[pos[b]]), b
        assert torch.equal(distances[b][pos[b]], bbox_targets[pos[b]]), b
    # the hand-made image: points on an edge are outside; the duplicate and, where they overlap, the equal-area
    # pair go to the first listed; a largest distance of exactly 64 is in P3's range and in P4's
    assert not (pos[2] & ((points[:, 0] == 4) | (points[:, 1] == 4)) & (matched[2] == 0)).any()
    assert (matched[2][pos[2]] == 4).any() and not (matched[2][pos[2]] == 5).any()
    overlap = pos[2] & (points[:, 0] > 110) & (points[:, 0] < 130) & (points[:, 1] > 100) & (points[:, 1] < 120)
    assert overlap.any() and (matched[2][overlap] == 2).all() and (matched[2][pos[2]] == 3).any()
    at_64 = pos[2] & (distances[2].amax(-1) == 64)
    for gt, level_range in ((1, [-1, 64]), (6, [64, 128])):  # P3 points at x = 68, P4 points at x = 72
        rows = at_64 & (matched[2] == gt)
        assert rows.any() and (ranges[rows] == torch.tensor(level_range)).all(), gt


def test_centerness_targets_never_nan_and_loss_ignores_non_positives():
    """Negatives have zero or negative distances (0 / 0 in the centerness formula): their targets are guarded, so
    losses and gradients stay finite even for huge predicted distances off the objects."""
    model = fcos.fcos_r50().train()
    images, targets = small_batch()
    outputs = model.head_outputs(images)
    outputs["box_preds"] = outputs["box_preds"].detach().clone().requires_grad_()
    with torch.no_grad():
        outputs["box_preds"][1] = 1e30  # image without objects: every point negative
    losses = model.loss(outputs, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.isfinite(outputs["box_preds"].grad).all() and (outputs["box_preds"].grad[1] == 0).all()
    assert fcos.centerness_target(torch.tensor([[10.0, 5, 10, 20]])).tolist() == pytest.approx([0.5])


def test_train_forward_compiles_as_one_graph():
    """No graph break anywhere in a training forward (backbone, points, assignment, losses): no host sync or
    data-dependent shape for an accelerator to stall on."""
    model = fcos.fcos_r50().train()
    images, targets = small_batch()
    got, want = compiled_outputs(model, images, targets), model(images, targets)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_checkpoint_names_and_backbone_weights(tmp_path):
    """mmdet's names are ours (early mmdet's `fcos_cls` / `fcos_reg` / `fcos_centerness` are renamed); the caffe
    ResNet-50 that mmdet's FCOS starts from (torchvision's names under "state_dict", no num_batches_tracked) loads
    into the backbone with nothing missing; frozen parameters stay frozen."""
    model = fcos.fcos_r50(num_classes=3)
    state = model.state_dict()
    assert fcos.from_mmdet(state).keys() == state.keys()
    legacy = {k.replace("conv_cls", "fcos_cls").replace("conv_reg", "fcos_reg").replace("conv_centerness",
                                                                                       "fcos_centerness"): v
              for k, v in state.items()}
    assert "bbox_head.fcos_centerness.weight" in legacy and fcos.from_mmdet(legacy).keys() == state.keys()
    donor = ResNetBackbone(50, style="caffe")
    caffe = {k: v for k, v in donor.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": caffe}, tmp_path / "resnet50_caffe.pth")
    report = fcos.load_backbone_weights(model, torch.load(tmp_path / "resnet50_caffe.pth", weights_only=True))
    assert report == {"missing": [], "unexpected": [], "shape_mismatch": []}
    assert torch.equal(model.backbone.layer4[2].conv3.weight, donor.layer4[2].conv3.weight)
    assert not model.backbone.conv1.weight.requires_grad and not model.backbone.layer3[0].bn1.weight.requires_grad


def test_recipe_reaches_the_flags():
    """The fp16 8 x 8 recipe as train_det.py's defaults: LR 0.04 for 64 images, warmup 1000 from 0.1, clipping at
    35, biases at 2 x LR without decay; the "fcos" preset pads with Detectron's mean colour."""
    args = train_det.parse_args(["--model", "fcos_r50"])
    assert (args.blr, args.lr_batch, args.batch_size, args.warmup_iters, args.warmup_factor, args.clip_grad) == \
        (0.04, 64, 8, 1000, 0.1, 35.0)
    assert (args.bias_lr_mult, args.bias_weight_decay, args.norm_weight_decay, args.lr_steps) == (2.0, 0.0, None,
                                                                                                 (8, 11))
    assert get_preset("fcos")["fill"] == tuple(round(c) for c in fcos.FCOS(50).mean.tolist())


def test_predict_loads_an_fcos_checkpoint(tmp_path):
    """det.predict on what train_det.py saves for fcos_r50 (its classifier sure of class "b" everywhere, as random
    heads score ~0.01, under the 0.05 threshold): detections in the picture's pixels."""
    torch.manual_seed(0)
    model = fcos.fcos_r50(num_classes=3)
    with torch.no_grad():
        model.bbox_head.conv_cls.bias[1] = 3.0
    extra = {"model": "fcos_r50", "img_size": 64, "classes": ["a", "b", "c"], "label_to_cat": [1, 2, 3]}
    torch.save({"model": model.state_dict(), "extra": extra}, tmp_path / "fcos.pth")
    loaded = predict.load(tmp_path / "fcos.pth")
    assert loaded.predict_info["preset"] == "fcos"
    found = predict.detect(loaded, Image.new("RGB", (160, 128), (200, 30, 30)), score_thr=0.0)
    assert 0 < len(found) <= 100 and {d["class"] for d in found} == {"b"}
    assert all(0 <= d["box"][0] <= d["box"][2] <= 160 and 0 <= d["box"][1] <= d["box"][3] <= 128 for d in found)


def random_head_outputs(batch: int, seed: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random FCOS head outputs on a 64 x 96 canvas (5 classes) and padded targets with 1-3 objects per image."""
    g = torch.Generator().manual_seed(seed)
    points, ranges = fcos.grid_points([(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)], torch.device("cpu"))
    outputs = {"cls_logits": torch.randn(batch, len(points), 5, generator=g), "points": points,
               "regress_ranges": ranges, "box_preds": torch.rand(batch, len(points), 4, generator=g) * 30 + 1,
               "centerness": torch.randn(batch, len(points), generator=g)}
    xy = torch.rand(batch, 3, 2, generator=g) * 40
    targets = {"boxes": torch.cat([xy, xy + 12 + torch.rand(batch, 3, 2, generator=g) * 40], -1),
               "labels": torch.randint(0, 5, (batch, 3), generator=g),
               "valid": torch.arange(3)[None] < torch.randint(1, 4, (batch, 1), generator=g)}
    return outputs, targets


def test_normalisers_are_averaged_over_ranks(tmp_path):
    """mmdet's reduce_mean of the positive count and the centerness-target sum: the two ranks' mean loss (what
    DistributedDataParallel's averaged gradients follow) equals one process's loss on the whole batch."""
    whole, ranks = losses_on_two_ranks(tmp_path, random_head_outputs, fcos.fcos_loss,
                                       shared=("points", "regress_ranges"))
    for key, value in whole.items():
        torch.testing.assert_close((ranks[0][key] + ranks[1][key]) / 2, value, msg=key)
    assert whole["loss_bbox"] > 0 and ranks[0]["loss_bbox"] != ranks[1]["loss_bbox"]  # the halves differ

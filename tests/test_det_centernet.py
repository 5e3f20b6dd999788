"""CenterNet-R18: parameter count, the train/eval contract, empty and padded targets, the batched targets against a
per-image port of mmdet's get_targets loop, one graph for the whole training forward, the test canvas, the training
crop against mmdet's RandomCenterCropPad, and equality with mmdet 3.3.0 recorded as a fixture.

tests/data/mmdet_centernet_r18.json.gz was written once with mmdet 3.3.0 (a throw-away venv, script outside the
repo): the model of centernet_r18_8xb16-crop512-140e_coco.py on `fixture_state_dict`'s weights, its losses and
targets on `fixture_batch()` and its detections through the config's test pipeline (RandomCenterCropPad in test
mode, DetDataPreprocessor, predict); and RandomCenterCropPad in training mode on `crop_inputs(k)` after
np.random.seed(k).
"""
import json
import math

import numpy as np
import pytest
import torch

from det import centernet_data, data, presets
from det.models import centernet
from det.synthetic_coco import synthetic_coco
from tests.det_compare import (
    CANVAS,
    assert_same_detections,
    assert_same_losses,
    fixture_batch,
    load_mmdet_fixture,
    small_batch,
)
from tests.graph_check import compiled_outputs
from tests.mmpretrain_fixture import seeded_state_dict
from tests.scripts import run_script
from tests.test_det_yolox import statistics_from_one_batch

PARAMS = 14_219_092  # ../shared/reference/figures.md, and mmdet's own model


def fixture_state_dict(keys: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Seeded weights with the head biases moved so outputs look like a detector's: heatmap probabilities around
    0.1, not 0.5, and boxes about 8 cells (32 px) wide, not of negative size."""
    state = seeded_state_dict(keys)
    state["bbox_head.heatmap_head.2.bias"] -= 2.5
    state["bbox_head.wh_head.2.bias"] += 8.0
    return state


def crop_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """A random uint8 image of 60-220 px a side with 0-5 boxes (some across its edges, one image in four without)
    and the crop size and border to cut it with: 128 / 32 (our 128 px canvas), 512 / 128 (mmdet's) for seeds 6, 7
    on a 480 x 640 image. -> (image [3, h, w], boxes [N, 4], labels [N], crop_size, border)."""
    g = torch.Generator().manual_seed(seed)
    crop, border = (512, 128) if seed in (6, 7) else (128, 32)
    h, w = (480, 640) if crop == 512 else torch.randint(60, 221, (2,), generator=g).tolist()
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    n = 0 if seed % 4 == 3 else int(torch.randint(1, 6, (), generator=g))
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 1.1 - 10
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.5 + 1
    boxes = torch.cat([xy, xy + wh], 1).clamp(min=0).minimum(torch.tensor([w, h, w, h]))
    return image, boxes, torch.randint(0, 80, (n,), generator=g), crop, border


def checksums(image: torch.Tensor) -> list[int]:
    """Pixel sum and a position-weighted sum of a uint8 [3, h, w] image: a pasted patch in the wrong place fails."""
    c, h, w = image.shape
    weights = (torch.arange(c)[:, None, None] + torch.arange(h)[:, None] * 31 + torch.arange(w) * 17) % 101
    return [int(image.long().sum()), int((image.long() * weights).sum())]


# mmdet 3.3.0 models/utils/gaussian_target.py and CenterNetHead.get_targets, as written there
def reference_gaussian2d(radius, sigma=1, dtype=torch.float32):
    x = torch.arange(-radius, radius + 1, dtype=dtype).view(1, -1)
    y = torch.arange(-radius, radius + 1, dtype=dtype).view(-1, 1)
    h = (-(x * x + y * y) / (2 * sigma * sigma)).exp()
    h[h < torch.finfo(h.dtype).eps * h.max()] = 0
    return h


def reference_gen_gaussian_target(heatmap, center, radius, k=1):
    diameter = 2 * radius + 1
    gaussian_kernel = reference_gaussian2d(radius, sigma=diameter / 6, dtype=heatmap.dtype)
    x, y = center
    height, width = heatmap.shape[:2]
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    masked_heatmap = heatmap[y - top:y + bottom, x - left:x + right]
    masked_gaussian = gaussian_kernel[radius - top:radius + bottom, radius - left:radius + right]
    torch.max(masked_heatmap, masked_gaussian * k, out=heatmap[y - top:y + bottom, x - left:x + right])
    return heatmap


def reference_gaussian_radius(det_size, min_overlap):
    height, width = det_size
    a1 = 1
    b1 = (height + width)
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    sq1 = math.sqrt(b1**2 - 4 * a1 * c1)
    r1 = (b1 - sq1) / (2 * a1)
    a2 = 4
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    sq2 = math.sqrt(b2**2 - 4 * a2 * c2)
    r2 = (b2 - sq2) / (2 * a2)
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    sq3 = math.sqrt(b3**2 - 4 * a3 * c3)
    r3 = (b3 + sq3) / (2 * a3)
    return min(r1, r2, r3)


def reference_get_targets(gt_bboxes, gt_labels, feat_shape, img_shape, num_classes):
    img_h, img_w = img_shape[:2]
    bs, _, feat_h, feat_w = feat_shape
    width_ratio = float(feat_w / img_w)
    height_ratio = float(feat_h / img_h)
    center_heatmap_target = gt_bboxes[-1].new_zeros([bs, num_classes, feat_h, feat_w])
    wh_target = gt_bboxes[-1].new_zeros([bs, 2, feat_h, feat_w])
    offset_target = gt_bboxes[-1].new_zeros([bs, 2, feat_h, feat_w])
    wh_offset_target_weight = gt_bboxes[-1].new_zeros([bs, 2, feat_h, feat_w])
    for batch_id in range(bs):
        gt_bbox = gt_bboxes[batch_id]
        gt_label = gt_labels[batch_id]
        center_x = (gt_bbox[:, [0]] + gt_bbox[:, [2]]) * width_ratio / 2
        center_y = (gt_bbox[:, [1]] + gt_bbox[:, [3]]) * height_ratio / 2
        gt_centers = torch.cat((center_x, center_y), dim=1)
        for j, ct in enumerate(gt_centers):
            ctx_int, cty_int = ct.int()
            ctx, cty = ct
            scale_box_h = (gt_bbox[j][3] - gt_bbox[j][1]) * height_ratio
            scale_box_w = (gt_bbox[j][2] - gt_bbox[j][0]) * width_ratio
            radius = reference_gaussian_radius([scale_box_h, scale_box_w], min_overlap=0.3)
            radius = max(0, int(radius))
            ind = gt_label[j]
            reference_gen_gaussian_target(center_heatmap_target[batch_id, ind], [ctx_int, cty_int], radius)
            wh_target[batch_id, 0, cty_int, ctx_int] = scale_box_w
            wh_target[batch_id, 1, cty_int, ctx_int] = scale_box_h
            offset_target[batch_id, 0, cty_int, ctx_int] = ctx - ctx_int
            offset_target[batch_id, 1, cty_int, ctx_int] = cty - cty_int
            wh_offset_target_weight[batch_id, :, cty_int, ctx_int] = 1
    avg_factor = max(1, center_heatmap_target.eq(1).sum())
    return {"heatmap": center_heatmap_target, "wh": wh_target, "offset": offset_target,
            "weight": wh_offset_target_weight}, avg_factor


def test_parameter_count():
    model = centernet.centernet_r18()
    assert sum(p.numel() for p in model.parameters()) == PARAMS
    assert all(p.requires_grad for p in model.parameters())  # mmdet: nothing frozen
    model.train()
    assert all(m.training for m in model.backbone.modules())  # norm_eval=False: BatchNorm learns its statistics
    assert centernet.centernet_r18(num_classes=3).bbox_head.heatmap_head[2].out_channels == 3
    deconv = model.neck.deconv_layers[1].conv.weight  # [256, 256, 4, 4]: mmdet's bilinear kernel on output channel 0
    ramp = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.equal(deconv[:, 0], (ramp[:, None] * ramp).expand(256, 4, 4))
    assert model.bbox_head.heatmap_head[2].bias[0].item() == pytest.approx(-math.log(9))  # prior 0.1


def test_equals_mmdet():
    """Losses (and the targets' sums) and detections of mmdet 3.3.0's CenterNet on seeded weights, with padded
    targets and an image without objects; detections through mmdet's test pipeline, each image centred on its
    own test canvas (here by the model)."""
    fixture = load_mmdet_fixture("centernet_r18")
    assert fixture["params"] == PARAMS
    model = centernet.centernet_r18()
    model.load_state_dict(centernet.from_mmdet(fixture_state_dict(fixture["keys"])), strict=True)  # mmdet's names
    statistics_from_one_batch(model)
    images, targets = fixture_batch()
    assert int(images.long().sum()) == fixture["image_sum"]
    with torch.no_grad():  # training mode: BatchNorm on this batch's statistics, which become the running ones
        outputs = model.train().head_outputs(images)
    t = centernet.centernet_targets(targets, tuple(outputs["heatmap"].shape[-2:]), CANVAS, 80)
    for key, value in fixture["target_sums"].items():
        assert t[key].sum().item() == pytest.approx(value, rel=1e-6), key
    losses = model.loss(outputs, targets)
    assert_same_losses(losses, fixture["losses"])
    with torch.no_grad():
        out = model.eval()(images, image_size=targets["image_size"])
    assert out["valid"].all()
    for b, expected in enumerate(fixture["detections"]):
        assert len(expected["scores"]) == centernet.TEST_CFG["topk"]
        assert_same_detections({k: v[b] for k, v in out.items()}, expected, max_det=centernet.TEST_CFG["topk"],
                               canvas=CANVAS)


def random_targets(seed: int, batch: int = 4, max_gt: int = 8, canvas: tuple[int, int] = (96, 128),
                   num_classes: int = 3) -> dict[str, torch.Tensor]:
    """Boxes from under a cell to most of the canvas, few classes (same-class Gaussians overlap), one pair of
    same-class centres in one cell per image (mostly: the last object's size and offset win), an image without
    objects, padding rows holding boxes too."""
    g = torch.Generator().manual_seed(seed)
    h, w = canvas
    xy = torch.rand(batch, max_gt, 2, generator=g) * torch.tensor([w, h]) * 0.9
    wh = torch.rand(batch, max_gt, 2, generator=g) ** 2 * torch.tensor([w, h]) * 0.7 + 1.5
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], -1)
    boxes[:, 1] = boxes[:, 0] + torch.tensor([0.3, 0.2, -0.4, 1.0])  # its centre shares object 0's cell
    labels = torch.randint(0, num_classes, (batch, max_gt), generator=g)
    labels[:, 1] = labels[:, 0]
    counts = torch.randint(2, max_gt + 1, (batch,), generator=g)
    counts[-1] = 0
    return {"boxes": boxes, "labels": labels,
            "valid": torch.arange(max_gt)[None] < counts[:, None], "image_size": torch.tensor([[h, w]] * batch)}


@pytest.mark.parametrize("seed", range(4))
def test_targets_equal_per_image_mmdet_loop(seed):
    targets = random_targets(seed)
    feature = (24, 32)  # stride 4 on 96 x 128
    ours = centernet.centernet_targets(targets, feature, (96, 128), num_classes=3)
    n = targets["valid"].sum(1).tolist()
    want, avg_factor = reference_get_targets([targets["boxes"][b, :k] for b, k in enumerate(n)],
                                             [targets["labels"][b, :k] for b, k in enumerate(n)],
                                             (len(n), 3, *feature), (96, 128), num_classes=3)
    for key, value in want.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    assert ours["avg_factor"].item() == float(avg_factor) > 1
    assert not ours["heatmap"][-1].any() and not ours["weight"][-1].any()  # the image without objects
    assert (ours["heatmap"] == 1).sum() < targets["valid"].sum()  # shared cells were exercised
    radius = centernet.gaussian_radius(*(targets["boxes"][..., 2:] - targets["boxes"][..., :2]).unbind(-1)[::-1])
    for b, k in enumerate(n):  # the radius alone, before truncation: mmdet's square roots are double's
        for (x1, y1, x2, y2), r in zip(targets["boxes"][b, :k], radius[b, :k], strict=True):
            assert r.item() == pytest.approx(reference_gaussian_radius([y2 - y1, x2 - x1], 0.3).item(), rel=1e-6)


def test_train_and_eval_contract():
    model = centernet.centernet_r18(num_classes=10).train()
    images, targets = small_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_center_heatmap", "loss_wh", "loss_offset"}
    assert all(v.shape == () and torch.isfinite(v) and v > 0 for v in losses.values())
    with torch.no_grad():
        outputs = model.head_outputs(images)
    assert {k: tuple(v.shape) for k, v in outputs.items() if k != "input_size"} == {
        "heatmap": (2, 10, 16, 24), "wh": (2, 2, 16, 24), "offset": (2, 2, 16, 24)}
    assert outputs["input_size"] == (64, 96)
    model.eval()
    with torch.no_grad():
        out = model(images, image_size=torch.tensor([[64, 96], [40, 50]]))
        whole = model(images)  # image_size None: the whole canvas
    assert {k: tuple(v.shape) for k, v in out.items()} == {"boxes": (2, 100, 4), "scores": (2, 100),
                                                           "labels": (2, 100), "valid": (2, 100)}
    assert out["valid"].all() and (out["scores"][:, :-1] >= out["scores"][:, 1:]).all()
    torch.testing.assert_close(whole["boxes"][0], out["boxes"][0])


def test_test_canvas_is_mmdets():
    """Each image centred on its own (h | 31) + 1 x (w | 31) + 1 black canvas, as mmdet's RandomCenterCropPad in
    test mode places it (the recorded borders), and the rest of the batch canvas the mean colour (mmdet's 0 after
    normalisation)."""
    recorded = load_mmdet_fixture("centernet_r18")["test_pad"]
    mean = torch.tensor([123.675, 116.28, 103.53])
    images = torch.randint(1, 256, (len(recorded), 3, 100, 130), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))
    sizes = torch.tensor([r["size"] for r in recorded])
    x, border = centernet.centre_on_test_canvas(images, sizes, mean)
    assert x.shape == (len(recorded), 3, 128, 160)  # (100 | 31) + 1, (130 | 31) + 1
    for b, r in enumerate(recorded):
        (h, w), (canvas_h, canvas_w), (top, left) = r["size"], r["shape"], r["border"][::2]
        assert border[b].tolist() == [top, left]
        assert torch.equal(x[b, :, top:top + h, left:left + w], images[b, :, :h, :w].float())
        own = x[b, :, :canvas_h, :canvas_w].clone()
        own[:, top:top + h, left:left + w] = 0
        assert not own.any()  # black around the image
        beyond = torch.cat([x[b, :, canvas_h:].flatten(1), x[b, :, :, canvas_w:].flatten(1)], 1)
        assert (beyond == mean[:, None]).all()


def test_no_objects_trains_and_padding_rows_change_nothing():
    """An image without objects: the heatmap learns background everywhere, size and offset losses are 0 and every
    head parameter still gets a finite gradient, even with junk in its padding rows. Junk in padding rows changes no
    loss."""
    model = centernet.centernet_r18(num_classes=10).train()
    images, targets = small_batch()
    empty = {k: v[1:].clone() for k, v in targets.items()}
    empty["boxes"][0, 0] = torch.tensor([50.0, 60, 20, 10])  # inverted
    losses = model(images[1:], empty)
    assert losses["loss_wh"].item() == losses["loss_offset"].item() == 0.0 and losses["loss_center_heatmap"] > 0
    sum(losses.values()).backward()
    for name, p in model.bbox_head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    junk = {k: v.clone() for k, v in targets.items()}
    junk["boxes"][:, 2:] = torch.tensor([[[50.0, 60, 20, 10]], [[-500, -500, 900, 900]]])  # inverted, off the map
    junk["labels"][:, 2:] = 9
    with torch.no_grad():
        outputs = model.head_outputs(images)
        a, b = model.loss(outputs, targets), model.loss(outputs, junk)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_training_forward_is_one_graph():
    """Model forward + targets + losses compile to one graph without host syncs, and give eager's numbers."""
    model = centernet.centernet_r18(num_classes=10).train()
    images, targets = small_batch()
    got, want = compiled_outputs(model, images, targets), model(images, targets)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_random_center_crop_pad_equals_mmdet():
    """The training crop of each recorded input, drawn from RandomState(k) as mmdet from np.random.seed(k): the same
    size, the same pixels in the same place, the same boxes (float32, bit for bit) and labels."""
    recorded = load_mmdet_fixture("centernet_r18")["crops"]
    assert any(len(r["boxes"]) for r in recorded) and any(not r["boxes"] for r in recorded)
    for seed, expected in enumerate(recorded):
        image, boxes, labels, crop, border = crop_inputs(seed)
        out, out_boxes, out_labels = centernet_data.random_center_crop_pad(image, boxes, labels,
                                                                           np.random.RandomState(seed), crop,
                                                                           border=border)
        assert list(out.shape[1:]) == expected["shape"], seed
        assert checksums(out) == expected["checksums"], seed
        assert out_boxes.tolist() == expected["boxes"] and out_labels.tolist() == expected["labels"], seed


def test_presets_train_on_the_square_and_test_unresized(tmp_path):
    """Training items are img_size squares with their boxes on them; evaluation keeps each image as it is (mmdet
    has no test resize) on the larger evaluation canvas, which collate(evaluation=True) uses; an image larger than
    that canvas is resized to fit."""
    root = synthetic_coco(tmp_path / "synthetic", 12, 8)
    preset = presets.get_preset("centernet")
    train = data.CocoDetection(root, "train", preset["train_transforms"](64))
    torch.manual_seed(0)
    np.random.seed(0)
    objects = 0
    for index in range(len(train)):
        image, target, _ = train[index]
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
        boxes = target["boxes"]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all() and len(boxes) == len(target["labels"])
        objects += len(boxes)
    assert objects > 0
    val = data.CocoDetection(root, "val", preset["eval_transforms"](128))  # evaluation canvas 160
    items = [val[i] for i in range(len(val))]
    for image, _, meta in items:
        size = tuple(image.shape[-2:])
        assert size == meta["orig_size"] if max(meta["orig_size"]) <= 160 else max(size) == 160
    assert any(max(meta["orig_size"]) > 160 for _, _, meta in items)
    images, _, _ = data.collate(items[:2], max_gt=None, preset="centernet", img_size=128, evaluation=True)
    assert images.shape[-2:] == (160, 160)


def test_imagenet_backbone_weights_load():
    from torchvision.models import resnet18

    model = centernet.centernet_r18()
    report = centernet.load_backbone_weights(model, resnet18().state_dict())
    assert not report["missing"] and not report["shape_mismatch"]
    assert set(report["unexpected"]) == {"fc.weight", "fc.bias"}


@pytest.mark.convergence
def test_learns_synthetic_shapes_from_scratch(tmp_path, tmp_path_factory, monkeypatch):
    """CenterNet-R18 from scratch with its whole pipeline (photometric distortion, RandomCenterCropPad, resize, flip;
    mmdet's test canvas at evaluation), 384 steps of 4 images on a 128 px canvas (~1 min 50 s here on 2 free cores).
    AdamW for the short run; batches of 4, as batches of 8 learnt less (AP50 0.013 vs 0.031 after 4 epochs at
    AdamW 2e-3). Our run reached AP 0.013 / AP50 0.039 after these 3 epochs (class-agnostic AP50 0.167: the ten
    shapes' classes come last) and AP50 0.054 after 4; the assertion asks for 0.02."""
    monkeypatch.setenv("PLAINVISION_CACHE", str(tmp_path_factory.getbasetemp() / "plainvision-cache"))
    run_script("train_det.py", "--model", "centernet_r18", "--device", "cpu", "--epochs", "3", "--img-size", "128",
               "--synthetic-size", "512", "--batch-size", "4", "--repeat", "1", "--opt", "adamw", "--lr", "5e-4",
               "--warmup-iters", "50", "--lr-steps", "2", "--eval-interval", "3", "--print-freq", "64",
               "--workers", "1", "--output-dir", str(tmp_path))
    stats = json.loads((tmp_path / "coco_bbox_summary.json").read_text())
    print("synthetic CenterNet-R18:", {k: round(v, 3) for k, v in stats.items()})
    assert stats["AP50"] > 0.02

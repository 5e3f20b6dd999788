"""SSD300 / SSD512 / SSDLite: parameter counts, the detector contract, empty and padded targets, compilation of the
loss, equality with mmdet 3.3 (recorded fixtures), backbone checkpoints, L2Norm, and torchvision's ssd300_vgg16 twin.

The fixtures tests/data/mmdet_<name>.json.gz were written once in a separate environment with mmdet 3.3.0: the
mmdet model of the config, filled with `seeded_state_dict` (keys and shapes recorded), run on `smooth_images` with
the recorded ground truth; its `model.loss` (train mode) and `model.predict` (eval mode, rescale=False, mmcv's NMS
replaced by torchvision.ops.batched_nms: the same greedy algorithm) outputs are recorded. Only torch is needed here.
"""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.image_list import ImageList

from cls.models import mobilenet_v2, vgg
from det.models import MODELS, RECIPES, load_backbone_weights, to_our_names
from det.models import ssd as S
from det.models import ssdlite as L
from tests.det_compare import LOSS_REL, assert_same_detections, load_mmdet_fixture
from tests.graph_check import compiled_outputs
from tests.mmpretrain_fixture import seeded_state_dict

PARAMS = {"ssd300": 34_305_206, "ssd512": 36_038_196, "ssdlite_mobilenet_v2": 4_228_788}  # figures.md, all trainable
NUM_ANCHORS = {"ssd300": 8732, "ssd512": 24564, "ssdlite_mobilenet_v2": 3234}  # SSD's paper: 8732 and 24564
FEATURE_SIZES = {"ssd300": [38, 19, 10, 5, 3, 1], "ssd512": [64, 32, 16, 8, 4, 2, 1],
                 "ssdlite_mobilenet_v2": [20, 10, 5, 3, 2, 1]}


def smooth_images(size: int, seed: int = 0, batch: int = 3) -> torch.Tensor:
    """uint8 RGB [B, 3, size, size]: low-resolution noise upsampled, so feature maps have structure."""
    low = torch.rand(batch, 3, size // 16, size // 16, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def padded_targets(boxes: list[list[list[float]]], labels: list[list[int]], size: int, max_gt: int = 4,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """The contract's padded targets; padding rows hold random garbage that `valid` must hide."""
    g = torch.Generator().manual_seed(seed)
    out = {"boxes": torch.rand(len(boxes), max_gt, 4, generator=g) * size - size / 4,
           "labels": torch.randint(0, 80, (len(boxes), max_gt), generator=g),
           "valid": torch.zeros(len(boxes), max_gt, dtype=torch.bool),
           "image_size": torch.tensor([[size, size]] * len(boxes))}
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        out["boxes"][i, :len(b)] = torch.tensor(b).reshape(-1, 4)
        out["labels"][i, :len(b)] = torch.tensor(lab, dtype=torch.long)
        out["valid"][i, :len(b)] = True
    return out


EXAMPLE_GT = ([[[20.0, 30, 120, 160], [150, 40, 290, 280]], [], [[100.0, 100, 108, 112]]], [[3, 79], [], [0]])


@pytest.mark.parametrize("name", PARAMS)
def test_parameter_counts_and_anchors(name):
    model = MODELS[name]()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == PARAMS[name]
    per_position = zip(FEATURE_SIZES[name], model.anchors_per_level, strict=True)
    assert sum(s * s * k for s, k in per_position) == NUM_ANCHORS[name]


@pytest.mark.parametrize(("name", "canvas"), [("ssd300", 257), ("ssdlite_mobilenet_v2", 128)])
def test_smaller_canvas_scales_the_default_boxes(name, canvas):
    """--img-size for quick runs: each box keeps its size relative to the canvas, each level's centres spread
    evenly over it (the recipe's min_img_size is the smallest canvas the layers take)."""
    model = MODELS[name]().eval()
    assert RECIPES[name]["min_img_size"] <= canvas
    with torch.no_grad():
        outputs = model.head_outputs(smooth_images(canvas, batch=1))
    anchors, sizes = outputs["anchors"], outputs["feature_sizes"]
    native = model.anchors([(s, s) for s in FEATURE_SIZES[name]], model.canvas, torch.device("cpu"))
    levels = anchors.split([h * w * k for (h, w), k in zip(sizes, model.anchors_per_level, strict=True)])
    for small, big, k in zip(levels, native, model.anchors_per_level, strict=True):
        torch.testing.assert_close(small[:k, 2:] - small[:k, :2], (big[:k, 2:] - big[:k, :2]) * canvas / model.canvas)
        centres = (small[:, :2] + small[:, 2:]) / 2
        torch.testing.assert_close(centres.min(0).values + centres.max(0).values, torch.full((2,), float(canvas)))
        assert centres.min() > 0


@pytest.fixture(scope="module")
def ssdlite():
    torch.manual_seed(0)
    return L.ssdlite_mobilenet_v2()


def test_contract_train_and_eval(ssdlite):
    images = smooth_images(320, batch=2)
    targets = padded_targets(EXAMPLE_GT[0][:2], EXAMPLE_GT[1][:2], 320)
    ssdlite.train()
    losses = ssdlite(images, targets)
    assert set(losses) == {"loss_cls", "loss_bbox"}
    for value in losses.values():
        assert value.shape == () and torch.isfinite(value)
    sum(losses.values()).backward()
    ssdlite.eval()
    with torch.no_grad():
        out = ssdlite(images.float(), image_size=torch.tensor([[320, 320], [300, 200]]))
    assert out["boxes"].shape == (2, 200, 4) and out["scores"].shape == out["labels"].shape == (2, 200)
    assert out["valid"].dtype == torch.bool
    assert (out["boxes"][1, :, 2] <= 200).all() and (out["boxes"][1, :, 3] <= 300).all()  # clipped to (h, w)


def test_head_outputs_keys_and_shapes(ssdlite):
    ssdlite.train()
    outputs = ssdlite.head_outputs(smooth_images(320, batch=2))
    a = NUM_ANCHORS["ssdlite_mobilenet_v2"]
    assert {k: tuple(v.shape) for k, v in outputs.items() if k != "feature_sizes"} == {
        "cls_logits": (2, a, 81), "box_deltas": (2, a, 4), "anchors": (a, 4)}
    assert outputs["feature_sizes"] == [(s, s) for s in FEATURE_SIZES["ssdlite_mobilenet_v2"]]
    losses = ssdlite.loss(outputs, padded_targets(EXAMPLE_GT[0][:2], EXAMPLE_GT[1][:2], 320))
    assert set(losses) == {"loss_cls", "loss_bbox"}


def test_batch_without_objects_has_finite_losses_and_gradients(ssdlite):
    ssdlite.train()
    ssdlite.zero_grad()
    losses = ssdlite(smooth_images(320, batch=2), padded_targets([[], []], [[], []], 320))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_cls"] == 0  # no positives: no mined negatives either (mmdet)
    sum(losses.values()).backward()
    for name, p in ssdlite.bbox_head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def random_ssd300_head_outputs(batch: int = 3, seed: int = 0):
    """SSD300's anchors [8732, 4] and random head outputs of the matching shapes, without running the network."""
    model = S.ssd300()
    anchors = torch.cat(model.anchors([(s, s) for s in FEATURE_SIZES["ssd300"]], 300, torch.device("cpu")))
    g = torch.Generator().manual_seed(seed)
    cls_logits = torch.randn(batch, len(anchors), 81, generator=g) * 2
    return cls_logits, torch.randn(batch, len(anchors), 4, generator=g), anchors


def test_padding_rows_do_not_change_the_loss():
    cls_logits, box_deltas, anchors = random_ssd300_head_outputs()
    few = S.ssd_loss(cls_logits, box_deltas, anchors, padded_targets(*EXAMPLE_GT, 300, max_gt=4, seed=1))
    many = S.ssd_loss(cls_logits, box_deltas, anchors, padded_targets(*EXAMPLE_GT, 300, max_gt=16, seed=2))
    for key in few:
        torch.testing.assert_close(few[key], many[key], rtol=0, atol=0)


def test_loss_compiles_without_graph_breaks():
    cls_logits, box_deltas, anchors = random_ssd300_head_outputs()
    targets = padded_targets(*EXAMPLE_GT, 300)
    got = compiled_outputs(S.ssd_loss, cls_logits, box_deltas, anchors, targets)
    want = S.ssd_loss(cls_logits, box_deltas, anchors, targets)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_train_forward_compiles_as_one_graph():
    """The whole training forward (network, default boxes, assignment, hard-negative mining, losses) of the SSD
    family is one graph without host syncs; SSDLite at a small canvas keeps the test quick."""
    model = L.ssdlite_mobilenet_v2(num_classes=4).train()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    targets = {"boxes": torch.tensor([[[4.0, 6, 40, 50], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]]),
               "labels": torch.tensor([[2, 0], [0, 0]]), "valid": torch.tensor([[True, False], [False, False]]),
               "image_size": torch.tensor([[64, 64], [64, 64]])}
    got, want = compiled_outputs(model, images, targets), model(images, targets)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


@pytest.mark.parametrize("name", list(PARAMS))
def test_equals_mmdet(name):
    fixture = load_mmdet_fixture(name)
    model = MODELS[name]()
    mmdet_checkpoint = {"state_dict": seeded_state_dict(fixture["keys"])}
    model.load_state_dict(to_our_names(name, mmdet_checkpoint), strict=True)  # the family's from_mmdet
    size = fixture["canvas"]
    images = smooth_images(size, fixture["image_seed"])
    assert images.long().sum().item() == fixture["image_sum"]  # same inputs as recorded
    model.eval()  # first: SSDLite's training-mode BatchNorm below updates the running statistics
    with torch.no_grad():
        out = model(images)
    for b, expected in enumerate(fixture["detections"]):  # as sets: the recording CPU's order is not portable
        assert len(expected["scores"]) == expected["count"]
        assert_same_detections({k: v[b] for k, v in out.items()}, expected, max_det=S.TEST_CFG["max_det"],
                               canvas=size)
    model.train()
    with torch.no_grad():
        losses = model(images, padded_targets(fixture["gt_boxes"], fixture["gt_labels"], size))
    for key, value in fixture["losses"].items():
        assert losses[key].item() == pytest.approx(value, rel=LOSS_REL), key


def test_fixture_comparison_survives_another_cpus_rounding():
    """What another CPU does to SSD300 (AVX2 against the recording machine's AVX-512: 8 of 800 box values off by up
    to 254 px, two near-equal detections swapped), played here by weights moved by ~2e-7 of themselves, the
    size of float32 summation-order noise: the position-by-position comparison the fixtures once had fails on it,
    the set comparison accepts it."""
    fixture = load_mmdet_fixture("ssd300")
    state = to_our_names("ssd300", {"state_dict": seeded_state_dict(fixture["keys"])})
    g = torch.Generator().manual_seed(1)
    model = S.ssd300().eval()
    model.load_state_dict({k: v * (1 + 2e-7 * torch.randn(v.shape, generator=g)) for k, v in state.items()})
    with torch.no_grad():
        out = model(smooth_images(fixture["canvas"], fixture["image_seed"]))
    moved = 0
    for b, expected in enumerate(fixture["detections"]):
        moved += int(((out["boxes"][b, :200] - torch.tensor(expected["boxes"])).abs() > 1e-3).sum())
        assert_same_detections({k: v[b] for k, v in out.items()}, expected, max_det=200, canvas=300)
    assert moved > 0  # the case is exercised: some detections did change places


@pytest.mark.parametrize(("name", "arch", "unused", "missing"), [
    ("ssd300", "vgg16", {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")},
     {f"features.{i}.{p}" for i in (31, 33) for p in ("weight", "bias")}),  # fc6 / fc7 convs are SSD's own
    ("ssdlite_mobilenet_v2", "mobilenet_v2", {"classifier.1.weight", "classifier.1.bias"}, set()),
])
def test_backbone_weights_load(tmp_path, name, arch, unused, missing):
    with torch.device("meta"):
        classifier = getattr(vgg if arch == "vgg16" else mobilenet_v2, arch)()
    state = seeded_state_dict([(k, list(v.shape)) for k, v in classifier.state_dict().items()])
    torch.save({"model": state}, tmp_path / "cls.pth")  # the format train_cls.py writes
    model = MODELS[name]()
    report = load_backbone_weights(name, model, torch.load(tmp_path / "cls.pth", weights_only=True))
    assert set(report["unexpected"]) == unused and set(report["missing"]) == missing and not report["shape_mismatch"]
    torch.testing.assert_close(model.backbone.features[0].state_dict(), {k.removeprefix("features.0."): v
                               for k, v in state.items() if k.startswith("features.0.")})


def test_l2norm_scales_unit_vectors():
    norm = S.L2Norm(8, scale=20.0)
    y = norm(torch.randn(2, 8, 5, 5) * 100)
    torch.testing.assert_close(y.norm(dim=1), torch.full((2, 5, 5), 20.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(torch.randn(1, 8, 2, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_torchvision_ssd300_vgg16_weights_load_and_agree():
    theirs = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=81).eval()
    theirs.load_state_dict(seeded_state_dict([(k, list(v.shape)) for k, v in theirs.state_dict().items()]))
    ours = S.ssd300().eval()
    ours.load_state_dict(S.from_torchvision(theirs.state_dict()), strict=True)
    x = torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(0)) * 60  # both take 0-255 minus mean
    with torch.no_grad():
        head = theirs.head(list(theirs.backbone(x).values()))
        cls_logits, box_deltas = ours.bbox_head(ours.neck(ours.backbone(x)))
    # Both sides run here, on the same conv kernels, so no CPU's summation order is baked in; they differ only in
    # L2Norm's formula (x / (|x| + eps) * w against F.normalize): ~3e-7 on outputs of magnitude ~2.5, so 1e-4 has a
    # 300x margin on any CPU.
    torch.testing.assert_close(box_deltas, head["bbox_regression"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls_logits, head["cls_logits"].roll(-1, dims=-1), rtol=1e-4, atol=1e-4)
    # Same default boxes in the same order, except the last map's 2:1 and 1:2 boxes (369 px), which torchvision
    # clips to the 300 px image (DefaultBoxGenerator clip=True) and mmdet does not.
    _, _, anchors = random_ssd300_head_outputs(batch=1)
    theirs_anchors = theirs.anchor_generator(ImageList(x, [(300, 300)]), [torch.zeros(1, 1, s, s)
                                                                          for s in FEATURE_SIZES["ssd300"]])[0]
    # elementwise float32 arithmetic, the same on every CPU; 1e-3 px covers two formulas' rounding (~3e-5 px at 300)
    torch.testing.assert_close(anchors[:-2], theirs_anchors[:-2], rtol=0, atol=1e-3)
    widths = [(boxes[-2:, 2] - boxes[-2:, 0]).max().item() for boxes in (theirs_anchors, anchors)]
    assert widths[0] <= 300 + 1e-3 < widths[1]

"""RetinaNet: parameter counts, the train/eval contract, empty and padded targets, compilation of the loss,
the FPN against torchvision's, frozen stages, and equality with mmdet 3.3.0 recorded as fixtures."""
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from cls.models import resnet
from det.anchors import grid_anchors, octave_base_anchors
from det.backbones import ResNetBackbone
from det.fpn import FPN
from det.models import retinanet
from tests.det_compare import CANVAS, assert_matches_fixture, empty_targets, fixture_batch, load_mmdet_fixture
from tests.graph_check import compiled_outputs
from tests.mmpretrain_fixture import seeded_state_dict


def fixture_state_dict(keys: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Seeded weights, with the classifier bias moved to the focal-loss prior so scores look like a detector's
    (mostly below the 0.05 threshold) rather than all near 0.5."""
    state = seeded_state_dict(keys)
    state["bbox_head.retina_cls.bias"] = state["bbox_head.retina_cls.bias"] - 4.6
    return state


def count(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


# figures.md: mmdet 3.3.0 retinanet_r{18,50}_fpn_1x_coco, 80 classes, (total, trainable)
PARAMS = {"retinanet_r18": (21_410_100, 21_252_596), "retinanet_r50": (37_968_692, 37_743_348)}


@pytest.mark.parametrize("name", PARAMS)
def test_param_counts(name):
    model = getattr(retinanet, name)()
    assert (count(model), count(model, trainable=True)) == PARAMS[name]


def test_torchvision_twin_differs_by_the_p6_conv_only():
    twin = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80)
    # mmdet's P6 reads C5 (2048 channels), torchvision's reads P5 (256): one 3x3 conv's weights apart (figures.md)
    assert count(retinanet.retinanet_r50()) - count(twin) == (2048 - 256) * 256 * 9


@pytest.mark.parametrize("name", PARAMS)
def test_equals_mmdet(name):
    """Losses and detections of mmdet 3.3.0 (recorded by a script run once against mmdet, mmcv's NMS replaced by
    torchvision's) on seeded weights, with padded and empty images."""
    fixture = load_mmdet_fixture(name)
    model = getattr(retinanet, name)()
    model.load_state_dict(fixture_state_dict(fixture["keys"]), strict=True)  # mmdet's names are ours
    assert_matches_fixture(model, fixture, max_det=retinanet.TEST_CFG["max_det"])


def test_no_objects_frozen_stages_and_norm_eval():
    """A batch without objects trains (finite losses, gradients on the head); the stem and stage 1 get no
    gradient; backbone BatchNorms stay in eval mode, their running statistics untouched."""
    model = retinanet.retinanet_r18().train()
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.neck.training and model.bbox_head.training
    running = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    images = torch.randint(0, 256, (2, 3, 128, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    losses = model(images, empty_targets(2, 4, [[128, 160], [100, 120]]))
    assert all(v.shape == () and torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    for param_name, p in model.bbox_head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), param_name
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.backbone.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1."))}
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if n in frozen)
    assert model.backbone.layer2[0].bn1.weight.grad is not None  # affine trained outside the frozen stages
    for key, value in model.backbone.state_dict().items():
        if key in running:
            assert torch.equal(value, running[key]), key


def test_head_outputs_keys_and_shapes():
    model = retinanet.retinanet_r18().train()
    images, targets = fixture_batch()
    outputs = model.head_outputs(images)
    sizes = [(-(-CANVAS[0] // s), -(-CANVAS[1] // s)) for s in retinanet.STRIDES]  # ceil: stride-2 convs pad
    a = sum(h * w * retinanet.NUM_ANCHORS for h, w in sizes)
    assert outputs["feature_sizes"] == sizes
    assert {k: tuple(v.shape) for k, v in outputs.items() if k != "feature_sizes"} == {
        "cls_logits": (3, a, 80), "box_deltas": (3, a, 4), "anchors": (a, 4)}
    assert set(model.loss(outputs, targets)) == {"loss_cls", "loss_bbox"}


def test_backbone_freezing_and_norm_eval_are_arguments():
    """det/backbones.py's ResNet for detectors trained from scratch: nothing frozen, BatchNorms train."""
    free = ResNetBackbone(18, frozen_stages=-1, norm_eval=False).train()
    assert all(p.requires_grad for p in free.parameters())
    assert all(m.training for m in free.modules() if isinstance(m, nn.BatchNorm2d))
    stem_only = ResNetBackbone(50, frozen_stages=0)
    assert {n.split(".")[0] for n, p in stem_only.named_parameters() if not p.requires_grad} == {"conv1", "bn1"}
    feats = stem_only.eval()(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == stem_only.out_channels == [256, 512, 1024, 2048]


def test_padding_rows_do_not_change_losses():
    model = retinanet.retinanet_r18().train()
    images, few = fixture_batch(max_gt=4)
    _, many = fixture_batch(max_gt=16)
    g = torch.Generator().manual_seed(2)
    many["boxes"][:, 4:] = torch.rand(3, 12, 4, generator=g) * 100 + torch.tensor([0, 0, 100, 100])  # junk rows
    many["labels"][:, 4:] = torch.randint(0, 80, (3, 12), generator=g)
    with torch.no_grad():
        a, b = model(images, few), model(images, many)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0)


def test_assignment_and_loss_compile_without_graph_breaks():
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]  # a 128 x 160 canvas
    anchors = torch.cat(grid_anchors(octave_base_anchors(retinanet.STRIDES), sizes, retinanet.STRIDES))

    def step(cls_logits, box_deltas, anchors, targets):
        valid = retinanet.anchor_valid_mask(targets["image_size"], sizes, retinanet.STRIDES, retinanet.NUM_ANCHORS)
        return retinanet.retinanet_loss(cls_logits, box_deltas, anchors, valid, targets)

    g = torch.Generator().manual_seed(3)
    targets = empty_targets(2, 3, [[128, 160], [96, 100]])
    targets["boxes"][0, :2] = torch.tensor([[10.0, 20, 60, 90], [70, 10, 150, 120]])
    targets["labels"][0, :2] = torch.tensor([3, 7])
    targets["valid"][0, :2] = True  # image 1: no objects
    cls_logits = torch.randn(2, len(anchors), 80, generator=g) - 3
    box_deltas = torch.randn(2, len(anchors), 4, generator=g) * 0.1
    got = compiled_outputs(step, cls_logits, box_deltas, anchors, targets)
    want = step(cls_logits, box_deltas, anchors, targets)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def checkpoint_formats(model: nn.Module) -> dict[str, dict]:
    sd = model.state_dict()
    mmpretrain = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    mmpretrain |= {"head.fc.weight": sd["fc.weight"], "head.fc.bias": sd["fc.bias"]}
    return {"ours": {"model": sd, "epoch": 1}, "torchvision": sd, "mmpretrain": {"state_dict": mmpretrain}}


@pytest.mark.parametrize("fmt", ["ours", "torchvision", "mmpretrain"])
def test_backbone_weights_from_classification_checkpoint(fmt, tmp_path):
    classifier = resnet.resnet18()
    torch.save(checkpoint_formats(classifier)[fmt], tmp_path / "resnet18.pth")
    model = retinanet.retinanet_r18()
    report = retinanet.load_backbone_weights(model, torch.load(tmp_path / "resnet18.pth", weights_only=True))
    assert report == {"missing": [], "unexpected": ["fc.weight", "fc.bias"], "shape_mismatch": []}
    assert torch.equal(model.backbone.layer4[1].conv2.weight, classifier.layer4[1].conv2.weight)
    assert not model.backbone.conv1.weight.requires_grad  # loading keeps the stem frozen


@pytest.mark.parametrize("extra", ["p6p7_on_output", "maxpool"])
def test_fpn_equals_torchvision(extra):
    """The neck's other modes, as FCOS (P6 from P5, ReLU before P7) and SOLOv2 (a max-pooled extra level) use them,
    against torchvision's FeaturePyramidNetwork with LastLevelP6P7 / LastLevelMaxPool."""
    in_channels = [16, 32, 64, 128]
    if extra == "maxpool":
        ours = FPN(in_channels, 24, start_level=0, num_extra_levels=1)
        theirs = FeaturePyramidNetwork(in_channels, 24, LastLevelMaxPool())
        extra_names = []
    else:
        ours = FPN(in_channels, 24, start_level=1, num_extra_levels=2, extra_convs="on_output", relu_before_extra=True)
        theirs = FeaturePyramidNetwork(in_channels[1:], 24, LastLevelP6P7(24, 24))
        extra_names = ["extra_blocks.p6", "extra_blocks.p7"]
    n = len(ours.lateral_convs)
    names = [(f"inner_blocks.{i}.0", f"lateral_convs.{i}.conv") for i in range(n)]
    names += [(f"layer_blocks.{i}.0", f"fpn_convs.{i}.conv") for i in range(n)]
    names += [(t, f"fpn_convs.{n + i}.conv") for i, t in enumerate(extra_names)]
    ours_sd = ours.state_dict()
    theirs.load_state_dict({f"{t}.{p}": ours_sd[f"{o}.{p}"] for t, o in names for p in ("weight", "bias")})
    g = torch.Generator().manual_seed(4)
    feats = [torch.randn(2, c, 33 // 2**i + 1, 41 // 2**i + 1, generator=g) for i, c in enumerate(in_channels)]
    want = list(theirs(OrderedDict((str(i), f) for i, f in enumerate(feats[ours.start_level:]))).values())
    got = ours(feats)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_head_equals_torchvision_head():
    """Same towers and output layout as torchvision's RetinaNetHead (the bench twin), weights mapped by name."""
    ours, theirs = retinanet.RetinaHead(80), RetinaNetHead(256, retinanet.NUM_ANCHORS, 80)
    sd = ours.state_dict()
    mapping = {"classification_head.cls_logits": "retina_cls", "regression_head.bbox_reg": "retina_reg"}
    mapping |= {f"{t}_head.conv.{i}.0": f"{o}_convs.{i}.conv" for t, o in (("classification", "cls"),
                                                                             ("regression", "reg")) for i in range(4)}
    theirs.load_state_dict({f"{t}.{p}": sd[f"{o}.{p}"] for t, o in mapping.items() for p in ("weight", "bias")})
    g = torch.Generator().manual_seed(5)
    feats = [torch.randn(1, 256, 6, 8, generator=g), torch.randn(1, 256, 3, 4, generator=g)]
    want = theirs(feats)
    cls_logits, box_deltas = ours(feats)
    torch.testing.assert_close(cls_logits, want["cls_logits"])
    torch.testing.assert_close(box_deltas, want["bbox_regression"])


def test_train_forward_compiles_as_one_graph():
    """No graph break anywhere in a training forward (backbone, anchors, valid flags, assignment, losses): no
    host sync or data-dependent shape for an accelerator to stall on."""
    model = retinanet.retinanet_r18().train()
    images = torch.randint(0, 256, (2, 3, 128, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    targets = empty_targets(2, 2, [[128, 160], [90, 130]])
    targets["boxes"][1, 0], targets["labels"][1, 0], targets["valid"][1, 0] = torch.tensor([5.0, 8, 80, 70]), 11, True
    got, want = compiled_outputs(model, images, targets), model(images, targets)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_from_scratch_backbone_trains_whole_with_batchnorm_statistics():
    """Without pretrained weights (train_det.py's rule, torchvision's): nothing in the backbone is frozen and its
    BatchNorms update their running statistics; the recipe's builder defaults keep mmdet's freezing."""
    model = retinanet.retinanet_r18(frozen_stages=-1, norm_eval=False).train()
    assert all(p.requires_grad for p in model.backbone.parameters())
    # torchvision's init: no residual branch starts at zero (mmcls's zero_init_residual), so gradients reach them
    assert all(block.bn2.weight.min() == 1 for layer in (model.backbone.layer1, model.backbone.layer4)
               for block in layer)
    before = model.backbone.bn1.running_var.clone()
    images = torch.randint(0, 256, (2, 3, 96, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    model(images, empty_targets(2, 4, [[96, 160], [96, 160]]))
    assert not torch.equal(model.backbone.bn1.running_var, before)
    recipe = retinanet.retinanet_r18().train()
    frozen = {n.split(".")[0] for n, p in recipe.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}
    assert (retinanet.RECIPES["retinanet_r18"]["frozen_stages"], retinanet.RECIPES["retinanet_r18"]["norm_eval"]) \
        == (1, True)

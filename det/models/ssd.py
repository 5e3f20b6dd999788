"""SSD (Liu et al. 2016, "SSD: Single Shot MultiBox Detector") and SSDLite, as mmdet 3.3 builds them.

backbone -> neck (extra layers, one more map each) -> head (one conv per map for scores, one for boxes) over SSD's
default boxes. Scores are a softmax over C + 1 classes with the background LAST (mmdet's order); training assigns
anchors by max IoU, regresses positives with smooth-L1 and mines 3 negatives per positive by classification loss.
Names follow mmdet's checkpoints (`backbone.*`, `neck.*`, `bbox_head.*`); `from_torchvision` loads torchvision's
`ssd300_vgg16` (the same network as SSD300). SSDLite (MobileNetV2 trunk, depthwise layers) is det/models/ssdlite.py.
"""
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cls.convert import to_our_names
from cls.models.layers import ConvModule, NormLayer, init_weights
from cls.models.vgg import VGG_CFGS, make_features
from common.checkpoint import load_model_weights
from det.anchors import grid_anchors, ssd_base_anchors, ssd_sizes
from det.assign import gather_gt, hard_negative_mask, max_iou_assign
from det.boxes import box_iou, encode_deltas
from det.models.dense import flatten_levels, image_size_or_canvas, normalize, predict_boxes

BOX_STDS = (0.1, 0.1, 0.2, 0.2)  # mmdet's DeltaXYWHBBoxCoder target_stds for SSD (the paper's "variances")
TEST_CFG = dict(nms_pre=1000, score_thr=0.02, iou_thr=0.45, max_det=200)  # mmdet's SSD test_cfg


def init_convs(module: nn.Module, init: Callable[[Tensor], object]) -> None:
    """mmdet's init_cfg for one part: `init` on every Conv2d weight, biases 0 (norm layers keep 1 / 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            init(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class DepthwiseSeparableConv(nn.Module):
    """kxk depthwise conv -> norm -> act, then 1x1 pointwise conv -> norm -> act; mmcv's
    DepthwiseSeparableConvModule with its names (`depthwise_conv`, `pointwise_conv`)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
        norm: NormLayer | None, act: type[nn.Module] | None,
    ) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(in_channels, in_channels, kernel_size, stride, padding, groups=in_channels,
                                         norm=norm, act=act)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1, norm=norm, act=act)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class L2Norm(nn.Module):
    """ParseNet's normalisation (Liu et al. 2015) of conv4_3, whose features are much larger than the later maps':
    each position's feature vector to unit L2 norm, times a learnt per-channel scale initialised to 20 (SSD sec. 3.1).
    Computed in float32 under autocast, as mmdet's."""

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        norm = x32.pow(2).sum(1, keepdim=True).sqrt() + self.eps  # [B, 1, H, W]
        return (self.weight.float()[None, :, None, None] * x32 / norm).to(x.dtype)


class SSDVGG(nn.Module):
    """VGG-16 conv1_1..conv5_3 with ceil-mode pools (38x38 conv4_3 at 300 px), then pool5 as 3x3 stride 1 and fc6 /
    fc7 as convs, fc6 dilated by 6 (SSD sec. 3: "atrous"). `features` indices are mmdet's SSDVGG = torchvision's
    vgg16.features (fc6 = 31, fc7 = 33), so VGG-16 classification checkpoints load by name.
    Returns conv4_3 [B, 512, H/8, W/8] (after ReLU, index 22) and fc7 [B, 1024, H/16, W/16]."""

    classification_arch = "vgg16"  # the cls.models builder whose checkpoints load into this trunk

    def __init__(self) -> None:
        super().__init__()
        self.features = make_features(VGG_CFGS[16][:-1])  # no pool after conv5_3: pool5 is replaced below
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True  # 75 -> 38, not 37, at 300 px (mmdet's ceil_mode=True)
        self.features.extend([
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, kernel_size=1),
            nn.ReLU(inplace=True),
        ])
        init_weights(self)  # Kaiming, mmdet's SSDVGG init without a checkpoint

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        conv4_3 = self.features[:23](x)
        return conv4_3, self.features[23:](conv4_3)


class SSDNeck(nn.Module):
    """mmdet's SSDNeck: optional L2Norm on the first input map, then one extra block per new map, each a 1x1 conv
    halving the channels and a kxk conv (depthwise-separable in SSDLite) producing the next, smaller map."""

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        level_strides: Sequence[int],
        level_paddings: Sequence[int],
        l2_norm_scale: float | None,
        last_kernel_size: int = 3,
        depthwise: bool = False,
        norm: NormLayer | None = None,
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.l2_norm = L2Norm(in_channels[0], l2_norm_scale) if l2_norm_scale else None
        new_channels = out_channels[len(in_channels):]
        self.extra_layers = nn.ModuleList()
        previous = in_channels[-1]
        for i, (channels, stride, padding) in enumerate(zip(new_channels, level_strides, level_paddings, strict=True)):
            k = last_kernel_size if i == len(new_channels) - 1 else 3  # SSD512's last map: 4x4 conv, 2x2 -> 1x1
            mid = channels // 2
            second = (DepthwiseSeparableConv(mid, channels, k, stride, padding, norm, act) if depthwise
                      else ConvModule(mid, channels, k, stride, padding, norm=norm, act=act))
            self.extra_layers.append(nn.Sequential(ConvModule(previous, mid, 1, norm=norm, act=act), second))
            previous = channels

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        outs = list(features)
        if self.l2_norm is not None:
            outs[0] = self.l2_norm(outs[0])
        x = outs[-1]
        for layer in self.extra_layers:
            x = layer(x)
            outs.append(x)
        return outs


class SSDHead(nn.Module):
    """Per map, one conv to `K * (C + 1)` scores and one to `K * 4` box deltas (K anchors per position): 3x3 in SSD;
    in SSDLite a 3x3 depthwise conv + norm + act, then 1x1 (mmdet's SSDHead with use_depthwise)."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: Sequence[int],
        num_anchors: Sequence[int],
        depthwise: bool = False,
        norm: NormLayer | None = None,
        act: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes

        def branch(channels: int, outputs: int) -> nn.Sequential:
            if depthwise:
                return nn.Sequential(ConvModule(channels, channels, 3, groups=channels, norm=norm, act=act),
                                     nn.Conv2d(channels, outputs, 1))
            return nn.Sequential(nn.Conv2d(channels, outputs, 3, padding=1))

        pairs = list(zip(in_channels, num_anchors, strict=True))
        self.cls_convs = nn.ModuleList(branch(c, k * (num_classes + 1)) for c, k in pairs)
        self.reg_convs = nn.ModuleList(branch(c, k * 4) for c, k in pairs)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """-> class logits [B, A, C + 1] (background last) and box deltas [B, A, 4], in anchor order."""
        cls_logits = flatten_levels([conv(f) for conv, f in zip(self.cls_convs, features, strict=True)],
                                    self.num_classes + 1)
        box_deltas = flatten_levels([conv(f) for conv, f in zip(self.reg_convs, features, strict=True)], 4)
        return cls_logits, box_deltas


def ssd_loss(
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors: Tensor,
    targets: dict[str, Tensor],
    *,
    pos_iou_thr: float = 0.5,
    neg_iou_thr: float = 0.5,
    neg_pos_ratio: int = 3,
    smooth_l1_beta: float = 1.0,
    stds: Sequence[float] = BOX_STDS,
) -> dict[str, Tensor]:
    """SSD's MultiBox loss (paper eq. 1-3) for a whole batch, as mmdet's SSDHead.loss_by_feat computes it.

    cls_logits [B, A, C + 1] (background last), box_deltas [B, A, 4], anchors [A, 4]; targets["boxes"] [B, M, 4],
    ["labels"] [B, M], ["valid"] [B, M]. Anchors match gts by max IoU (>= pos_iou_thr positive, < neg_iou_thr
    negative, and each gt's first best anchor positive whatever its IoU: min_pos_iou 0, gt_max_assign_all False).
    Classification: cross-entropy over positives and the `neg_pos_ratio * num_pos` hardest negatives of each image;
    regression: smooth-L1 over positives. Both are summed over the batch and divided by the batch's number of
    positives counting each image as >= 1 (mmdet's avg_factor: its SamplingResult clamps num_pos per image; its
    per-image losses are then summed), so a batch with no objects gives finite losses.
    """
    background = cls_logits.shape[-1] - 1
    gt_boxes, gt_valid = targets["boxes"], targets["valid"]
    matched, pos, neg = max_iou_assign(box_iou(anchors, gt_boxes), gt_valid, pos_iou_thr=pos_iou_thr,
                                       neg_iou_thr=neg_iou_thr, min_pos_iou=0.0, gt_max_assign_all=False)
    labels = torch.where(pos, gather_gt(targets["labels"], matched), background)  # [B, A]
    ce = F.cross_entropy(cls_logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)
    counted = pos | hard_negative_mask(ce, pos, neg, neg_pos_ratio)
    num_pos = pos.sum(dim=1).clamp(min=1).sum()  # mmdet's avg_factor: every image counts >= 1 positive
    loss_cls = torch.where(counted, ce, 0.0).sum() / num_pos
    # targets of non-positives (possibly matched to a padding row: log(0)) are zeroed before they meet the loss
    box_targets = torch.where(pos[..., None], encode_deltas(anchors, gather_gt(gt_boxes, matched), stds=stds), 0.0)
    l1 = F.smooth_l1_loss(box_deltas.float(), box_targets, beta=smooth_l1_beta, reduction="none")  # [B, A, 4]
    loss_bbox = torch.where(pos[..., None], l1, 0.0).sum() / num_pos
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}


class SSD(nn.Module):
    """backbone -> neck -> head; each level's base anchors are tiled over its feature map at every forward (a
    constant of the canvas, like mmdet's prior generator, and cheap: no per-image work).

    train: `model(images, targets)` -> {"loss_cls", "loss_bbox"}; eval: `model(images, image_size=None)` ->
    {"boxes" [B, 200, 4], "scores", "labels", "valid"} (det.models.dense.predict_boxes). images [B, 3, H, W] RGB
    0-255 on a square canvas: the one the anchor sizes were chosen for (`canvas`: 300, 512 or 320) or, for quick
    runs, another (see `anchors`). SSD's pipeline resizes every image onto the whole canvas, so every anchor takes
    part in training (mmdet's valid flags at pad_shape = canvas) and targets["image_size"] is not read; at eval,
    boxes are clipped to `image_size`.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: SSDNeck,
        bbox_head: SSDHead,
        canvas: int,
        strides: Sequence[int],
        base_anchors: Sequence[Tensor],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.backbone, self.neck, self.bbox_head = backbone, neck, bbox_head
        self.canvas, self.strides = canvas, list(strides)
        self.anchors_per_level = [len(b) for b in base_anchors]
        self.register_buffer("base_anchors", torch.cat(list(base_anchors)), persistent=False)  # [sum K, 4]
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def head_outputs(self, images: Tensor) -> dict:
        """images [B, 3, H, W] -> {"cls_logits" [B, A, C + 1] (background last), "box_deltas" [B, A, 4],
        "anchors" [A, 4], "feature_sizes" [(h, w) per level]}, A = sum of h * w * anchors per position."""
        features = self.neck(self.backbone(normalize(images, self.mean, self.std)))
        cls_logits, box_deltas = self.bbox_head(features)
        sizes = [tuple(f.shape[-2:]) for f in features]
        anchors = torch.cat(self.anchors(sizes, images.shape[-1], images.device))
        return {"cls_logits": cls_logits, "box_deltas": box_deltas, "anchors": anchors, "feature_sizes": sizes}

    def anchors(self, sizes: Sequence[tuple[int, int]], canvas: int, device: torch.device) -> list[Tensor]:
        """Default boxes [h * w * K, 4] per level for the feature maps `sizes` of a square `canvas`. On the canvas
        the sizes were chosen for, mmdet's exactly; on another (`--img-size` for quick runs) each box keeps its size
        relative to the canvas and each level's centres spread evenly over it (stride = canvas / cells, the rule
        behind SSDLite's strides 16 ... 107, 160, 320)."""
        base, strides = self.base_anchors.split(self.anchors_per_level), self.strides
        if canvas != self.canvas:
            scale, new_strides = canvas / self.canvas, [canvas / h for h, _ in sizes]
            base = [(b - old / 2) * scale + new / 2 for b, old, new in zip(base, strides, new_strides, strict=True)]
            strides = new_strides
        return grid_anchors(base, sizes, strides, device=device)

    def loss(self, outputs: dict, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Assignment + losses from `head_outputs`' dict (every anchor takes part: see the class docstring)."""
        return ssd_loss(outputs["cls_logits"], outputs["box_deltas"], outputs["anchors"], targets)

    def forward(
        self, images: Tensor, targets: dict[str, Tensor] | None = None, image_size: Tensor | None = None
    ) -> dict[str, Tensor]:
        outputs = self.head_outputs(images)
        if self.training:
            assert targets is not None, "training needs targets"
            return self.loss(outputs, targets)
        level_sizes = [h * w * k for (h, w), k in zip(outputs["feature_sizes"], self.anchors_per_level, strict=True)]
        scores = outputs["cls_logits"].float().softmax(-1)[..., :-1]  # drop the background, mmdet's last column
        return predict_boxes(scores, outputs["box_deltas"].float(), outputs["anchors"], level_sizes,
                             image_size_or_canvas(images, image_size), stds=BOX_STDS, **TEST_CFG)


def from_mmdet(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """An mmdet SSD300 / SSD512 state dict onto our names: they are the same (SSDLite's differ: see ssdlite.py)."""
    return dict(state_dict)


def from_torchvision(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's `ssd300_vgg16` (num_classes = C + 1, background first) onto our `ssd300(C)`.

    torchvision splits the VGG at conv4_3 (`backbone.features` = our features[0:23], `backbone.extra.0` = pool4 ..
    conv5_3 then a Sequential(pool5, fc6, relu, fc7, relu)), keeps the L2Norm scale as `backbone.scale_weight` and
    the extra blocks as `backbone.extra.<1..4>.{0,2}`. Its default boxes per position come in our order (small
    square, large square, then each ratio's wide and tall box), so only the class axis moves: background 0 -> last.
    """
    extra0 = {"1": 24, "3": 26, "5": 28, "7.1": 31, "7.3": 33}
    out = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r"backbone\.extra\.0\.(\d|7\.\d)\.(weight|bias)", key):
            key = f"backbone.features.{extra0[m[1]]}.{m[2]}"
        elif m := re.fullmatch(r"backbone\.extra\.(\d)\.([02])\.(.+)", key):
            key = f"neck.extra_layers.{int(m[1]) - 1}.{int(m[2]) // 2}.conv.{m[3]}"
        elif key == "backbone.scale_weight":
            key = "neck.l2_norm.weight"
        elif m := re.fullmatch(r"head\.classification_head\.module_list\.(\d)\.(.+)", key):
            k = state_dict[key.replace("classification", "regression")].shape[0] // 4  # anchors per position
            per_anchor = value.reshape(k, -1, *value.shape[1:])  # [K, C + 1, ...]: anchor-major channels
            value = torch.cat([per_anchor[:, 1:], per_anchor[:, :1]], dim=1).reshape(value.shape)
            key = f"bbox_head.cls_convs.{m[1]}.0.{m[2]}"
        elif m := re.fullmatch(r"head\.regression_head\.module_list\.(\d)\.(.+)", key):
            key = f"bbox_head.reg_convs.{m[1]}.0.{m[2]}"
        out[key] = value
    return out


def load_backbone_weights(model: SSD, checkpoint: dict) -> dict[str, list[str]]:
    """An ImageNet classification checkpoint (ours / torchvision / mmpretrain) of the backbone's architecture
    (vgg16 or mobilenet_v2) into `model.backbone`; returns the key report (the classifier stays unused, and SSD's
    fc6 / fc7 convs stay missing: they are not the classifier's fc layers). mmdet's SSD starts from caffe VGG-16
    weights made for 0-255 inputs (std 1); torchvision-style weights expect std ~58, a scale that the L2Norm on
    conv4_3 divides out again, but not fc7's."""
    return load_model_weights(model.backbone, to_our_names(model.backbone.classification_arch, checkpoint))


def _ssd_vgg(num_classes: int, input_size: int, neck_args: dict, strides: list[int], ratios: list[list[int]],
             ratio_range: tuple[float, float]) -> SSD:
    """mmdet's ssd300.py model with the given neck and anchor settings (ssd512_coco.py overrides those)."""
    channels = neck_args["out_channels"]
    base_anchors = ssd_base_anchors(strides, ratios, *ssd_sizes(input_size, ratio_range, len(strides)))
    neck = SSDNeck(in_channels=(512, 1024), l2_norm_scale=20.0, **neck_args)
    head = SSDHead(num_classes=num_classes, in_channels=channels, num_anchors=[len(b) for b in base_anchors])
    init_convs(neck.extra_layers, nn.init.xavier_uniform_)  # mmdet's SSDNeck / SSDHead init_cfg
    init_convs(head, nn.init.xavier_uniform_)
    # mmdet's data_preprocessor: std 1, the caffe VGG-16 weights expect 0-255 inputs minus the mean
    return SSD(backbone=SSDVGG(), neck=neck, bbox_head=head, canvas=input_size, strides=strides,
               base_anchors=base_anchors, mean=(123.675, 116.28, 103.53), std=(1.0, 1.0, 1.0))


# mmdet's configs ssd/ssd300_coco.py, ssd/ssd512_coco.py (schedule_2x: 24 epochs, steps 16 / 22, linear warmup 500
# iters from 0.001); SSDLite's is in det/models/ssdlite.py. All train on COCO wrapped in RepeatDataset(times=5), so
# an mmdet "epoch" is 5 passes; lr is for lr_batch = auto_scale_lr's base_batch_size (8 GPUs x batch_size).
# Train pipeline of all SSDs (det/presets.py's "ssd" preset): Expand (ratio
# 1-4, mean fill), MinIoURandomCrop (min IoUs 0.1-0.9, min crop 0.3), Resize to the square canvas (no keep-ratio),
# flip 0.5, PhotoMetricDistortion; images without objects or smaller than 32 px are dropped.
_SSD_RECIPE = dict(preset="ssd", batch_size=8, lr=2e-3, lr_batch=64, momentum=0.9, weight_decay=5e-4, epochs=24,
                   schedule="multistep", lr_steps=(16, 22), warmup_iters=500, warmup_factor=0.001, repeat=5,
                   clip_grad=None, iou_type="bbox", metric="AP")
# min_img_size: the smallest canvas the layers accept (VGG's last unpadded 3x3 convs need a 3 px map), for --img-size
RECIPES = {
    "ssd300": dict(_SSD_RECIPE, img_size=300, min_img_size=257),
    "ssd512": dict(_SSD_RECIPE, img_size=512, min_img_size=257),
}


def ssd300(num_classes: int = 80) -> SSD:
    neck = dict(out_channels=(512, 1024, 512, 256, 256, 256), level_strides=(2, 2, 1, 1), level_paddings=(1, 1, 0, 0))
    return _ssd_vgg(num_classes, 300, neck, [8, 16, 32, 64, 100, 300], [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                    (0.15, 0.9))


def ssd512(num_classes: int = 80) -> SSD:
    neck = dict(out_channels=(512, 1024, 512, 256, 256, 256, 256), level_strides=(2, 2, 2, 2, 1),
                level_paddings=(1, 1, 1, 1, 1), last_kernel_size=4)
    return _ssd_vgg(num_classes, 512, neck, [8, 16, 32, 64, 128, 256, 512],
                    [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]], (0.1, 0.9))

"""FCOS (Tian et al. 2019, "FCOS: Fully Convolutional One-Stage Object Detection") as mmdet 3.3.0 builds
fcos_r50-caffe_fpn_gn-head_1x_coco: a caffe-style ResNet-50 (det/backbones.py: the stride on each stage's first 1x1
conv, BatchNorms fixed, stem and stage 1 frozen) on BGR pixels minus Detectron's mean -> FPN P3-P7 (P6 from P5, a
ReLU before P7) -> a head shared over levels: two towers of four 3x3 conv + GroupNorm + ReLU, the class tower
predicting C class logits and a centerness logit, the box tower the distances from the point to the box's four sides
(exp of a learnt per-level scale times the conv output) at every point of every level (anchor-free).

Training gives each point to the smallest object that contains it and whose largest side distance lies in the
point's level range (det/assign.py's point_assign), then sums a focal loss over all points and, over positives, an
IoU loss weighted by the centerness target and a centerness BCE. Everything runs for the whole batch with masks, so
a step compiles to one graph. Detections score class probability x centerness. Parameter names are mmdet's
(`backbone.*`, `neck.*`, `bbox_head.*`): mmdet checkpoints load without renaming.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cls.convert import to_our_names as classification_names
from common.checkpoint import load_model_weights
from common.dist import all_reduce_sum, get_world_size
from det.anchors import grid_anchors
from det.assign import gather_gt, point_assign
from det.backbones import ResNetBackbone
from det.boxes import box_iou, distance_to_box
from det.fpn import FPN
from det.losses import sigmoid_focal_loss
from det.models.dense import flatten_levels, image_size_or_canvas, normalize
from det.nms import select_and_nms

STRIDES = (8, 16, 32, 64, 128)  # P3-P7
INF = 1e8  # mmdet fcos_head.py: the open end of the last regress range
# the largest side distance each level learns (Tian et al. sec. 3.2: m2..m7 = 0, 64, 128, 256, 512, inf)
REGRESS_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))
# mmdet test_cfg: nms_pre, score_thr, nms iou_threshold, max_per_img (min_bbox_size 0 is in select_and_nms)
TEST_CFG = dict(nms_pre=1000, score_thr=0.05, iou_thr=0.5, max_det=100)


def grid_points(feature_sizes: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """mmdet's MlvlPointGenerator(STRIDES, offset=0.5).grid_priors: [A, 2] (x, y), the centre of every cell, level by
    level and row-major as the head flattens its maps; and [A, 2] the regress range of each point's level."""
    centres = grid_anchors([torch.full((1, 4), s / 2) for s in STRIDES], feature_sizes, STRIDES, device=device)
    ranges = [torch.tensor(r, dtype=torch.float32, device=device).expand(len(c), 2)
              for r, c in zip(REGRESS_RANGES, centres, strict=True)]
    return torch.cat(centres)[:, :2], torch.cat(ranges)


def centerness_target(distances: Tensor) -> Tensor:
    """Tian et al. eq. 3, sqrt(min(l, r) / max(l, r) x min(t, b) / max(t, b)): [..., 4] -> [...], for positive
    distances (elsewhere 0 / 0 can occur: mmdet computes it on positives only, the callers mask)."""
    left_right, top_bottom = distances[..., 0::2], distances[..., 1::2]
    return ((left_right.amin(-1) / left_right.amax(-1)) * (top_bottom.amin(-1) / top_bottom.amax(-1))).sqrt()


def fcos_loss(outputs: dict[str, Tensor], targets: dict[str, Tensor], *, alpha: float = 0.25, gamma: float = 2.0,
              iou_eps: float = 1e-6) -> dict[str, Tensor]:
    """Assignment + losses of mmdet's FCOSHead.loss_by_feat for a whole batch.

    outputs: `FCOS.head_outputs`' dict; targets: "boxes" [B, M, 4], "labels" [B, M], "valid" [B, M].
    Returns {"loss_cls": focal loss over every point / positives, "loss_bbox": IoU loss -log(IoU) (mmdet's IoULoss,
    mode 'log', eps 1e-6) of the positives' boxes, each weighted by its centerness target / the sum of those
    targets, "loss_centerness": BCE of the positives' centerness / positives}. The positive count and the
    centerness sum are averaged over ranks (mmdet's reduce_mean), at least 1 and 1e-6. Without positives the
    masked sums are 0 and every output stays in the graph (mmdet's `pred.sum()`).
    """
    cls_logits = outputs["cls_logits"].float()  # sums over ~B*A*C terms
    box_preds, centerness, points = outputs["box_preds"].float(), outputs["centerness"].float(), outputs["points"]
    matched, pos, distances = point_assign(points, outputs["regress_ranges"], targets["boxes"], targets["valid"])
    num_pos = (all_reduce_sum(pos.sum().float()) / get_world_size()).clamp(min=1.0)
    labels = gather_gt(targets["labels"], matched)  # [B, A]
    loss_cls = sigmoid_focal_loss(cls_logits, labels, pos, torch.ones_like(pos), alpha=alpha, gamma=gamma) / num_pos
    # non-positives get distances 1: centerness 1 and a finite box instead of 0 / 0; torch.where then drops them
    distances = torch.where(pos[..., None], distances, 1.0)  # [B, A, 4]
    centerness_t = torch.where(pos, centerness_target(distances), 0.0)  # [B, A]
    centerness_sum = (all_reduce_sum(centerness_t.sum()) / get_world_size()).clamp(min=1e-6)
    # both boxes decoded from the point, as mmdet decodes prediction and target before its aligned IoU
    boxes, gt = distance_to_box(points, box_preds), distance_to_box(points, distances)  # [B, A, 4]
    iou = box_iou(boxes[..., None, :], gt[..., None, :])[..., 0, 0].clamp(min=iou_eps)  # [B, A] aligned pairs
    loss_bbox = torch.where(pos, -iou.log() * centerness_t, 0.0).sum() / centerness_sum
    bce = F.binary_cross_entropy_with_logits(centerness, centerness_t, reduction="none")  # [B, A]
    loss_centerness = torch.where(pos, bce, 0.0).sum() / num_pos
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_centerness": loss_centerness}


def fcos_predict(outputs: dict[str, Tensor], image_size: Tensor, *, nms_pre: int, score_thr: float, iou_thr: float,
                 max_det: int) -> dict[str, Tensor]:
    """mmdet's FCOSHead.predict_by_feat (base_dense_head's, with centerness as score_factors), batched: per level the
    nms_pre best (point, class) pairs by class probability above score_thr, boxes clipped to image_size [B, 2];
    each then scored class probability x sigmoid(centerness) (no square root: mmdet 3.3.0 multiplies, and a comment
    in its code leaves the paper's sqrt for later), zero-size boxes dropped, class-wise NMS, the max_det best.
    Returns {"boxes": [B, max_det, 4], "scores", "labels", "valid": [B, max_det]}."""
    boxes = distance_to_box(outputs["points"], outputs["box_preds"].float())  # [B, A, 4]
    return select_and_nms(boxes, outputs["cls_logits"].float().sigmoid(), outputs["level_sizes"], image_size,
                          score_factors=outputs["centerness"].float().sigmoid(), nms_pre=nms_pre,
                          score_thr=score_thr, iou_thr=iou_thr, max_det=max_det)


class ConvGN(nn.Module):
    """mmcv's ConvModule with norm_cfg GN(32): a 3x3 (or kernel_size) conv without bias -> GroupNorm -> ReLU, children
    `conv`, `gn`, `activate` (mmcv names the norm by its type, so cls/models/layers.py's ConvModule, `bn`, does not
    fit)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.gn = nn.GroupNorm(num_groups, out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.gn(self.conv(x)))


class Scale(nn.Module):
    """mmcv's Scale: one learnt scalar times a level's box output, so one shared head can regress each level's
    range of sizes (Tian et al. sec. 3.2, exp(s_i x))."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class FCOSHead(nn.Module):
    """Two towers of `stacked_convs` ConvGN shared over levels, then `conv_cls` (C logits) and `conv_centerness` on
    the class tower (mmdet's centerness_on_reg=False) and `conv_reg` (4 distances) on the box tower, all 3x3.
    mmdet's names and init."""

    def __init__(self, num_classes: int, in_channels: int = 256, feat_channels: int = 256, stacked_convs: int = 4,
                 num_levels: int = len(STRIDES), prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_classes = num_classes
        widths = [in_channels] + [feat_channels] * (stacked_convs - 1)  # input width of each tower conv
        self.cls_convs = nn.Sequential(*(ConvGN(c, feat_channels) for c in widths))
        self.reg_convs = nn.Sequential(*(ConvGN(c, feat_channels) for c in widths))
        self.conv_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for m in self.modules():  # mmdet AnchorFreeHead init_cfg: every conv N(0, 0.01), zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # focal-loss prior (Lin et al. 2017 sec. 4.1): every point starts at foreground probability 0.01
        nn.init.constant_(self.conv_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """FPN maps -> (cls_logits [B, A, C], box_preds [B, A, 4] distances (l, t, r, b) in pixels, float32,
        centerness [B, A] logits) in point order."""
        cls_maps, reg_maps, centerness_maps = [], [], []
        for x, scale in zip(feats, self.scales, strict=True):
            cls_feat = self.cls_convs(x)
            cls_maps.append(self.conv_cls(cls_feat))  # [B, C, H, W]
            centerness_maps.append(self.conv_centerness(cls_feat))  # [B, 1, H, W]
            # float32 before exp, as mmdet: exp overflows fp16 past a distance of 65504 px / e^11
            reg_maps.append(scale(self.conv_reg(self.reg_convs(x))).float().exp())  # [B, 4, H, W]
        return (flatten_levels(cls_maps, self.num_classes), flatten_levels(reg_maps, 4),
                flatten_levels(centerness_maps, 1).squeeze(-1))


class FCOS(nn.Module):
    """images [B, 3, H, W] RGB 0-255 (uint8 or float). mmdet's caffe-style FCOS reads BGR minus Detectron's pixel
    mean, std 1 (the caffe checkpoints' input): the model subtracts the mean and flips the channels itself, so
    mmdet's weights work unchanged. With `norm_eval` (pretrained weights) the backbone's BatchNorms are frozen whole,
    statistics and affine (mmdet's norm_cfg requires_grad=False); from scratch (norm_eval False) they train."""

    def __init__(self, depth: int, num_classes: int = 80, *, frozen_stages: int = 1, norm_eval: bool = True) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(depth, style="caffe", frozen_stages=frozen_stages, norm_eval=norm_eval,
                                       norm_trainable=not norm_eval)
        # mmdet neck: FPN(start_level=1, add_extra_convs='on_output', num_outs=5, relu_before_extra_convs=True)
        self.neck = FPN(self.backbone.out_channels, 256, start_level=1, num_extra_levels=2, extra_convs="on_output",
                        relu_before_extra=True)
        self.bbox_head = FCOSHead(num_classes)
        # mmdet data_preprocessor mean (102.9801, 115.9465, 122.7717) in BGR, here in RGB order; std 1
        self.register_buffer("mean", torch.tensor([122.7717, 115.9465, 102.9801]), persistent=False)
        self.register_buffer("std", torch.ones(3), persistent=False)

    def head_outputs(self, images: Tensor) -> dict:
        """images -> {"cls_logits" [B, A, C], "box_preds" [B, A, 4], "centerness" [B, A] (FCOSHead.forward's),
        "points" [A, 2], "regress_ranges" [A, 2], "level_sizes" [h * w per level]}, A = sum of h * w."""
        feats = self.neck(self.backbone(normalize(images, self.mean, self.std).flip(1)))
        cls_logits, box_preds, centerness = self.bbox_head(feats)
        sizes = [tuple(f.shape[-2:]) for f in feats]
        points, regress_ranges = grid_points(sizes, images.device)
        return {"cls_logits": cls_logits, "box_preds": box_preds, "centerness": centerness, "points": points,
                "regress_ranges": regress_ranges, "level_sizes": [h * w for h, w in sizes]}

    def loss(self, outputs: dict, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Assignment + losses from `head_outputs`' dict. Every point takes part, also over an image's canvas padding
        (mmdet's points have no valid flags), so targets' "image_size" is not needed."""
        return fcos_loss(outputs, targets)

    def forward(self, images: Tensor, targets: dict[str, Tensor] | None = None,
                image_size: Tensor | None = None) -> dict[str, Tensor]:
        """Train: targets (boxes, labels, valid) -> {"loss_cls", "loss_bbox", "loss_centerness"}. Eval: {"boxes"
        [B, 100, 4], "scores", "labels", "valid" [B, 100]}, clipped to image_size."""
        outputs = self.head_outputs(images)
        if self.training:
            return self.loss(outputs, targets)
        return fcos_predict(outputs, image_size_or_canvas(images, image_size), **TEST_CFG)


def from_mmdet(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """An mmdet FCOS state dict onto our names: they are the same, except in checkpoints of early mmdet, whose
    predictors were `bbox_head.fcos_cls`, `fcos_reg`, `fcos_centerness`; those are renamed as mmdet's
    AnchorFreeHead._load_from_state_dict renames them (a head module whose name ends in cls / reg / centerness)."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "bbox_head":
            parts[1] = next((f"conv_{end}" for end in ("cls", "reg", "centerness") if parts[1].endswith(end)),
                            parts[1])
        out[".".join(parts)] = value
    return out


def load_backbone_weights(model: FCOS, checkpoint: dict) -> dict[str, list[str]]:
    """A caffe-style ResNet checkpoint into `model.backbone`: what mmdet's FCOS loads, open-mmlab://detectron/
    resnet50_caffe (download.openmmlab.com/pretrain/third_party/resnet50_caffe-788b5fa3.pth: Detectron's ImageNet
    R-50 in torchvision's names under "state_dict", BGR input minus the mean, std 1, its affine channels as
    BatchNorms of mean 0 / variance 1). Those hold no `num_batches_tracked`, which frozen BatchNorms never read: the
    model's own fill them in, so they are not reported missing (mmengine does not report them either). Our,
    torchvision's and mmpretrain's ResNet-50 load too, by name, but were trained on RGB / std-normalised input with
    the stride on the 3x3 conv: they fit the shapes, not the model. Returns load_model_weights' report."""
    state_dict = classification_names(f"resnet{model.backbone.depth}", checkpoint)
    counters = {k: v for k, v in model.backbone.state_dict().items() if k.endswith("num_batches_tracked")}
    return load_model_weights(model.backbone, counters | state_dict)


# Training recipe of the seed's fcos_r50_caffe_fpn_gn-head_fp16_1x_bs8x8_coco.py (mmdet 2.x; mmdet 3.3.0 keeps only
# its base, fcos_r50-caffe_fpn_gn-head_1x_coco.py): 8 GPUs x 8 images, SGD LR 0.04, momentum 0.9, weight decay 1e-4,
# except biases: no decay, and twice the LR outside norm layers (paramwise_cfg bias_lr_mult 2, bias_decay_mult 0);
# gradient norm clipped to 35; fp16 with a dynamic loss scale (train with --amp: GradScaler's dynamic scaling);
# linear warmup over 1000 iterations from 0.1 x LR; 12 epochs, LR x 0.1 after epochs 8 and 11. The 1x config itself:
# 8 GPUs x 2 images, LR 0.01, a constant warmup of 1/3 x LR over 500 iterations (ConstantLR; not offered by
# --warmup), the rest the same. Data: keep-ratio resize to 1333x800, horizontal flip 0.5 (coco_detection.py, whose
# filter_empty_gt drops images without objects), padded with the mean colour (the "fcos" preset).
RECIPES = {
    "fcos_r50": dict(preset="fcos", img_size=800, batch_size=8, lr=0.04, lr_batch=64, momentum=0.9, weight_decay=1e-4,
                     epochs=12, schedule="multistep", lr_steps=(8, 11), warmup_iters=1000, warmup_factor=0.1,
                     repeat=1, clip_grad=35.0, iou_type="bbox", metric="AP", frozen_stages=1, norm_eval=True,
                     bias_lr_mult=2.0, bias_weight_decay=0.0),
}


def fcos_r50(num_classes: int = 80, *, frozen_stages: int = 1, norm_eval: bool = True) -> FCOS:
    return FCOS(50, num_classes, frozen_stages=frozen_stages, norm_eval=norm_eval)

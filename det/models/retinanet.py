"""RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection") as mmdet 3.3.0 builds
retinanet_r{18,50}_fpn_1x_coco: ResNet (det/backbones.py: stem and stage 1 frozen, BatchNorms in eval mode) ->
FPN P3-P7 -> a shared head of two 4-conv towers predicting 9 anchors x C class logits and 9 x 4 box deltas per location.

Training assigns anchors to objects by IoU (>= 0.5 object, < 0.4 background, in between ignored, plus each object's
best anchors) and sums the focal loss over assigned anchors and an L1 loss over positives, both divided by the
number of positives. Everything runs for the whole batch with masks (det/assign.py), so a step compiles to one graph.
Parameter names are mmdet's (`backbone.*`, `neck.*`, `bbox_head.*`): mmdet checkpoints load without renaming.
"""
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cls.models.layers import ConvModule
from det.anchors import grid_anchors, octave_base_anchors
from det.assign import gather_gt, max_iou_assign
from det.backbones import ResNetBackbone
from det.boxes import box_iou, encode_deltas
from det.fpn import FPN
from det.losses import sigmoid_focal_loss
from det.models.dense import flatten_levels, image_size_or_canvas, normalize, predict_boxes

STRIDES = (8, 16, 32, 64, 128)  # P3-P7
NUM_ANCHORS = 9  # 3 octave scales x 3 aspect ratios (Lin et al. sec. 4)
PAD_DIVISOR = 32  # mmdet DetDataPreprocessor pad_size_divisor: each image's "pad_shape", for the valid flags
BOX_STDS = (1.0, 1.0, 1.0, 1.0)  # mmdet 3.x RetinaNet bbox_coder target_stds
# mmdet test_cfg: nms_pre, score_thr, nms iou_threshold, max_per_img (min_bbox_size 0 is in predict_boxes)
TEST_CFG = dict(nms_pre=1000, score_thr=0.05, iou_thr=0.5, max_det=100)


def anchor_valid_mask(image_size: Tensor, feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int],
                      num_anchors: int, pad_divisor: int = PAD_DIVISOR) -> Tensor:
    """mmdet's AnchorGenerator.valid_flags for a batch: [B, 2] (h, w) -> [B, A].

    mmdet pads each image to a multiple of `pad_divisor` ("pad_shape") and keeps, per level, the anchors of the
    first ceil(pad / stride) rows and columns; anchors further out lie over the canvas padding of a smaller image
    and take part in nothing.
    """
    padded = (image_size + pad_divisor - 1) // pad_divisor * pad_divisor  # [B, 2]
    masks = []
    for (h, w), stride in zip(feature_sizes, strides, strict=True):
        cells = (padded + stride - 1) // stride  # [B, 2] valid rows and columns
        rows = torch.arange(h, device=image_size.device) < cells[:, 0, None]  # [B, h]
        cols = torch.arange(w, device=image_size.device) < cells[:, 1, None]  # [B, w]
        valid = (rows[:, :, None] & cols[:, None, :])[..., None].expand(-1, -1, -1, num_anchors)  # [B, h, w, K]
        masks.append(valid.reshape(image_size.shape[0], -1))
    return torch.cat(masks, dim=1)


def retinanet_loss(
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors: Tensor,
    anchor_valid: Tensor | None,
    targets: dict[str, Tensor],
    *,
    pos_iou_thr: float = 0.5,
    neg_iou_thr: float = 0.4,
    min_pos_iou: float = 0.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
    stds: Sequence[float] = BOX_STDS,
) -> dict[str, Tensor]:
    """Assignment + losses of mmdet's RetinaHead for a whole batch.

    cls_logits [B, A, C], box_deltas [B, A, 4], anchors [A, 4], anchor_valid [B, A] (None: all valid);
    targets: "boxes" [B, M, 4], "labels" [B, M], "valid" [B, M].
    Returns {"loss_cls": focal loss (alpha, gamma) over positive and negative anchors, "loss_bbox": L1 on the
    positives' deltas}, each divided by the number of positives as mmdet counts them (per image at least 1).
    """
    gt_boxes, gt_valid = targets["boxes"], targets["valid"]
    iou = box_iou(anchors, gt_boxes)  # [B, A, M]
    # mmdet MaxIoUAssigner of the 1x config; low-quality matches give every object its best anchors, all ties
    matched, pos, neg = max_iou_assign(iou, gt_valid, pos_iou_thr=pos_iou_thr, neg_iou_thr=neg_iou_thr,
                                       min_pos_iou=min_pos_iou, gt_max_assign_all=True, anchor_valid=anchor_valid)
    # mmdet's avg_factor: sum over images of max(num_pos, 1) (SamplingResult), so an image without objects counts 1
    num_pos = pos.sum(dim=1).clamp(min=1).sum()
    labels = gather_gt(targets["labels"], matched)  # [B, A]
    # float32 even under autocast: the sum runs over ~B*A*C terms; ignored anchors (between the thresholds) count 0
    loss_cls = sigmoid_focal_loss(cls_logits.float(), labels, pos, pos | neg, alpha=alpha, gamma=gamma) / num_pos
    # non-positives regress onto their own anchor (target 0) so padding gts never reach log(0)
    gt = torch.where(pos[..., None], gather_gt(gt_boxes, matched), anchors)  # [B, A, 4]
    l1 = (box_deltas.float() - encode_deltas(anchors, gt, stds=stds)).abs()
    loss_bbox = (l1 * pos[..., None]).sum() / num_pos
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}


class RetinaHead(nn.Module):
    """Two towers of `stacked_convs` 3x3 conv + ReLU shared over levels (Lin et al. Fig. 3), then `retina_cls`
    (K*C sigmoid logits) and `retina_reg` (K*4 deltas). mmdet's names and init."""

    def __init__(self, num_classes: int, in_channels: int = 256, feat_channels: int = 256, stacked_convs: int = 4,
                 num_anchors: int = NUM_ANCHORS, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_classes = num_classes
        widths = [in_channels] + [feat_channels] * (stacked_convs - 1)  # input width of each tower conv
        self.cls_convs = nn.ModuleList(ConvModule(c, feat_channels, 3, norm=None) for c in widths)
        self.reg_convs = nn.ModuleList(ConvModule(c, feat_channels, 3, norm=None) for c in widths)
        self.retina_cls = nn.Conv2d(feat_channels, num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(feat_channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():  # mmdet RetinaHead init_cfg: N(0, 0.01), zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        # focal-loss prior (Lin et al. sec. 4.1): every anchor starts at foreground probability pi, so the ~100k
        # easy negatives do not swamp the first iterations
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """FPN maps -> (cls_logits [B, A, C], box_deltas [B, A, 4]) in anchor order."""
        cls_maps, reg_maps = [], []
        for x in feats:
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            cls_maps.append(self.retina_cls(cls_feat))  # [B, K*C, H, W]
            reg_maps.append(self.retina_reg(reg_feat))  # [B, K*4, H, W]
        return flatten_levels(cls_maps, self.num_classes), flatten_levels(reg_maps, 4)


class RetinaNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 80, *, frozen_stages: int = 1, norm_eval: bool = True) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(depth, frozen_stages=frozen_stages, norm_eval=norm_eval)
        # mmdet neck: FPN(start_level=1, add_extra_convs='on_input', num_outs=5): P3-P5 from C3-C5, P6 by a
        # stride-2 conv on C5 and P7 on P6 (no ReLU between them in mmdet, relu_before_extra_convs=False)
        self.neck = FPN(self.backbone.out_channels, 256, start_level=1, num_extra_levels=2, extra_convs="on_input")
        self.bbox_head = RetinaHead(num_classes)
        # mmdet DetDataPreprocessor: ImageNet RGB statistics on 0-255 pixels
        self.register_buffer("mean", torch.tensor([123.675, 116.28, 103.53]), persistent=False)
        self.register_buffer("std", torch.tensor([58.395, 57.12, 57.375]), persistent=False)
        self.register_buffer("base_anchors", torch.stack(octave_base_anchors(STRIDES)), persistent=False)  # [5,9,4]

    def head_outputs(self, images: Tensor) -> dict:
        """images [B, 3, H, W] 0-255 RGB -> {"cls_logits" [B, A, C], "box_deltas" [B, A, 4], "anchors" [A, 4],
        "feature_sizes" [(h, w) per level]}, A = sum of h * w * 9."""
        feats = self.neck(self.backbone(normalize(images, self.mean, self.std)))
        cls_logits, box_deltas = self.bbox_head(feats)
        sizes = [tuple(f.shape[-2:]) for f in feats]
        anchors = torch.cat(grid_anchors(list(self.base_anchors), sizes, STRIDES, device=images.device))  # [A, 4]
        return {"cls_logits": cls_logits, "box_deltas": box_deltas, "anchors": anchors, "feature_sizes": sizes}

    def loss(self, outputs: dict, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Assignment + losses from `head_outputs`' dict; anchors over each image's padding take no part."""
        valid = anchor_valid_mask(targets["image_size"], outputs["feature_sizes"], STRIDES, NUM_ANCHORS)
        return retinanet_loss(outputs["cls_logits"], outputs["box_deltas"], outputs["anchors"], valid, targets)

    def forward(self, images: Tensor, targets: dict[str, Tensor] | None = None,
                image_size: Tensor | None = None) -> dict[str, Tensor]:
        """Train: targets (boxes, labels, valid, image_size) -> {"loss_cls", "loss_bbox"}. Eval: {"boxes" [B, 100, 4],
        "scores", "labels", "valid" [B, 100]}, clipped to image_size."""
        outputs = self.head_outputs(images)
        if self.training:
            return self.loss(outputs, targets)
        level_sizes = [h * w * NUM_ANCHORS for h, w in outputs["feature_sizes"]]
        return predict_boxes(outputs["cls_logits"].sigmoid(), outputs["box_deltas"], outputs["anchors"], level_sizes,
                             image_size_or_canvas(images, image_size), stds=BOX_STDS, **TEST_CFG)


def from_mmdet(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """An mmdet RetinaNet state dict onto our names: they are the same."""
    return dict(state_dict)


def load_backbone_weights(model: RetinaNet, checkpoint: dict) -> dict[str, list[str]]:
    """An ImageNet ResNet checkpoint (ours / torchvision / mmpretrain) into `model.backbone`; the classifier
    (`fc.*`) is reported unused. Returns load_model_weights' report."""
    return model.backbone.load_classification_weights(checkpoint)


# Training recipes of the seed's configs (mmdet 3.3.0 .mim/configs/retinanet). frozen_stages / norm_eval are the
# backbone's over ImageNet weights (mmdet's ResNet settings); without them train_det trains the whole backbone.
# Both: 12 epochs, SGD momentum 0.9, weight decay 1e-4, linear warmup over 500 iterations from 0.001 x LR, LR x 0.1
# after epochs 8 and 11 (schedule_1x.py), no gradient clipping; data: keep-ratio resize to 1333x800, horizontal
# flip 0.5, nothing else (coco_detection.py, whose filter_empty_gt=True / min_size=32 drops images without objects
# from training).
RECIPES = {
    # retinanet_r18_fpn_1xb8-1x_coco.py (the seed's retinanet_r18_fpn_1x8_1x_coco): 1 GPU x 8 images, LR 0.005
    "retinanet_r18": dict(preset="retinanet", img_size=800, batch_size=8, lr=0.005, lr_batch=8, momentum=0.9,
                          weight_decay=1e-4, epochs=12, schedule="multistep", lr_steps=(8, 11), warmup_iters=500,
                          warmup_factor=0.001, repeat=1, clip_grad=None, iou_type="bbox", metric="AP",
                          frozen_stages=1, norm_eval=True),
    # retinanet_r50_fpn_amp-1x_coco.py (the seed's retinanet_r50_fpn_fp16_1x_coco): retinanet_r50_fpn_1x_coco.py
    # (8 GPUs x 2 images; it lowers schedule_1x's LR 0.02 to 0.01) trained with mixed precision (AmpOptimWrapper)
    "retinanet_r50": dict(preset="retinanet", img_size=800, batch_size=2, lr=0.01, lr_batch=16, momentum=0.9,
                          weight_decay=1e-4, epochs=12, schedule="multistep", lr_steps=(8, 11), warmup_iters=500,
                          warmup_factor=0.001, repeat=1, clip_grad=None, iou_type="bbox", metric="AP",
                          frozen_stages=1, norm_eval=True),
}


def retinanet_r18(num_classes: int = 80, *, frozen_stages: int = 1, norm_eval: bool = True) -> RetinaNet:
    return RetinaNet(18, num_classes, frozen_stages=frozen_stages, norm_eval=norm_eval)


def retinanet_r50(num_classes: int = 80, *, frozen_stages: int = 1, norm_eval: bool = True) -> RetinaNet:
    return RetinaNet(50, num_classes, frozen_stages=frozen_stages, norm_eval=norm_eval)

"""YOLOX (Ge et al. 2021, "YOLOX: Exceeding YOLO Series in 2021") as mmdet 3.3.0 builds yolox_s_8xb8-300e_coco:
CSPDarknet (det/csp_darknet.py) -> PAFPN over strides 8, 16, 32 -> a decoupled head per level predicting, at every
grid point (anchor-free), C class logits, an objectness logit and a box (centre offset and log size in strides).

Training assigns points to objects by SimOTA (det/assign.py: a dynamic number of cheapest points per object, the
cost mixing classification and IoU), then sums an IoU loss and an IoU-aware classification BCE over the positives,
an objectness BCE over all points and, in the last epochs, an L1 loss on the raw box outputs. The whole batch runs
with masks, so a training step compiles to one graph. Parameter names are mmdet's (`backbone.*`, `neck.*`,
`bbox_head.*`): mmdet checkpoints load without renaming.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.checkpoint import load_model_weights, state_dict_of
from common.dist import all_reduce_sum, get_world_size
from det.anchors import grid_anchors
from det.assign import gather_gt, simota_assign
from det.boxes import box_iou
from det.csp_darknet import CSPDarknet, CSPLayer, conv_bn_act
from det.models.dense import flatten_levels, normalize
from det.nms import batched_nms

STRIDES = (8, 16, 32)
# mmdet test_cfg: score_thr 0.01, nms iou_threshold 0.65, and no max_per_img: YOLOXHead returns every NMS survivor.
# A static graph needs a bound, so NMS runs over the 1000 best-scored points above score_thr (mmdet: all of them) and
# returns all its survivors: mmdet's result whenever at most 1000 points (of 8400 at 640 px) pass the threshold,
# otherwise only detections scoring below the 1000th point's score can be missing. 1000 is also the candidate cap of
# the other detectors; it bounds the [B, 1000, 1000] overlap matrix of det/nms.py's exact NMS.
TEST_CFG = dict(score_thr=0.01, iou_thr=0.65, max_candidates=1000, max_det=1000)
PRIOR_PROB = 0.01  # mmdet YOLOXHead.init_weights: cls and obj biases start at this probability


def grid_priors(feature_sizes: list[tuple[int, int]], strides: tuple[int, ...], device: torch.device) -> Tensor:
    """mmdet's MlvlPointGenerator(strides, offset=0).grid_priors(with_stride=True): [A, 4] (x, y, stride, stride),
    the top-left corner of every cell, level by level and row-major as the head flattens its maps."""
    corners = grid_anchors([torch.zeros(1, 4)] * len(strides), feature_sizes, strides, device=device)  # (x, y, x, y)
    return torch.cat([torch.cat([c[:, :2], torch.full_like(c[:, :2], s)], 1) for c, s in zip(corners, strides,
                                                                                              strict=True)])


def decode_boxes(priors: Tensor, box_preds: Tensor) -> Tensor:
    """mmdet YOLOXHead._bbox_decode: centre = prior + offset x stride, size = exp(log size) x stride -> xyxy."""
    xy = box_preds[..., :2] * priors[:, 2:] + priors[:, :2]
    wh = box_preds[..., 2:].exp() * priors[:, 2:]
    return torch.cat([xy - wh / 2, xy + wh / 2], dim=-1)


@torch.no_grad()
def assign(outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """SimOTA as mmdet's YOLOXHead._get_targets_single calls it: on detached predictions, with scores
    sqrt(sigmoid(cls) x sigmoid(obj)) and the cell centres as the points ("center priors with 0.5 offset"), though
    boxes are regressed from the corners. Returns simota_assign's (matched [B, A], pos [B, A], pos_iou [B, A])."""
    scores = (outputs["cls_logits"].float().sigmoid() * outputs["objectness"].float()[..., None].sigmoid()).sqrt()
    priors = outputs["priors"]
    centres = torch.cat([priors[:, :2] + priors[:, 2:] * 0.5, priors[:, 2:]], dim=-1)  # [A, 4]
    return simota_assign(outputs["boxes"].float(), scores, centres, targets["boxes"], targets["labels"],
                         targets["valid"])


def yolox_loss(outputs: dict[str, Tensor], targets: dict[str, Tensor], *, use_l1: bool = False,
               iou_loss_weight: float = 5.0) -> dict[str, Tensor]:
    """Assignment + losses of mmdet's YOLOXHead.loss_by_feat for a whole batch.

    outputs: `YOLOX.head_outputs`' dict; targets: "boxes" [B, M, 4], "labels" [B, M], "valid" [B, M].
    Returns {"loss_cls", "loss_bbox", "loss_obj"} (+ "loss_l1" with use_l1), each a sum divided by the positives per
    rank averaged over ranks, at least 1 (mmdet's reduce_mean). Objectness is learnt on every point (target 1 on
    positives, 0 elsewhere, also in images without objects); classes, boxes and L1 on positives only. mmdet skips
    the cls and bbox sums when no image has positives; masked sums are then 0 as well, and every output stays in
    the graph (the reason for mmdet's `pred.sum() * 0`).
    """
    cls_logits, objectness = outputs["cls_logits"].float(), outputs["objectness"].float()  # sums over ~B*A*C terms
    box_preds, boxes, priors = outputs["box_preds"].float(), outputs["boxes"].float(), outputs["priors"]
    gt_boxes = targets["boxes"]
    matched, pos, pos_iou = assign(outputs, targets)
    num_total = (all_reduce_sum(pos.sum().float()) / get_world_size()).clamp(min=1.0)

    loss_obj = F.binary_cross_entropy_with_logits(objectness, pos.float(), reduction="sum") / num_total
    # IoU-aware classification target: the positive's one-hot label scaled by its prediction's IoU with its gt
    cls_target = F.one_hot(gather_gt(targets["labels"], matched), cls_logits.shape[-1]) * pos_iou[..., None]
    cls_bce = F.binary_cross_entropy_with_logits(cls_logits, cls_target, reduction="none").sum(-1)  # [B, A]
    loss_cls = torch.where(pos, cls_bce, 0.0).sum() / num_total
    # non-positives read gt 0 or a padding row; their terms are masked by torch.where, not multiplied, so a term
    # that is not finite (the log of a padding box's size) cannot turn a sum or a gradient into NaN
    gt = gather_gt(gt_boxes, matched)  # [B, A, 4]
    iou = box_iou(boxes[..., None, :], gt[..., None, :])[..., 0, 0].clamp(min=1e-16)  # [B, A] aligned pairs
    # mmdet IoULoss(mode='square', eps=1e-16, loss_weight=5.0)
    loss_bbox = iou_loss_weight * torch.where(pos, 1 - iou ** 2, 0.0).sum() / num_total
    losses = {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_obj": loss_obj}
    if use_l1:  # mmdet _get_l1_target: (centre - corner) / stride, log(size / stride + 1e-8)
        gt_xy, gt_wh = (gt[..., :2] + gt[..., 2:]) / 2, gt[..., 2:] - gt[..., :2]
        l1_target = torch.cat([(gt_xy - priors[:, :2]) / priors[:, 2:], torch.log(gt_wh / priors[:, 2:] + 1e-8)], -1)
        losses["loss_l1"] = torch.where(pos, (box_preds - l1_target).abs().sum(-1), 0.0).sum() / num_total
    return losses


def yolox_predict(outputs: dict[str, Tensor], *, score_thr: float, iou_thr: float, max_candidates: int,
                  max_det: int) -> dict[str, Tensor]:
    """mmdet's YOLOXHead.predict_by_feat, batched: one detection per point, its best class, scored
    sigmoid(obj) x sigmoid(cls); those scoring at least score_thr go through class-wise NMS. Boxes are not clipped
    to the image and none is dropped for its size (mmdet's YOLOX _bbox_post_process does neither).
    Returns {"boxes": [B, max_det, 4], "scores", "labels", "valid": [B, max_det]}."""
    best, labels = outputs["cls_logits"].sigmoid().max(dim=-1)  # [B, A]
    scores = best * outputs["objectness"].sigmoid()
    boxes, scores, labels, valid = batched_nms(outputs["boxes"], scores, labels, scores >= score_thr,
                                               iou_thr=iou_thr, max_det=max_det, max_candidates=max_candidates)
    return {"boxes": boxes, "scores": scores, "labels": labels, "valid": valid}


class YOLOXPAFPN(nn.Module):
    """PANet's path aggregation (Liu et al. 2018) with CSP layers: top-down (1x1 reduce, nearest 2x upsample, concat,
    CSP), bottom-up (stride-2 3x3 conv, concat, CSP), then a 1x1 conv per level to `out_channels`. mmdet's names."""

    def __init__(self, in_channels: tuple[int, ...] = (128, 256, 512), out_channels: int = 128,
                 num_csp_blocks: int = 1) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        top = range(len(in_channels) - 1, 0, -1)  # from the coarsest level down
        self.reduce_layers = nn.ModuleList(conv_bn_act(in_channels[i], in_channels[i - 1], 1) for i in top)
        self.top_down_blocks = nn.ModuleList(CSPLayer(in_channels[i - 1] * 2, in_channels[i - 1], num_csp_blocks,
                                                      add_identity=False) for i in top)
        bottom = range(len(in_channels) - 1)
        self.downsamples = nn.ModuleList(conv_bn_act(in_channels[i], in_channels[i], 3, stride=2) for i in bottom)
        self.bottom_up_blocks = nn.ModuleList(CSPLayer(in_channels[i] * 2, in_channels[i + 1], num_csp_blocks,
                                                       add_identity=False) for i in bottom)
        self.out_convs = nn.ModuleList(conv_bn_act(c, out_channels, 1) for c in in_channels)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        inner = [feats[-1]]  # top-down; the reduced map replaces its level, and the bottom-up path reads that one
        for j, i in enumerate(range(len(feats) - 1, 0, -1)):
            inner[0] = self.reduce_layers[j](inner[0])
            inner.insert(0, self.top_down_blocks[j](torch.cat([self.upsample(inner[0]), feats[i - 1]], 1)))
        outs = [inner[0]]
        for i in range(len(feats) - 1):
            outs.append(self.bottom_up_blocks[i](torch.cat([self.downsamples[i](outs[-1]), inner[i + 1]], 1)))
        return [conv(x) for conv, x in zip(self.out_convs, outs, strict=True)]


class YOLOXHead(nn.Module):
    """Per level (no sharing): a class tower and a box tower of `stacked_convs` 3x3 ConvModules, then 1x1 convs for
    the class logits (class tower), the box and the objectness (box tower). mmdet's names and init; `use_l1` is the
    flag mmdet's YOLOXModeSwitchHook turns on for the last epochs."""

    def __init__(self, num_classes: int, in_channels: int = 128, feat_channels: int = 128, stacked_convs: int = 2,
                 num_levels: int = len(STRIDES)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.use_l1 = False
        widths = [in_channels] + [feat_channels] * (stacked_convs - 1)

        def tower() -> nn.Sequential:
            return nn.Sequential(*(conv_bn_act(c, feat_channels, 3) for c in widths))

        self.multi_level_cls_convs = nn.ModuleList(tower() for _ in range(num_levels))
        self.multi_level_reg_convs = nn.ModuleList(tower() for _ in range(num_levels))
        self.multi_level_conv_cls = nn.ModuleList(nn.Conv2d(feat_channels, num_classes, 1) for _ in range(num_levels))
        self.multi_level_conv_reg = nn.ModuleList(nn.Conv2d(feat_channels, 4, 1) for _ in range(num_levels))
        self.multi_level_conv_obj = nn.ModuleList(nn.Conv2d(feat_channels, 1, 1) for _ in range(num_levels))
        # mmdet: Kaiming-uniform weights (PyTorch's default) with zero biases, then the prior probability on the cls
        # and obj biases so the ~8400 background points per image start near 0.01
        prior_bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for cls, reg, obj in zip(self.multi_level_conv_cls, self.multi_level_conv_reg, self.multi_level_conv_obj,
                                 strict=True):
            nn.init.constant_(cls.bias, prior_bias)
            nn.init.zeros_(reg.bias)
            nn.init.constant_(obj.bias, prior_bias)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Neck maps -> (cls_logits [B, A, C], box_preds [B, A, 4], objectness [B, A]) in prior order."""
        cls_maps, reg_maps, obj_maps = [], [], []
        for x, cls_convs, reg_convs, conv_cls, conv_reg, conv_obj in zip(
                feats, self.multi_level_cls_convs, self.multi_level_reg_convs, self.multi_level_conv_cls,
                self.multi_level_conv_reg, self.multi_level_conv_obj, strict=True):
            reg_feat = reg_convs(x)
            cls_maps.append(conv_cls(cls_convs(x)))  # [B, C, H, W]
            reg_maps.append(conv_reg(reg_feat))  # [B, 4, H, W]
            obj_maps.append(conv_obj(reg_feat))  # [B, 1, H, W]
        return (flatten_levels(cls_maps, self.num_classes), flatten_levels(reg_maps, 4),
                flatten_levels(obj_maps, 1).squeeze(-1))


class YOLOX(nn.Module):
    """images [B, 3, H, W] RGB 0-255 (uint8 or float), H and W multiples of 32. mmdet's YOLOX reads BGR 0-255
    without normalisation (its data_preprocessor has no mean/std and no bgr_to_rgb), so the model flips the channels
    itself and mmdet's weights work unchanged."""

    def __init__(self, num_classes: int = 80, *, deepen_factor: float = 0.33, widen_factor: float = 0.5,
                 num_csp_blocks: int = 1) -> None:
        super().__init__()
        self.backbone = CSPDarknet(deepen_factor, widen_factor)
        width = self.backbone.out_channels[0]  # 128 for YOLOX-s: neck output and head width
        self.neck = YOLOXPAFPN(tuple(self.backbone.out_channels), width, num_csp_blocks)
        self.bbox_head = YOLOXHead(num_classes, width, width)
        self.register_buffer("mean", torch.zeros(3), persistent=False)  # mmdet: no normalisation
        self.register_buffer("std", torch.ones(3), persistent=False)

    def head_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """images -> {"cls_logits" [B, A, C], "objectness" [B, A], "box_preds" [B, A, 4] raw (offset, log size in
        strides), "priors" [A, 4] (x, y, stride_w, stride_h) cell corners, "boxes" [B, A, 4] decoded xyxy},
        A = sum over strides s of H / s x W / s."""
        if images.shape[-2] % STRIDES[-1] or images.shape[-1] % STRIDES[-1]:
            raise ValueError(f"YOLOX needs a canvas whose sides are multiples of {STRIDES[-1]} (mmdet pads to them), "
                             f"not {tuple(images.shape[-2:])}")
        bgr = normalize(images, self.mean, self.std).flip(1)
        feats = self.neck(self.backbone(bgr))
        cls_logits, box_preds, objectness = self.bbox_head(feats)
        priors = grid_priors([tuple(f.shape[-2:]) for f in feats], STRIDES, images.device)
        return {"cls_logits": cls_logits, "objectness": objectness, "box_preds": box_preds, "priors": priors,
                "boxes": decode_boxes(priors, box_preds)}

    def loss(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Assignment + losses from `head_outputs`' dict. Every point takes part, also over an image's canvas padding
        (mmdet's point priors have no valid flags), so targets' "image_size" is not needed."""
        return yolox_loss(outputs, targets, use_l1=self.bbox_head.use_l1)

    def forward(self, images: Tensor, targets: dict[str, Tensor] | None = None,
                image_size: Tensor | None = None) -> dict[str, Tensor]:
        """Train: targets (boxes, labels, valid) -> {"loss_cls", "loss_bbox", "loss_obj"} (+ "loss_l1" once
        `bbox_head.use_l1`). Eval: {"boxes" [B, 1000, 4], "scores", "labels", "valid" [B, 1000]}; `image_size` is
        accepted as by every detector but unused: mmdet does not clip YOLOX's boxes."""
        outputs = self.head_outputs(images)
        if self.training:
            return self.loss(outputs, targets)
        return yolox_predict(outputs, **TEST_CFG)


def from_mmdet(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """An mmdet YOLOX state dict onto our names: they are the same. Checkpoints trained with mmdet 2.x's
    ExpMomentumEMAHook (the zoo's yolox_s_8x8_300e_coco_20211121_095711-4592a793.pth came from mmdet 2.x) may also
    hold `ema_*` buffers: that hook leaves the averaged weights, the ones mmdet evaluates, under the ordinary names
    and the raw training weights under `ema_*`, which are dropped here. mmdet 3.x's EMAHook writes the averaged
    weights into "state_dict" and the raw ones into a separate "ema_state_dict", which is not read."""
    return {k: v for k, v in state_dict.items() if not k.startswith("ema_")}


def load_backbone_weights(model: YOLOX, checkpoint: dict) -> dict[str, list[str]]:
    """A CSPDarknet state dict with mmdet's names, bare or as the `backbone.*` of a YOLOX checkpoint (ours
    {"model": ...} or mmdet's {"state_dict": ...}). No ImageNet classification checkpoint exists for this backbone
    (mmdet trains YOLOX from scratch; cls/models/cspnet.py's cspdarknet53 is another network), and one that does not
    fit is refused by load_model_weights. Returns its report."""
    state_dict = state_dict_of(checkpoint)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
    return load_model_weights(model.backbone, state_dict, holds="YOLOX takes a CSPDarknet (P5) state dict")


# Training recipe of mmdet 3.3.0 .mim/configs/yolox/yolox_s_8xb8-300e_coco.py: 8 GPUs x 8 images, SGD (nesterov) LR 0.01
# for the global batch 64, momentum 0.9, weight decay 5e-4 on conv weights only (norm_decay_mult and bias_decay_mult 0);
# 300 epochs: quadratic warmup over 5 epochs from 0 (QuadraticWarmupLR, LR x ((t + 1) / T)^2 per iteration), cosine to
# 0.05 x LR at epoch 285, then constant. YOLOXModeSwitchHook turns off Mosaic / RandomAffine / MixUp and sets
# bbox_head.use_l1 once epoch + 1 >= 300 - 15 (0-based: the last 16 epochs); EMA of weights and buffers, ExpMomentumEMA
# momentum 1e-4 (decay 0.9999) and gamma 2000, evaluated and saved by mmdet in place of the model (ema_eval "instead");
# SyncNormHook averages BN statistics over ranks before each evaluation (every 10 epochs; here before every evaluation
# of every model, common/loop.py). Data: Mosaic (640), RandomAffine (scale 0.1-2), MixUp (0.8-1.6), HSV jitter, flip,
# keep-ratio resize to 640, pad to square with 114 (det/yolox_data.py); per batch a canvas of 480-800 px (0.75-1.25 x
# 640) in steps of 32, redrawn every 10 iterations (BatchSyncRandomResize: --multiscale); images without objects stay in
# the training set. Evaluation: keep-ratio resize to 640, pad to 640 x 640 with 114. warmup_iters: 5 epochs of COCO
# train2017 at global batch 64 (1849 iterations each); a run on other data sets it with --lr-warmup-epochs 5.
RECIPES = {
    "yolox_s": dict(preset="yolox", img_size=640, batch_size=8, lr=0.01, lr_batch=64, momentum=0.9,
                    weight_decay=5e-4, epochs=300, schedule="cosine", lr_steps=(), warmup_iters=5 * 1849,
                    warmup_factor=0.0, repeat=1, clip_grad=None, iou_type="bbox", metric="AP",
                    norm_weight_decay=0.0, nesterov=True, warmup="quadratic", min_lr_ratio=0.05, hold_epochs=15,
                    no_aug_epochs=15, ema=True, ema_eval="instead", ema_decay=0.9999, ema_gamma=2000,
                    multiscale=(0.75, 1.25), multiscale_interval=10),
}


def yolox_s(num_classes: int = 80) -> YOLOX:
    return YOLOX(num_classes, deepen_factor=0.33, widen_factor=0.5, num_csp_blocks=1)

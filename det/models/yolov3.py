"""YOLOv3 (Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement") as mmdet 3.3.0 builds
yolov3_d53_8xb8-ms-608-273e_coco: Darknet-53 (det/darknet.py) -> YOLOV3Neck (an FPN of three DetectionBlocks,
top-down with nearest upsampling) -> per level a 3x3 bridge conv and a 1x1 conv predicting, for each of 3 anchors,
(tx, ty, tw, th, objectness, C class logits). Levels run coarse to fine: strides 32, 16, 8.

Training (mmdet's YOLOV3Head.loss_by_feat): the grid assigner (det/assign.py) makes positive the anchors of the
cells holding an object's centre that overlap it best, and negative every anchor that overlaps no object by more
than 0.5. Losses are sums over the batch, not normalised: BCE of the class logits and of (tx, ty) against the
centre's position in its cell, squared error of (tw, th) against log(gt size / anchor size), all on positives,
and BCE of the objectness on positives and negatives. Parameter names are mmdet's: its checkpoints load as they are.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.checkpoint import load_model_weights, state_dict_of
from det.anchors import _centred_boxes, grid_anchors
from det.assign import gather_gt, grid_assign
from det.boxes import box_area, box_iou
from det.darknet import Darknet, DarknetConv
from det.models.dense import flatten_levels, normalize
from det.nms import batched_nms, topk_candidates

STRIDES = (32, 16, 8)  # coarse to fine, as mmdet's featmap_strides
# (w, h) of the anchors per level: k-means on COCO (YOLOv3 paper sec. 2.3), mmdet's YOLOAnchorGenerator base_sizes
BASE_SIZES = (((116, 90), (156, 198), (373, 326)), ((30, 61), (62, 45), (59, 119)), ((10, 13), (16, 30), (33, 23)))
NUM_ANCHORS = 3
EPS = 1e-6  # mmdet YOLOBBoxCoder eps
LOSS_WEIGHTS = dict(loss_cls=1.0, loss_conf=1.0, loss_xy=2.0, loss_wh=2.0)  # the config's loss_weight of each
# mmdet test_cfg; nms_pre counts (anchor, class) pairs over all levels together, as YOLOV3Head flattens them
TEST_CFG = dict(nms_pre=1000, conf_thr=0.005, score_thr=0.05, iou_thr=0.45, max_det=100)


def yolo_base_anchors(strides=STRIDES, base_sizes=BASE_SIZES) -> list[Tensor]:
    """mmdet's YOLOAnchorGenerator: each level's (w, h) sizes centred on the middle of the cell -> [3, 4] each."""
    return [_centred_boxes(s / 2, s / 2, torch.tensor([w for w, _ in sizes], dtype=torch.float32),
                           torch.tensor([h for _, h in sizes], dtype=torch.float32))
            for s, sizes in zip(strides, base_sizes, strict=True)]


def responsible_anchors(gt_boxes: Tensor, gt_valid: Tensor, feature_sizes: list[tuple[int, int]],
                        strides=STRIDES, num_anchors: int = NUM_ANCHORS) -> Tensor:
    """mmdet's YOLOV3Head.responsible_flags for a batch: gt_boxes [B, M, 4], gt_valid [B, M] -> [B, A], True for
    the anchors of every cell (per level) that holds the centre of some object (any object, not a particular one)."""
    centres = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, M, 2] (x, y)
    flags = []
    for (h, w), stride in zip(feature_sizes, strides, strict=True):
        cell = torch.floor(centres / stride).long()  # [B, M, 2]
        index = cell[..., 1] * w + cell[..., 0]  # [B, M] row-major cell index
        hit = (index[..., None] == torch.arange(h * w, device=gt_boxes.device)) & gt_valid[..., None]  # [B, M, hw]
        flags.append(hit.any(dim=1)[..., None].expand(-1, -1, num_anchors).reshape(gt_boxes.shape[0], -1))
    return torch.cat(flags, dim=1)


def encode_yolo(anchors: Tensor, gt: Tensor, stride: Tensor) -> Tensor:
    """mmdet's YOLOBBoxCoder.encode: (gt centre's position in the cell, in (eps, 1 - eps); log(gt w / anchor w),
    log(gt h / anchor h)). anchors, gt [..., 4], stride [...] -> [..., 4]."""
    xy = ((gt[..., :2] + gt[..., 2:]) / 2 - (anchors[..., :2] + anchors[..., 2:]) / 2) / stride[..., None] + 0.5
    wh = ((gt[..., 2:] - gt[..., :2]) / (anchors[..., 2:] - anchors[..., :2])).clamp(min=EPS).log()
    return torch.cat([xy.clamp(EPS, 1 - EPS), wh], dim=-1)


def decode_yolo(anchors: Tensor, pred: Tensor, stride: Tensor) -> Tensor:
    """mmdet's YOLOBBoxCoder.decode of (sigmoid(tx), sigmoid(ty), tw, th): the cell centre moved by up to half a
    stride, the anchor size scaled by exp. anchors [A, 4], pred [B, A, 4], stride [A] -> xyxy [B, A, 4]."""
    centre = (anchors[:, :2] + anchors[:, 2:]) / 2 + (pred[..., :2] - 0.5) * stride[:, None]
    half = (anchors[:, 2:] - anchors[:, :2]) / 2 * pred[..., 2:].exp()
    return torch.cat([centre - half, centre + half], dim=-1)


def yolov3_loss(pred: Tensor, anchors: Tensor, strides: Tensor, responsible: Tensor,
                targets: dict[str, Tensor], *, num_classes: int) -> dict[str, Tensor]:
    """Assignment + losses of mmdet's YOLOV3Head for a whole batch.

    pred [B, A, 5 + C] raw outputs (tx, ty, tw, th, objectness, class logits), anchors [A, 4], strides [A],
    responsible [B, A] (responsible_anchors); targets: "boxes" [B, M, 4], "labels" [B, M], "valid" [B, M].
    Returns {"loss_cls", "loss_conf", "loss_xy", "loss_wh"}: sums over the batch with the config's weights.
    """
    gt_boxes = targets["boxes"]
    matched, pos, neg = grid_assign(box_iou(anchors, gt_boxes), responsible, targets["valid"])  # [B, A] each
    pred = pred.float()  # sums over B * A * C terms: float32 under autocast too
    posf = pos[..., None].float()
    # non-positives encode their own anchor (finite logs for padding rows); their terms are masked out
    gt = torch.where(pos[..., None], gather_gt(gt_boxes, matched), anchors)  # [B, A, 4]
    target = encode_yolo(anchors, gt, strides)
    onehot = F.one_hot(gather_gt(targets["labels"], matched), num_classes).float()  # [B, A, C]
    bce = F.binary_cross_entropy_with_logits
    losses = {
        "loss_cls": (bce(pred[..., 5:], onehot, reduction="none") * posf).sum(),
        "loss_conf": (bce(pred[..., 4], pos.float(), reduction="none") * (pos | neg)).sum(),
        "loss_xy": (bce(pred[..., :2], target[..., :2], reduction="none") * posf).sum(),
        "loss_wh": ((pred[..., 2:4] - target[..., 2:]).square() * posf).sum(),
    }
    return {k: v * LOSS_WEIGHTS[k] for k, v in losses.items()}


def yolov3_predict(pred: Tensor, anchors: Tensor, strides: Tensor, *, nms_pre: int, conf_thr: float,
                   score_thr: float, iou_thr: float, max_det: int) -> dict[str, Tensor]:
    """mmdet's YOLOV3Head.predict_by_feat, batched and static: pred [B, A, 5 + C] -> {"boxes" [B, max_det, 4],
    "scores", "labels", "valid" [B, max_det]}.

    Anchors whose objectness is under conf_thr drop out; the nms_pre best (anchor, class) pairs by class
    probability above score_thr go on, scored class probability x objectness; boxes of zero width or height drop
    out; class-wise NMS. mmdet does not clip YOLO boxes to the image, so neither do we.
    """
    pred = pred.float()
    objectness = pred[..., 4].sigmoid()  # [B, A]
    cls = pred[..., 5:].sigmoid() * (objectness >= conf_thr)[..., None]  # [B, A, C]; 0 never passes score_thr
    boxes = decode_yolo(anchors, torch.cat([pred[..., :2].sigmoid(), pred[..., 2:4]], dim=-1), strides)
    # the objectness rides along as a fifth box column, so the candidates keep their own
    cand, scores, labels, valid = topk_candidates(cls, torch.cat([boxes, objectness[..., None]], dim=-1),
                                                  [cls.shape[1]], nms_pre=nms_pre, score_thr=score_thr)
    boxes, scores = cand[..., :4], scores * cand[..., 4]
    valid = valid & (box_area(boxes) > 0)  # mmdet's min_bbox_size 0: positive width and height
    boxes, scores, labels, valid = batched_nms(boxes, scores, labels, valid, iou_thr=iou_thr, max_det=max_det,
                                               max_candidates=nms_pre)
    return {"boxes": boxes, "scores": scores, "labels": labels, "valid": valid}


class DetectionBlock(nn.Module):
    """Five convs alternating 1x1 (n channels) and 3x3 (2n): mmdet's DetectionBlock."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = DarknetConv(in_channels, out_channels, 1)
        self.conv2 = DarknetConv(out_channels, out_channels * 2, 3)
        self.conv3 = DarknetConv(out_channels * 2, out_channels, 1)
        self.conv4 = DarknetConv(out_channels, out_channels * 2, 3)
        self.conv5 = DarknetConv(out_channels * 2, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv5(self.conv4(self.conv3(self.conv2(self.conv1(x)))))


class YOLOV3Neck(nn.Module):
    """C3-C5 -> three maps, coarse first: detect1 on C5; then per finer level a 1x1 conv, 2x nearest upsampling,
    concatenation with the backbone map and a DetectionBlock (mmdet's YOLOV3Neck)."""

    def __init__(self, in_channels=(1024, 512, 256), out_channels=(512, 256, 128)) -> None:
        super().__init__()
        self.detect1 = DetectionBlock(in_channels[0], out_channels[0])
        for i in range(1, len(in_channels)):
            self.add_module(f"conv{i}", DarknetConv(out_channels[i - 1], out_channels[i], 1))
            self.add_module(f"detect{i + 1}", DetectionBlock(in_channels[i] + out_channels[i], out_channels[i]))
        self.num_scales = len(in_channels)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        out = self.detect1(feats[-1])
        outs = [out]
        for i, x in enumerate(reversed(feats[:-1])):
            up = F.interpolate(getattr(self, f"conv{i + 1}")(out), scale_factor=2)  # nearest, as mmdet
            out = getattr(self, f"detect{i + 2}")(torch.cat([up, x], dim=1))
            outs.append(out)
        return outs


class YOLOV3Head(nn.Module):
    """Per level a 3x3 bridge conv (BN, LeakyReLU) and a 1x1 prediction conv of 3 x (5 + C) channels."""

    def __init__(self, num_classes: int, in_channels=(512, 256, 128), out_channels=(1024, 512, 256)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.convs_bridge = nn.ModuleList(DarknetConv(i, o, 3) for i, o in zip(in_channels, out_channels, strict=True))
        self.convs_pred = nn.ModuleList(nn.Conv2d(o, NUM_ANCHORS * (5 + num_classes), 1) for o in out_channels)
        for m in self.modules():  # mmdet YOLOV3Head.init_weights: N(0, 0.01) convs, norms at 1 / 0
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for conv, stride in zip(self.convs_pred, STRIDES, strict=True):
            bias = conv.bias.data.view(NUM_ANCHORS, 5 + num_classes)
            # priors: ~8 objects per 608 x 608 image spread over the level's cells, and class probability 0.01
            bias[:, 4] = -math.log((1 - (p := 8 / (608 / stride) ** 2)) / p)
            bias[:, 5:] = -math.log((1 - 0.01) / 0.01)

    def forward(self, feats: list[Tensor]) -> Tensor:
        """Neck maps, coarse first -> [B, A, 5 + C] in anchor order (level, row, column, anchor)."""
        maps = [pred(bridge(x)) for x, bridge, pred in zip(feats, self.convs_bridge, self.convs_pred, strict=True)]
        return flatten_levels(maps, 5 + self.num_classes)


class YOLOV3(nn.Module):
    def __init__(self, num_classes: int = 80, *, norm_eval: bool = True) -> None:
        super().__init__()
        self.backbone = Darknet(53, norm_eval=norm_eval)
        self.neck = YOLOV3Neck()
        self.bbox_head = YOLOV3Head(num_classes)
        # mmdet's preprocessor for YOLOv3: mean 0, std 255 on RGB
        self.register_buffer("mean", torch.zeros(3), persistent=False)
        self.register_buffer("std", torch.full((3,), 255.0), persistent=False)
        self.register_buffer("base_anchors", torch.stack(yolo_base_anchors()), persistent=False)  # [3, 3, 4]

    def head_outputs(self, images: Tensor) -> dict:
        """images [B, 3, H, W] RGB 0-255 (mmdet's preprocessor: RGB / 255) -> {"pred" [B, A, 5 + C], "anchors"
        [A, 4], "strides" [A], "feature_sizes" [(h, w) per level]}."""
        feats = self.neck(self.backbone(normalize(images, self.mean, self.std)))
        sizes = [tuple(f.shape[-2:]) for f in feats]
        anchors = grid_anchors(list(self.base_anchors), sizes, STRIDES, device=images.device)
        strides = torch.cat([torch.full((len(a),), float(s), device=images.device)
                             for a, s in zip(anchors, STRIDES, strict=True)])  # [A], each anchor's level stride
        return {"pred": self.bbox_head(feats), "anchors": torch.cat(anchors), "strides": strides,
                "feature_sizes": sizes}

    def loss(self, outputs: dict, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        responsible = responsible_anchors(targets["boxes"], targets["valid"], outputs["feature_sizes"])
        return yolov3_loss(outputs["pred"], outputs["anchors"], outputs["strides"], responsible, targets,
                           num_classes=self.bbox_head.num_classes)

    def forward(self, images: Tensor, targets: dict[str, Tensor] | None = None,
                image_size: Tensor | None = None) -> dict[str, Tensor]:
        """Train: targets (boxes, labels, valid) -> {"loss_cls", "loss_conf", "loss_xy", "loss_wh"}. Eval:
        {"boxes" [B, 100, 4], "scores", "labels", "valid" [B, 100]}; image_size is accepted as every detector's and
        unused: mmdet does not clip YOLO boxes."""
        outputs = self.head_outputs(images)
        if self.training:
            return self.loss(outputs, targets)
        return yolov3_predict(outputs["pred"], outputs["anchors"], outputs["strides"], **TEST_CFG)


def from_mmdet(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """An mmdet YOLOv3 state dict onto our names: they are the same."""
    return dict(state_dict)


def load_backbone_weights(model: YOLOV3, checkpoint: dict) -> dict[str, list[str]]:
    """A Darknet-53 checkpoint into `model.backbone`: mmdet's ImageNet one (open-mmlab://darknet53, keys as
    Darknet's) or a detector's `backbone.*` keys. Returns load_model_weights' report."""
    state = state_dict_of(checkpoint)
    return load_model_weights(model.backbone, {k.removeprefix("backbone."): v for k, v in state.items()})


# Training recipe of the seed's config: yolov3_d53_8xb8-ms-608-273e_coco.py (the seed's yolov3_d53_fp16_mstrain-608
# became its -amp- twin: the same recipe under AmpOptimWrapper, dynamic loss scale): 8 GPUs x 8 images, SGD LR 1e-3,
# momentum 0.9, weight decay 5e-4 (mmdet decays every parameter), gradient norm clipped at 35, linear warmup over
# 2000 iterations from 0.1 x LR, LR x 0.1 after epochs 218 and 246 of 273. Data: Expand (ratio 1-2, black),
# MinIoURandomCrop (0.4-0.9, crop >= 0.3), keep-ratio resize to 320-608, flip, PhotoMetricDistortion; test
# keep-ratio 608. The backbone starts from ImageNet Darknet-53 with mmdet's norm_eval=True and nothing frozen;
# without weights train_det.py trains its BatchNorms.
RECIPES = {
    "yolov3_d53": dict(preset="yolov3", img_size=608, batch_size=8, lr=1e-3, lr_batch=64, momentum=0.9,
                       weight_decay=5e-4, epochs=273, schedule="multistep", lr_steps=(218, 246), warmup_iters=2000,
                       warmup_factor=0.1, repeat=1, clip_grad=35.0, iou_type="bbox", metric="AP", norm_eval=True),
}


def yolov3_d53(num_classes: int = 80, *, norm_eval: bool = True) -> YOLOV3:
    return YOLOV3(num_classes, norm_eval=norm_eval)

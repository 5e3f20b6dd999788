"""SOLOv2 (Wang et al. 2020, "SOLOv2: Dynamic and Fast Instance Segmentation") as mmdet 3.3.0 builds
solov2_r50_fpn_1x_coco: ResNet-50 (det/backbones.py: stem and stage 1 frozen, BatchNorms in eval mode) -> FPN P2-P6
(P6 by max-pooling P5) -> a mask head in two parts. Per level the FPN map, resized to an S x S grid (S = 40, 36,
24, 16, 12 from P2 to P6), feeds a category branch (C class logits per cell) and, with two coordinate channels
(CoordConv), a kernel branch (a 256-wide 1x1 conv kernel per cell); a unified mask-feature branch fuses P2-P5 into
one 256-channel map at stride 4. A cell's instance mask is its kernel convolved with that map (dynamic conv).

Training makes the cells of each object's centre region positive on the levels its size fits (det/assign.py's
solo_assign) and sums a Dice loss between each (object, positive cell) pair's mask and the object's mask and a focal
loss over all cells, for the whole batch with masks and a fixed pair budget, so a step compiles to one graph.
Inference keeps cells that are local maxima above 0.1, builds their masks, scores them class x maskness and ranks
them with Matrix NMS. Parameter names are mmdet's (`backbone.*`, `neck.*`, `mask_head.*`): mmdet checkpoints load
without renaming.
"""
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from det.assign import gather_gt, solo_assign, solo_pair_counts
from det.backbones import ResNetBackbone
from det.boxes import clip_boxes
from det.fpn import FPN
from det.losses import dice_loss, sigmoid_focal_loss
from det.masks import mask_boxes
from det.models.dense import flatten_levels, image_size_or_canvas, normalize
from det.models.fcos import ConvGN
from det.nms import matrix_nms

NUM_GRIDS = (40, 36, 24, 16, 12)  # cells per side of each level's grid, P2-P6
# sqrt(box area) each level learns, both ends inclusive (mmdet config scale_ranges): neighbours overlap by 2x
SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
LIGHT_SCALE_RANGES = ((1, 56), (28, 112), (56, 224), (112, 448), (224, 896))  # solov2-light_*_ms-3x_coco.py
STRIDES = (8, 8, 16, 32, 32)  # mmdet config strides, used only at inference: a level's masks need more cells
POS_SCALE = 0.2  # the centre region: this fraction of the half box around the mask's centre of mass
MASK_STRIDE = 4  # the mask-feature map's stride: masks are predicted at 1/4 of the canvas
# solo_assign's pair budget per image is PAIRS_PER_GT x M (M the targets' padded rows, at least the object count: the
# loader pads to 32, 64, ... or --max-gt). An object covers at most 3 x 3 cells per level, on one level, two where
# neighbouring ranges overlap, three at exactly 96, 192, 384 and 768. At the recipe's 800 x 1333 its centre region
# (0.2 x the half box) covers 1-4 cells per level below 96 px and up to 9 + 9 for the largest objects, so an image
# needs more than 9 M only if most of its M rows are large objects; check_targets names any that does (the fixture's
# 96 x 128 canvas, with cells of 2-8 px, makes one at M = 4).
PAIRS_PER_GT = 9
DICE_WEIGHT = 3.0  # mmdet config loss_mask loss_weight
# mmdet test_cfg: nms_pre, score_thr, mask_thr, filter_thr, sigma (Gaussian kernel), max_per_img
TEST_CFG = dict(nms_pre=500, score_thr=0.1, mask_thr=0.5, filter_thr=0.05, sigma=2.0, max_det=100)


def coordinate_channels(x: Tensor) -> Tensor:
    """mmdet's generate_coordinate (CoordConv, Liu et al. 2018): [B, C, H, W] -> [B, C + 2, H, W], the x and then the
    y position from -1 to 1 appended, so translation-invariant convs can tell where a cell is."""
    b, _, h, w = x.shape
    y_range, x_range = torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device)
    y, x_grid = torch.meshgrid(y_range, x_range, indexing="ij")
    return torch.cat([x, torch.stack([x_grid, y]).to(x.dtype).expand(b, -1, -1, -1)], 1)


def points_nms(scores: Tensor, num_grids: tuple[int, ...] = NUM_GRIDS) -> Tensor:
    """mmdet's SOLOV2Head.predict_by_feat local maximum: class probabilities [B, G, C] over every level's cells
    (row-major, level by level) -> the same with a cell's score zeroed unless it is the largest of its 2 x 2 window
    reaching up and left (max_pool2d of 2, stride 1, padding 1, cropped)."""
    out = []
    for level, grid in zip(scores.split([g * g for g in num_grids], 1), num_grids, strict=True):
        maps = level.transpose(1, 2).unflatten(2, (grid, grid))  # [B, C, S, S]
        local_max = F.max_pool2d(maps, 2, stride=1, padding=1)[..., :-1, :-1]
        out.append(level * (local_max == maps).flatten(2).transpose(1, 2))  # [B, S^2, C]
    return torch.cat(out, 1)


def solov2_loss(outputs: dict[str, Tensor], targets: dict[str, Tensor], *, scale_ranges=SCALE_RANGES,
                alpha: float = 0.25, gamma: float = 2.0) -> dict[str, Tensor]:
    """Targets + losses of mmdet's SOLOV2Head.loss_by_feat for a whole batch.

    outputs: `SOLOv2.head_outputs`' dict; targets: "boxes" [B, M, 4], "labels" [B, M], "valid" [B, M], "masks"
    [B, M, h, w] bool at the mask-feature map's size, "mask_centers" [B, M, 2] (y, x) in canvas pixels.
    Returns {"loss_mask": 3 x the Dice losses of all (gt, positive cell) pairs / positive cells, "loss_cls": focal
    loss over every cell and class / (positive cells + 1)}. A cell two gts cover counts once in the positives and
    twice in the Dice sum, as in mmdet. Neither count is averaged over ranks (mmdet's SOLOv2 does not reduce them).
    Without positives no pair is valid and loss_mask is 0 (mmdet's mask_feats.sum() * 0), still in the graph.
    """
    kernels, mask_feats = outputs["kernels"], outputs["mask_feats"]
    cls_logits = outputs["cls_logits"].float()  # sums over B * 3872 * C terms
    num_classes = cls_logits.shape[-1]
    canvas = (mask_feats.shape[-2] * MASK_STRIDE, mask_feats.shape[-1] * MASK_STRIDE)  # mmdet's upsampled_size
    cell_labels, pos, pair_cell, pair_gt, pair_valid = solo_assign(
        targets["boxes"], targets["labels"], targets["mask_centers"], targets["valid"], canvas, num_grids=NUM_GRIDS,
        scale_ranges=scale_ranges, pos_scale=POS_SCALE, num_classes=num_classes,
        max_pairs=PAIRS_PER_GT * targets["boxes"].shape[1])
    num_pos = pos.sum()
    # the pair's 1x1 dynamic kernel on its image's mask features: one matmul for the batch, [B, P, E] x [B, E, h*w]
    mask_logits = (gather_gt(kernels, pair_cell) @ mask_feats.flatten(2)).float()  # [B, P, h*w]
    gt_masks = gather_gt(targets["masks"].flatten(2), pair_gt)  # [B, P, h*w]
    dice = torch.where(pair_valid, DICE_WEIGHT * dice_loss(mask_logits.sigmoid(), gt_masks), 0.0)  # [B, P]
    loss_mask = dice.sum() / num_pos.clamp(min=1)
    labels = cell_labels.clamp(max=num_classes - 1)  # background cells' label is never read (pos is False)
    loss_cls = sigmoid_focal_loss(cls_logits, labels, pos, torch.ones_like(pos), alpha=alpha, gamma=gamma) / (
        num_pos + 1)
    return {"loss_mask": loss_mask, "loss_cls": loss_cls}


def solov2_predict(outputs: dict[str, Tensor], image_size: Tensor, *, nms_pre: int, score_thr: float,
                   mask_thr: float, filter_thr: float, sigma: float, max_det: int) -> dict[str, Tensor]:
    """mmdet's SOLOV2Head.predict_by_feat / _predict_by_feat_single, batched and static in shape.

    Class probabilities that are local maxima (`points_nms`) and above score_thr are candidates (cell, class); their
    kernels on the mask features give soft masks, binarised at mask_thr; a candidate whose mask area is not above
    its level's stride is dropped; each is scored class probability x maskness (the mean soft mask over its binary
    mask), then Matrix NMS (Gaussian, label-specific) decays the scores, those below filter_thr go and the max_det
    best stay. Static where mmdet is not: here the nms_pre candidates are the best by class probability before the
    area filter, in mmdet the best by the maskness-weighted score after it; the two sets are the same (every
    candidate) whenever at most nms_pre class probabilities pass score_thr.
    Returns {"boxes" [B, max_det, 4] the extents of each binary mask (stride-4 cells x 4, canvas pixels, clipped to
    image_size [B, 2]), "scores", "labels", "valid" [B, max_det], "masks" [B, max_det, h, w] soft masks at the
    mask-feature map's size (zeros for padding rows; det/masks.py's paste_masks brings them to the picture)}.
    """
    scores = points_nms(outputs["cls_logits"].float().sigmoid())  # [B, G, C]
    batch, num_cells, num_classes = scores.shape
    top, index = scores.flatten(1).topk(min(nms_pre, num_cells * num_classes), dim=1)  # [B, N] (cell, class) pairs
    cell, labels = index // num_classes, index % num_classes
    mask_feats = outputs["mask_feats"]
    probs = (gather_gt(outputs["kernels"], cell) @ mask_feats.flatten(2)).float().sigmoid()  # [B, N, h*w]
    masks = probs > mask_thr
    area = masks.sum(-1).float()  # [B, N]
    strides = torch.cat([torch.full((g * g,), s, device=area.device) for g, s in zip(NUM_GRIDS, STRIDES, strict=True)])
    valid = (top > score_thr) & (area > strides[cell])
    maskness = (probs * masks).sum(-1) / area.clamp(min=1)
    scores, labels, keep_index, keep = matrix_nms(masks, top * maskness, labels, valid, sigma=sigma,
                                                  filter_thr=filter_thr, max_det=max_det)
    kept = (gather_gt(probs, keep_index) * keep[..., None]).unflatten(2, mask_feats.shape[-2:])  # [B, K, h, w]
    boxes = mask_boxes((kept > mask_thr).flatten(0, 1)).view(batch, max_det, 4) * MASK_STRIDE
    return {"boxes": clip_boxes(boxes, image_size), "scores": scores, "labels": labels, "valid": keep,
            "masks": kept}


def check_targets(targets: dict[str, Tensor], metas: list[dict], *, scale_ranges=SCALE_RANGES) -> None:
    """The "solov2" presets' hook on every training batch (CPU, in the loader): a ValueError naming the first image
    whose positive (gt, cell) pairs exceed solo_assign's budget of PAIRS_PER_GT x M, which would drop pairs
    silently. targets as solov2_loss takes them, metas with each image's "file_name" and "image_id"; scale_ranges
    the model's."""
    num_gt = targets["boxes"].shape[1]
    canvas = (targets["masks"].shape[-2] * MASK_STRIDE, targets["masks"].shape[-1] * MASK_STRIDE)
    counts = solo_pair_counts(targets["boxes"], targets["mask_centers"], targets["valid"], canvas,
                              num_grids=NUM_GRIDS, scale_ranges=scale_ranges, pos_scale=POS_SCALE)
    for meta, count in zip(metas, counts.tolist(), strict=True):
        if count > PAIRS_PER_GT * num_gt:
            raise ValueError(f"image {meta['file_name']} (id {meta['image_id']}) has {count} positive (object, grid "
                             f"cell) pairs, more than SOLOv2's budget of {PAIRS_PER_GT * num_gt} ({PAIRS_PER_GT} x "
                             f"{num_gt} padded objects): raise --max-gt, which raises the budget with it")


class MaskFeatModule(nn.Module):
    """mmdet's MaskFeatModule (SOLOv2 sec. 3.2.2, unified mask features): P2 through one ConvGN, P3, P4 and P5 through
    1, 2 and 3 stages of (ConvGN, 2x bilinear upsampling) down to stride 4 (P5 with two coordinate channels first),
    the four summed, then a 1x1 ConvGN to `out_channels`. mmdet's names (`convs_all_levels.i.conv{j}`,
    `conv_pred`)."""

    def __init__(self, in_channels: int = 256, feat_channels: int = 128, out_channels: int = 256,
                 num_levels: int = 4) -> None:
        super().__init__()
        self.convs_all_levels = nn.ModuleList()
        for i in range(num_levels):
            layers = OrderedDict()
            for j in range(max(i, 1)):
                width = in_channels + 2 if i == num_levels - 1 else in_channels  # CoordConv on the coarsest
                layers[f"conv{j}"] = ConvGN(width if j == 0 else feat_channels, feat_channels)
                if i > 0:
                    layers[f"upsample{j}"] = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.convs_all_levels.append(nn.Sequential(layers))
        self.conv_pred = ConvGN(feat_channels, out_channels, kernel_size=1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        """[P2, P3, P4, P5] -> [B, out_channels, H / 4, W / 4]."""
        out = self.convs_all_levels[0](feats[0])
        for i in range(1, len(feats)):
            x = coordinate_channels(feats[i]) if i == len(feats) - 1 else feats[i]
            out = out + self.convs_all_levels[i](x)
        return self.conv_pred(out)


class SOLOV2Head(nn.Module):
    """Category and kernel branches of `stacked_convs` ConvGN (shared over levels) on each level resized to its grid,
    then `conv_cls` (C logits) and `conv_kernel` (the 1x1 dynamic kernels, `kernel_channels` wide), both 3x3; plus
    `mask_feature_head`. mmdet's names and init (convs N(0, 0.01), the class prior 0.01 on conv_cls's bias;
    conv_pred keeps mmcv ConvModule's own Kaiming init, which mmengine applies after the head's)."""

    def __init__(self, num_classes: int, in_channels: int = 256, feat_channels: int = 512, stacked_convs: int = 4,
                 kernel_channels: int = 256, num_grids: tuple[int, ...] = NUM_GRIDS, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.num_classes, self.kernel_channels, self.num_grids = num_classes, kernel_channels, num_grids
        self.kernel_convs = nn.Sequential(*(ConvGN(in_channels + 2 if i == 0 else feat_channels, feat_channels)
                                            for i in range(stacked_convs)))
        self.cls_convs = nn.Sequential(*(ConvGN(in_channels if i == 0 else feat_channels, feat_channels)
                                         for i in range(stacked_convs)))
        self.conv_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.conv_kernel = nn.Conv2d(feat_channels, kernel_channels, 3, padding=1)
        self.mask_feature_head = MaskFeatModule(in_channels, out_channels=kernel_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.kaiming_normal_(self.mask_feature_head.conv_pred.conv.weight, mode="fan_out", nonlinearity="relu")
        # focal-loss prior (Lin et al. 2017 sec. 4.1): every cell starts at foreground probability 0.01
        nn.init.constant_(self.conv_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """[P2, ..., P6] -> (kernels [B, G, kernel_channels], cls_logits [B, G, C], mask_feats [B, kernel_channels,
        H / 4, W / 4]), G = sum of S^2 cells in row-major order, level by level."""
        mask_feats = self.mask_feature_head(feats[:4])
        # mmdet's SOLOHead.resize_feats: P2 halved, P6 brought up to P5's size, before the resize to the grid
        feats = [F.interpolate(feats[0], scale_factor=0.5, mode="bilinear", align_corners=False), *feats[1:-1],
                 F.interpolate(feats[-1], size=feats[-2].shape[-2:], mode="bilinear", align_corners=False)]
        kernel_maps, cls_maps = [], []
        for x, grid in zip(feats, self.num_grids, strict=True):
            x = F.interpolate(coordinate_channels(x), size=grid, mode="bilinear", align_corners=False)
            kernel_maps.append(self.conv_kernel(self.kernel_convs(x)))  # [B, E, S, S]
            cls_maps.append(self.conv_cls(self.cls_convs(x[:, :-2])))  # [B, C, S, S], no coordinates
        return (flatten_levels(kernel_maps, self.kernel_channels), flatten_levels(cls_maps, self.num_classes),
                mask_feats)


class SOLOv2(nn.Module):
    """images [B, 3, H, W] RGB 0-255 (uint8 or float) on a canvas of multiples of 32, normalised inside with
    ImageNet's statistics as mmdet's data preprocessor. The head's widths and the scale ranges are the config's:
    SOLOv2 (512 wide, 4 convs, 256-wide kernels) or SOLOv2-light (256, 2, 128, smaller ranges)."""

    def __init__(self, depth: int, num_classes: int = 80, *, frozen_stages: int = 1, norm_eval: bool = True,
                 feat_channels: int = 512, stacked_convs: int = 4, kernel_channels: int = 256,
                 scale_ranges: tuple[tuple[int, int], ...] = SCALE_RANGES) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(depth, frozen_stages=frozen_stages, norm_eval=norm_eval)
        # mmdet neck: FPN(start_level=0, num_outs=5), no extra convs: P2-P5 from C2-C5, P6 by max-pooling P5
        self.neck = FPN(self.backbone.out_channels, 256, start_level=0, num_extra_levels=1, extra_convs=None)
        self.mask_head = SOLOV2Head(num_classes, feat_channels=feat_channels, stacked_convs=stacked_convs,
                                    kernel_channels=kernel_channels)
        self.scale_ranges = scale_ranges
        self.register_buffer("mean", torch.tensor([123.675, 116.28, 103.53]), persistent=False)
        self.register_buffer("std", torch.tensor([58.395, 57.12, 57.375]), persistent=False)

    def head_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """images -> {"kernels" [B, G, 256], "cls_logits" [B, G, C], "mask_feats" [B, 256, H / 4, W / 4]}, G = 3872
        grid cells (40^2 + 36^2 + 24^2 + 16^2 + 12^2) whatever the canvas."""
        kernels, cls_logits, mask_feats = self.mask_head(self.neck(self.backbone(normalize(images, self.mean,
                                                                                            self.std))))
        return {"kernels": kernels, "cls_logits": cls_logits, "mask_feats": mask_feats}

    def loss(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """head_outputs' dict + targets (boxes, labels, valid, masks, mask_centers) -> {"loss_mask", "loss_cls"}."""
        return solov2_loss(outputs, targets, scale_ranges=self.scale_ranges)

    def forward(self, images: Tensor, targets: dict[str, Tensor] | None = None,
                image_size: Tensor | None = None) -> dict[str, Tensor]:
        """Train: targets -> `loss`. Eval: {"boxes" [B, 100, 4], "scores", "labels", "valid" [B, 100], "masks"
        [B, 100, H / 4, W / 4]} (solov2_predict)."""
        outputs = self.head_outputs(images)
        if self.training:
            return self.loss(outputs, targets)
        return solov2_predict(outputs, image_size_or_canvas(images, image_size), **TEST_CFG)


def from_mmdet(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """An mmdet SOLOv2 state dict onto our names: they are the same."""
    return dict(state_dict)


def load_backbone_weights(model: SOLOv2, checkpoint: dict) -> dict[str, list[str]]:
    """An ImageNet ResNet checkpoint (ours / torchvision / mmpretrain) into `model.backbone` (mmdet's config starts
    from torchvision://resnet50); the classifier (`fc.*`) is reported unused. Returns load_model_weights' report."""
    return model.backbone.load_classification_weights(checkpoint)


# Training recipe of mmdet 3.3.0 .mim/configs/solov2/solov2_r50_fpn_1x_coco.py: 8 GPUs x 2 images, SGD LR 0.01 (the
# config lowers schedule_1x's 0.02), momentum 0.9, weight decay 1e-4, gradient norm clipped at 35, linear warmup
# over 500 iterations from 0.001 x LR, 12 epochs, LR x 0.1 after epochs 8 and 11; data: coco_instance.py, keep-ratio
# resize to 1333x800 and horizontal flip 0.5 with the masks, evaluated by mask AP.
RECIPES = {
    "solov2_r50": dict(preset="solov2", img_size=800, batch_size=2, lr=0.01, lr_batch=16, momentum=0.9,
                       weight_decay=1e-4, epochs=12, schedule="multistep", lr_steps=(8, 11), warmup_iters=500,
                       warmup_factor=0.001, repeat=1, clip_grad=35.0, iou_type="segm", metric="AP", frozen_stages=1,
                       norm_eval=True),
}
# solov2-light_r18_fpn_ms-3x_coco.py: the same optimizer, 36 epochs, LR x 0.1 after 27 and 33, warmup from 1/3;
# tested at (448, 768). mmdet trains it at a short side drawn from 352-512 (long side 768); here at --img-size alone
# (the "solov2_light" preset: single-scale, long side 1333/800 x the short one, 746 at 448).
RECIPES["solov2_light_r18"] = dict(RECIPES["solov2_r50"], preset="solov2_light", img_size=448, epochs=36,
                                   lr_steps=(27, 33), warmup_factor=1 / 3)


def solov2_r50(num_classes: int = 80, *, frozen_stages: int = 1, norm_eval: bool = True) -> SOLOv2:
    return SOLOv2(50, num_classes, frozen_stages=frozen_stages, norm_eval=norm_eval)


def solov2_light_r18(num_classes: int = 80, *, frozen_stages: int = 1, norm_eval: bool = True) -> SOLOv2:
    """SOLOv2-light on ResNet-18: 7x cheaper heads (the grids' convs are most of SOLOv2's cost at any canvas), what
    the CPU runs and the convergence test train."""
    return SOLOv2(18, num_classes, frozen_stages=frozen_stages, norm_eval=norm_eval, feat_channels=256,
                  stacked_convs=2, kernel_channels=128, scale_ranges=LIGHT_SCALE_RANGES)

"""CenterNet (Zhou et al. 2019, "Objects as Points") as mmdet 3.3.0 builds centernet_r18_8xb16-crop512-140e_coco:
ResNet-18 (det/backbones.py, every stage and BatchNorm trained) -> CTResNetNeck (three stages of 3x3 conv + 4x4
stride-2 deconv, 512 -> 256 -> 128 -> 64 channels, C5 back to stride 4) -> three heads on that one map: a class heatmap
of object centres, the box size (w, h) and the centre's sub-cell offset, all in output cells.

Training renders each object as a Gaussian peak on its class's heatmap (radius from CornerNet's overlap rule) and
learns it with a penalty-reduced focal loss; size and offset are learnt at the centre cells by L1. Targets are built
for the whole batch at once (no loop over images or objects), so a step compiles to one graph. Testing keeps the 3x3
local maxima of the heatmap and their top 100 over classes and cells: no NMS, a fixed number of detections per
image. Parameter names are mmdet's (`backbone.*`, `neck.deconv_layers.*`, `bbox_head.*`): its checkpoints load as
they are.
"""
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cls.models.layers import ConvModule
from det.backbones import ResNetBackbone
from det.losses import gaussian_focal_loss
from det.models.dense import image_size_or_canvas, normalize
from det.nms import pad_detections

MIN_OVERLAP = 0.3  # mmdet CenterNetHead.get_targets: gaussian_radius(min_overlap=0.3)
LOSS_WEIGHTS = dict(loss_center_heatmap=1.0, loss_wh=0.1, loss_offset=1.0)  # the config's loss_weight of each
TEST_CFG = dict(topk=100, kernel=3)  # mmdet test_cfg: topk 100, local_maximum_kernel 3 (max_per_img 100: NMS only)
# mmdet's test pipeline, RandomCenterCropPad(test_mode=True, test_pad_mode=['logical_or', 31], test_pad_add_pix=1):
# each image centred on a black canvas of (side | 31) + 1, a multiple of 32 at least 1 px larger
TEST_PAD_OR, TEST_PAD_ADD = 31, 1


def gaussian_radius(height: Tensor, width: Tensor, min_overlap: float = MIN_OVERLAP) -> Tensor:
    """mmdet's gaussian_radius, elementwise: the largest corner shift r that keeps IoU >= min_overlap with the box, the
    smallest of CornerNet's three cases (one corner inside, both inside, both outside), each the smaller root of its
    quadratic. CornerNet's own code takes (b + sqrt) / 2 for all three; mmdet's is the corrected formula. The
    expressions are mmdet's, scalars included, in float32 (mmdet's square roots are math.sqrt's, in double: the
    radius can differ in its last bit, which the truncation to whole cells hides)."""
    a1, b1 = 1, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 - torch.sqrt(b1**2 - 4 * a1 * c1)) / (2 * a1)
    a2, b2 = 4, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 - torch.sqrt(b2**2 - 4 * a2 * c2)) / (2 * a2)
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / (2 * a3)
    return torch.minimum(torch.minimum(r1, r2), r3)


@torch.no_grad()
def centernet_targets(targets: dict[str, Tensor], feature_size: tuple[int, int], input_size: tuple[int, int],
                      num_classes: int, min_overlap: float = MIN_OVERLAP) -> dict[str, Tensor]:
    """mmdet's CenterNetHead.get_targets for a whole padded batch, without its loops.

    targets: "boxes" [B, M, 4] canvas pixels, "labels" [B, M], "valid" [B, M]; feature_size (H, W) of the output
    map, input_size (h, w) of the canvas (mmdet's batch_input_shape). Returns {"heatmap" [B, C, H, W]: per class the
    elementwise max of every object's Gaussian (radius max(0, int(gaussian_radius)) cells on the output grid, sigma =
    (2r + 1) / 6, cut to 0 below float32 eps, 1 at the centre cell), "wh" [B, 2, H, W] box size in cells, "offset"
    [B, 2, H, W] the centre's fraction past its cell, "weight" [B, 2, H, W] 1 at centre cells, "avg_factor" (): the
    heatmap's cells equal to 1, at least 1}. Where centres share a cell, size and offset are the last object's, as
    mmdet's loop overwrites them. A centre outside the map (mmdet: an IndexError) is clamped onto its edge.
    """
    height, width = feature_size
    h_ratio, w_ratio = float(height / input_size[0]), float(width / input_size[1])
    boxes, valid = targets["boxes"].float(), targets["valid"]
    centre_x = (boxes[..., 0] + boxes[..., 2]) * w_ratio / 2  # [B, M] in output cells
    centre_y = (boxes[..., 1] + boxes[..., 3]) * h_ratio / 2
    cell_x = centre_x.long().clamp(0, width - 1)  # mmdet ct.int(): truncated
    cell_y = centre_y.long().clamp(0, height - 1)
    box_w, box_h = (boxes[..., 2] - boxes[..., 0]) * w_ratio, (boxes[..., 3] - boxes[..., 1]) * h_ratio
    radius = gaussian_radius(box_h, box_w, min_overlap).long().clamp(min=0)  # [B, M], max(0, int(r))

    # mmdet gaussian2D: exp(-(dx^2 + dy^2) / (2 sigma^2)) in float32, sigma = (2r + 1) / 6; its 2 sigma^2 comes from
    # Python floats, the same float32 number as the correctly rounded (2r + 1)^2 / 18 (no float64 on every device)
    denom = ((2 * radius + 1).square().float() / 18)[..., None, None]  # [B, M, 1, 1]
    dx = torch.arange(width, device=boxes.device) - cell_x[..., None]  # [B, M, W]
    dy = torch.arange(height, device=boxes.device) - cell_y[..., None]  # [B, M, H]
    d2 = (dy.square()[..., :, None] + dx.square()[..., None, :]).float()  # [B, M, H, W]
    gaussian = torch.exp(-d2 / denom)
    r = radius[..., None, None]
    window = (dy.abs()[..., :, None] <= r) & (dx.abs()[..., None, :] <= r) & valid[..., None, None]
    gaussian = torch.where(window & (gaussian >= torch.finfo(torch.float32).eps), gaussian, 0.0)
    batch, num_gt = valid.shape
    index = torch.where(valid, targets["labels"], 0)[..., None].expand(-1, -1, height * width)  # [B, M, HW]
    heatmap = boxes.new_zeros(batch, num_classes, height * width).scatter_reduce(
        1, index, gaussian.flatten(2), reduce="amax")  # [B, C, HW]: max over each class's objects

    cell = torch.where(valid, cell_y * width + cell_x, 0)  # [B, M]; padding rows point anywhere and take no part
    order = torch.where(valid, torch.arange(num_gt, device=boxes.device), -1)
    owner = torch.full((batch, height * width), -1, device=boxes.device).scatter_reduce(
        1, cell, order, reduce="amax")  # [B, HW] the last object centred in each cell, -1: none
    per_gt = torch.stack([box_w, box_h, centre_x - cell_x, centre_y - cell_y], dim=1)  # [B, 4, M]
    maps = per_gt.gather(2, owner.clamp(min=0)[:, None].expand(-1, 4, -1)) * (owner >= 0)[:, None]  # [B, 4, HW]
    maps = maps.view(batch, 4, height, width)
    weight = (owner >= 0).view(batch, 1, height, width).expand(-1, 2, -1, -1).float()
    heatmap = heatmap.view(batch, num_classes, height, width)
    return {"heatmap": heatmap, "wh": maps[:, :2], "offset": maps[:, 2:], "weight": weight,
            "avg_factor": heatmap.eq(1).sum().clamp(min=1).float()}


def centernet_loss(outputs: dict, targets: dict[str, Tensor]) -> dict[str, Tensor]:
    """mmdet's CenterNetHead.loss_by_feat for a whole batch.

    outputs: `CenterNet.head_outputs`' dict; targets: "boxes" [B, M, 4], "labels" [B, M], "valid" [B, M].
    Returns {"loss_center_heatmap": Gaussian focal loss (det/losses.py) / avg_factor, "loss_wh": 0.1 x L1 of the
    size at centre cells / (2 avg_factor), "loss_offset": L1 of the offset / (2 avg_factor)}, avg_factor counting
    this rank's heatmap peaks: mmdet averages nothing over ranks here (no reduce_mean in CenterNetHead).
    """
    heatmap = outputs["heatmap"]
    t = centernet_targets(targets, tuple(heatmap.shape[-2:]), outputs["input_size"], heatmap.shape[1])
    avg_factor = t["avg_factor"]
    losses = {  # float32 sums over B * C * H * W terms, also under autocast
        "loss_center_heatmap": gaussian_focal_loss(heatmap.float(), t["heatmap"]) / avg_factor,
        # mmdet's L1Loss(weight, avg_factor=2 * avg_factor): the weight holds both channels of each centre cell
        "loss_wh": ((outputs["wh"].float() - t["wh"]).abs() * t["weight"]).sum() / (2 * avg_factor),
        "loss_offset": ((outputs["offset"].float() - t["offset"]).abs() * t["weight"]).sum() / (2 * avg_factor),
    }
    return {k: v * LOSS_WEIGHTS[k] for k, v in losses.items()}


def centernet_predict(outputs: dict, border: Tensor, *, topk: int, kernel: int) -> dict[str, Tensor]:
    """mmdet's CenterNetHead._decode_heatmap + the border subtraction of _predict_by_feat_single, batched.

    Heatmap cells that are not the maximum of their kernel x kernel neighbourhood drop to 0; the `topk` best scores
    over (class, cell) become detections, each box the cell + offset, +-wh / 2, scaled from output cells to canvas
    pixels, then moved by `border` [B, 2] (top, left: where the test pipeline put the image on its canvas). As mmdet:
    no NMS, no score threshold (all topk detections are kept), no clipping.
    Returns {"boxes": [B, topk, 4], "scores", "labels", "valid": [B, topk]}.
    """
    heat = outputs["heatmap"]
    batch, num_classes, height, width = heat.shape
    peak = F.max_pool2d(heat, kernel, stride=1, padding=(kernel - 1) // 2)
    heat = heat * (peak == heat)  # mmdet get_local_maximum
    scores, index = heat.flatten(1).topk(min(topk, heat[0].numel()), dim=1)  # [B, K] class-major, as mmdet
    labels, cell = index // (height * width), index % (height * width)
    ys, xs = (cell // width).float(), (cell % width).float()
    wh = outputs["wh"].flatten(2).gather(2, cell[:, None].expand(-1, 2, -1)).float()  # [B, 2, K]
    offset = outputs["offset"].flatten(2).gather(2, cell[:, None].expand(-1, 2, -1)).float()
    xs, ys = xs + offset[:, 0], ys + offset[:, 1]
    in_h, in_w = outputs["input_size"]
    boxes = torch.stack([(xs - wh[:, 0] / 2) * (in_w / width), (ys - wh[:, 1] / 2) * (in_h / height),
                         (xs + wh[:, 0] / 2) * (in_w / width), (ys + wh[:, 1] / 2) * (in_h / height)], dim=2)
    boxes = boxes - border.flip(1).repeat(1, 2)[:, None].to(boxes.dtype)  # (left, top, left, top)
    valid = torch.ones_like(scores, dtype=torch.bool)
    boxes, scores, labels, valid = pad_detections(topk, boxes, scores, labels, valid)
    return {"boxes": boxes, "scores": scores, "labels": labels, "valid": valid}


def centre_on_test_canvas(images: Tensor, image_size: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """mmdet's CenterNet test input for a batch: images [B, 3, H, W] 0-255 on our canvas (each at the top left,
    image_size [B, 2] (h, w)) -> (float 0-255 [B, 3, (H | 31) + 1, (W | 31) + 1], border [B, 2] (top, left)).

    RandomCenterCropPad in test mode centres each image, unresized, on a (h | 31) + 1 x (w | 31) + 1 canvas of black
    (its mean 0), the image's top-left at (canvas // 2 - h // 2, canvas // 2 - w // 2); DetDataPreprocessor then
    normalises and pads the batch to its largest canvas with 0, which is `mean` [3] before normalisation. The same
    here in one static gather: each output row and column reads its source pixel, or none.
    """
    batch, _, height, width = images.shape
    out_h, out_w = (height | TEST_PAD_OR) + TEST_PAD_ADD, (width | TEST_PAD_OR) + TEST_PAD_ADD
    own = (image_size | TEST_PAD_OR) + TEST_PAD_ADD  # [B, 2] each image's own test canvas
    border = own // 2 - image_size // 2  # [B, 2] (top, left)
    rows = torch.arange(out_h, device=images.device) - border[:, :1]  # [B, out_h] source row of each output row
    cols = torch.arange(out_w, device=images.device) - border[:, 1:]  # [B, out_w]
    in_image = (((rows >= 0) & (rows < image_size[:, :1]))[:, None, :, None]
                & ((cols >= 0) & (cols < image_size[:, 1:]))[:, None, None, :])  # [B, 1, out_h, out_w]
    in_canvas = ((torch.arange(out_h, device=images.device) < own[:, :1])[:, None, :, None]
                 & (torch.arange(out_w, device=images.device) < own[:, 1:])[:, None, None, :])
    x = images.gather(2, rows.clamp(0, height - 1)[:, None, :, None].expand(-1, 3, -1, width))
    x = x.gather(3, cols.clamp(0, width - 1)[:, None, None, :].expand(-1, 3, out_h, -1))  # [B, 3, out_h, out_w]
    x = torch.where(in_image, x, 0).float()
    return torch.where(in_canvas, x, mean.view(1, 3, 1, 1)), border


def deconv_module(channels: int, kernel: int) -> nn.Sequential:
    """mmcv's ConvModule(conv_cfg=dict(type='deconv'), norm_cfg=BN) under its names: a kernel x kernel stride-2
    transposed conv without bias (2x upsampling), BatchNorm, ReLU."""
    return nn.Sequential(OrderedDict(conv=nn.ConvTranspose2d(channels, channels, kernel, 2, padding=1, bias=False),
                                     bn=nn.BatchNorm2d(channels), activate=nn.ReLU(inplace=True)))


class CTResNetNeck(nn.Module):
    """mmdet's CTResNetNeck(use_dcn=False): per stage a 3x3 ConvModule to the stage's width, then a 2x upsampling
    deconv, on the backbone's last map only. mmdet's init: BatchNorm 1 / 0, PyTorch's default conv init (mmdet resets
    ConvModule's Kaiming init to it; ours has it from the start), and in each deconv a bilinear upsampling kernel on
    output channel 0 of every input channel (mmdet fills w[c, 0] of the [in, out, k, k] weight, the rest keeps the
    default init: the original CenterNet's, kept)."""

    def __init__(self, in_channels: int = 512, widths: tuple[int, ...] = (256, 128, 64),
                 kernels: tuple[int, ...] = (4, 4, 4)) -> None:
        super().__init__()
        layers = []
        for width, kernel in zip(widths, kernels, strict=True):
            layers += [ConvModule(in_channels, width, 3), deconv_module(width, kernel)]
            in_channels = width
        self.deconv_layers = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                k = m.weight.shape[2]
                f = math.ceil(k / 2)
                c = (2 * f - 1 - f % 2) / (2.0 * f)
                ramp = 1 - (torch.arange(k) / f - c).abs()
                m.weight.data[:, 0] = ramp[:, None] * ramp[None, :]

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.deconv_layers(feats[-1])


class CenterNetHead(nn.Module):
    """Three branches of 3x3 conv + ReLU + 1x1 conv on the neck's map (mmdet's `_build_head`, children 0 and 2):
    class heatmap (bias at prior probability 0.1), box size and centre offset (N(0, 0.001) weights, zero bias)."""

    def __init__(self, num_classes: int, in_channels: int = 64, feat_channels: int = 64) -> None:
        super().__init__()
        self.num_classes = num_classes

        def branch(out_channels: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(in_channels, feat_channels, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(feat_channels, out_channels, 1))

        self.heatmap_head, self.wh_head, self.offset_head = branch(num_classes), branch(2), branch(2)
        nn.init.constant_(self.heatmap_head[-1].bias, -math.log((1 - 0.1) / 0.1))  # mmdet bias_init_with_prob(0.1)
        for m in (*self.wh_head.modules(), *self.offset_head.modules()):
            if isinstance(m, nn.Conv2d):  # mmdet normal_init(std=0.001): tiny sizes and offsets at the start
                nn.init.normal_(m.weight, std=0.001)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, 64, H, W] -> (heatmap [B, C, H, W] probabilities, float32; wh [B, 2, H, W]; offset [B, 2, H, W])."""
        return self.heatmap_head(x).float().sigmoid(), self.wh_head(x), self.offset_head(x)


class CenterNet(nn.Module):
    """images [B, 3, H, W] RGB 0-255 (uint8 or float); the output map is H / 4 x W / 4 for multiples of 32. Training
    reads the canvas as it is (mmdet's are 512 x 512 crops); evaluation first builds mmdet's test canvas
    (`centre_on_test_canvas`)."""

    def __init__(self, depth: int = 18, num_classes: int = 80, *, frozen_stages: int = -1,
                 norm_eval: bool = False) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(depth, frozen_stages=frozen_stages, norm_eval=norm_eval)
        self.neck = CTResNetNeck(self.backbone.out_channels[-1])
        self.bbox_head = CenterNetHead(num_classes)
        # mmdet DetDataPreprocessor of the config: ImageNet RGB statistics on 0-255 pixels (bgr_to_rgb on its BGR)
        self.register_buffer("mean", torch.tensor([123.675, 116.28, 103.53]), persistent=False)
        self.register_buffer("std", torch.tensor([58.395, 57.12, 57.375]), persistent=False)

    def head_outputs(self, images: Tensor) -> dict:
        """images [B, 3, H, W] 0-255 -> {"heatmap" [B, C, H/4, W/4] probabilities, "wh" [B, 2, H/4, W/4], "offset"
        [B, 2, H/4, W/4], "input_size" (H, W)}."""
        heatmap, wh, offset = self.bbox_head(self.neck(self.backbone(normalize(images, self.mean, self.std))))
        return {"heatmap": heatmap, "wh": wh, "offset": offset, "input_size": tuple(images.shape[-2:])}

    def loss(self, outputs: dict, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Targets + losses from `head_outputs`' dict. Every cell takes part, also over an image's canvas padding
        (mmdet has no valid flags here), so targets' "image_size" is not needed."""
        return centernet_loss(outputs, targets)

    def forward(self, images: Tensor, targets: dict[str, Tensor] | None = None,
                image_size: Tensor | None = None) -> dict[str, Tensor]:
        """Train: targets (boxes, labels, valid) -> {"loss_center_heatmap", "loss_wh", "loss_offset"}. Eval: each
        image (its image_size) centred on mmdet's test canvas -> {"boxes" [B, 100, 4] in the image's own pixels,
        "scores", "labels", "valid" [B, 100] (all 100 valid, as mmdet keeps them)}."""
        if self.training:
            return self.loss(self.head_outputs(images), targets)
        x, border = centre_on_test_canvas(images, image_size_or_canvas(images, image_size), self.mean)
        return centernet_predict(self.head_outputs(x), border, **TEST_CFG)


def from_mmdet(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """An mmdet CenterNet state dict onto our names: they are the same."""
    return dict(state_dict)


def load_backbone_weights(model: CenterNet, checkpoint: dict) -> dict[str, list[str]]:
    """An ImageNet ResNet checkpoint (ours / torchvision / mmpretrain) into `model.backbone` (mmdet's config starts
    from torchvision://resnet18); the classifier (`fc.*`) is reported unused. Returns load_model_weights' report."""
    return model.backbone.load_classification_weights(checkpoint)


# Training recipe of mmdet 3.3.0 .mim/configs/centernet/centernet_r18_8xb16-crop512-140e_coco.py (its base
# centernet_r18-dcnv2_8xb16-crop512-140e_coco.py with use_dcn=False): 8 GPUs x 16 images, SGD LR 0.02 (schedule_1x's,
# auto_scale_lr base 128), momentum 0.9, weight decay 1e-4 on every parameter, gradient norm clipped at 35, linear
# warmup over 1000 iterations from 0.001 x LR, RepeatDataset x5 and 28 epochs (= 140 COCO epochs), LR x 0.1 after
# epochs 18 and 24 (90 and 120). ResNet-18 from torchvision's ImageNet weights, nothing frozen, BatchNorm trained
# (norm_eval=False). Data: PhotoMetricDistortion, RandomCenterCropPad (512 x 0.6-1.3, black), resize to 512, flip
# (det/centernet_data.py); training drops COCO images without objects (filter_empty_gt), which here stay. Test:
# each image at its own resolution, centred on a (side | 31) + 1 canvas (`centre_on_test_canvas`).
RECIPES = {
    "centernet_r18": dict(preset="centernet", img_size=512, batch_size=16, lr=0.02, lr_batch=128, momentum=0.9,
                          weight_decay=1e-4, epochs=28, schedule="multistep", lr_steps=(18, 24), warmup_iters=1000,
                          warmup_factor=0.001, repeat=5, clip_grad=35.0, iou_type="bbox", metric="AP",
                          frozen_stages=-1, norm_eval=False),
}


def centernet_r18(num_classes: int = 80, *, frozen_stages: int = -1, norm_eval: bool = False) -> CenterNet:
    return CenterNet(18, num_classes, frozen_stages=frozen_stages, norm_eval=norm_eval)

"""SSDLite (Sandler et al. 2018, "MobileNetV2", sec. 6.2: SSD with every regular 3x3 conv of the extra layers and
the head replaced by a depthwise-separable one) as mmdet 3.3 builds ssdlite_mobilenetv2-scratch_8xb24-600e_coco:
the MobileNetV2 trunk tapped at two depths, the renaming of mmdet's MobileNetV2 backbone keys, the recipe and the
builder. SSD itself (neck, head, loss, decoding) is det/models/ssd.py.
"""
import re
from functools import partial

import torch
from torch import nn

from cls.models import mobilenet_v2
from cls.models.layers import NormLayer
from det.anchors import ssd_base_anchors
from det.models import ssd
from det.models.ssd import SSD, SSDHead, SSDNeck, init_convs


class MobileNetV2Trunk(nn.Module):
    """cls/models/mobilenet_v2.py's `features` without the classifier. Returns the output of `features[13]`
    (last 96-channel block, stride 16) and of `features[18]` (1x1 conv to 1280, stride 32): mmdet's MobileNetV2
    with out_indices (4, 7), the two maps SSDLite predicts from before its extra layers (paper, sec. 6.2)."""

    classification_arch = "mobilenet_v2"  # the cls.models builder whose checkpoints load into this trunk

    def __init__(self, norm: NormLayer) -> None:
        super().__init__()
        self.features = mobilenet_v2.MobileNetV2(norm=norm).features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c4 = self.features[:14](x)  # [B, 96, H/16, W/16]
        return c4, self.features[14:](c4)  # [B, 1280, H/32, W/32]


def rename_mmdet_mobilenet_v2(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmdet's MobileNetV2 backbone keys onto our trunk (`backbone.features.<n>.*`); other keys unchanged.

    mmdet names a block's ConvModules `expand_conv` (absent when the expansion is 1), `depthwise_conv`,
    `linear_conv`; mmpretrain numbers them `conv.<k>` in that order. Translate to mmpretrain's names, then reuse
    cls/models/mobilenet_v2.py's `from_mmpretrain`.
    """
    backbone, rest = {}, {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r"backbone\.layer(\d)\.(\d+)\.(expand|depthwise|linear)_conv\.(.+)", key):
            has_expand = mobilenet_v2.INVERTED_RESIDUAL_SETTING[int(m[1]) - 1][0] != 1
            k = {"expand": 0, "depthwise": 1, "linear": 2}[m[3]] - (not has_expand)
            backbone[f"backbone.layer{m[1]}.{m[2]}.conv.{k}.{m[4]}"] = value
        elif key.startswith(("backbone.conv1.", "backbone.conv2.")):
            backbone[key] = value
        else:
            rest[key] = value
    return rest | {f"backbone.{k}": v for k, v in mobilenet_v2.from_mmpretrain(backbone).items()}


def from_mmdet(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmdet SSDLite state dict onto our names: only the MobileNetV2 backbone is renamed."""
    return rename_mmdet_mobilenet_v2(state_dict)


def load_backbone_weights(model: SSD, checkpoint: dict) -> dict[str, list[str]]:
    """An ImageNet MobileNetV2 checkpoint (ours / torchvision / mmpretrain) into the trunk: SSD's loader, which
    reads the trunk's `classification_arch`."""
    return ssd.load_backbone_weights(model, checkpoint)


# mmdet's ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py: 120 cosine epochs of RepeatDataset(times=5) (600 passes),
# lr for 8 GPUs x 24 images, the "ssd" data preset; min_img_size: the smallest canvas the layers accept
RECIPES = {
    "ssdlite_mobilenet_v2": dict(preset="ssd", img_size=320, min_img_size=40, batch_size=24, lr=0.015, lr_batch=192,
                                 momentum=0.9, weight_decay=4e-5, epochs=120, schedule="cosine", lr_steps=None,
                                 warmup_iters=500, warmup_factor=0.001, repeat=5, clip_grad=None,
                                 iou_type="bbox", metric="AP"),
}


def ssdlite_mobilenet_v2(num_classes: int = 80) -> SSD:
    """Trained from scratch in mmdet: its init (truncated normal 0.03 backbone / neck, normal 0.001 head) matters."""
    norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.03)
    channels = (96, 1280, 512, 256, 256, 128)
    strides = [16, 32, 64, 107, 160, 320]
    base_anchors = ssd_base_anchors(strides, [[2, 3]] * 6, [48, 100, 150, 202, 253, 304],
                                    [100, 150, 202, 253, 304, 320])  # sizes set by hand in the config, for 320 px
    backbone = MobileNetV2Trunk(norm)
    neck = SSDNeck(in_channels=channels[:2], out_channels=channels, level_strides=(2, 2, 2, 2),
                   level_paddings=(1, 1, 1, 1), l2_norm_scale=None, depthwise=True, norm=norm, act=nn.ReLU6)
    head = SSDHead(num_classes=num_classes, in_channels=channels, num_anchors=[len(b) for b in base_anchors],
                   depthwise=True, norm=norm, act=nn.ReLU6)
    for part in (backbone, neck):
        init_convs(part, partial(nn.init.trunc_normal_, std=0.03))
    init_convs(head, partial(nn.init.normal_, std=0.001))
    return SSD(backbone=backbone, neck=neck, bbox_head=head, canvas=320, strides=strides,
               base_anchors=base_anchors, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


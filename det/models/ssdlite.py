"""The SSDLite pieces (Sandler et al. 2018, "MobileNetV2", sec. 6.2: SSD with every regular 3x3 conv of the extra
layers and the head replaced by a depthwise-separable one): the MobileNetV2 trunk tapped at two depths, the
depthwise-separable block, and the renaming of mmdet's MobileNetV2 backbone keys. SSD itself is det/models/ssd.py.
"""
import re

import torch
from torch import nn

from cls.models import mobilenet_v2
from cls.models.layers import ConvModule, NormLayer


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


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

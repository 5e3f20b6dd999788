"""MobileNetV3 (Howard et al. 2019, "Searching for MobileNetV3"), small and large.

Names follow torchvision's `mobilenet_v3_small` / `mobilenet_v3_large`, so its checkpoints load unchanged;
`from_mmpretrain` renames mmpretrain's MobileNetV3 + StackedLinearClsHead.
"""
import re
from functools import partial

import torch
from torch import nn

from cls.models.layers import ConvNormAct, NormLayer, SqueezeExcitation, init_weights, make_divisible

RE, HS = nn.ReLU, nn.Hardswish
# Tables 1 and 2 of the paper, one row per inverted residual:
# (kernel, expanded channels, out channels, squeeze-excite, activation, stride). The first block's input is
# the 16-channel stem; `last_channel` is the width of the classifier's hidden layer.
ARCHS: dict[str, dict] = {
    "small": dict(
        last_channel=1024,
        blocks=(
            (3, 16, 16, True, RE, 2),
            (3, 72, 24, False, RE, 2),
            (3, 88, 24, False, RE, 1),
            (5, 96, 40, True, HS, 2),
            (5, 240, 40, True, HS, 1),
            (5, 240, 40, True, HS, 1),
            (5, 120, 48, True, HS, 1),
            (5, 144, 48, True, HS, 1),
            (5, 288, 96, True, HS, 2),
            (5, 576, 96, True, HS, 1),
            (5, 576, 96, True, HS, 1),
        ),
    ),
    "large": dict(
        last_channel=1280,
        blocks=(
            (3, 16, 16, False, RE, 1),
            (3, 64, 24, False, RE, 2),
            (3, 72, 24, False, RE, 1),
            (5, 72, 40, True, RE, 2),
            (5, 120, 40, True, RE, 1),
            (5, 120, 40, True, RE, 1),
            (3, 240, 80, False, HS, 2),
            (3, 200, 80, False, HS, 1),
            (3, 184, 80, False, HS, 1),
            (3, 184, 80, False, HS, 1),
            (3, 480, 112, True, HS, 1),
            (3, 672, 112, True, HS, 1),
            (5, 672, 160, True, HS, 2),
            (5, 960, 160, True, HS, 1),
            (5, 960, 160, True, HS, 1),
        ),
    ),
}


class InvertedResidual(nn.Module):
    """MobileNetV2's block with an optional squeeze-excite after the depthwise conv (paper fig. 4)."""

    def __init__(
        self,
        in_channels: int,
        kernel_size: int,
        expanded: int,
        out_channels: int,
        use_se: bool,
        act: type[nn.Module],
        stride: int,
        norm: NormLayer,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(ConvNormAct(in_channels, expanded, 1, norm=norm, act=act))
        depthwise = ConvNormAct(expanded, expanded, kernel_size, stride, groups=expanded, norm=norm, act=act)
        layers.append(depthwise)
        if use_se:
            # Squeeze to 1/4 of the expansion, gate with hard-sigmoid (paper sec. 5.3).
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4), gate=nn.Hardsigmoid))
        layers.append(ConvNormAct(expanded, out_channels, 1, norm=norm, act=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res_connect else self.block(x)


class MobileNetV3(nn.Module):
    def __init__(
        self,
        blocks: tuple[tuple, ...],
        last_channel: int,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        # TF-style BatchNorm hyper-parameters of the reference training (torchvision and mmpretrain alike).
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers: list[nn.Module] = [ConvNormAct(3, 16, 3, stride=2, norm=norm, act=HS)]
        in_channels = 16
        for row in blocks:
            layers.append(InvertedResidual(in_channels, *row, norm=norm))
            in_channels = layers[-1].out_channels
        layers.append(ConvNormAct(in_channels, 6 * in_channels, 1, norm=norm, act=HS))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * in_channels, last_channel),
            HS(inplace=True),
            nn.Dropout(dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )

        # torchvision's init.
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x)).flatten(1)  # [B, C]
        return self.classifier(x)


def from_mmpretrain(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an mmpretrain MobileNetV3 checkpoint (mmcv ConvModules `conv`/`bn`) to our names.

    mmpretrain's `layerK` is `features[K]` (stem, blocks, last conv). Inside a block mmpretrain names its
    parts (`expand_conv`, `depthwise_conv`, `se`, `linear_conv`) and torchvision numbers those present, so a
    part's index is the number of earlier parts the block has (no expand conv if it keeps the width, SE only
    where the table says).
    The StackedLinearClsHead's two linears are the classifier's `0` and `3` (hard-swish and dropout between).
    """
    parts = ("expand_conv", "depthwise_conv", "se", "linear_conv")
    child = {"conv": "0", "bn": "1", "conv1.conv": "fc1", "conv2.conv": "fc2"}
    present = {".".join(k.split(".")[:3]) for k in state_dict}  # e.g. "backbone.layer4.se"
    out = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r"backbone\.layer(\d+)\.(conv|bn)\.(.+)", key):
            key = f"features.{m[1]}.{child[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"backbone\.layer(\d+)\.(\w+)\.(conv|bn|conv1\.conv|conv2\.conv)\.(\w+)", key):
            index = sum(f"backbone.layer{m[1]}.{p}" in present for p in parts[: parts.index(m[2])])
            key = f"features.{m[1]}.block.{index}.{child[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"head\.layers\.([01])\.fc\.(\w+)", key):
            key = f"classifier.{3 * int(m[1])}.{m[2]}"
        else:
            raise KeyError(f"unexpected mmpretrain MobileNetV3 key {key}")
        out[key] = value
    return out


def mobilenet_v3_small(num_classes: int = 1000) -> MobileNetV3:
    return MobileNetV3(**ARCHS["small"], num_classes=num_classes)


def mobilenet_v3_large(num_classes: int = 1000) -> MobileNetV3:
    return MobileNetV3(**ARCHS["large"], num_classes=num_classes)

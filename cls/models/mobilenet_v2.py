"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").

Names follow torchvision's `mobilenet_v2`, so its checkpoints load unchanged; `from_mmpretrain` renames
mmpretrain's MobileNetV2 + LinearClsHead. `features` is a plain nn.Sequential indexed as torchvision's:
`features[0]` stem, `features[1:18]` the 17 inverted residuals, `features[18]` the 1x1 conv to 1280 channels.
Detection taps it by index (mmdet's SSDLite `out_indices=(4, 7)` = outputs of `features[13]`, 96 channels at
stride 16, and `features[18]`, 1280 channels at stride 32).
"""
import re

import torch
from torch import nn

from cls.models.layers import ConvNormAct, NormLayer, init_weights, make_divisible

# Table 2 of the paper: expansion t, output channels c, repeats n, first stride s of each stage.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 project with no activation (the "linear bottleneck", sec. 3.2)."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, norm: NormLayer
    ) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(in_channels, hidden, 1, norm=norm, act=nn.ReLU6))
        layers += [
            ConvNormAct(hidden, hidden, 3, stride, groups=hidden, norm=norm, act=nn.ReLU6),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            norm(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """`norm` is swappable because detectors train it otherwise (mmdet's SSDLite: eps=1e-3, momentum=0.03)."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        norm: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        in_channels = make_divisible(32 * width_mult)
        # The last conv only widens, never narrows (paper sec. 6.1: "we do not apply it to the last layer").
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvNormAct(3, in_channels, 3, stride=2, norm=norm, act=nn.ReLU6)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_channels = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_channels, out_channels, s if i == 0 else 1, t, norm))
                in_channels = out_channels
        layers.append(ConvNormAct(in_channels, self.last_channel, 1, norm=norm, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))

        # torchvision's init.
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((2, 3))  # [B, C] global average pool
        return self.classifier(x)


def from_mmpretrain(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an mmpretrain MobileNetV2 checkpoint (mmcv ConvModules `conv`/`bn`) to our names.

    mmpretrain numbers blocks per stage (`layer1.0` .. `layer7.0`), torchvision flat along `features`, so
    block j of stage L sits at `features[first[L] + j]`. Inside a block mmpretrain has a ConvModule per conv;
    torchvision keeps expand / depthwise as ConvNormAct (`conv.k.0`, `conv.k.1`) but spreads the final linear
    projection over two children (`conv.k` conv, `conv.k+1` norm).
    """
    first = [1]  # features[0] is the stem
    for _, _, n, _ in INVERTED_RESIDUAL_SETTING:
        first.append(first[-1] + n)
    child = {"conv": "0", "bn": "1"}
    out = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r"backbone\.conv([12])\.(conv|bn)\.(.+)", key):
            index = 0 if m[1] == "1" else first[-1]
            key = f"features.{index}.{child[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"backbone\.layer(\d)\.(\d+)\.conv\.(\d)\.(conv|bn)\.(.+)", key):
            stage, k = int(m[1]) - 1, int(m[3])
            project = 1 if INVERTED_RESIDUAL_SETTING[stage][0] == 1 else 2  # no expand conv when t == 1
            name = f"{k + (m[4] == 'bn')}" if k == project else f"{k}.{child[m[4]]}"
            key = f"features.{first[stage] + int(m[2])}.conv.{name}.{m[5]}"
        elif key.startswith("head.fc."):
            key = key.replace("head.fc.", "classifier.1.")
        else:
            raise KeyError(f"unexpected mmpretrain MobileNetV2 key {key}")
        out[key] = value
    return out


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)

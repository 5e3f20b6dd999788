"""ShuffleNetV2 (Ma et al. 2018, "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design").

Names follow torchvision's `shufflenet_v2_x*`, so its checkpoints load unchanged; `from_mmpretrain` renames
mmpretrain's ShuffleNetV2 + LinearClsHead. The branches are flat nn.Sequentials (conv, bn, relu, ...) as in
torchvision, hence no ConvNormAct inside them.
"""
import re

import torch
from torch import nn

from cls.models.layers import ConvNormAct

STAGE_REPEATS = (4, 8, 4)
# Table 5 of the paper: output channels of conv1, stage2-4 and conv5 for each width.
STAGE_OUT_CHANNELS = {
    "x0_5": (24, 48, 96, 192, 1024),
    "x1_0": (24, 116, 232, 464, 1024),
    "x1_5": (24, 176, 352, 704, 1024),
    "x2_0": (24, 244, 488, 976, 2048),
}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    # [B, g, C/g, H, W] -> [B, C/g, g, H, W]: interleave the groups so information crosses branches (sec. 3).
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _depthwise_bn(channels: int, stride: int) -> list[nn.Module]:
    conv = nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)
    return [conv, nn.BatchNorm2d(channels)]


def _pointwise_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class InvertedResidual(nn.Module):
    """Paper fig. 3(c) (stride 1: split channels, transform one half) and 3(d) (stride 2: no split)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = out_channels // 2
        if stride > 1:  # with stride 1 the split-off half passes through untouched
            self.branch1 = nn.Sequential(
                *_depthwise_bn(in_channels, stride), *_pointwise_bn_relu(in_channels, branch)
            )
        self.branch2 = nn.Sequential(
            *_pointwise_bn_relu(in_channels if stride > 1 else branch, branch),
            *_depthwise_bn(branch, stride),
            *_pointwise_bn_relu(branch, branch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)  # [B, C/2, H, W] each
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """Initialised with PyTorch's defaults, as torchvision's twin."""

    def __init__(self, stage_out_channels: tuple[int, ...], num_classes: int = 1000) -> None:
        super().__init__()
        in_channels = stage_out_channels[0]
        self.conv1 = ConvNormAct(3, in_channels, 3, stride=2)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, repeats in enumerate(STAGE_REPEATS):
            out_channels = stage_out_channels[i + 1]
            blocks = [InvertedResidual(in_channels, out_channels, 2)]
            blocks += [InvertedResidual(out_channels, out_channels, 1) for _ in range(repeats - 1)]
            # The paper's names stage2-4 (conv1 and the max-pool are its stage 1).
            setattr(self, f"stage{i + 2}", nn.Sequential(*blocks))
            in_channels = out_channels
        self.conv5 = ConvNormAct(in_channels, stage_out_channels[-1], 1)
        self.fc = nn.Linear(stage_out_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean((2, 3)))  # [B, C] global average pool


def from_mmpretrain(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an mmpretrain ShuffleNetV2 checkpoint (mmcv ConvModules `conv`/`bn`) to our names.

    mmpretrain's `layers.0-2` are the stages `stage2-4` and `layers.3` is `conv5`. Its branches hold one
    ConvModule per conv; torchvision's are flat: branch1 = (dw, bn, pw, bn, relu) has its convs at children
    0, 2 and branch2 = (pw, bn, relu, dw, bn, pw, bn, relu) at 0, 3, 5; each conv's norm is the next child.
    """
    first_child = {"branch1": (0, 2), "branch2": (0, 3, 5)}
    bn_offset = {"conv": 0, "bn": 1}
    out = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r"backbone\.(conv1|layers\.3)\.(conv|bn)\.(.+)", key):
            key = f"{'conv1' if m[1] == 'conv1' else 'conv5'}.{bn_offset[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"backbone\.layers\.(\d)\.(\d+)\.(branch[12])\.(\d)\.(conv|bn)\.(.+)", key):
            child = first_child[m[3]][int(m[4])] + bn_offset[m[5]]
            key = f"stage{int(m[1]) + 2}.{m[2]}.{m[3]}.{child}.{m[6]}"
        elif key.startswith("head.fc."):
            key = key.removeprefix("head.")
        else:
            raise KeyError(f"unexpected mmpretrain ShuffleNetV2 key {key}")
        out[key] = value
    return out


def shufflenet_v2_x0_5(num_classes: int = 1000) -> ShuffleNetV2:
    return ShuffleNetV2(STAGE_OUT_CHANNELS["x0_5"], num_classes=num_classes)


def shufflenet_v2_x1_0(num_classes: int = 1000) -> ShuffleNetV2:
    return ShuffleNetV2(STAGE_OUT_CHANNELS["x1_0"], num_classes=num_classes)


def shufflenet_v2_x1_5(num_classes: int = 1000) -> ShuffleNetV2:
    return ShuffleNetV2(STAGE_OUT_CHANNELS["x1_5"], num_classes=num_classes)


def shufflenet_v2_x2_0(num_classes: int = 1000) -> ShuffleNetV2:
    return ShuffleNetV2(STAGE_OUT_CHANNELS["x2_0"], num_classes=num_classes)

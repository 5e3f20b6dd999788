"""Small building blocks shared by several model families.

Two conv-norm-activation blocks exist because two checkpoint formats name them differently:
`ConvNormAct` is torchvision's `Conv2dNormActivation` (children `0`, `1`, `2`), used by the families that have
a torchvision twin; `ConvModule` is mmcv's (children `conv`, `bn`, `activate`), used by the families whose
only public weights are OpenMMLab's. Same maths, names chosen so that checkpoints load unchanged.
"""
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10 % below `value`.

    The rule of the MobileNetV2 reference code, used by torchvision and mmcv alike.
    """
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def init_weights(model: nn.Module, linear_std: float = 0.01) -> None:
    """The initialisation torchvision's ResNet/VGG/MobileNets and mmcls's heads share: Kaiming-normal convs
    (fan_out, ReLU gain; He et al. 2015) with zero bias, norm layers at scale 1 / shift 0, linears N(0, std)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


def rename_keys(
    state_dict: dict[str, torch.Tensor], rules: Sequence[tuple[str, str | Callable]], family: str
) -> dict[str, torch.Tensor]:
    """A new state dict whose keys went through the first matching `(regex, replacement)` rule (`re.sub`,
    first occurrence); a key that no rule matches is an error, so a checkpoint of another family is not
    half-loaded silently."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            new, matched = re.subn(pattern, replacement, key, count=1)
            if matched:
                out[new] = value
                break
        else:
            raise KeyError(f"no {family} rule for mmpretrain key {key!r}")
    return out


class ConvNormAct(nn.Sequential):
    """Conv2d -> norm -> activation, children named `0`, `1`, `2` as torchvision's Conv2dNormActivation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        norm: NormLayer | None = nn.BatchNorm2d,
        act: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=norm is None)
        ]
        if norm is not None:
            layers.append(norm(out_channels))
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class ConvModule(nn.Module):
    """Conv2d -> BatchNorm -> activation, attributes named `conv`, `bn`, `activate` as mmcv's ConvModule."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dilation: int = 1,
        norm: NormLayer | None = nn.BatchNorm2d,
        act: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation if padding is None else padding
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=norm is None
        )
        self.bn = norm(out_channels) if norm is not None else nn.Identity()
        self.activate = act(inplace=True) if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SqueezeExcitation(nn.Module):
    """Channel attention of SENet (Hu et al. 2018, eq. 2-3) with torchvision's names `fc1`, `fc2`."""

    def __init__(
        self,
        channels: int,
        squeeze_channels: int,
        act: type[nn.Module] = nn.ReLU,
        gate: type[nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = act()
        self.scale_activation = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale

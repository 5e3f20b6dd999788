"""VGG (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", 2015).

Names follow torchvision's `VGG` (a flat `features` Sequential, `avgpool`, `classifier`), so torchvision
checkpoints load unchanged; `from_mmpretrain` renames OpenMMLab's checkpoints onto the same indices.
"""
import re

import torch
from torch import nn

from cls.models.layers import init_weights

# Table 1 of the paper, columns A, B, D, E: conv widths, "M" = 2x2 max-pool. Keyed by depth (convs + 3 fc).
# Module level so that detectors (SSD's VGG-16 body) can rebuild the trunk with their own pooling.
VGG_CFGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


def make_features(cfg: tuple[int | str, ...], batch_norm: bool = False, in_channels: int = 3) -> nn.Sequential:
    """The conv trunk as one flat Sequential: conv, [bn,] relu per width, one MaxPool2d per "M".

    Flat (not nested conv blocks) because torchvision's checkpoints index it as `features.<i>`.
    """
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        assert isinstance(v, int)
        # The conv keeps its bias even before BatchNorm, as in torchvision's and mmpretrain's vgg*_bn weights.
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Conv trunk, then the paper's three fully connected layers (4096, 4096, num_classes) on a 7x7 map."""

    def __init__(
        self,
        *,
        cfg: tuple[int | str, ...],
        batch_norm: bool = False,
        num_classes: int = 1000,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = make_features(cfg, batch_norm=batch_norm)
        # The fc layers were sized for 224 px (7x7 after five pools); adaptive pooling to 7x7 (torchvision)
        # lets any input size >= 32 px reuse them (at 64 px the 2x2 map is resampled to 7x7).
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        # torchvision's init, which is also mmpretrain's VGG init_cfg (Kaiming fan_out, BN 1/0, fc N(0, 0.01)).
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))  # [B, 512, 7, 7]
        return self.classifier(torch.flatten(x, 1))  # [B, num_classes]


def from_mmpretrain(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an mmpretrain VGG checkpoint (`backbone.features.<i>.{conv,bn}.*`, `backbone.classifier.*`).

    mmpretrain's `features` holds one ConvModule (conv, [bn,] relu) per conv and one entry per MaxPool;
    torchvision spends `per_conv` = 2 or 3 entries on each conv. So mmpretrain entry i sits at
    i + (per_conv - 1) * (number of convs before i) in ours, and its bn one entry after its conv.
    The head (`ClsHead`) has no parameters: the classifier lives in mmpretrain's backbone, same indices.
    """
    conv_entries = {
        int(m[1]) for key in state_dict if (m := re.match(r"backbone\.features\.(\d+)\.conv\.", key))
    }
    per_conv = 3 if any(re.match(r"backbone\.features\.\d+\.bn\.", key) for key in state_dict) else 2
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"backbone\.features\.(\d+)\.(conv|bn)\.(.+)", key)
        if m is None:
            out[key.removeprefix("backbone.")] = value
            continue
        i = int(m[1])
        index = i + (per_conv - 1) * sum(c < i for c in conv_entries) + (m[2] == "bn")
        out[f"features.{index}.{m[3]}"] = value
    return out


def vgg11(num_classes: int = 1000) -> VGG:
    return VGG(cfg=VGG_CFGS[11], num_classes=num_classes)


def vgg13(num_classes: int = 1000) -> VGG:
    return VGG(cfg=VGG_CFGS[13], num_classes=num_classes)


def vgg16(num_classes: int = 1000) -> VGG:
    return VGG(cfg=VGG_CFGS[16], num_classes=num_classes)


def vgg19(num_classes: int = 1000) -> VGG:
    return VGG(cfg=VGG_CFGS[19], num_classes=num_classes)


def vgg11_bn(num_classes: int = 1000) -> VGG:
    return VGG(cfg=VGG_CFGS[11], batch_norm=True, num_classes=num_classes)


def vgg13_bn(num_classes: int = 1000) -> VGG:
    return VGG(cfg=VGG_CFGS[13], batch_norm=True, num_classes=num_classes)


def vgg16_bn(num_classes: int = 1000) -> VGG:
    return VGG(cfg=VGG_CFGS[16], batch_norm=True, num_classes=num_classes)


def vgg19_bn(num_classes: int = 1000) -> VGG:
    return VGG(cfg=VGG_CFGS[19], batch_norm=True, num_classes=num_classes)

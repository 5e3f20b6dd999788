"""ResNet (He et al. 2016), ResNeXt (Xie et al. 2017), ResNet-D (He et al. 2019), SE-ResNet (Hu et al. 2018).

One network, switched by data: `groups`/`width_per_group` (ResNeXt), `deep_stem`/`avg_down` (ResNet-D, mmcls
ResNetV1d) and `se_ratio` (SE-ResNet). Names are torchvision's (`conv1`, `bn1`, `layer1`..`layer4`, `fc`),
which mmcls shares; the parts torchvision lacks take mmcls's names: the deep stem `stem.{0,1,2}.{conv,bn}`,
the ResNet-D shortcut `downsample.{0: AvgPool, 1: conv, 2: bn}` and the SE layer `se_layer.conv{1,2}.conv`.
"""

import torch
from torch import nn

from cls.models.layers import ConvModule, init_weights, make_divisible, rename_keys


class SELayer(nn.Module):
    """mmcls's SELayer: the SE gate of Hu et al. (eq. 2-3) with each 1x1 conv wrapped in a ConvModule.

    layers.SqueezeExcitation is the same maths under torchvision's names (`fc1`, `fc2`); the only SE-ResNet
    weights are mmcls's, so this one keeps theirs.
    """

    def __init__(self, channels: int, ratio: int = 16) -> None:
        super().__init__()
        squeeze = make_divisible(channels // ratio, 8)  # mmcls SELayer: divisor 8
        self.conv1 = ConvModule(channels, squeeze, 1, norm=None)
        # The sigmoid is applied in forward: ConvModule builds its activation with `inplace=True`, which
        # nn.Sigmoid does not take.
        self.conv2 = ConvModule(squeeze, channels, 1, norm=None, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.conv2(self.conv1(x.mean((2, 3), keepdim=True))))  # [B, C, 1, 1]
        return x * gate


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Takes Bottleneck's switches only to reject the ones it has no use for."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        se_ratio: int | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or width_per_group != 64 or se_ratio is not None:
            raise ValueError("BasicBlock supports only groups=1, width_per_group=64 and no SE layer")
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (grouped for ResNeXt) -> 1x1 expand, optional SE gate before the residual sum.

    The stride sits on the 3x3 conv ("ResNet v1.5", torchvision's and mmcls's style='pytorch').
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        se_ratio: int | None = None,
    ) -> None:
        super().__init__()
        # ResNeXt template (Xie et al. Table 1): cardinality x bottleneck width, e.g. 32x4d -> 128 in stage 1.
        width = planes * width_per_group // 64 * groups
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        # SE-ResNet module (Hu et al. Fig. 3): gate the residual branch, then add the identity.
        self.se_layer = SELayer(out_channels, se_ratio) if se_ratio is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se_layer is not None:
            out = self.se_layer(out)
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int, avg_down: bool) -> nn.Sequential:
    if avg_down and stride != 1:
        # ResNet-D (He et al. 2019, Fig. 2c): a strided 1x1 conv ignores 3/4 of its input, so average-pool
        # first and keep the conv at stride 1. Pool settings from mmcls ResLayer.
        return nn.Sequential(
            nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class ResNet(nn.Module):
    """Stem (stride 4) -> four residual stages (strides 4, 8, 16, 32) -> global average pool -> fc."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        groups: int = 1,
        width_per_group: int = 64,
        deep_stem: bool = False,
        avg_down: bool = False,
        se_ratio: int | None = None,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        self.deep_stem = deep_stem
        if deep_stem:
            # ResNet-C (He et al. 2019, Fig. 2b): three 3x3 convs (32, 32, 64 channels) replace the 7x7.
            self.stem = nn.Sequential(ConvModule(3, 32, 3, 2), ConvModule(32, 32, 3), ConvModule(32, 64, 3))
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)

        in_channels = 64
        stages = []
        for i, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            out_channels = planes * block.expansion
            downsample = None
            if stride != 1 or in_channels != out_channels:
                downsample = _shortcut(in_channels, out_channels, stride, avg_down)
            blocks = [block(in_channels, planes, stride, downsample, groups, width_per_group, se_ratio)]
            blocks += [
                block(out_channels, planes, 1, None, groups, width_per_group, se_ratio) for _ in range(num_blocks - 1)
            ]
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # mmcls ResNet init_cfg: Kaiming-normal (fan_out) convs, BN 1/0; LinearClsHead N(0, 0.01), bias 0
        # (torchvision agrees, except that it keeps nn.Linear's default init for fc).
        init_weights(self)
        # mmcls defaults zero_init_residual=True (torchvision: False): the last BN of every block starts at 0
        # so each block begins as the identity (Goyal et al. 2017, Sec. 5.1), which eases early training.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> outputs of layer1..layer4, strides 4, 8, 16, 32 (C2-C5 for detection necks)."""
        x = self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.stages(x)[-1]).flatten(1)  # [B, C5]
        return self.fc(x)


# mmpretrain ImageClassifier: `backbone.*` is our trunk under the same names, the neck (global average
# pooling) has no weights, and LinearClsHead keeps its linear layer at `head.fc`.
_MMPRETRAIN_RULES = [(r"^backbone\.", ""), (r"^head\.fc\.", "fc.")]


def from_mmpretrain(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an mmpretrain ResNet / ResNeXt / ResNetV1d / SEResNet `state_dict` onto this file's names."""
    return rename_keys(state_dict, _MMPRETRAIN_RULES, "ResNet")


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes)


def resnet101(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes=num_classes)


def resnet152(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes=num_classes)


def resnext50_32x4d(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, groups=32, width_per_group=4)


def resnext101_32x4d(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes=num_classes, groups=32, width_per_group=4)


def resnext101_32x8d(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes=num_classes, groups=32, width_per_group=8)


def resnetv1d50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, deep_stem=True, avg_down=True)


def resnetv1d101(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes=num_classes, deep_stem=True, avg_down=True)


def resnetv1d152(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes=num_classes, deep_stem=True, avg_down=True)


def seresnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, se_ratio=16)


def seresnet101(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes=num_classes, se_ratio=16)

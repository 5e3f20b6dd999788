"""CSPNet (Wang et al., "CSPNet: A New Backbone that can Enhance Learning Capability of CNN", CVPRW 2020).

CSPResNet-50, CSPResNeXt-50 and CSPDarkNet-53 exactly as mmpretrain 1.2.0 builds them (`backbones/cspnet.py`):
one `CSPStage` class, the three networks differ only in their stage tables and in the `darknet` switch.
torchvision has no twin, so names are mmpretrain's with `backbone.` stripped (including its misspelt
`atfer_blocks_conv`) and the head's linear is `fc`, as in our ResNets: `from_mmpretrain` is a prefix change.

mmpretrain's configs give every layer `act_cfg=dict(type='LeakyReLU')`, i.e. torch's default slope 0.01
(the docstrings there say 0.1, the code builds 0.01), including inside the ResNet/ResNeXt bottlenecks.
"""
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from cls.models.layers import ConvModule, rename_keys

Act = nn.LeakyReLU

# One row per stage: (in_channels, out_channels, num_blocks, expand_ratio, bottle_ratio, has_downsampler),
# from the `arch_settings` of mmpretrain's CSPResNet / CSPResNeXt / CSPDarkNet.
StageSpec = tuple[int, int, int, float, float, bool]
CSPRESNET50: tuple[StageSpec, ...] = (
    (64, 128, 3, 4, 2, False), (128, 256, 3, 4, 2, True),
    (256, 512, 5, 4, 2, True), (512, 1024, 2, 4, 2, True),
)
# mmpretrain's ResNeXt bottleneck (expansion 4, groups 32, width_per_group 4, base_channels 32) has
# 32 * 4 * (c / 4) / 32 = c mid channels, i.e. bottle_ratio 1 in our terms.
CSPRESNEXT50: tuple[StageSpec, ...] = (
    (64, 256, 3, 4, 1, False), (256, 512, 3, 2, 1, True),
    (512, 1024, 5, 2, 1, True), (1024, 2048, 2, 2, 1, True),
)
CSPDARKNET53: tuple[StageSpec, ...] = (
    (32, 64, 1, 2, 2, True), (64, 128, 2, 1, 1, True), (128, 256, 8, 1, 1, True),
    (256, 512, 8, 1, 1, True), (512, 1024, 4, 1, 1, True),
)


class ResNetBottleneck(nn.Module):
    """1x1 -> 3x3 (grouped for ResNeXt) -> 1x1, plus identity; names of mmpretrain's ResNet `Bottleneck`."""

    def __init__(self, channels: int, mid_channels: int, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu = Act(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + x)


class DarknetBottleneck(nn.Module):
    """1x1 -> 3x3 conv-bn-act, plus identity (no activation after the sum), as YOLOv3's residual unit."""

    def __init__(self, channels: int, mid_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvModule(channels, mid_channels, 1, act=Act)
        self.conv2 = ConvModule(mid_channels, channels, 3, act=Act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class CSPStage(nn.Module):
    """Cross Stage Partial stage (paper fig. 2(b), "fusion last" with a transition on the block path).

    Optional stride-2 conv -> 1x1 expand -> split channels into halves xa, xb; only xb runs through the
    blocks and a 1x1 transition; concat(xa, xb) -> 1x1 final conv. xa bypassing the blocks is the paper's
    cross-stage partial connection, which stops the blocks' gradients being duplicated (sec. 3.1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        *,
        block: Callable[[int, int], nn.Module],
        expand_ratio: float,
        bottle_ratio: float,
        has_downsampler: bool,
        down_growth: bool,
        expand_act: bool,
        groups: int = 1,
    ) -> None:
        super().__init__()
        down_channels = out_channels if down_growth else in_channels
        self.downsample_conv = (
            ConvModule(in_channels, down_channels, 3, stride=2, groups=groups, act=Act)
            if has_downsampler else nn.Identity()
        )
        exp_channels = int(down_channels * expand_ratio)
        # mmpretrain gives the expand conv an activation only in CSPDarkNet.
        self.expand_conv = ConvModule(down_channels, exp_channels, 1, act=Act if expand_act else None)
        half = exp_channels // 2
        self.blocks = nn.Sequential(*(block(half, int(half / bottle_ratio)) for _ in range(num_blocks)))
        self.atfer_blocks_conv = ConvModule(half, half, 1, act=Act)  # sic, mmpretrain's spelling
        self.final_conv = ConvModule(2 * half, out_channels, 1, act=Act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.expand_conv(self.downsample_conv(x))
        xa, xb = x.chunk(2, dim=1)  # [B, C/2, H, W] each
        xb = self.atfer_blocks_conv(self.blocks(xb))
        return self.final_conv(torch.cat((xa, xb), dim=1))  # [B, C, H, W] -> [B, out_channels, H, W]


class CSPNet(nn.Module):
    """Stem, CSP stages, global average pool, linear classifier.

    `darknet=False` is mmpretrain's CSPResNet/CSPResNeXt: 7x7/2 conv + 3x3/2 max-pool stem, ResNet
    bottlenecks, stage widths kept by the downsampler, linear expand conv. `darknet=True` is CSPDarkNet:
    3x3/1 conv stem, Darknet bottlenecks, the downsampler already widens to the stage's output, activated
    expand conv. `groups` is the ResNeXt cardinality, used by both the downsampler and the 3x3 in the blocks.
    """

    def __init__(
        self,
        stages: Sequence[StageSpec],
        *,
        darknet: bool = False,
        groups: int = 1,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        stem_channels = stages[0][0]
        if darknet:
            self.stem: nn.Module = ConvModule(3, stem_channels, 3, act=Act)
            block: Callable[[int, int], nn.Module] = DarknetBottleneck
        else:
            self.stem = nn.Sequential(
                ConvModule(3, stem_channels, 7, stride=2, act=Act), nn.MaxPool2d(3, stride=2, padding=1)
            )
            block = partial(ResNetBottleneck, groups=groups)
        self.stages = nn.Sequential(*(
            CSPStage(
                cin, cout, n, block=block, expand_ratio=expand, bottle_ratio=bottle, has_downsampler=down,
                down_growth=darknet, expand_act=darknet, groups=groups,
            )
            for cin, cout, n, expand, bottle, down in stages
        ))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(stages[-1][1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The state mmpretrain's init_weights() leaves: Kaiming normal (fan_out) on every conv, with relu gain
        # from CSPNet's init_cfg for the bottleneck convs, then mmcv's ConvModule.init_weights re-inits its
        # own conv with the gain of its LeakyReLU (relu gain if it has no activation); CSPDarkNet's uniform
        # init_cfg thus survives nowhere. LinearClsHead: Normal(std=0.01), bias 0. BatchNorm: 1, 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, ConvModule) and isinstance(m.activate, nn.LeakyReLU):
                nn.init.kaiming_normal_(
                    m.conv.weight, a=m.activate.negative_slope, mode="fan_out", nonlinearity="leaky_relu"
                )
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # [B, C, h, w] -> [B, C] -> [B, num_classes]


# mmpretrain ImageClassifier: backbone.* -> ours; its GlobalAveragePooling neck has no weights; head.fc -> fc.
_MMPRETRAIN_RULES = ((r"^backbone\.", ""), (r"^head\.fc\.", "fc."))


def from_mmpretrain(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an mmpretrain CSPResNet/CSPResNeXt/CSPDarkNet checkpoint onto ours (prefix change only)."""
    return rename_keys(state_dict, _MMPRETRAIN_RULES, "CSPNet")


def cspresnet50(num_classes: int = 1000) -> CSPNet:
    return CSPNet(CSPRESNET50, num_classes=num_classes)


def cspresnext50(num_classes: int = 1000) -> CSPNet:
    return CSPNet(CSPRESNEXT50, groups=32, num_classes=num_classes)


def cspdarknet53(num_classes: int = 1000) -> CSPNet:
    """mmpretrain's config is named `cspdarknet50_8xb32_in1k.py` but builds CSPDarkNet(depth=53)."""
    return CSPNet(CSPDARKNET53, darknet=True, num_classes=num_classes)

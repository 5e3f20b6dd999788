"""HRNet for classification (Wang et al. 2019, "Deep High-Resolution Representation Learning"), as mmpretrain.

The backbone keeps a high-resolution branch through the whole network and adds a branch at half the resolution
(twice the channels) in each of stages 2-4; inside a stage, every HRModule runs residual blocks on each branch
and then fuses all branches into each one. The classification neck (mmpretrain's HRFuseScales) widens each
branch with a Bottleneck and folds the four resolutions into one map by strided convs, then pools into `fc`.

Names follow mmpretrain's `backbone.*` with the prefix stripped, its neck as `neck`, its `head.fc` as `fc`
(the name of the ResNet siblings), so an OpenMMLab checkpoint loads after `from_mmpretrain`, a prefix change.
"""
from typing import NamedTuple

import torch
from torch import nn

from cls.models.layers import ConvModule, ConvNormAct, rename_keys
from cls.models.resnet import BasicBlock, Bottleneck

Block = type[BasicBlock] | type[Bottleneck]


def _res_layer(block: Block, in_channels: int, out_channels: int, num_blocks: int) -> nn.Sequential:
    """ResNet blocks (resnet.py's, as mmpretrain's HRNet reuses its ResNet's); the first one gets a 1x1 conv + BN
    shortcut where the width changes (never strided in HRNet)."""
    shortcut = None
    if in_channels != out_channels:
        shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
    planes = out_channels // block.expansion
    rest = [block(out_channels, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(block(in_channels, planes, 1, shortcut), *rest)


def _strided_convs(in_channels: int, out_channels: int, steps: int, last_relu: bool) -> nn.Sequential:
    """`steps` stride-2 3x3 conv + BN + ReLU keeping the width; the last one changes it (ReLU iff last_relu)."""
    convs = [ConvNormAct(in_channels, in_channels, 3, stride=2) for _ in range(steps - 1)]
    last = ConvNormAct(in_channels, out_channels, 3, stride=2, act=nn.ReLU if last_relu else None)
    return nn.Sequential(*convs, last)


class HRModule(nn.Module):
    """Residual blocks on every branch, then each output branch i sums all branches j brought to its shape.

    Branch j > i (coarser) is upsampled: 1x1 conv + BN to branch i's width, nearest x 2^(j-i).
    Branch j < i (finer) is downsampled by i-j strided 3x3 convs; j == i passes through.
    """

    def __init__(self, block: Block, num_blocks: tuple[int, ...], channels: list[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            _res_layer(block, c, c, n) for c, n in zip(channels, num_blocks, strict=True)
        )
        self.fuse_layers = nn.ModuleList()
        for i, c_i in enumerate(channels):
            fuse: list[nn.Module] = []
            for j, c_j in enumerate(channels):
                if j > i:
                    fuse.append(nn.Sequential(
                        nn.Conv2d(c_j, c_i, 1, bias=False),
                        nn.BatchNorm2d(c_i),
                        nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"),
                    ))
                elif j == i:
                    fuse.append(nn.Identity())  # parameter-free, so the checkpoint's indices are unchanged
                else:
                    fuse.append(_strided_convs(c_j, c_i, i - j, last_relu=False))  # ReLU follows the sum
            self.fuse_layers.append(nn.ModuleList(fuse))
        self.relu = nn.ReLU()

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        # branch i: [B, C_i, H / 2^i, W / 2^i]
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        return [self.relu(sum(f(x) for f, x in zip(fuse, xs, strict=True))) for fuse in self.fuse_layers]


class HRFuseScales(nn.Module):
    """mmpretrain's classification neck: widen branches to 128/256/512/1024, fold fine to coarse, 1x1 conv."""

    widths = (128, 256, 512, 1024)

    def __init__(self, in_channels: list[int], out_channels: int = 2048) -> None:
        super().__init__()
        self.increase_layers = nn.ModuleList(
            _res_layer(Bottleneck, c, w, 1) for c, w in zip(in_channels, self.widths, strict=True)
        )
        self.downsample_layers = nn.ModuleList(
            ConvModule(c_in, c_out, 3, stride=2)
            for c_in, c_out in zip(self.widths[:-1], self.widths[1:], strict=True)
        )
        self.final_layer = ConvModule(self.widths[-1], out_channels, 1)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        feat = self.increase_layers[0](xs[0])
        for down, increase, x in zip(self.downsample_layers, self.increase_layers[1:], xs[1:], strict=True):
            feat = down(feat) + increase(x)
        return self.final_layer(feat)  # [B, out_channels, H / 32, W / 32]


class Stage(NamedTuple):
    """One row of mmpretrain's HRNet.arch_zoo; the number of branches is len(num_channels)."""

    num_modules: int
    block: Block
    num_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]  # before the block's expansion


def hrnet_stages(width: int) -> tuple[Stage, ...]:
    """Every published HRNet: a ResNet stage 1, then 1/4/3 HRModules on 2/3/4 branches of width * 2^i."""
    return (
        Stage(1, Bottleneck, (4,), (64,)),
        Stage(1, BasicBlock, (4, 4), (width, 2 * width)),
        Stage(4, BasicBlock, (4, 4, 4), (width, 2 * width, 4 * width)),
        Stage(3, BasicBlock, (4, 4, 4, 4), (width, 2 * width, 4 * width, 8 * width)),
    )


class HRNet(nn.Module):
    """[B, 3, H, W] -> logits [B, num_classes]; H and W multiples of 32, so that upsampled branches align."""

    def __init__(self, stages: tuple[Stage, ...], num_classes: int = 1000, neck_channels: int = 2048) -> None:
        super().__init__()
        # stem: two stride-2 3x3 convs to 1/4 resolution
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        first = stages[0]  # a plain residual layer, named layer1 as in the original HRNet code
        channels = [first.num_channels[0] * first.block.expansion]
        self.layer1 = _res_layer(first.block, 64, channels[0], first.num_blocks[0])
        for i, stage in enumerate(stages[1:], start=1):
            new = [c * stage.block.expansion for c in stage.num_channels]
            self.add_module(f"transition{i}", self._transition(channels, new))
            modules = [HRModule(stage.block, stage.num_blocks, new) for _ in range(stage.num_modules)]
            self.add_module(f"stage{i + 1}", nn.Sequential(*modules))
            channels = new
        self.num_stages = len(stages)
        self.neck = HRFuseScales(channels, neck_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(neck_channels, num_classes)

        # mmpretrain's init: Kaiming-normal (fan_out) on the backbone's convs and on the neck's ConvModules
        # (mmcv inits those on construction); the neck's Bottlenecks keep PyTorch's default, as the neck's
        # init_cfg targets only Linear layers; BN (1, 0); LinearClsHead's fc ~ N(0, 0.01), bias 0.
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and not name.startswith("neck.increase_layers"):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    @staticmethod
    def _transition(old: list[int], new: list[int]) -> nn.ModuleList:
        """Adapt old branches' widths (3x3 conv); open each new, coarser branch from the coarsest old one."""
        layers: list[nn.Module] = []
        for i, c in enumerate(new):
            if i < len(old):
                layers.append(nn.Identity() if c == old[i] else ConvNormAct(old[i], c, 3))
            else:
                layers.append(_strided_convs(old[-1], c, i + 1 - len(old), last_relu=True))
        return nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]  # [B, 256, H / 4, W / 4]
        for i in range(1, self.num_stages):
            transition = getattr(self, f"transition{i}")
            # a new branch opens from the coarsest existing one
            xs = [t(xs[min(j, len(xs) - 1)]) for j, t in enumerate(transition)]
            xs = getattr(self, f"stage{i + 1}")(xs)
        x = torch.flatten(self.avgpool(self.neck(xs)), 1)  # [B, neck_channels]
        return self.fc(x)


# mmpretrain -> ours: strip `backbone.`; its neck is Sequential(HRFuseScales, GAP); its head.fc is our fc.
_MMPRETRAIN_RENAMES = [(r"^backbone\.", ""), (r"^neck\.0\.", "neck."), (r"^head\.fc\.", "fc.")]


def from_mmpretrain(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return rename_keys(state_dict, _MMPRETRAIN_RENAMES, "HRNet")


def hrnet_w18(num_classes: int = 1000) -> HRNet:
    return HRNet(hrnet_stages(18), num_classes=num_classes)


def hrnet_w32(num_classes: int = 1000) -> HRNet:
    return HRNet(hrnet_stages(32), num_classes=num_classes)


def hrnet_w48(num_classes: int = 1000) -> HRNet:
    return HRNet(hrnet_stages(48), num_classes=num_classes)

"""CSPDarknet, the backbone of YOLOv5 and YOLOX, as mmdet 3.3.0 builds it (models/backbones/csp_darknet.py and
models/layers/csp_layer.py): a Focus stem, then four stages of a stride-2 3x3 conv and a Cross Stage Partial layer
(Wang et al. 2020, "CSPNet"), the last with YOLOv3-SPP's spatial pyramid pooling before it.

Every conv is mmcv's ConvModule (conv without bias, BatchNorm, Swish = SiLU); parameter names are mmdet's
(`stem.conv.conv.weight`, `stage1.0.conv.weight`, `stage1.1.main_conv.bn.bias`, ...), so its checkpoints load as they
are. Conv weights keep PyTorch's default init, which is mmdet's init_cfg for these modules (Kaiming uniform,
a=sqrt(5), fan_in, leaky_relu); BatchNorms start at scale 1, shift 0.
"""
from functools import partial

import torch
from torch import Tensor, nn

from cls.models.layers import ConvModule

# mmdet's norm_cfg BN(momentum=0.03, eps=0.001): mmcv hands both to nn.BatchNorm2d unchanged, so 0.03 is PyTorch's
# momentum (the weight of each new batch statistic), as in Megvii's YOLOX
BatchNorm = partial(nn.BatchNorm2d, momentum=0.03, eps=0.001)

# mmdet CSPDarknet.arch_settings["P5"], per stage: in and out channels, CSP blocks, identity in the blocks, SPP
P5 = ((64, 128, 3, True, False), (128, 256, 9, True, False), (256, 512, 9, True, False), (512, 1024, 3, False, True))


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> ConvModule:
    """mmcv ConvModule(norm_cfg=BN(0.03, 1e-3), act_cfg=Swish), padding (k - 1) // 2 as every YOLOX conv."""
    return ConvModule(in_channels, out_channels, kernel_size, stride, norm=BatchNorm, act=nn.SiLU)


class Focus(nn.Module):
    """Space-to-depth: every 2x2 pixel block into channels (top-left, bottom-left, top-right, bottom-right, mmdet's
    order), then a 3x3 conv: [B, 3, H, W] -> [B, out, H / 2, W / 2]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = conv_bn_act(in_channels * 4, out_channels, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1))


class DarknetBottleneck(nn.Module):
    """1x1 conv to `expansion` x out channels, 3x3 conv back, plus the input when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, expansion: float = 0.5, add_identity: bool = True) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = conv_bn_act(in_channels, hidden, 1)
        self.conv2 = conv_bn_act(hidden, out_channels, 3)
        self.add_identity = add_identity and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class CSPLayer(nn.Module):
    """Cross Stage Partial layer: half the channels through `num_blocks` bottlenecks (main), half through one 1x1
    conv (short), concatenated (main first) and fused by a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 1, add_identity: bool = True,
                 expand_ratio: float = 0.5) -> None:
        super().__init__()
        mid = int(out_channels * expand_ratio)
        self.main_conv = conv_bn_act(in_channels, mid, 1)
        self.short_conv = conv_bn_act(in_channels, mid, 1)
        self.final_conv = conv_bn_act(2 * mid, out_channels, 1)
        self.blocks = nn.Sequential(*(DarknetBottleneck(mid, mid, 1.0, add_identity) for _ in range(num_blocks)))

    def forward(self, x: Tensor) -> Tensor:
        return self.final_conv(torch.cat([self.blocks(self.main_conv(x)), self.short_conv(x)], dim=1))


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling (He et al. 2014) as YOLOv3-SPP: a 1x1 conv halves the channels, stride-1 max pools
    of each kernel size are concatenated beside it, a 1x1 conv fuses them."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        mid = in_channels // 2
        self.conv1 = conv_bn_act(in_channels, mid, 1)
        self.poolings = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes)
        self.conv2 = conv_bn_act(mid * (len(kernel_sizes) + 1), out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.poolings], dim=1))


class CSPDarknet(nn.Module):
    """images [B, 3, H, W] -> the outputs of stages 2, 3, 4 (mmdet's out_indices (2, 3, 4), the stem being 0):
    [B, c_i, H / s, W / s] for s = 8, 16, 32, c_i = `out_channels`.

    deepen_factor scales the CSP blocks per stage (round, at least 1), widen_factor the channels (YOLOX-s: 0.33,
    0.5). H and W must be multiples of 32 for the necks that merge the levels again.
    """

    def __init__(self, deepen_factor: float = 1.0, widen_factor: float = 1.0, out_indices: tuple[int, ...] = (2, 3, 4),
                 spp_kernel_sizes: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        self.out_indices = out_indices
        self.stem = Focus(3, int(P5[0][0] * widen_factor), kernel_size=3)
        widths = [self.stem.conv.conv.out_channels]
        for i, (in_channels, out_channels, num_blocks, add_identity, use_spp) in enumerate(P5):
            in_channels, out_channels = int(in_channels * widen_factor), int(out_channels * widen_factor)
            stage = [conv_bn_act(in_channels, out_channels, 3, stride=2)]
            if use_spp:
                stage.append(SPPBottleneck(out_channels, out_channels, spp_kernel_sizes))
            stage.append(CSPLayer(out_channels, out_channels, max(round(num_blocks * deepen_factor), 1), add_identity))
            self.add_module(f"stage{i + 1}", nn.Sequential(*stage))
            widths.append(out_channels)
        self.out_channels = [widths[i] for i in out_indices]

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, name in enumerate(("stem", "stage1", "stage2", "stage3", "stage4")):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return outs

"""EfficientNet B0-B7 (Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019).

Names follow torchvision's `EfficientNet` (`features`, `avgpool`, `classifier`; MBConv children `block.<i>`),
so torchvision checkpoints load unchanged. `tf_same_padding=True` builds the network as TensorFlow runs it
(the released TF weights, which mmpretrain ports): every conv pads "SAME" from its input size, and BatchNorm
uses TF's eps 1e-3. `from_mmpretrain` renames OpenMMLab's checkpoints onto our names.
"""
import math
import re
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import StochasticDepth

from cls.models.layers import ConvNormAct, NormLayer, SqueezeExcitation, make_divisible

# AdvProp checkpoints (mmpretrain's efficientnet-b*_*-01norm_in1k, e.g. the seed B4) were trained on pixels
# scaled to [-1, 1]: mean = std = 0.5 on [0, 1] pixels, i.e. 127.5 / 127.5 on 0-255 (the config's
# data_preprocessor). torchvision's and the other mmpretrain EfficientNet weights use the ImageNet statistics.
ADVPROP_MEAN = (0.5, 0.5, 0.5)
ADVPROP_STD = (0.5, 0.5, 0.5)

# Eval crop per variant: the paper's compound-scaled resolution, mmpretrain's arch_settings and test crops
# (EfficientNetCenterCrop: crop / (crop + 32) of the short side, bicubic). torchvision's weights use the same
# crops except B2 (288).
INPUT_SIZES = {
    "efficientnet_b0": 224,
    "efficientnet_b1": 240,
    "efficientnet_b2": 260,
    "efficientnet_b3": 300,
    "efficientnet_b4": 380,
    "efficientnet_b5": 456,
    "efficientnet_b6": 528,
    "efficientnet_b7": 600,
}

# Table 1 of the paper (B0), one row per stage: expand ratio, kernel, stride, in / out channels, blocks.
# Channels are scaled by width_mult, block counts by depth_mult (ceil), as torchvision's MBConvConfig does.
STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding, as mmcv's Conv2dAdaptivePadding.

    TF pads so that out = ceil(in / stride), computed from each input's size; when the total padding is odd
    the extra pixel goes bottom / right, where PyTorch's fixed symmetric padding would shift the sampling grid
    by one pixel on stride-2 layers with even inputs.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return super().forward(F.pad(x, [left, right, top, bottom]))


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    *,
    norm: NormLayer,
    act: type[nn.Module] | None = nn.SiLU,
    tf_same_padding: bool = False,
) -> ConvNormAct:
    """ConvNormAct (names 0, 1, 2) whose conv becomes a Conv2dSame (same parameters) under TF padding."""
    layer = ConvNormAct(in_channels, out_channels, kernel_size, stride, groups, norm=norm, act=act)
    if tf_same_padding:
        layer[0] = Conv2dSame(in_channels, out_channels, kernel_size, stride, groups)
    return layer


class MBConv(nn.Module):
    """Inverted residual with squeeze-excitation (MobileNetV2 + SE, paper Sec. 4): 1x1 expand, kxk depthwise,
    SE, 1x1 linear projection; identity shortcut with stochastic depth when shapes allow."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        stochastic_depth_prob: float,
        norm: NormLayer,
        tf_same_padding: bool = False,
    ) -> None:
        super().__init__()
        conv = partial(conv_bn_act, norm=norm, tf_same_padding=tf_same_padding)
        mid = make_divisible(in_channels * expand_ratio)
        layers: list[nn.Module] = []
        if mid != in_channels:
            layers.append(conv(in_channels, mid, 1))
        layers += [
            conv(mid, mid, kernel_size, stride, groups=mid),
            # SE squeezes to a quarter of the block's *input* width (se_ratio 0.25 in the TF reference).
            SqueezeExcitation(mid, max(1, in_channels // 4), act=nn.SiLU),
            conv(mid, out_channels, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and in_channels == out_channels
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return self.stochastic_depth(out) + x if self.use_res_connect else out


class EfficientNet(nn.Module):
    """Stem, seven MBConv stages (features.1-7), 1x1 head conv to 4x the last width, pool, dropout, linear."""

    def __init__(
        self,
        *,
        width_mult: float,
        depth_mult: float,
        dropout: float,
        num_classes: int = 1000,
        stochastic_depth_prob: float = 0.2,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        tf_same_padding: bool = False,
    ) -> None:
        super().__init__()
        norm = partial(nn.BatchNorm2d, eps=bn_eps, momentum=bn_momentum)
        conv = partial(conv_bn_act, norm=norm, tf_same_padding=tf_same_padding)

        def width(channels: int) -> int:
            return make_divisible(channels * width_mult)

        stages = [
            (e, k, s, width(cin), width(cout), math.ceil(n * depth_mult)) for e, k, s, cin, cout, n in STAGES
        ]
        layers: list[nn.Module] = [conv(3, stages[0][3], 3, 2)]
        total_blocks, block_id = sum(s[-1] for s in stages), 0
        for expand_ratio, kernel, stride, cin, cout, num_blocks in stages:
            blocks = []
            for i in range(num_blocks):
                blocks.append(
                    MBConv(
                        cin if i == 0 else cout,
                        cout,
                        expand_ratio=expand_ratio,
                        kernel_size=kernel,
                        stride=stride if i == 0 else 1,
                        # drop probability grows linearly with depth (torchvision; Huang et al. 2016)
                        stochastic_depth_prob=stochastic_depth_prob * block_id / total_blocks,
                        norm=norm,
                        tf_same_padding=tf_same_padding,
                    )
                )
                block_id += 1
            layers.append(nn.Sequential(*blocks))
        last_channels = 4 * stages[-1][4]  # 1280 for B0 (Table 1's final 1x1 conv), scaled with width
        layers.append(conv(stages[-1][4], last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channels, num_classes))

        # torchvision's init, so that an untrained model starts as torchvision's does
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)  # [B, C]
        return self.classifier(x)


def from_mmpretrain(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an mmpretrain EfficientNet (b*) checkpoint onto torchvision's names.

    mmpretrain's `backbone.layers` are: 0 stem, 1-3 = our stages 1-3, 4 = our stages 4+5, 5 = our stages 6+7
    (its model_scaling merges a stride-1 stage into the one before), 6 = head conv. A merged layer is split
    where the blocks' output width changes (80 -> 112 and 192 -> 320 channels, times width_mult).
    """

    split = {}  # mmpretrain layer -> how many of its leading blocks form the first of its two stages
    for layer in (4, 5):
        widths = []  # output width of each block, in block order
        while (w := state_dict.get(f"backbone.layers.{layer}.{len(widths)}.linear_conv.conv.weight")) is not None:
            widths.append(w.shape[0])
        split[layer] = widths.count(widths[0]) if widths else 0

    out = {}
    for key, value in state_dict.items():
        if m := re.match(r"backbone\.layers\.([1-5])\.(\d+)\.(expand_conv|depthwise_conv|se|linear_conv)\.(.+)", key):
            layer, block, part, rest = int(m[1]), int(m[2]), m[3], m[4]
            stage = layer if layer < 4 else 2 * layer - 4  # mmpretrain layer 4 -> stage 4, 5 -> stage 6
            if layer in split and block >= split[layer]:
                stage, block = stage + 1, block - split[layer]
            # MBConv children: [expand,] depthwise, se, project (no expand conv when expand_ratio == 1)
            offset = int(f"backbone.layers.{m[1]}.{m[2]}.expand_conv.conv.weight" in state_dict)
            index = {"expand_conv": 0, "depthwise_conv": offset, "se": offset + 1, "linear_conv": offset + 2}
            rest = re.sub(r"^conv(\d)\.conv\.", r"fc\1.", rest)  # SE: se.conv1.conv.* -> fc1.*
            new = f"features.{stage}.{block}.block.{index[part]}.{rest}"
        elif m := re.match(r"backbone\.layers\.([06])\.(.+)", key):  # stem conv, head conv
            new = f"features.{0 if m[1] == '0' else 8}.{m[2]}"
        elif key.startswith("head.fc."):
            new = "classifier.1." + key.removeprefix("head.fc.")
        else:
            raise KeyError(f"no EfficientNet rule for mmpretrain key {key!r}")
        # mmcv ConvModule (conv, bn) -> torchvision Conv2dNormActivation (0, 1)
        new = re.sub(r"\.conv\.(weight|bias)$", r".0.\1", new)
        out[new.replace(".bn.", ".1.")] = value
    return out


def _efficientnet(
    width_mult: float,
    depth_mult: float,
    dropout: float,
    num_classes: int,
    tf_same_padding: bool,
    bn_eps: float = 1e-5,
    bn_momentum: float = 0.1,
) -> EfficientNet:
    return EfficientNet(
        width_mult=width_mult,
        depth_mult=depth_mult,
        dropout=dropout,
        num_classes=num_classes,
        # TF-trained weights need TF's BatchNorm eps (tf.keras default 1e-3; mmpretrain's norm_cfg eps=1e-3)
        bn_eps=1e-3 if tf_same_padding else bn_eps,
        bn_momentum=bn_momentum,
        tf_same_padding=tf_same_padding,
    )


# (width_mult, depth_mult) from the paper's compound scaling; dropout and BatchNorm settings as torchvision
# sets them (B5-B7 were ported from TF with eps 1e-3 and momentum 0.01, i.e. TF's decay 0.99).
def efficientnet_b0(num_classes: int = 1000, tf_same_padding: bool = False) -> EfficientNet:
    return _efficientnet(1.0, 1.0, 0.2, num_classes, tf_same_padding)


def efficientnet_b1(num_classes: int = 1000, tf_same_padding: bool = False) -> EfficientNet:
    return _efficientnet(1.0, 1.1, 0.2, num_classes, tf_same_padding)


def efficientnet_b2(num_classes: int = 1000, tf_same_padding: bool = False) -> EfficientNet:
    return _efficientnet(1.1, 1.2, 0.3, num_classes, tf_same_padding)


def efficientnet_b3(num_classes: int = 1000, tf_same_padding: bool = False) -> EfficientNet:
    return _efficientnet(1.2, 1.4, 0.3, num_classes, tf_same_padding)


def efficientnet_b4(num_classes: int = 1000, tf_same_padding: bool = False) -> EfficientNet:
    return _efficientnet(1.4, 1.8, 0.4, num_classes, tf_same_padding)


def efficientnet_b5(num_classes: int = 1000, tf_same_padding: bool = False) -> EfficientNet:
    return _efficientnet(1.6, 2.2, 0.4, num_classes, tf_same_padding, bn_eps=1e-3, bn_momentum=0.01)


def efficientnet_b6(num_classes: int = 1000, tf_same_padding: bool = False) -> EfficientNet:
    return _efficientnet(1.8, 2.6, 0.5, num_classes, tf_same_padding, bn_eps=1e-3, bn_momentum=0.01)


def efficientnet_b7(num_classes: int = 1000, tf_same_padding: bool = False) -> EfficientNet:
    return _efficientnet(2.0, 3.1, 0.5, num_classes, tf_same_padding, bn_eps=1e-3, bn_momentum=0.01)

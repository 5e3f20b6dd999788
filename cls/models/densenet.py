"""DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017).

Names follow torchvision's `DenseNet` (`features.conv0`, `features.denseblock1.denselayer1.norm1`, ...,
`features.norm5`, `classifier`), so current torchvision checkpoints load unchanged. torchvision's
`memory_efficient` option (gradient checkpointing of the bottleneck) is left out: it trades compute for
memory and does not change the maths or the weights.
"""
import torch
import torch.nn.functional as F
from torch import nn

from cls.models.layers import rename_keys


class DenseLayer(nn.Module):
    """BN-ReLU-Conv(1x1, bn_size*k) -> BN-ReLU-Conv(3x3, k): the "-B" bottleneck layer of Sec. 3."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, H, W], all earlier feature maps of the block concatenated -> [B, k, H, W] new ones
        x = self.conv1(self.relu1(self.norm1(x)))
        x = self.conv2(self.relu2(self.norm2(x)))
        return F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else x


class DenseBlock(nn.ModuleDict):
    """Layer l sees the concatenation of the block input and every earlier layer's output (eq. 2)."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            x = torch.cat([x, layer(x)], 1)  # [B, C_in + (l + 1) * k, H, W]
        return x


class Transition(nn.Sequential):
    """BN-ReLU-Conv(1x1) halving the channels (compression 0.5, "-C") then 2x2 average pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """Stem (7x7/2 conv, 3x3/2 max-pool), four dense blocks joined by transitions, BN-ReLU, pool, linear."""

    def __init__(
        self,
        *,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bn_size, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(channels, channels // 2))
                channels //= 2
        # Pre-activation layers leave the last block un-normalised: one more BN (ReLU in forward).
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        # torchvision's init (mmpretrain's DenseNet keeps PyTorch's defaults); the linear weight stays default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x))  # [B, C, H/32, W/32]
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # [B, C]
        return self.classifier(x)


# mmpretrain -> ours. mmpretrain counts stages and layers from 0, torchvision from 1; its last "transition"
# is Sequential(BN, ReLU) (keys `transitions.<i>.0.*`), which is torchvision's `norm5`.
_MMPRETRAIN_RULES = [
    (r"^backbone\.stem\.0\.", "features.conv0."),
    (r"^backbone\.stem\.1\.", "features.norm0."),
    (r"^backbone\.stages\.(\d+)\.block\.(\d+)\.",
     lambda m: f"features.denseblock{int(m[1]) + 1}.denselayer{int(m[2]) + 1}."),
    (r"^backbone\.transitions\.\d+\.0\.", "features.norm5."),
    (r"^backbone\.transitions\.(\d+)\.", lambda m: f"features.transition{int(m[1]) + 1}."),
    (r"^head\.fc\.", "classifier."),
]


def from_mmpretrain(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an mmpretrain DenseNet checkpoint (`backbone.stem/stages/transitions`, `head.fc`) onto ours."""
    return rename_keys(state_dict, _MMPRETRAIN_RULES, "DenseNet")


def densenet121(num_classes: int = 1000) -> DenseNet:
    return DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, num_classes=num_classes)


def densenet161(num_classes: int = 1000) -> DenseNet:
    return DenseNet(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96, num_classes=num_classes)


def densenet169(num_classes: int = 1000) -> DenseNet:
    return DenseNet(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64, num_classes=num_classes)


def densenet201(num_classes: int = 1000) -> DenseNet:
    return DenseNet(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64, num_classes=num_classes)

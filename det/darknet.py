"""Darknet-53 (Redmon & Farhadi 2018, "YOLOv3: An Incremental Improvement", Table 1) as mmdet 3.3.0's `Darknet`:
a 3x3 stem, then five stages of a stride-2 3x3 conv followed by 1, 2, 8, 8, 4 residual blocks (1x1 halving, 3x3
restoring), every conv followed by BatchNorm and LeakyReLU(0.1). Parameter names are mmdet's (`conv1`,
`conv_res_block1..5`, `res0..`), so `open-mmlab://darknet53` and mmdet YOLOv3 checkpoints load by name.
"""
from functools import partial

from torch import Tensor, nn

from cls.models.layers import ConvModule

LeakyReLU = partial(nn.LeakyReLU, 0.1)  # Darknet's activation (YOLOv3 paper, as YOLOv2)
DarknetConv = partial(ConvModule, act=LeakyReLU)  # conv (no bias) -> BN -> LeakyReLU(0.1)

# depth -> (residual blocks per stage, (in, out) channels per stage): mmdet Darknet.arch_settings
ARCH_SETTINGS = {53: ((1, 2, 8, 8, 4), ((32, 64), (64, 128), (128, 256), (256, 512), (512, 1024)))}


class ResBlock(nn.Module):
    """x + conv3x3(conv1x1(x)), the 1x1 at half the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = DarknetConv(channels, channels // 2, 1)
        self.conv2 = DarknetConv(channels // 2, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.conv1(x))


def conv_res_block(in_channels: int, out_channels: int, num_blocks: int) -> nn.Sequential:
    """The stride-2 downsampling conv, then `num_blocks` ResBlocks (mmdet's `make_conv_res_block`)."""
    stage = nn.Sequential()
    stage.add_module("conv", DarknetConv(in_channels, out_channels, 3, stride=2))
    for i in range(num_blocks):
        stage.add_module(f"res{i}", ResBlock(out_channels))
    return stage


class Darknet(nn.Module):
    """images [B, 3, H, W] (RGB / 255) -> the stages `out_indices` (mmdet's default 3, 4, 5: strides 8, 16, 32 with
    256, 512, 1024 channels).

    frozen_stages: mmdet's meaning for Darknet: the first k of (stem, stage 1, ..., stage 5) take no gradient (-1 or
    0: none). norm_eval keeps every BatchNorm in eval mode during training: mmdet's default, right over ImageNet
    weights (open-mmlab://darknet53) and wrong from scratch (train_det.py decides, as for ResNet backbones).
    """

    def __init__(self, depth: int = 53, out_indices: tuple[int, ...] = (3, 4, 5), *, frozen_stages: int = -1,
                 norm_eval: bool = True) -> None:
        super().__init__()
        if depth not in ARCH_SETTINGS:
            raise ValueError(f"no Darknet of depth {depth}; choose one of {sorted(ARCH_SETTINGS)}")
        blocks, channels = ARCH_SETTINGS[depth]
        self.out_indices, self.frozen_stages, self.norm_eval = out_indices, frozen_stages, norm_eval
        self.conv1 = DarknetConv(3, 32, 3)
        self.cr_blocks = ["conv1"]
        for i, (num_blocks, (c_in, c_out)) in enumerate(zip(blocks, channels, strict=True)):
            self.add_module(f"conv_res_block{i + 1}", conv_res_block(c_in, c_out, num_blocks))
            self.cr_blocks.append(f"conv_res_block{i + 1}")
        self.out_channels = [32 if i == 0 else channels[i - 1][1] for i in out_indices]
        for m in self.modules():  # mmdet Darknet init_cfg: Kaiming-normal convs (fan_out, ReLU gain), BN 1 / 0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name in self.cr_blocks[:max(frozen_stages, 0)]:
            getattr(self, name).requires_grad_(False)

    def train(self, mode: bool = True) -> "Darknet":
        super().train(mode)
        for name in self.cr_blocks[:max(self.frozen_stages, 0)]:  # frozen stages keep their statistics too
            getattr(self, name).eval()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i, name in enumerate(self.cr_blocks):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return outs

"""Feature Pyramid Network (Lin et al. 2017, "Feature Pyramid Networks for Object Detection"), as mmdet's FPN.

Top-down pathway: a 1x1 lateral conv per backbone level, each coarser map upsampled (nearest) and added to the
next finer one, then a 3x3 conv per merged map. Optional extra coarser levels on top (P6, P7, ...): stride-2 3x3
convs for RetinaNet (Lin et al. 2017, "Focal Loss", sec. 4) and FCOS, or 1x1 max-pooling with stride 2 (Mask R-CNN,
SOLOv2). Names are mmdet's (`lateral_convs.i.conv`, `fpn_convs.i.conv`, extra convs appended to `fpn_convs`), so
mmdet checkpoints load unchanged under `neck.`.
"""
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from cls.models.layers import ConvModule


class FPN(nn.Module):
    """in_channels: channels of every backbone level given to forward (e.g. C2..C5); levels below `start_level`
    are ignored (mmdet's start_level=1 for RetinaNet/FCOS: P3 is the finest output).

    extra_convs: where the first extra level's conv reads from, as mmdet's `add_extra_convs`:
    "on_input" = the last backbone map used (C5; RetinaNet in mmdet), "on_output" = the last FPN output (P5;
    FCOS, torchvision's RetinaNet), None = no convs, extra levels are max-pooled (SOLOv2).
    relu_before_extra: ReLU on the input of every extra conv after the first (FCOS; mmdet's
    relu_before_extra_convs, which never applies it to the first one).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        *,
        start_level: int = 0,
        num_extra_levels: int = 0,
        extra_convs: str | None = None,
        relu_before_extra: bool = False,
    ) -> None:
        super().__init__()
        if extra_convs not in (None, "on_input", "on_output"):
            raise ValueError(f"extra_convs must be None, 'on_input' or 'on_output', not {extra_convs!r}")
        self.start_level = start_level
        self.num_extra_levels = num_extra_levels
        self.extra_convs = extra_convs
        self.relu_before_extra = relu_before_extra
        used = in_channels[start_level:]
        # no norm, no activation: mmdet FPN defaults (norm_cfg=None, act_cfg=None), so every conv has a bias
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1, norm=None, act=None) for c in used)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, norm=None, act=None) for _ in used)
        if extra_convs is not None:
            for i in range(num_extra_levels):
                c = used[-1] if i == 0 and extra_convs == "on_input" else out_channels
                self.fpn_convs.append(ConvModule(c, out_channels, 3, stride=2, norm=None, act=None))
        for m in self.modules():  # mmdet FPN init_cfg: Xavier-uniform convs (Glorot & Bengio 2010), zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """Backbone maps (finest first) -> len(in_channels) - start_level + num_extra_levels maps, finest first."""
        inputs = inputs[self.start_level:]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down; size= handles odd sizes as mmdet does
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=False)]  # the rest are extra convs
        for i in range(self.num_extra_levels):
            if self.extra_convs is None:  # 1x1 max-pool, stride 2: plain subsampling of the previous level
                x = F.max_pool2d(outs[-1], 1, stride=2)
            elif i == 0:
                x = self.fpn_convs[len(laterals)](inputs[-1] if self.extra_convs == "on_input" else outs[-1])
            else:
                x = self.fpn_convs[len(laterals) + i](F.relu(outs[-1]) if self.relu_before_extra else outs[-1])
            outs.append(x)
        return outs

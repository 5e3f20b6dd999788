"""Classification trunks as detection backbones, shared by the detector families (RetinaNet, FCOS; CenterNet and
SOLOv2 to come).

`ResNetBackbone` is mmdet's ResNet(style, frozen_stages, norm_eval, norm_cfg requires_grad) on our classification
ResNet: same parameter names (`conv1`, `bn1`, `layer1..4`, so ImageNet checkpoints load by name), C2-C5 out, with the
stem plus the first `frozen_stages` stages taking no gradient and, with `norm_eval`, every BatchNorm kept in eval mode.
These are constructor arguments: they only make sense for pretrained weights, and a caller that trains from scratch
passes frozen_stages=-1, norm_eval=False.
"""
from torch import Tensor, nn

from cls.convert import to_our_names
from cls.models import resnet
from common.checkpoint import load_model_weights

RESNET_ARCHS = {  # depth -> (block, blocks per stage), torchvision's / mmdet's ResNet depths
    18: (resnet.BasicBlock, (2, 2, 2, 2)),
    34: (resnet.BasicBlock, (3, 4, 6, 3)),
    50: (resnet.Bottleneck, (3, 4, 6, 3)),
    101: (resnet.Bottleneck, (3, 4, 23, 3)),
}


class ResNetBackbone(resnet.ResNet):
    """images [B, 3, H, W] normalised -> [C2, C3, C4, C5] ([B, 64 or 256 * 2**i, H / 4 / 2**i, W / 4 / 2**i]).

    frozen_stages: -1 nothing frozen, 0 the stem, k the stem and layer1..k (mmdet's meaning; its detectors use 1:
    the ImageNet low-level filters are kept). norm_eval: BatchNorms keep their ImageNet statistics in training
    (detection batches of 2-8 images are too small to estimate them); their affine parameters still train outside
    the frozen stages, unless norm_trainable is False (mmdet's norm_cfg requires_grad=False: every BatchNorm a fixed
    affine map, as the caffe checkpoints' were). style: "pytorch" puts a stage's stride on the first block's 3x3 conv
    (torchvision's "ResNet v1.5"), "caffe" on its first 1x1 conv (the original ResNet and Detectron's, whose
    checkpoints mmdet's FCOS starts from). The classifier is an Identity: it loads nothing and is reported unused.
    """

    def __init__(self, depth: int, *, frozen_stages: int = 1, norm_eval: bool = True, style: str = "pytorch",
                 norm_trainable: bool = True) -> None:
        if depth not in RESNET_ARCHS:
            raise ValueError(f"no ResNet of depth {depth}; choose one of {sorted(RESNET_ARCHS)}")
        if style not in ("pytorch", "caffe"):
            raise ValueError(f"style must be 'pytorch' or 'caffe', not {style!r}")
        # torchvision's init (zero_init_residual=False), not mmcls's: it only matters without pretrained weights,
        # and there residual branches that start at zero pass almost no gradient to their first layers while the
        # head (N(0, 0.01) towers) is still tiny, so SGD from scratch sat at the focal-loss prior for epochs
        super().__init__(*RESNET_ARCHS[depth], zero_init_residual=False)
        self.depth, self.frozen_stages, self.norm_eval = depth, frozen_stages, norm_eval
        self.fc = nn.Identity()  # detection uses the stages (C2-C5) only
        out = 64 * RESNET_ARCHS[depth][0].expansion
        self.out_channels = [out * 2**i for i in range(4)]
        if style == "caffe":  # the stride of each stage's first Bottleneck on its 1x1 reduce conv, not on the 3x3
            for layer in (self.layer2, self.layer3, self.layer4):
                if isinstance(layer[0], resnet.Bottleneck):  # a BasicBlock has no 1x1 conv: unchanged, as in mmdet
                    layer[0].conv1.stride, layer[0].conv2.stride = layer[0].conv2.stride, (1, 1)
        if frozen_stages >= 0:
            frozen = [self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, frozen_stages + 1)]
            for module in frozen:
                module.requires_grad_(False)
        if not norm_trainable:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNetBackbone":
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):  # SyncBatchNorm too, as mmdet's check
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.stages(x)

    def load_classification_weights(self, checkpoint: dict) -> dict[str, list[str]]:
        """An ImageNet ResNet checkpoint (ours / torchvision / mmpretrain) of this depth; returns load_model_weights'
        report (`fc.*` unused). Frozen parameters stay frozen."""
        return load_model_weights(self, to_our_names(f"resnet{self.depth}", checkpoint))


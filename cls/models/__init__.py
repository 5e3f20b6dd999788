"""Every classification model by name: one plain dict from name to builder, no registry."""
from torch import Tensor, nn

from cls.models import cspnet, densenet, efficientnet, hrnet, mobilenet_v2, mobilenet_v3, resnet, shufflenet_v2, vgg

MODELS = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
    "resnext50_32x4d": resnet.resnext50_32x4d,
    "resnext101_32x4d": resnet.resnext101_32x4d,
    "resnext101_32x8d": resnet.resnext101_32x8d,
    "resnetv1d50": resnet.resnetv1d50,
    "resnetv1d101": resnet.resnetv1d101,
    "resnetv1d152": resnet.resnetv1d152,
    "seresnet50": resnet.seresnet50,
    "seresnet101": resnet.seresnet101,
    "vgg11": vgg.vgg11,
    "vgg13": vgg.vgg13,
    "vgg16": vgg.vgg16,
    "vgg19": vgg.vgg19,
    "vgg11_bn": vgg.vgg11_bn,
    "vgg13_bn": vgg.vgg13_bn,
    "vgg16_bn": vgg.vgg16_bn,
    "vgg19_bn": vgg.vgg19_bn,
    "mobilenet_v2": mobilenet_v2.mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3.mobilenet_v3_small,
    "mobilenet_v3_large": mobilenet_v3.mobilenet_v3_large,
    "shufflenet_v2_x0_5": shufflenet_v2.shufflenet_v2_x0_5,
    "shufflenet_v2_x1_0": shufflenet_v2.shufflenet_v2_x1_0,
    "shufflenet_v2_x1_5": shufflenet_v2.shufflenet_v2_x1_5,
    "shufflenet_v2_x2_0": shufflenet_v2.shufflenet_v2_x2_0,
    "densenet121": densenet.densenet121,
    "densenet161": densenet.densenet161,
    "densenet169": densenet.densenet169,
    "densenet201": densenet.densenet201,
    "efficientnet_b0": efficientnet.efficientnet_b0,
    "efficientnet_b1": efficientnet.efficientnet_b1,
    "efficientnet_b2": efficientnet.efficientnet_b2,
    "efficientnet_b3": efficientnet.efficientnet_b3,
    "efficientnet_b4": efficientnet.efficientnet_b4,
    "efficientnet_b5": efficientnet.efficientnet_b5,
    "efficientnet_b6": efficientnet.efficientnet_b6,
    "efficientnet_b7": efficientnet.efficientnet_b7,
    "hrnet_w18": hrnet.hrnet_w18,
    "hrnet_w32": hrnet.hrnet_w32,
    "hrnet_w48": hrnet.hrnet_w48,
    "cspresnext50": cspnet.cspresnext50,
    "cspresnet50": cspnet.cspresnet50,
    "cspdarknet53": cspnet.cspdarknet53,
}

# Same network, same parameter names as torchvision's builder of the same name (tests load its weights into ours).
TORCHVISION_TWINS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
    "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
)


def _tensors_only(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: a picture or a list fails with what to call instead, not deep inside the first conv."""
    if args and not isinstance(args[0], Tensor):
        raise TypeError(f"a classifier expects a normalised float tensor [B, 3, H, W], not {type(args[0]).__name__}; "
                        "for pictures, files or lists use cls.predict.classify(model, images)")


def build_model(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Build `name` with a `num_classes`-way head; keyword switches go to the builder (e.g. tf_same_padding)."""
    if name not in MODELS:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(MODELS)}")
    model = MODELS[name](num_classes=num_classes, **kwargs)
    model.register_forward_pre_hook(_tensors_only)
    return model

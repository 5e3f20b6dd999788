"""Every detector by name: one plain dict from name to builder, the recipes beside them, checkpoint loading."""
import sys
from types import ModuleType

import torch
from torch import nn

from det.models import retinanet, ssd, ssdlite

MODELS = {
    "ssd300": ssd.ssd300,
    "ssd512": ssd.ssd512,
    "ssdlite_mobilenet_v2": ssdlite.ssdlite_mobilenet_v2,
    "retinanet_r18": retinanet.retinanet_r18,
    "retinanet_r50": retinanet.retinanet_r50,
}
RECIPES = {**ssd.RECIPES, **ssdlite.RECIPES, **retinanet.RECIPES}  # the mmdet configs' training recipes, by model name


def build_model(name: str, num_classes: int = 80) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown detector {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes)


def family(name: str) -> ModuleType:
    """The model file that defines `name` (it knows its checkpoint names and backbone)."""
    return sys.modules[MODELS[name].__module__]


def load_backbone_weights(name: str, model: nn.Module, checkpoint: dict) -> dict[str, list[str]]:
    """An ImageNet classification checkpoint (ours, torchvision's or mmpretrain's) into the detector's backbone."""
    return family(name).load_backbone_weights(model, checkpoint)


def to_our_names(name: str, checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint of ours ({"model": ...}), of mmdet ({"state_dict": ...}, renamed by
    the family's `from_mmdet` where its names differ) or saved from a DistributedDataParallel wrapper."""
    if "model" in checkpoint:
        state_dict = checkpoint["model"]
    elif "state_dict" in checkpoint:
        state_dict = checkpoint["state_dict"]
        if hasattr(family(name), "from_mmdet"):
            state_dict = family(name).from_mmdet(state_dict)
    else:
        state_dict = checkpoint
    return {k.removeprefix("module."): v for k, v in state_dict.items()}

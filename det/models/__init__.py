"""Every detector by name: one plain dict from name to builder, the recipes beside them, checkpoint loading.

A family file (det/models/<family>.py: blocks, model class, builders at the bottom) provides, by name:
- builders `<name>(num_classes=80) -> nn.Module`, listed in MODELS below; the model's forward takes
  (images, targets) in training -> {"loss_*": scalar}, (images, image_size=None) in eval -> padded detections
  {"boxes" [B, K, 4], "scores", "labels", "valid" [B, K]} (instance segmentation adds "masks" [B, K, h, w]: soft
  masks on the canvas at stride 4, SOLOv2);
- `RECIPES`: {name: dict(preset, img_size, batch_size, lr, ..., iou_type, metric)} for each of its builders, plus
  `frozen_stages` and `norm_eval` where the builder takes them (ResNet: both, Darknet: norm_eval; the backbone's
  settings over ImageNet weights; train_det.py trains the whole backbone without weights);
- `from_mmdet(state_dict) -> state_dict`: mmdet's parameter names onto ours (the identity where they agree);
- `load_backbone_weights(model, checkpoint) -> {"missing", "unexpected", "shape_mismatch"}`: an ImageNet
  classification checkpoint (ours, torchvision's or mmpretrain's) into the model's backbone.
A new family adds its module to FAMILIES and its builders to MODELS; tests/test_det_models.py checks the protocol.
"""
import sys
from types import ModuleType

import torch
from torch import nn

from common.checkpoint import state_dict_of
from det.models import centernet, fcos, retinanet, solov2, ssd, ssdlite, yolov3, yolox

FAMILIES = (ssd, ssdlite, retinanet, yolov3, yolox, fcos, centernet, solov2)
MODELS = {
    "ssd300": ssd.ssd300,
    "ssd512": ssd.ssd512,
    "ssdlite_mobilenet_v2": ssdlite.ssdlite_mobilenet_v2,
    "retinanet_r18": retinanet.retinanet_r18,
    "retinanet_r50": retinanet.retinanet_r50,
    "yolov3_d53": yolov3.yolov3_d53,
    "yolox_s": yolox.yolox_s,
    "fcos_r50": fcos.fcos_r50,
    "centernet_r18": centernet.centernet_r18,
    "solov2_r50": solov2.solov2_r50,
    "solov2_light_r18": solov2.solov2_light_r18,
}
RECIPES = {name: recipe for f in FAMILIES for name, recipe in f.RECIPES.items()}  # the mmdet configs' recipes


def build_model(name: str, num_classes: int = 80, **backbone) -> nn.Module:
    """`backbone`: the ResNet detectors' `frozen_stages` and `norm_eval`, YOLOv3's `norm_eval` (recipes that have
    them name them)."""
    if name not in MODELS:
        raise ValueError(f"unknown detector {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, **backbone)


def family(name: str) -> ModuleType:
    """The family file that defines `name`'s builder (it knows its checkpoint names and backbone)."""
    return sys.modules[MODELS[name].__module__]


def load_backbone_weights(name: str, model: nn.Module, checkpoint: dict) -> dict[str, list[str]]:
    """An ImageNet classification checkpoint (ours, torchvision's or mmpretrain's) into the detector's backbone."""
    return family(name).load_backbone_weights(model, checkpoint)


def to_our_names(name: str, checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint of ours ({"model": ...}; the EMA's weights when its run evaluated
    them in place of the model, see common.checkpoint.state_dict_of), of mmdet ({"state_dict": ...}, renamed by the
    family's `from_mmdet`) or saved from a DistributedDataParallel wrapper."""
    state_dict = state_dict_of(checkpoint)
    if "model" not in checkpoint and "state_dict" in checkpoint:
        state_dict = family(name).from_mmdet(state_dict)
    return {k.removeprefix("module."): v for k, v in state_dict.items()}

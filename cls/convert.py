"""Bring a checkpoint from elsewhere onto our parameter names.

- ours (train_cls.py): {"model": state_dict, "model_ema": ..., ...}: the EMA's weights when the run used
  `--ema-eval instead` (common.checkpoint.state_dict_of)
- torchvision: a bare state dict; our twins of torchvision models use its names, so nothing is renamed.
- mmpretrain / mmcls: {"state_dict": {"backbone.*", "neck.*", "head.*"}, "meta": ...}; each family file's
  `from_mmpretrain` knows its renames (a prefix strip for the families named after OpenMMLab's modules).
- anything saved from a DistributedDataParallel wrapper: the "module." prefix is dropped.
"""
import sys

import torch

from cls.models import MODELS
from common.checkpoint import state_dict_of


def is_mmpretrain(state_dict: dict) -> bool:
    return any(k.startswith(("backbone.", "head.")) for k in state_dict)


def to_our_names(arch: str, checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model state dict inside `checkpoint` (any of the formats above), keyed by our names for `arch`."""
    state_dict = state_dict_of(checkpoint)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if is_mmpretrain(state_dict):
        family = sys.modules[MODELS[arch].__module__]  # the file that defines the builder knows the names
        state_dict = family.from_mmpretrain(state_dict)
    return state_dict

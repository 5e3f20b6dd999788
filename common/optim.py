"""Optimizer, learning-rate schedule and EMA, as small functions.

The LR is a pure function of the global optimizer step (`lr_at`), set on the optimizer every step, so a resumed
run recomputes it from the step it stored and cannot drift from an uninterrupted one.
"""
import bisect
import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

# what mmengine's DefaultOptimWrapperConstructor counts as a norm layer
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float = 0.0, *,
                 bias_weight_decay: float | None = None, bias_lr_mult: float = 1.0) -> list[dict]:
    """Two groups: weights of convs and linears decay by `weight_decay`, norm scales/shifts and biases (1-d tensors)
    by `norm_weight_decay`, 0 by default: decaying BN's gamma/beta or biases only fights the normalisation (Goyal et
    al. 2017, "no bias decay"); torchvision's --norm-weight-decay sets it.

    bias_weight_decay / bias_lr_mult (mmengine's paramwise_cfg bias_decay_mult / bias_lr_mult, e.g. FCOS's 0 and 2):
    parameters named `bias` move to two more groups, both decaying by bias_weight_decay (norm layers' shifts too, as
    mmengine's order of rules gives), the ones outside norm layers learning at bias_lr_mult x the LR (the group's
    "lr_mult", which apply_gradients reads). The defaults (None, 1) keep the two groups."""
    split_biases = bias_weight_decay is not None or bias_lr_mult != 1.0
    decay, no_decay, biases, norm_biases = [], [], [], []
    for full_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner, _, name = full_name.rpartition(".")
        if split_biases and name == "bias":
            (norm_biases if isinstance(model.get_submodule(owner), NORM_LAYERS) else biases).append(p)
        else:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": norm_weight_decay}]
    if split_biases:
        bias_decay = norm_weight_decay if bias_weight_decay is None else bias_weight_decay
        groups += [{"params": biases, "weight_decay": bias_decay, "lr_mult": bias_lr_mult},
                   {"params": norm_biases, "weight_decay": bias_decay}]
    return groups


def build_optimizer(
    name: str, model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
    norm_weight_decay: float = 0.0, nesterov: bool = False, *, bias_weight_decay: float | None = None,
    bias_lr_mult: float = 1.0,
) -> torch.optim.Optimizer:
    """sgd (mmcls/torchvision ResNet recipe; `nesterov` for YOLOX's), adamw, or rmsprop with TensorFlow's alpha/eps
    (MobileNet/EfficientNet recipes: eps 0.0316 ~ sqrt(1e-3) because TF puts eps inside the square root).
    Parameter groups as param_groups makes them."""
    groups = param_groups(model, weight_decay, norm_weight_decay, bias_weight_decay=bias_weight_decay,
                          bias_lr_mult=bias_lr_mult)
    device = next(model.parameters()).device
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **fast_kernels("sgd", device))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **fast_kernels("adamw", device))
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=0.0316, momentum=momentum,
                                   **fast_kernels("rmsprop", device))
    raise ValueError(f"unknown optimizer {name!r}: choose sgd, adamw or rmsprop")


def fast_kernels(name: str, device: torch.device) -> dict[str, bool]:
    """The optimizer step's fastest form on `device`: `fused` (one kernel over all parameters) for SGD and AdamW on
    CUDA and CPU, where torch has those kernels; `foreach` (a few kernels over lists of tensors) otherwise, on the
    NPU (torch_npu implements the foreach ops) and for RMSprop, which has no fused kernel. The default per-parameter
    loop launches a few kernels per tensor: ResNet-50 has 161. Measured on a 2-core CPU for ResNet-50, one step of
    fused SGD / AdamW took 0.07 / 0.09 s, the default loop 0.12 / 0.37 s."""
    if name in ("sgd", "adamw") and device.type in ("cuda", "cpu"):
        return {"fused": True}
    return {"foreach": True}


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule (Goyal et al. 2017): the LR grows with the images per optimizer step."""
    return base_lr * global_batch / reference_batch


def lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    schedule: str = "cosine",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_steps: int = 0,
    warmup_factor: float = 0.001,
    warmup: str = "linear",
    min_lr: float = 0.0,
    hold_steps: int = 0,
) -> float:
    """Learning rate at optimizer step `step` (0-based).

    schedule "cosine": base_lr -> min_lr along half a cosine over [warmup_steps, total_steps - hold_steps] (SGDR
    without restarts), then min_lr for the last `hold_steps` (YOLOX's constant last epochs); "poly": base_lr ->
    min_lr linearly over the same span (mmengine's PolyLR, power 1); "multistep": base_lr * gamma ** (number of
    milestones <= step). During warmup the scheduled LR is multiplied by a factor rising from `warmup_factor` to 1
    linearly (warmup "linear", mmengine's LinearLR), or by ((step + 1) / warmup_steps) ** 2 (warmup "quadratic",
    mmdet's QuadraticWarmupLR, which starts from 0 and ignores warmup_factor).
    """
    end = total_steps - hold_steps
    progress = min(1.0, max(0, step - warmup_steps) / max(1, end - warmup_steps))
    if schedule == "cosine":
        lr = min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "poly":
        lr = min_lr + (base_lr - min_lr) * (1 - progress)
    elif schedule == "multistep":
        lr = base_lr * gamma ** bisect.bisect_right(sorted(milestones), step)
    else:
        raise ValueError(f"unknown schedule {schedule!r}: choose cosine, poly or multistep")
    if step >= warmup_steps:
        return lr
    if warmup == "quadratic":
        return lr * ((step + 1) / warmup_steps) ** 2
    if warmup == "linear":
        return lr * (warmup_factor + (1 - warmup_factor) * step / warmup_steps)
    raise ValueError(f"unknown warmup {warmup!r}: choose linear or quadratic")


def epoch_schedule(
    *, base_lr: float, epochs: int, steps_per_epoch: int, schedule: str, lr_steps: Sequence[int] = (),
    gamma: float = 0.1, warmup_steps: int = 0, warmup_factor: float = 0.001, warmup: str = "linear",
    min_lr: float = 0.0, hold_epochs: int = 0,
) -> Callable[[int], float]:
    """`lr_at` for a run described in epochs (milestones `lr_steps` and the final `hold_epochs` at min_lr in
    epochs): a function of the global step."""
    return partial(lr_at, base_lr=base_lr, total_steps=epochs * steps_per_epoch, schedule=schedule,
                   milestones=[e * steps_per_epoch for e in lr_steps], gamma=gamma, warmup_steps=warmup_steps,
                   warmup_factor=warmup_factor, warmup=warmup, min_lr=min_lr, hold_steps=hold_epochs * steps_per_epoch)


def apply_gradients(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, parameters, *, lr: float, clip_grad: float = 0.0
) -> None:
    """One optimizer step on the accumulated gradients: set the LR (times a group's "lr_mult"), unscale and clip the
    global gradient norm (if clip_grad > 0), step through the loss scaler (which skips steps with inf/NaN fp16
    gradients), zero grads."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(parameters, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def exp_momentum_ema(momentum: float, gamma: float) -> Callable:
    """mmdet's ExpMomentumEMA (YOLOX) as a torch AveragedModel `multi_avg_fn`: after n updates the new weights enter
    with (1 - momentum) * exp(-(1 + n) / gamma) + momentum, so the average follows the fast-changing early weights
    closely and settles to `momentum` (1e-4 for YOLOX) after a few x gamma steps. The weight stays a device tensor
    (no host sync); integer buffers are copied, as mmengine does."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        weight = (1 - momentum) * torch.exp(-(1 + num_averaged.double()) / gamma) + momentum
        for avg, new in zip(averaged, current, strict=True):
            if avg.is_floating_point():
                avg.lerp_(new, weight.to(avg.dtype))
            else:
                avg.copy_(new)
    return update


def ema_model(model: nn.Module, decay: float, gamma: float | None = None) -> AveragedModel:
    """Exponential moving average of weights and buffers (BN statistics too), evaluated beside the model: a
    constant `decay` per update, or with `gamma` mmdet's ExpMomentumEMA of momentum 1 - decay."""
    avg_fn = get_ema_multi_avg_fn(decay) if gamma is None else exp_momentum_ema(1 - decay, gamma)
    return AveragedModel(model, multi_avg_fn=avg_fn, use_buffers=True)

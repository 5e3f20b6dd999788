"""Loss functions shared by detectors, for whole padded batches."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(
    logits: Tensor, labels: Tensor, pos: Tensor, weight: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Focal loss (Lin et al. 2017, eq. 5) summed over anchors and classes, for one-hot targets.

    logits [B, A, C]; labels [B, A] the class of each positive anchor; pos [B, A]; weight [B, A] which anchors
    count at all (positives and negatives, not the ignored). Equals `torchvision.ops.sigmoid_focal_loss` on the
    one-hot target, summed, and so does its gradient: every entry pays the negative term (1 - alpha) p^gamma
    (-log(1 - p)), and each positive anchor's labelled entry pays alpha (1 - p)^gamma (-log p) instead.

    A * C is ~1.6 * 10^7 per image for RetinaNet at 800 x 1344. On a CPU a new tensor of that size costs about ten
    in-place passes over it (its memory is fresh), and ATen's softplus more: autograd's form of this expression
    (about ten new [B, A, C] tensors and a softplus) made RetinaNet-R18's assignment + loss take 0.99 s at batch 2,
    9.6 % of its step in det.bench; here the value and the gradient come from three new tensors and in-place passes
    (0.27 s, 2.6 %), and `with_gradient` hands the gradient to autograd.
    """
    # at least float32 even under autocast (the value too): the sum runs over ~B*A*C terms
    x = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
    needs_grad = logits.requires_grad and torch.is_grad_enabled()
    with torch.no_grad():
        p = torch.sigmoid(x)  # [B, A, C]
        # -log(1 - p) = softplus(x) = x - log p. It only ever enters multiplied by p^gamma, so where p underflows
        # (x < -87 in float32) any finite value serves: the clamp keeps log 0 from making 0 * inf
        s = torch.log(p).clamp_(min=math.log(torch.finfo(x.dtype).tiny)).neg_().add_(x)
        p_gamma = p.pow(gamma)
        s.mul_(p_gamma)  # p^gamma softplus(x)
        negative = (1 - alpha) * (s.sum(-1) * weight).sum()
        # positive anchors' labelled entries: the positive term in place of the negative one, on [B, A] only
        xl = x.gather(-1, labels[..., None]).squeeze(-1)  # [B, A] the labelled class's logit
        pl, sl, sl_neg = torch.sigmoid(xl), F.softplus(xl), F.softplus(-xl)
        value = negative + ((alpha * (1 - pl) ** gamma * sl_neg - (1 - alpha) * pl ** gamma * sl) * pos).sum()
        if not needs_grad:
            return value
        # d/dx p^gamma softplus(x) = gamma (1 - p) p^gamma softplus(x) + p^(gamma + 1), as dp/dx = p (1 - p)
        s.addcmul_(s, p, value=-1)  # (1 - p) p^gamma softplus(x)
        grad = p.mul_(p_gamma).add_(s, alpha=gamma).mul_(weight[..., None] * (1 - alpha))  # [B, A, C] in p's memory
        # d/dx (1 - p)^gamma softplus(-x) = -(1 - p)^gamma (gamma p softplus(-x) + 1 - p)
        fix_grad = (-alpha * (1 - pl) ** gamma * (gamma * pl * sl_neg + 1 - pl)
                    - (1 - alpha) * pl ** gamma * (gamma * (1 - pl) * sl + pl))
        grad.scatter_add_(-1, labels[..., None], (fix_grad * pos)[..., None])
    return with_gradient(value, logits, grad)


def with_gradient(value: Tensor, x: Tensor, grad: Tensor) -> Tensor:
    """A scalar equal to `value` whose gradient with respect to `x` is `grad` (both computed without autograd):
    <x, grad> - <x, grad> is 0, and autograd sees only the first term's gradient, grad (in x's dtype). The product
    runs in grad's dtype: a half-precision sum over ~10^7 terms could overflow, and inf - inf is nan."""
    dot = torch.dot(x.flatten().to(grad.dtype), grad.flatten())
    return value + (dot - dot.detach())


def gaussian_focal_loss(pred: Tensor, target: Tensor, alpha: float = 2.0, gamma: float = 4.0) -> Tensor:
    """CornerNet's penalty-reduced focal loss (Law & Deng 2018, eq. 1) summed over every element, as mmdet's
    gaussian_focal_loss: pred and target [B, C, H, W], pred probabilities (mmdet's: logs of sigmoid outputs plus
    1e-12, not log-sigmoids of logits), target Gaussian heatmaps. Cells where the target is exactly 1 pay
    -(1 - p)^alpha log p; every other cell -p^alpha log(1 - p), scaled down near an object by (1 - target)^gamma.
    mmdet adds both terms at every cell, one of them 0; choosing one per cell gives the same numbers with a log and
    a power fewer over the [B, C, H, W] map (a third of the loss's time)."""
    eps = 1e-12
    pos = target.eq(1)
    weight = torch.where(pos, (1 - pred).pow(alpha), pred.pow(alpha) * (1 - target).pow(gamma))
    return -((torch.where(pos, pred, 1 - pred) + eps).log() * weight).sum()


def dice_loss(probs: Tensor, target: Tensor, eps: float = 1e-3) -> Tensor:
    """V-Net's Dice loss (Milletari et al. 2016, eq. 1) per mask, as mmdet's dice_loss with naive_dice=False: probs
    and target [..., D] (probabilities, and 0/1 or bool masks flattened over their pixels) -> [...] of
    1 - 2 sum(p t) / (sum(p^2) + eps + sum(t^2) + eps). eps keeps an empty target against a zero prediction finite."""
    target = target.float()
    return 1 - 2 * (probs * target).sum(-1) / (((probs * probs).sum(-1) + eps) + ((target * target).sum(-1) + eps))

"""Loss functions shared by detectors, for whole padded batches."""
import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(
    logits: Tensor, labels: Tensor, pos: Tensor, weight: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Focal loss (Lin et al. 2017, eq. 5) summed over anchors and classes, for one-hot targets.

    logits [B, A, C]; labels [B, A] the class of each positive anchor; pos [B, A]; weight [B, A] which anchors
    count at all (positives and negatives, not the ignored). Equals `torchvision.ops.sigmoid_focal_loss` on the
    one-hot target, summed: every entry pays the negative term (1 - alpha) p^gamma (-log(1 - p)), and each positive
    anchor's labelled entry pays alpha (1 - p)^gamma (-log p) instead. Written this way it needs three [B, A, C]
    temporaries instead of about ten, which is most of a RetinaNet loss's cost (A * C is ~10^7 per image).
    """
    # -log(1 - sigmoid(x)) = softplus(x), -log(sigmoid(x)) = softplus(-x): stable for large |x|
    negative = (torch.sigmoid(logits) ** gamma * F.softplus(logits)).sum(-1)  # [B, A]
    x = logits.gather(-1, labels[..., None]).squeeze(-1)  # [B, A] the labelled class's logit
    positive_fix = alpha * torch.sigmoid(-x) ** gamma * F.softplus(-x) - (1 - alpha) * torch.sigmoid(x) ** gamma * (
        F.softplus(x))
    return ((1 - alpha) * negative * weight).sum() + (positive_fix * pos).sum()


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

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

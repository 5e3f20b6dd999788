"""Anchors ("priors", "default boxes") as mmdet's AnchorGenerator and SSDAnchorGenerator place them.

A detector describes its anchors once as base anchors per level (boxes around one grid cell) and tiles them over
each feature map with `grid_anchors`. The result depends only on the feature-map sizes, i.e. on the canvas, so
it is a constant of the compiled graph. Order, as mmdet's: level, then row, then column, then base anchor, which
is also the order in which heads flatten their outputs (`[B, K*C, H, W] -> [B, H*W*K, C]`).
"""
import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _centred_boxes(cx: float, cy: float, widths: Tensor, heights: Tensor) -> Tensor:
    return torch.stack([cx - 0.5 * widths, cy - 0.5 * heights, cx + 0.5 * widths, cy + 0.5 * heights], dim=-1)


def octave_base_anchors(
    strides: Sequence[int],
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    octave_base_scale: float = 4,
    scales_per_octave: int = 3,
) -> list[Tensor]:
    """RetinaNet's anchors (Lin et al. 2017, sec. 4): at each level, areas (stride * octave_base_scale * 2^(i/3))^2
    for i < scales_per_octave times the aspect ratios h/w; centred on the cell's top-left corner (mmdet's
    center_offset 0), ratio-major order. Returns [len(ratios) * scales_per_octave, 4] per level."""
    scales = torch.tensor([octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)])
    h_ratios = torch.tensor(ratios, dtype=torch.float32).sqrt()
    w_ratios = 1 / h_ratios
    anchors = []
    for stride in strides:
        widths = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
        heights = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        anchors.append(_centred_boxes(0.0, 0.0, widths, heights))
    return anchors


def ssd_sizes(input_size: int, basesize_ratio_range: tuple[float, float], num_levels: int) -> tuple[list, list]:
    """SSD's min/max anchor sizes per level (Liu et al. 2016, eq. 4) with mmdet's integer arithmetic and its extra
    small first level (7-15 % of 300 px for SSD300 on COCO, 4-10 % of 512 px for SSD512)."""
    low, high = int(basesize_ratio_range[0] * 100), int(basesize_ratio_range[1] * 100)
    step = int(math.floor(high - low) / (num_levels - 2))
    min_sizes = [int(input_size * r / 100) for r in range(low, high + 1, step)]
    max_sizes = [int(input_size * (r + step) / 100) for r in range(low, high + 1, step)]
    first = {(300, 15): (7, 15), (300, 20): (10, 20), (512, 10): (4, 10), (512, 15): (7, 15)}[(input_size, low)]
    return [int(input_size * first[0] / 100)] + min_sizes, [int(input_size * first[1] / 100)] + max_sizes


def ssd_base_anchors(
    strides: Sequence[int], ratios: Sequence[Sequence[float]], min_sizes: Sequence[int], max_sizes: Sequence[int]
) -> list[Tensor]:
    """SSD's default boxes per level: a square of side min_size, a square of side sqrt(min_size * max_size), then
    a box of area min_size^2 for each aspect ratio r and 1/r; centred in the cell (mmdet's SSDAnchorGenerator with
    scale_major=False, keeping its order: small square, large square, 1/r1, r1, 1/r2, r2)."""
    anchors = []
    for stride, level_ratios, min_size, max_size in zip(strides, ratios, min_sizes, max_sizes, strict=True):
        aspect = [1.0] + [x for r in level_ratios for x in (1 / r, r)]  # h / w
        h_ratios = torch.tensor(aspect, dtype=torch.float32).sqrt()
        scales = torch.tensor([1.0, math.sqrt(max_size / min_size)], dtype=torch.float32)
        widths = (min_size * scales[:, None] / h_ratios[None, :]).reshape(-1)  # scale-minor: all ratios per scale
        heights = (min_size * scales[:, None] * h_ratios[None, :]).reshape(-1)
        boxes = _centred_boxes(stride / 2, stride / 2, widths, heights)
        order = [0, len(aspect)] + list(range(1, len(aspect)))  # small square, large square, then the ratios
        anchors.append(boxes[order])
    return anchors


def grid_anchors(
    base_anchors: Sequence[Tensor], feature_sizes: Sequence[tuple[int, int]], strides: Sequence[float],
    device: torch.device | None = None,
) -> list[Tensor]:
    """Tile each level's base anchors [K, 4] over its (h, w) grid, shifted by `stride` per cell: [h*w*K, 4] each."""
    levels = []
    for base, (h, w), stride in zip(base_anchors, feature_sizes, strides, strict=True):
        ys, xs = torch.meshgrid(torch.arange(h, device=device) * stride, torch.arange(w, device=device) * stride,
                                indexing="ij")
        shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4).float()  # [h*w, 1, 4]
        levels.append((shifts + base.to(device)[None]).reshape(-1, 4))
    return levels

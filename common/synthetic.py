"""Procedural images for runs without a data set: coloured shapes on textured backgrounds.

Every shape is a polygon, so the same drawing gives a classification image, a detection box and an
instance-segmentation mask. Everything is a function of a numpy Generator: the same seed draws the same image.
"""
import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "triangle", "square", "pentagon", "star", "cross", "crescent", "arrow", "ell", "hourglass")


def _regular(n: int, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(math.cos(2 * math.pi * i / n + phase), math.sin(2 * math.pi * i / n + phase)) for i in range(n)]


def _unit_polygon(kind: str) -> list[tuple[float, float]]:
    """The shape as a polygon inside the unit circle."""
    if kind == "circle":
        return _regular(32)
    if kind == "triangle":
        return _regular(3, -math.pi / 2)
    if kind == "square":
        return _regular(4, math.pi / 4)
    if kind == "pentagon":
        return _regular(5, -math.pi / 2)
    if kind == "star":
        outer, inner = _regular(5, -math.pi / 2), _regular(5, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in (pair[0], (0.4 * pair[1][0], 0.4 * pair[1][1]))]
    if kind == "crescent":  # outer arc of the unit circle, back along a smaller offset arc
        outer = [(math.cos(a), math.sin(a)) for a in np.linspace(0.25 * math.pi, 1.75 * math.pi, 16)]
        inner = [(0.45 + 0.6 * math.cos(a), 0.6 * math.sin(a)) for a in np.linspace(1.6 * math.pi, 0.4 * math.pi, 12)]
        return outer + inner
    outlines = {  # hand-drawn outlines on a [-1, 1] grid
        "cross": [(-.3, -.9), (.3, -.9), (.3, -.3), (.9, -.3), (.9, .3), (.3, .3), (.3, .9), (-.3, .9), (-.3, .3),
                  (-.9, .3), (-.9, -.3), (-.3, -.3)],
        "arrow": [(-.9, -.25), (.2, -.25), (.2, -.7), (.9, 0), (.2, .7), (.2, .25), (-.9, .25)],
        "ell": [(-.7, -.9), (-.2, -.9), (-.2, .4), (.7, .4), (.7, .9), (-.7, .9)],
        "hourglass": [(-.7, -.9), (.7, -.9), (.12, 0), (.7, .9), (-.7, .9), (-.12, 0)],
    }
    return outlines[kind]


def shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of `kind` centred at (cx, cy), scaled by `radius` and rotated by `angle` radians (pixels)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + radius * (c * x - s * y), cy + radius * (s * x + c * y)) for x, y in _unit_polygon(kind)]


def class_color(rng: np.random.Generator, label: int, num_classes: int) -> tuple[int, int, int]:
    """A saturated colour whose hue is typical of the class (± a quarter of its hue band), so colour is a cue
    but not a give-away between neighbouring classes."""
    hue = (label + rng.uniform(-0.75, 0.75)) / num_classes % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def textured_background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Muted base colour, a random-direction sinusoidal texture and pixel noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta, period = rng.uniform(0, math.pi), rng.uniform(4, 16)
    wave = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)[..., None]
    base = rng.uniform(60, 160, size=3)
    img = base + 25 * wave * rng.uniform(0.3, 1.0, size=3) + rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def draw_polygon(image: Image.Image, polygon: list[tuple[float, float]], color: tuple[int, int, int]) -> None:
    ImageDraw.Draw(image).polygon(polygon, fill=color)


def classification_image(seed: int, index: int, num_classes: int, size: int) -> tuple[Image.Image, int]:
    """Image `index` of a synthetic classification set: one shape of class `index % num_classes`."""
    rng = np.random.default_rng([seed, index])
    label = index % num_classes
    image = textured_background(rng, size, size)
    radius = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    polygon = shape_polygon(SHAPES[label % len(SHAPES)], cx, cy, radius, rng.uniform(0, 2 * math.pi))
    draw_polygon(image, polygon, class_color(rng, label, num_classes))
    return image, label

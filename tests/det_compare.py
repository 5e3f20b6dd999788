"""Detections compared as sets, portably across CPUs (`assert_same_detections`), the batch every mmdet fixture
was recorded on (`fixture_batch`), and random detectors made to detect (`decisive`).

The mmdet fixtures were recorded on one CPU. On another (AVX2 instead of AVX-512, another thread count) the float32
sums inside every conv and reduction run in another order, so logits and deltas differ in their last bits (~1e-6
relative after twenty layers). That moves scores by ~1e-6 and boxes by up to ~1e-5 of their size, and it can swap
the rank of two detections whose scores are that close, or swap which of two such detections is the last one kept
at the `max_det` cut. A position-by-position comparison fails on both; the models are not wrong. So:

* each expected detection must have a partner among the returned ones with the same label, a score within
  `score_tol` and a box within `box_tol` per coordinate (order free);
* a detection without a partner is forgiven only at the cut: when the other side is full (`max_det` detections)
  and its score is within `score_tol` of that side's lowest kept score (it may be the 200th on one CPU and the
  201st on another);
* anything else unpaired (a wrong box, a wrong label, a missing or extra detection above the cut, a wrong count
  below max_det) fails, naming the detection.
"""
import gzip
import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

DATA = Path(__file__).parent / "data"

# Scores are probabilities; the last-bit differences above move them by ~1e-6, so 1e-4 leaves 100x margin and still
# tells apart any two detections that are not near-ties.
SCORE_TOL = 1e-4
# Box coordinates are anchor + delta * anchor size, so their float32 error scales with the box, which is at most the
# canvas: 1e-4 of the canvas (0.03 px at 320 px) is ~15x the worst seen between two CPUs (0.0023 px, RetinaNet-R18
# at 320 px); a wrong box is off by pixels. The 1e-3 px floor covers float32 rounding of coordinates (~3e-5 px).
BOX_TOL_PER_CANVAS_PX = 1e-4
BOX_TOL_FLOOR = 1e-3
# Losses are sums over ~1e5 anchor terms in float32 of inputs with the differences above: rel 1e-4, 100x margin.
LOSS_REL = 1e-4


def box_tolerance(canvas: int | tuple[int, ...]) -> float:
    """Absolute tolerance in pixels for a box coordinate on a canvas of this size (px, or (h, w))."""
    return BOX_TOL_FLOOR + BOX_TOL_PER_CANVAS_PX * max(canvas if isinstance(canvas, tuple) else (canvas,))


def _as_rows(boxes, scores, labels) -> list[tuple[int, float, list[float]]]:
    boxes, scores = torch.as_tensor(boxes, dtype=torch.float64), torch.as_tensor(scores, dtype=torch.float64)
    return [(int(lab), float(s), b.tolist()) for b, s, lab in zip(boxes.reshape(-1, 4), scores, labels, strict=True)]


def _describe(row: tuple[int, float, list[float]]) -> str:
    return f"label {row[0]} score {row[1]:.6f} box [{', '.join(f'{v:.3f}' for v in row[2])}]"


def assert_same_detections(
    got: dict[str, Tensor], expected: dict[str, list], *, max_det: int, canvas: int | tuple[int, ...],
    score_tol: float = SCORE_TOL, box_tol: float | None = None,
) -> None:
    """One image's detections against a recorded list, as sets (see the module docstring).

    got: {"boxes" [K, 4], "scores" [K], "labels" [K], "valid" [K]} (one image of a model's output, K >= max_det
    padded rows allowed); expected: {"boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...]}.
    """
    box_tol = box_tolerance(canvas) if box_tol is None else box_tol
    valid = got["valid"].bool()
    ours = _as_rows(got["boxes"][valid], got["scores"][valid], got["labels"][valid].tolist())
    theirs = _as_rows(expected["boxes"], expected["scores"], expected["labels"])
    assert len(ours) <= max_det and len(theirs) <= max_det, (len(ours), len(theirs), max_det)
    unmatched = set(range(len(ours)))
    missing = []  # expected rows without a partner
    for row in sorted(theirs, key=lambda r: -r[1]):
        best, best_err = None, None
        for j in unmatched:
            label, score, box = ours[j]
            err = max(abs(a - b) for a, b in zip(box, row[2], strict=True))
            if label == row[0] and abs(score - row[1]) <= score_tol and err <= box_tol and (
                    best is None or err < best_err):
                best, best_err = j, err
        if best is None:
            missing.append(row)
        else:
            unmatched.discard(best)
    extra = [ours[j] for j in sorted(unmatched)]

    def forgiven(row, other_side) -> bool:  # a tie at the max_det cut of the other side
        return len(other_side) == max_det and row[1] <= min(r[1] for r in other_side) + score_tol

    problems = [f"expected {_describe(r)}: not returned" for r in missing if not forgiven(r, ours)]
    problems += [f"returned {_describe(r)}: not expected" for r in extra if not forgiven(r, theirs)]
    assert not problems, (f"{len(ours)} detections returned, {len(theirs)} expected (box tol {box_tol:.4f} px, "
                          f"score tol {score_tol}):\n" + "\n".join(problems[:10]))


CANVAS = (256, 320)  # (h, w), small for CI; a multiple of 32 as the mmdet data preprocessor pads to


def fixture_batch(max_gt: int = 4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Three random uint8 images on one canvas: a full-canvas image with three objects, a 200x250 image with three
    (one touching its bottom-right corner, so the canvas padding matters) and a 160x192 image with none."""
    images = torch.randint(0, 256, (3, 3, *CANVAS), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    objects = [
        ([[20, 30, 120, 150], [150, 60, 310, 250], [200, 10, 230, 40]], [0, 17, 79]),
        ([[10, 10, 90, 80], [130, 90, 250, 200], [60, 100, 180, 190]], [5, 42, 5]),
        ([], []),
    ]
    boxes = torch.zeros(3, max_gt, 4)
    labels = torch.zeros(3, max_gt, dtype=torch.long)
    valid = torch.zeros(3, max_gt, dtype=torch.bool)
    for i, (b, lab) in enumerate(objects):
        boxes[i, :len(b)] = torch.tensor(b, dtype=torch.float32).reshape(-1, 4)
        labels[i, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        valid[i, :len(b)] = True
    image_size = torch.tensor([[256, 320], [200, 250], [160, 192]])
    return images, {"boxes": boxes, "labels": labels, "valid": valid, "image_size": image_size}


def load_mmdet_fixture(name: str) -> dict:
    """tests/data/mmdet_<name>.json.gz, what a recorder script wrote from mmdet 3.3.0."""
    with gzip.open(DATA / f"mmdet_{name}.json.gz", "rt") as f:
        return json.load(f)


def assert_same_losses(losses: dict[str, Tensor], expected: dict[str, float]) -> None:
    """The model's loss dict has exactly the recorded names, each a scalar within LOSS_REL of mmdet's value."""
    import pytest

    assert sorted(losses) == sorted(expected)
    for key, value in expected.items():
        assert losses[key].shape == () and losses[key].item() == pytest.approx(value, rel=LOSS_REL), key


def assert_matches_fixture(model, fixture: dict, *, max_det: int) -> None:
    """`model`, with the fixture's seeded weights loaded, on `fixture_batch()`: its training losses and its padded
    detections equal the recorded mmdet ones (losses within LOSS_REL, detections as sets)."""
    images, targets = fixture_batch()
    assert int(images.long().sum()) == fixture["image_sum"]  # the generator gave the same images
    assert_same_losses(model.train()(images, targets), fixture["losses"])
    with torch.no_grad():
        out = model.eval()(images, image_size=targets["image_size"])
    assert {k: tuple(v.shape) for k, v in out.items()} == {"boxes": (3, max_det, 4), "scores": (3, max_det),
                                                           "labels": (3, max_det), "valid": (3, max_det)}
    assert any(len(d["scores"]) for d in fixture["detections"])  # the fixture holds detections to compare
    for b, expected in enumerate(fixture["detections"]):  # as sets: the recording CPU's order is not portable
        assert_same_detections({k: v[b] for k, v in out.items()}, expected, max_det=max_det, canvas=CANVAS)


def empty_targets(batch: int, max_gt: int, image_size) -> dict[str, torch.Tensor]:
    """Padded targets without objects: `max_gt` rows per image, none valid; image_size one (h, w) for every image or
    one per image."""
    return {"boxes": torch.zeros(batch, max_gt, 4), "labels": torch.zeros(batch, max_gt, dtype=torch.long),
            "valid": torch.zeros(batch, max_gt, dtype=torch.bool),
            "image_size": torch.tensor(image_size).expand(batch, 2).clone()}


def small_batch() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A training batch for contract and compile tests: two 64 x 96 images, one with two objects (padded to three
    rows), one without."""
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    targets = empty_targets(2, 3, (64, 96))
    targets["boxes"][0, :2] = torch.tensor([[4.0, 6, 40, 50], [30, 10, 90, 60]])
    targets["labels"][0, :2] = torch.tensor([3, 7])
    targets["valid"][0, :2] = True
    return images, targets


def _rank_losses(rank: int, world_size: int, init_file: str, out_file: str, make_batch, loss_fn,
                 shared: tuple[str, ...]) -> None:
    """One of `world_size` gloo ranks: `loss_fn` on its slice of the global batch (`shared` outputs, such as the
    priors, are every rank's whole), saved to out_file.<rank>."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    outputs, targets = make_batch(2 * world_size)
    mine = slice(2 * rank, 2 * rank + 2)
    losses = loss_fn({k: v if k in shared else v[mine] for k, v in outputs.items()},
                     {k: v[mine] for k, v in targets.items()})
    torch.save({k: v.detach() for k, v in losses.items()}, f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()


def losses_on_two_ranks(tmp_path, make_batch, loss_fn, shared: tuple[str, ...]) -> tuple[dict, list[dict]]:
    """mmdet's reduce_mean, checked: `loss_fn` on one process's whole batch of 4 (`make_batch(4)` -> outputs,
    targets) and on two gloo ranks of 2 images each. Returns (whole, [rank 0's, rank 1's]); the callers assert
    that the ranks' mean, what DistributedDataParallel's averaged gradients follow, equals the whole."""
    outputs, targets = make_batch(4)
    whole = loss_fn(outputs, targets)
    torch.multiprocessing.spawn(_rank_losses, nprocs=2, args=(2, str(tmp_path / "init"), str(tmp_path / "losses"),
                                                             make_batch, loss_fn, shared))
    return whole, [torch.load(tmp_path / f"losses.{r}") for r in range(2)]


# the convs that give each head's class (and objectness) logits: RetinaNet, FCOS and SOLOv2 (conv_cls), YOLOX (per
# level), YOLOv3 (box, objectness and classes in one), SSD and SSDLite (per level; SSDLite's last of two), CenterNet
HEAD_LOGITS = re.compile(r"(retina_cls|conv_cls|conv_(cls|obj)\.\d|convs_pred\.\d|cls_convs\.\d+\.\d|heatmap_head\.2)$")


def decisive(model: nn.Module, images: torch.Tensor) -> None:
    """Rescale every head's logits conv so that its outputs on `images` spread as N(2, 1): detections pass the score
    thresholds and their scores lie far apart. Random heads score every location almost alike (or saturate at 1),
    and near-equal scores are ranked, suppressed and peak-picked by float rounding, which ONNX Runtime's kernels
    round otherwise."""
    convs = [m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and HEAD_LOGITS.search(name)]
    assert convs, "no head logits found"
    seen = {}

    def record(conv: nn.Conv2d, _, out: torch.Tensor) -> None:  # a head shared over the levels: by its first
        seen.setdefault(conv, (out.mean(), out.std()))

    hooks = [conv.register_forward_hook(record) for conv in convs]
    with torch.no_grad():
        model.head_outputs(images)  # every family's network without its decoding: the NMS would only cost time
        for hook in hooks:
            hook.remove()
        for conv, (mean, std) in seen.items():
            conv.weight /= std
            conv.bias.sub_(mean).div_(std).add_(2.0)

"""tests/det_compare.py, the set comparison of detections the mmdet fixture tests use: it forgives what differs
between CPUs (order among near-equal scores, a tie at the max_det cut, last-bit noise) and nothing else; and
tests/graph_check.py, which must fail on a host sync."""
import pytest
import torch

from tests.det_compare import assert_same_detections
from tests.graph_check import compiled_outputs

CANVAS = 320
MAX_DET = 6


def recorded(n: int = MAX_DET) -> dict[str, list]:
    """n detections with scores 0.9, 0.8, ..., two of them (2 and 3) a near-tie in score."""
    scores = [0.9 - 0.1 * i for i in range(n)]
    scores[3] = scores[2] - 2e-6
    boxes = [[10.0 * i, 5.0 * i, 10.0 * i + 50, 5.0 * i + 80] for i in range(n)]
    return {"boxes": boxes, "scores": scores, "labels": [i % 3 for i in range(n)]}


def returned(rec: dict[str, list], order=None, pad: int = 2) -> dict[str, torch.Tensor]:
    """A model's padded output holding `rec`'s detections in `order`."""
    order = list(range(len(rec["scores"]))) if order is None else order
    out = {"boxes": torch.tensor([rec["boxes"][i] for i in order]).reshape(-1, 4),
           "scores": torch.tensor([rec["scores"][i] for i in order]),
           "labels": torch.tensor([rec["labels"][i] for i in order], dtype=torch.long),
           "valid": torch.ones(len(order), dtype=torch.bool)}
    return {k: torch.cat([v, torch.zeros(pad, *v.shape[1:], dtype=v.dtype)]) for k, v in out.items()}


def check(got, rec, max_det=MAX_DET):
    assert_same_detections(got, rec, max_det=max_det, canvas=CANVAS)


def test_accepts_noise_and_swapped_near_ties():
    rec = recorded()
    got = returned(rec, order=[0, 1, 3, 2, 4, 5])
    got["boxes"] += 0.01  # last-bit noise of a 320 px box, within 1e-4 of the canvas
    got["scores"][:MAX_DET] -= 5e-5
    check(got, rec)


def test_accepts_a_tie_at_the_cut():
    rec = recorded()
    got = returned(rec)
    # the recorded 6th detection is the 7th here; a detection of nearly its score took its place
    got["boxes"][5] = torch.tensor([200.0, 200, 260, 270])
    got["labels"][5] = 2
    got["scores"][5] = rec["scores"][5] + 3e-5
    check(got, rec)


@pytest.mark.parametrize("fault", ["box", "label", "score", "missing_above_the_cut", "count", "extra"])
def test_rejects(fault):
    rec = recorded(5)  # below max_det: no cut to forgive anything at
    got = returned(rec)
    if fault == "box":
        got["boxes"][1, 2] += 2.0
    elif fault == "label":
        got["labels"][0] = 7
    elif fault == "score":
        got["scores"][4] += 0.01
    elif fault == "missing_above_the_cut":
        full = recorded()
        got = returned(full)
        got["boxes"][1] = torch.tensor([200.0, 200, 260, 270])  # the 2nd detection replaced by another
        rec = full
    elif fault == "count":
        got["valid"][4] = False
    elif fault == "extra":
        got["valid"][5] = True
        got["boxes"][5] = torch.tensor([1.0, 2, 30, 40])
        got["scores"][5] = 0.3
    with pytest.raises(AssertionError):
        check(got, rec)


def test_rejects_a_tie_that_is_not_at_the_cut_when_not_full():
    rec = recorded(5)
    got = returned(rec)
    got["boxes"][4] = torch.tensor([200.0, 200, 260, 270])  # the lowest one replaced: no cut at 5 < max_det
    with pytest.raises(AssertionError, match="not returned"):
        check(got, rec)


@pytest.mark.parametrize("step", [lambda x: x * (x > 0).sum().item(), lambda x: x[x > 0].sum(),
                                  lambda x: x.nonzero().float().sum()], ids=["item", "boolean-index", "nonzero"])
def test_graph_check_fails_on_host_syncs(step):
    """tests/graph_check.py catches what fullgraph=True lets through in torch 2.14, and passes a clean step."""
    x = torch.randn(6, requires_grad=True)
    torch.testing.assert_close(compiled_outputs(lambda x: (2 * x).sum(), x), (2 * x).sum())
    with pytest.raises(AssertionError, match="host syncs"):
        compiled_outputs(step, x)

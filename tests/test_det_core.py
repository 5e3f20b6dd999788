"""det/ core: boxes, anchors (against recorded mmdet anchors), the batched assigner and hard-negative mining
(against per-image loop references written after mmdet's code), NMS (against torchvision), and compilation."""
import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision

from det import anchors as A
from det.assign import gather_gt, hard_negative_mask, max_iou_assign
from det.boxes import box_iou, clip_boxes, decode_deltas, encode_deltas
from det.losses import sigmoid_focal_loss
from det.models.dense import predict_boxes
from det.nms import batched_nms, select_and_nms, topk_candidates
from tests.graph_check import compiled_outputs

FIXTURE = json.loads((Path(__file__).parent / "data" / "mmdet_anchors.json").read_text())


def random_boxes(generator: torch.Generator, shape: tuple[int, ...], canvas: float = 64.0) -> torch.Tensor:
    xy = torch.rand(*shape, 2, generator=generator) * canvas * 0.8
    wh = torch.rand(*shape, 2, generator=generator) * canvas * 0.5 + 2
    return torch.cat([xy, xy + wh], dim=-1)


def test_box_iou_matches_torchvision_and_broadcasts():
    g = torch.Generator().manual_seed(0)
    a, b = random_boxes(g, (3, 7)), random_boxes(g, (3, 5))
    batched = box_iou(a, b)
    for i in range(3):
        torch.testing.assert_close(batched[i], torchvision.ops.box_iou(a[i], b[i]))
    assert box_iou(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0.0  # padding rows: 0, not NaN


def test_delta_coder_round_trip_and_mmdet_example():
    g = torch.Generator().manual_seed(1)
    anchors, boxes = random_boxes(g, (50,)), random_boxes(g, (50,))
    stds = (0.1, 0.1, 0.2, 0.2)
    torch.testing.assert_close(decode_deltas(anchors, encode_deltas(anchors, boxes, stds=stds), stds=stds), boxes)
    # the worked example of mmdet's delta2bbox docstring, clipped to a 32 x 32 image
    rois = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [5, 5, 5, 5]])
    deltas = torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 2, -1], [0.7, -1.9, -0.5, 0.3]])
    expected = torch.tensor([[0.0, 0, 1, 1], [0.1409, 0.1409, 2.8591, 2.8591], [0, 0.3161, 4.1945, 0.6839],
                             [5, 5, 5, 5]])
    got = clip_boxes(decode_deltas(rois, deltas)[None], torch.tensor([[32, 32]]))[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


SSD300 = ([8, 16, 32, 64, 100, 300], [[2], [2, 3], [2, 3], [2, 3], [2], [2]])
SSD512 = ([8, 16, 32, 64, 128, 256, 512], [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]])
SSDLITE = ([16, 32, 64, 107, 160, 320], [[2, 3]] * 6)
ANCHOR_CASES = {  # the mmdet configs' anchor generators: strides and base anchors
    "retinanet_800x1344": ([8, 16, 32, 64, 128], lambda: A.octave_base_anchors([8, 16, 32, 64, 128])),
    "ssd300": (SSD300[0], lambda: A.ssd_base_anchors(*SSD300, *A.ssd_sizes(300, (0.15, 0.9), 6))),
    "ssd512": (SSD512[0], lambda: A.ssd_base_anchors(*SSD512, *A.ssd_sizes(512, (0.1, 0.9), 7))),
    "ssdlite320": (SSDLITE[0], lambda: A.ssd_base_anchors(*SSDLITE, [48, 100, 150, 202, 253, 304],
                                                          [100, 150, 202, 253, 304, 320])),
}


@pytest.mark.parametrize("name", sorted(ANCHOR_CASES))
def test_anchors_equal_mmdet(name):
    case = FIXTURE[name]
    strides, base = ANCHOR_CASES[name]
    levels = A.grid_anchors(base(), [tuple(s) for s in case["feature_sizes"]], strides)
    assert [len(level) for level in levels] == case["level_counts"]
    anchors = torch.cat(levels)
    torch.testing.assert_close(anchors[case["index"]], torch.tensor(case["anchors"]), atol=1e-3, rtol=0)
    assert anchors.double().sum().item() == pytest.approx(case["sum"], rel=1e-6)


def reference_assign(iou: torch.Tensor, pos_thr: float, neg_thr: float, min_pos_iou: float, all_max: bool):
    """mmdet's MaxIoUAssigner.assign_wrt_overlaps for one image, loops and index assignment as written there.
    iou: [A, M] over the valid gts only. Returns assigned gt index per anchor: -1 ignore, 0 negative, i+1 gt i."""
    num_anchors, num_gts = iou.shape
    assigned = torch.full((num_anchors,), -1, dtype=torch.long)
    if num_gts == 0:
        return assigned.zero_()
    max_overlaps, argmax_overlaps = iou.max(dim=1)
    gt_max_overlaps, gt_argmax_overlaps = iou.max(dim=0)
    assigned[(max_overlaps >= 0) & (max_overlaps < neg_thr)] = 0
    pos = max_overlaps >= pos_thr
    assigned[pos] = argmax_overlaps[pos] + 1
    for i in range(num_gts):
        if gt_max_overlaps[i] >= min_pos_iou:
            if all_max:
                assigned[iou[:, i] == gt_max_overlaps[i]] = i + 1
            else:
                assigned[gt_argmax_overlaps[i]] = i + 1
    return assigned


def padded_batch(seed: int, batch: int = 4, max_gt: int = 6):
    """Random gts with random validity (padding anywhere), one image with no objects, one with duplicate boxes."""
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(g, (batch, max_gt))
    valid = torch.rand(batch, max_gt, generator=g) > 0.3
    valid[0] = False
    boxes[1, 1], valid[1, :2] = boxes[1, 0], True  # two identical gts: ties in the low-quality matching
    return boxes, valid


@pytest.mark.parametrize("retinanet", [True, False], ids=["retinanet", "ssd"])
@pytest.mark.parametrize("seed", range(5))
def test_batched_assigner_equals_per_image_reference(retinanet, seed):
    strides = [8, 16, 32, 64, 128]
    anchors = torch.cat(A.grid_anchors(A.octave_base_anchors(strides), [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)],
                                       strides))
    gt_boxes, gt_valid = padded_batch(seed)
    # RetinaNet: anchors over an image's padding are invalid (mmdet's valid flags); the reference never sees them
    anchor_valid = torch.rand(len(gt_boxes), len(anchors), generator=torch.Generator().manual_seed(seed)) > 0.2
    if not retinanet:
        anchor_valid[:] = True
    thr = dict(pos_iou_thr=0.5, neg_iou_thr=0.4 if retinanet else 0.5, min_pos_iou=0.0)
    matched, pos, neg = max_iou_assign(box_iou(anchors, gt_boxes), gt_valid, **thr, gt_max_assign_all=retinanet,
                                       anchor_valid=anchor_valid)
    for b in range(len(gt_boxes)):
        real, usable = gt_valid[b].nonzero().flatten(), anchor_valid[b]
        ref = reference_assign(box_iou(anchors[usable], gt_boxes[b, real]), thr["pos_iou_thr"], thr["neg_iou_thr"],
                               thr["min_pos_iou"], retinanet)
        assert torch.equal(pos[b][usable], ref > 0) and torch.equal(neg[b][usable], ref == 0)
        assert not pos[b][~usable].any() and not neg[b][~usable].any()
        assert torch.equal(matched[b][usable][pos[b][usable]], real[ref[ref > 0] - 1])
    assert not pos[0].any() and neg[0].equal(anchor_valid[0])  # no objects: every usable anchor is background


def test_invalid_anchors_take_part_in_nothing_and_gather():
    iou = torch.tensor([[[0.9], [0.1], [0.05]]])  # one image, three anchors, one gt
    _, pos, neg = max_iou_assign(iou, torch.tensor([[True]]), pos_iou_thr=0.5, neg_iou_thr=0.4,
                                 anchor_valid=torch.tensor([[False, True, True]]))
    # as mmdet, which assigns among valid anchors only: the gt's best *valid* anchor is a low-quality positive
    assert pos.tolist() == [[False, True, False]] and neg.tolist() == [[False, False, True]]
    values = torch.arange(6.0).reshape(1, 3, 2)
    assert gather_gt(values, torch.tensor([[2, 0]])).tolist() == [[[4.0, 5.0], [0.0, 1.0]]]


@pytest.mark.parametrize("seed", range(5))
def test_hard_negative_mining_equals_per_image_topk(seed):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(4, 300, generator=g)
    pos = torch.rand(4, 300, generator=g) > 0.97
    neg = ~pos & (torch.rand(4, 300, generator=g) > 0.1)
    pos[0] = False  # no positives: no negatives either
    pos[1, :100], neg[1, :100] = True, False  # more positives than 3x the negatives allow: all negatives
    selected = hard_negative_mask(loss, pos, neg)
    for b in range(4):
        num_neg = min(3 * int(pos[b].sum()), int(neg[b].sum()))
        expected = loss[b][neg[b]].topk(num_neg).values.sum()
        torch.testing.assert_close((loss[b] * selected[b]).sum(), expected)
        assert not (selected[b] & ~neg[b]).any()


def assert_no_near_ties(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_thr: float) -> None:
    """The NMS comparisons below are exact, position by position, between two implementations: portable only if no
    decision rests on float32 rounding, which differs between our broadcast IoU, torchvision's kernel and CPUs
    (~1e-7). So the seeded inputs (the same on every machine) must hold no equal scores and no same-class pair
    whose IoU, in float64, lies within 1e-5 of the threshold; a new seed that breaks this fails here, not by chance
    on another CPU."""
    for b in range(len(boxes)):
        assert len(scores[b].unique()) == scores.shape[1]
        iou = torchvision.ops.box_iou(boxes[b].double(), boxes[b].double())
        assert ((iou - iou_thr).abs() > 1e-5)[labels[b][:, None] == labels[b][None]].all()


@pytest.mark.parametrize("seed", range(5))
def test_nms_equals_torchvision(seed):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(g, (3, 200), canvas=100)
    scores = torch.rand(3, 200, generator=g)
    labels = torch.randint(0, 3, (3, 200), generator=g)
    valid = torch.rand(3, 200, generator=g) > 0.2
    valid[2] = False  # an image with nothing left
    assert_no_near_ties(boxes, scores, labels, 0.5)
    out_boxes, out_scores, out_labels, out_valid = batched_nms(boxes, scores, labels, valid, iou_thr=0.5, max_det=50)
    assert out_boxes.shape == (3, 50, 4) and out_valid.shape == (3, 50)
    for b in range(3):
        keep = torchvision.ops.batched_nms(boxes[b][valid[b]], scores[b][valid[b]], labels[b][valid[b]], 0.5)[:50]
        assert torch.equal(out_boxes[b][out_valid[b]], boxes[b][valid[b]][keep])
        assert torch.equal(out_labels[b][out_valid[b]], labels[b][valid[b]][keep])
    assert not out_valid[2].any()


def test_nms_chain_needs_many_passes_and_is_one_graph():
    """A chain of 40 boxes, each overlapping the next by IoU 0.6: greedy NMS keeps every other box, which takes
    Cluster-NMS's loop 20 passes; compiled as one graph (no host sync, the stop is a while_loop) it gives the same
    boxes as torchvision's NMS, and so do random batches."""
    x = torch.arange(40.0) * 2.5  # width 10, shift 2.5: IoU 7.5 / 12.5 = 0.6 with the next, 0.33 with the second
    boxes = torch.stack([x, torch.zeros(40), x + 10, torch.full((40,), 10.0)], -1)[None]  # [1, 40, 4]
    scores = torch.linspace(1, 0.5, 40)[None]
    labels, valid = torch.zeros(1, 40, dtype=torch.long), torch.ones(1, 40, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    random = (random_boxes(g, (2, 200), canvas=100), torch.rand(2, 200, generator=g),
              torch.randint(0, 3, (2, 200), generator=g), torch.rand(2, 200, generator=g) > 0.2)
    assert_no_near_ties(*random[:3], 0.5)
    for b_boxes, b_scores, b_labels, b_valid in ((boxes, scores, labels, valid), random):
        out = compiled_outputs(partial(batched_nms, iou_thr=0.5, max_det=50), b_boxes, b_scores, b_labels, b_valid)
        for b in range(len(b_boxes)):
            v = b_valid[b]
            keep = torchvision.ops.batched_nms(b_boxes[b][v], b_scores[b][v], b_labels[b][v], 0.5)[:50]
            assert torch.equal(out[0][b][out[3][b]], b_boxes[b][v][keep])
            if b_boxes is boxes:
                assert len(keep) == 20


def test_nms_over_the_top_candidates():
    g = torch.Generator().manual_seed(7)
    boxes, scores = random_boxes(g, (1, 300), canvas=100), torch.rand(1, 300, generator=g)
    labels, valid = torch.zeros(1, 300, dtype=torch.long), torch.ones(1, 300, dtype=torch.bool)
    assert_no_near_ties(boxes, scores, labels, 0.5)
    _, out_scores, _, out_valid = batched_nms(boxes, scores, labels, valid, iou_thr=0.5, max_det=300,
                                              max_candidates=50)
    top = scores[0].topk(50).indices  # exactly torchvision's NMS over the 50 best
    keep = torchvision.ops.nms(boxes[0, top], scores[0, top], 0.5)
    assert torch.equal(out_scores[0][out_valid[0]], scores[0, top][keep])


def test_topk_candidates_per_level():
    scores = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.05, 0.3], [0.6, 0.7]]])  # [1, A=4, C=2], levels of 3 and 1
    boxes = torch.arange(16.0).reshape(1, 4, 4)
    cand_boxes, cand_scores, cand_labels, cand_valid = topk_candidates(scores, boxes, [3, 1], nms_pre=2,
                                                                       score_thr=0.5)
    assert cand_scores[0].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert cand_labels.tolist() == [[0, 1, 1, 0]] and cand_valid.tolist() == [[True, True, True, True]]
    assert cand_boxes[0, 1].tolist() == boxes[0, 1].tolist()
    _, _, _, low = topk_candidates(scores, boxes, [3, 1], nms_pre=3, score_thr=0.85)
    assert low.tolist() == [[True, False, False, False, False]]


def test_select_and_nms_on_decoded_boxes():
    """Boxes from any decoder (here: given directly, as a point head's): clipped, empty ones and low scores
    dropped, same-class overlaps suppressed, other classes kept, sorted by score."""
    boxes = torch.tensor([[[0.0, 0, 50, 50], [2, 2, 52, 52], [0, 0, 50, 50], [90, 10, 130, 40], [120, 5, 140, 30],
                           [30, 30, 60, 60]]])  # [1, A=6, 4]; levels of 4 and 2 locations
    scores = torch.zeros(1, 6, 2)
    scores[0, :, 0] = torch.tensor([0.9, 0.8, 0.0, 0.7, 0.95, 0.01])  # 4: outside once clipped; 5: under score_thr
    scores[0, 2, 1] = 0.6  # same box as 0, other class: kept
    out = select_and_nms(boxes, scores, [4, 2], torch.tensor([[100, 110]]), nms_pre=4, score_thr=0.05, iou_thr=0.5,
                         max_det=5)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"boxes": (1, 5, 4), "scores": (1, 5), "labels": (1, 5),
                                                           "valid": (1, 5)}
    n = int(out["valid"].sum())
    assert out["scores"][0, :n].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert out["labels"][0, :n].tolist() == [0, 0, 1]
    assert out["boxes"][0, 1].tolist() == [90.0, 10.0, 110.0, 40.0]  # clipped to the 110 px width
    g = torch.Generator().manual_seed(8)  # predict_boxes is decode + select_and_nms
    anchors, deltas = random_boxes(g, (40,)), torch.randn(2, 40, 4, generator=g) * 0.2
    probs, size = torch.rand(2, 40, 3, generator=g), torch.tensor([[60, 64], [50, 40]])
    cfg = dict(nms_pre=20, score_thr=0.3, iou_thr=0.5, max_det=10)
    want = select_and_nms(decode_deltas(anchors[None], deltas, stds=(0.1, 0.1, 0.2, 0.2)), probs, [30, 10], size,
                          **cfg)
    got = predict_boxes(probs, deltas, anchors, [30, 10], size, stds=(0.1, 0.1, 0.2, 0.2), **cfg)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_assignment_and_mining_compile_without_graph_breaks():
    def step(anchors, gt_boxes, gt_valid, loss):
        matched, pos, neg = max_iou_assign(box_iou(anchors, gt_boxes), gt_valid, pos_iou_thr=0.5, neg_iou_thr=0.5)
        targets = encode_deltas(anchors, gather_gt(gt_boxes, matched))
        return targets, hard_negative_mask(loss, pos, neg)

    anchors = random_boxes(torch.Generator().manual_seed(3), (100,))
    gt_boxes, gt_valid = padded_batch(3)
    loss = torch.rand(4, 100)
    for got, want in zip(compiled_outputs(step, anchors, gt_boxes, gt_valid, loss),
                         step(anchors, gt_boxes, gt_valid, loss), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 1.5)])
def test_sparse_focal_loss_equals_torchvision_dense(alpha, gamma):
    """Value and gradient (ours is written by hand, torchvision's comes from autograd), at the recipe's alpha and
    gamma and at others, in float64 so that a wrong term shows above rounding."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 50, 7, generator=g, dtype=torch.float64) * 4  # large |x| too: softplus must stay stable
    labels = torch.randint(0, 7, (3, 50), generator=g)
    pos = torch.rand(3, 50, generator=g) > 0.8
    weight = pos | (torch.rand(3, 50, generator=g) > 0.3)  # some anchors ignored
    onehot = torch.nn.functional.one_hot(labels, 7).double() * pos[..., None]
    dense = torchvision.ops.sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma)  # [B, A, C]
    expected = (dense * weight[..., None]).sum()
    torch.testing.assert_close(sigmoid_focal_loss(logits, labels, pos, weight, alpha, gamma), expected)
    grad_ours = torch.autograd.grad(sigmoid_focal_loss(logits.requires_grad_(), labels, pos, weight, alpha, gamma) * 3,
                                    logits)[0]
    grad_dense = torch.autograd.grad((torchvision.ops.sigmoid_focal_loss(logits, onehot, alpha, gamma)
                                      * weight[..., None]).sum() * 3, logits)[0]
    torch.testing.assert_close(grad_ours, grad_dense)
    # compiled, the in-place passes go through AOT autograd's functionalisation and the hand-off through its backward
    x = logits.detach().requires_grad_()
    (compiled_outputs(sigmoid_focal_loss, x, labels, pos, weight, alpha, gamma) * 3).backward()
    torch.testing.assert_close(x.grad, grad_dense)

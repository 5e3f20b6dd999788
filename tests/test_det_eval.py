"""det/eval.py: COCOeval against hand-computed AP, mapping back to file coordinates and category ids, edge cases."""
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from det.eval import STATS, coco_evaluate, save_results, to_coco_results


def make_gt(images: list[tuple[int, int, int]], boxes: list[tuple[int, int, list[float]]], cat_ids=(3, 7)) -> COCO:
    """An in-memory COCO ground truth: images (id, width, height), boxes (image_id, category_id, [x, y, w, h])."""
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": w, "height": h} for i, w, h in images],
        "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for k, (i, c, b) in enumerate(boxes)],
        "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids],
    }
    coco.createIndex()
    return coco


def test_ap_matches_the_hand_computation(capsys):
    """One image, one class, ground truths g1, g2, g3 (40 x 40 px: medium), detections by score:
    d1 0.9 on g1 exactly (IoU 1), d2 0.8 on nothing, d3 0.7 inside g2, 28.8 x 40 px: IoU 1152 / 1600 = 0.72.

    IoU thresholds 0.50-0.70 (5 of the 10): TP, FP, TP -> recall 1/3, 1/3, 2/3, precision 1, 1/2, 2/3, made
    non-increasing from the right: 1, 2/3, 2/3. COCO's 101 recall points 0, 0.01, ..., 1 each take that precision at
    the first detection whose recall reaches them: 0..0.33 (34 points) -> 1, 0.34..0.66 (33 points) -> 2/3, 0.67..1
    (never reached) -> 0. AP = (34 + 33 * 2/3) / 101 = 56/101.
    Thresholds 0.75-0.95: d3 is a FP too: TP, FP, FP -> only 0..0.33 reached, at precision 1: AP = 34/101.
    AP (mean over the 10) = (5 * 56 + 5 * 34) / 10 / 101 = 45/101; AP50 = 56/101; AP75 = 34/101.
    AR100 = AR10: recall 2/3 at 5 thresholds, 1/3 at the other 5 -> 1/2; AR1 (d1 only): 1/3.
    Every box is medium, so APm = AP, ARm = AR100, and small / large have no ground truth: -1.
    """
    gt = make_gt([(1, 300, 300)], [(1, 3, [10, 10, 40, 40]), (1, 3, [100, 100, 40, 40]), (1, 3, [200, 20, 40, 40])])
    results = [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40], "score": 0.9},
               {"image_id": 1, "category_id": 3, "bbox": [200, 200, 40, 40], "score": 0.8},
               {"image_id": 1, "category_id": 3, "bbox": [100, 100, 28.8, 40], "score": 0.7}]
    stats = coco_evaluate(gt, results)
    expected = {"AP": 45 / 101, "AP50": 56 / 101, "AP75": 34 / 101, "APs": -1, "APm": 45 / 101, "APl": -1,
                "AR1": 1 / 3, "AR10": 0.5, "AR100": 0.5, "ARs": -1, "ARm": 0.5, "ARl": -1}
    assert list(stats) == list(STATS)
    assert stats == pytest.approx(expected, abs=1e-9)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.446" in capsys.readouterr().out
    assert "area" not in results[0]  # the caller's dicts are left alone


def test_results_map_back_to_file_coordinates_and_category_ids():
    label_to_cat = [3, 7, 11]
    metas = [{"image_id": 42, "file_name": "42.jpg", "orig_size": (100, 200), "scale": (0.5, 0.25)},
             {"image_id": 43, "file_name": "43.jpg", "orig_size": (60, 60), "scale": (2.0, 2.0)}]
    boxes = torch.tensor([[[5.0, 10.0, 25.0, 30.0], [40.0, 40.0, 60.0, 60.0], [0.0, 0.0, 1.0, 1.0]],
                          [[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.0, 0.0]])
    labels = torch.tensor([[2, 0, 1], [1, 0, 0]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    results = to_coco_results(boxes, scores, labels, valid, metas, label_to_cat)
    assert [(r["image_id"], r["category_id"]) for r in results] == [(42, 11), (42, 3), (43, 7)]
    # x / 0.25, y / 0.5; the second box reaches x 240, y 120 in the file and is clipped to 200 x 100
    assert results[0]["bbox"] == pytest.approx([20, 20, 80, 40])
    assert results[1]["bbox"] == pytest.approx([160, 80, 40, 20])
    assert results[2]["bbox"] == pytest.approx([5, 10, 10, 10])
    assert [r["score"] for r in results] == pytest.approx([0.9, 0.5, 0.8])
    json.dumps(results)  # plain python numbers


def test_perfect_detections_give_ap_1(tmp_path):
    """Every size range and both (gapped) category ids, detections made on a canvas at another scale."""
    label_to_cat = [3, 7]
    gt_boxes = [(1, 3, [4, 6, 20, 16]), (1, 7, [50, 40, 60, 50]), (1, 3, [10, 100, 150, 90]),
                (2, 7, [0, 0, 30, 40]), (2, 7, [70, 20, 25, 25])]
    gt = make_gt([(1, 240, 200), (2, 100, 80)], gt_boxes)
    metas = [{"image_id": 1, "orig_size": (200, 240), "scale": (0.64, 0.5)},
             {"image_id": 2, "orig_size": (80, 100), "scale": (1.6, 1.28)}]
    boxes, labels = torch.zeros(2, 4, 4), torch.zeros(2, 4, dtype=torch.int64)
    valid = torch.zeros(2, 4, dtype=torch.bool)
    for image, meta in enumerate(metas):
        sy, sx = meta["scale"]
        mine = [(c, b) for i, c, b in gt_boxes if i == meta["image_id"]]
        for k, (cat, (x, y, w, h)) in enumerate(mine):
            boxes[image, k] = torch.tensor([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
            labels[image, k], valid[image, k] = label_to_cat.index(cat), True
    results = to_coco_results(boxes, torch.rand(2, 4), labels, valid, metas, label_to_cat)
    stats = coco_evaluate(gt, results, out_file=tmp_path / "eval" / "bbox.json")
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert stats[name] == pytest.approx(1.0), name
    assert json.loads((tmp_path / "eval" / "bbox.json").read_text()) == stats


def test_no_detections_score_zero(capsys):
    gt = make_gt([(1, 100, 100), (2, 50, 80)], [(1, 3, [10, 10, 50, 50]), (2, 7, [5, 5, 20, 30])])
    stats = coco_evaluate(gt, [])
    assert stats["AP"] == stats["AP50"] == stats["AR100"] == 0.0
    assert "Average Recall" in capsys.readouterr().out


def test_segm_evaluates_masks_not_boxes():
    """iou_type="segm": two detections with the same box as the ground truth, one of them with the gt's L-shaped
    mask, the other with the missing corner filled: box AP would call both right; mask IoU 2400 / 3200 = 0.75
    makes the second a miss at the thresholds above 0.75, so its AP50 is 1 and its AP over 0.50:0.95 about 0.6."""
    from pycocotools import mask as mask_utils

    gt = make_gt([(1, 100, 100)], [(1, 3, [10, 10, 40, 80])])
    l_shape = [10, 10, 50, 10, 50, 50, 30, 50, 30, 90, 10, 90]  # 40 x 80 box minus its 20 x 40 bottom-right corner
    gt.dataset["annotations"][0].update(segmentation=[l_shape], area=2400.0)
    gt.createIndex()

    def rle(fill_corner: bool) -> dict:
        m = np.zeros((100, 100), dtype=np.uint8)
        m[10:50, 10:50] = 1
        m[50:90, 10:30] = 1
        if fill_corner:
            m[50:90, 30:50] = 1
        return mask_utils.encode(np.asfortranarray(m))

    for fill, ap in ((False, 1.0), (True, None)):
        results = [{"image_id": 1, "category_id": 3, "segmentation": rle(fill), "score": 0.9}]
        stats = coco_evaluate(gt, results, iou_type="segm")
        assert stats["AP50"] == pytest.approx(1.0)
        if ap is not None:
            assert stats["AP"] == pytest.approx(ap)
        else:
            assert 0.4 < stats["AP"] <= 0.6  # right at 5 or 6 of the 10 IoU thresholds, not all
    with pytest.raises(ValueError, match="unknown iou_type 'keypoints'"):
        coco_evaluate(gt, [], iou_type="keypoints")



def test_saved_detections_are_what_coco_tools_load(tmp_path):
    """detections_val.json is COCO's results format: pycocotools' loadRes reads it back and scores it as the list."""
    gt = make_gt([(1, 300, 300)], [(1, 3, [10, 10, 40, 40])])
    results = [{"image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 40.0, 40.0], "score": 0.9}]
    save_results(results, tmp_path / "out" / "detections_val.json")
    assert json.loads((tmp_path / "out" / "detections_val.json").read_text()) == results
    loaded = gt.loadRes(str(tmp_path / "out" / "detections_val.json"))
    assert loaded.getAnnIds() and loaded.loadAnns(loaded.getAnnIds())[0]["bbox"] == [10.0, 10.0, 40.0, 40.0]
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left

"""det/eval.py: COCOeval against hand-computed AP, mapping back to file coordinates and category ids, edge cases;
mask results (pasted, RLE, boxes from the masks) and train_det's segm evaluation."""
import json
from functools import partial

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from det import data
from det.eval import STATS, coco_evaluate, save_results, to_coco_results
from det.masks import decode_segmentation, mask_boxes
from det.presets import get_preset
from det.synthetic_coco import synthetic_coco


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


def test_segm_takes_the_mask_area_not_the_box_area():
    """mmdet's CocoMetric drops a segm result's "bbox": loadRes would give the detection its box's area. A small gt
    square (20 x 20) found exactly (score 0.5), and a higher-scoring false positive whose mask is a thin diagonal
    (small: ~150 px) in a 52 x 50 box (medium): in the small range it counts, so APs is 1/2, where box AP (the box's
    area) ignores it."""
    gt = make_gt([(1, 120, 120)], [(1, 3, [10, 10, 20, 20])])
    gt.dataset["annotations"][0]["segmentation"] = [[10, 10, 30, 10, 30, 30, 10, 30]]
    gt.createIndex()
    square = np.zeros((120, 120), dtype=np.uint8)
    square[10:30, 10:30] = 1
    diagonal = np.zeros((120, 120), dtype=np.uint8)
    for k in range(50):
        diagonal[60 + k, 60 + k:63 + k] = 1

    def rle(m: np.ndarray) -> dict:
        return {**(r := mask_utils.encode(np.asfortranarray(m))), "counts": r["counts"].decode()}

    results = [{"image_id": 1, "category_id": 3, "segmentation": rle(square), "bbox": [10, 10, 20, 20], "score": 0.5},
               {"image_id": 1, "category_id": 3, "segmentation": rle(diagonal), "bbox": [60, 60, 52, 50],
                "score": 0.9}]
    stats = coco_evaluate(gt, results, iou_type="segm")
    assert stats["APs"] == pytest.approx(0.5, abs=0.01) and stats["APm"] == -1
    assert coco_evaluate(gt, results)["APs"] == pytest.approx(1.0)  # boxes: the false positive is medium, ignored
    assert "bbox" in results[0]  # the caller's dicts are left alone


@pytest.fixture(scope="module")
def synthetic_val(tmp_path_factory):
    root = synthetic_coco(tmp_path_factory.mktemp("segm") / "synthetic_coco", num_train=1, num_val=8)
    return data.CocoDetection(root, "val", get_preset("solov2")["eval_transforms"](192))


def soft_gt_masks(dataset: data.CocoDetection, indices: list[int], shift: int = 0) -> tuple:
    """An evaluation batch of `indices` and what a perfect SOLOv2 would answer: each image's non-crowd gt masks,
    decoded at the file's size, resized (bilinear) onto the image's place on the canvas and averaged over 4 x 4
    cells: float [B, K, H/4, W/4] soft masks, `shift` cells to the right."""
    images, targets, metas = data.collate([dataset[i] for i in indices], max_gt=None, preset="solov2", img_size=192,
                                          evaluation=True)
    k, (height, width) = 100, images.shape[-2:]
    out = {"boxes": torch.zeros(len(indices), k, 4), "scores": torch.zeros(len(indices), k),
           "labels": torch.zeros(len(indices), k, dtype=torch.int64), "valid": torch.zeros(len(indices), k, dtype=bool),
           "masks": torch.zeros(len(indices), k, height // 4, width // 4)}
    for b, (index, (h, w)) in enumerate(zip(indices, targets["image_size"].tolist(), strict=True)):
        info = dataset.coco.imgs[dataset.ids[index]]
        anns = [a for a in dataset.coco.imgToAnns[info["id"]] if not a["iscrowd"]]
        for j, ann in enumerate(anns):
            full = torch.from_numpy(decode_segmentation(ann["segmentation"], info["height"], info["width"], ann["id"]))
            canvas = torch.zeros(1, 1, height, width)
            canvas[..., :h, :w] = torch.nn.functional.interpolate(full[None, None].float(), size=(h, w),
                                                                  mode="bilinear", align_corners=False)
            out["masks"][b, j] = torch.nn.functional.avg_pool2d(canvas, 4)[0, 0].roll(shift, -1)
            out["labels"][b, j] = dataset.label_to_cat.index(ann["category_id"])
            out["scores"][b, j], out["valid"][b, j] = 0.9 - 0.01 * j, True
    return targets, metas, out


def test_ground_truth_masks_fed_back_score_mask_ap_near_1(synthetic_val):
    """The gt's masks at stride 4 through to_coco_results (pasted at the file's size, RLE, boxes from the pasted
    masks): mask AP near 1 (AP50 1); box AP50 1 too, its AP lower (measured 0.76): at stride 4 (3.5 file px here)
    the cells round corners and tips off, each box side moves in by about a pixel, and small boxes fail the IoU
    thresholds from 0.85. Shifted 2 cells (8 canvas px) right, both drop."""
    stats = {}
    for shift in (0, 2):
        results = []
        for index in range(len(synthetic_val)):  # one per batch: landscape and portrait canvases
            targets, metas, out = soft_gt_masks(synthetic_val, [index], shift)
            results += to_coco_results(out["boxes"], out["scores"], out["labels"], out["valid"], metas,
                                       synthetic_val.label_to_cat, out["masks"], targets["image_size"])
        assert len(results) == sum(map(len, synthetic_val.labels)) > 10
        json.dumps(results)
        for r in results:
            h0, w0 = synthetic_val.coco.imgs[r["image_id"]]["height"], synthetic_val.coco.imgs[r["image_id"]]["width"]
            mask = mask_utils.decode(r["segmentation"])
            assert mask.shape == (h0, w0) and mask.any()
            x1, y1, x2, y2 = mask_boxes(torch.from_numpy(mask)[None].bool())[0].tolist()
            assert r["bbox"] == [x1, y1, x2 - x1, y2 - y1]  # the box of the pasted mask
        stats[shift] = (coco_evaluate(synthetic_val.coco, results, iou_type="segm"),
                        coco_evaluate(synthetic_val.coco, results))
    (segm, bbox), (segm_shifted, bbox_shifted) = stats[0], stats[2]
    assert segm["AP50"] == bbox["AP50"] == pytest.approx(1.0) and segm["AP"] > 0.9 and bbox["AP"] > 0.7
    assert segm_shifted["AP"] < segm["AP"] - 0.2 and bbox_shifted["AP"] < bbox["AP"] - 0.2


class Replay(torch.nn.Module):
    """A model in eval mode that answers each call with the next of `outputs` (the interface's eval dict)."""

    def __init__(self, outputs: list[dict]) -> None:
        super().__init__()
        self.outputs = iter(outputs)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device to be on

    def forward(self, images: torch.Tensor, image_size: torch.Tensor) -> dict[str, torch.Tensor]:
        return next(self.outputs)


def test_train_det_evaluates_masks_and_their_boxes(synthetic_val, tmp_path, monkeypatch, capsys):
    """A recipe with iou_type "segm" and a model answering the gt's soft masks: both summaries written (mask AP 0.96,
    box AP 0.76, as in the test above), mask AP under the usual names (what picks best.pth) and the boxes' prefixed
    bbox_, all of it one readable record of log.jsonl."""
    import train_det
    from common.loop import evaluate_and_log
    from det.models import RECIPES

    monkeypatch.setitem(RECIPES, "retinanet_r18", {**RECIPES["retinanet_r18"], "iou_type": "segm"})
    args = train_det.parse_args(["--model", "retinanet_r18", "--output-dir", str(tmp_path), "--batch-size", "2"])
    args.world_size, args.memory_format, args.log_file = 1, torch.contiguous_format, tmp_path / "log.jsonl"
    _, val_loader = data.build_loaders(synthetic_val, synthetic_val, preset="solov2", img_size=192, batch_size=2,
                                       workers=0, rank=0, world_size=1, seed=0, max_gt=None)
    run_eval = partial(train_det.evaluate, loader=val_loader, device=torch.device("cpu"), args=args)
    model = Replay([soft_gt_masks(synthetic_val, batch)[2] for batch in val_loader.batch_sampler])
    stats = evaluate_and_log(run_eval, model.eval(), None, args, epoch=0, step=1)
    assert list(stats) == list(STATS) + [f"bbox_{name}" for name in STATS]
    assert json.loads((tmp_path / "coco_segm_summary.json").read_text()) == {k: stats[k] for k in STATS}
    assert json.loads((tmp_path / "coco_bbox_summary.json").read_text()) == {k: stats[f"bbox_{k}"] for k in STATS}
    assert stats["AP"] > 0.9 and 0.7 < stats["bbox_AP"] < 0.85
    detections = json.loads((tmp_path / "detections_val.json").read_text())
    assert len(detections) == sum(map(len, synthetic_val.labels)) and all({"segmentation", "bbox"} <= set(d)
                                                                          for d in detections)
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert record["mode"] == "val" and record["epoch"] == 0 and {"AP", "bbox_AP", "bbox_ARl"} <= set(record)
    out = capsys.readouterr().out
    assert out.index("masks (segm):") < out.index("boxes of the masks (bbox):")

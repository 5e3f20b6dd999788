"""COCO evaluation: padded predictions back to file coordinates and category ids, then pycocotools' COCOeval of
boxes or masks."""
import contextlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from det.masks import encode_rle, mask_boxes, paste_masks

# the 12 numbers of COCOeval.summarize(), in its order: AP over IoU 0.50:0.95 (all, then at 0.50, 0.75, then per
# area: small < 32^2 px <= medium < 96^2 px <= large), AR at 1, 10, 100 detections per image, AR per area
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, metas: Sequence[dict],
    label_to_cat: Sequence[int], masks: torch.Tensor | None = None, image_size: torch.Tensor | None = None,
) -> list[dict]:
    """Padded detections of a batch -> COCO result dicts.

    boxes [B, K, 4] xyxy canvas pixels, scores [B, K], labels [B, K] in 0..C-1, valid [B, K] bool (False: padding);
    metas from det/data.py collate (image_id, orig_size (H0, W0), scale (sy, sx)). Returns one
    {"image_id", "category_id", "bbox": [x, y, w, h], "score"} per valid detection, in the file's pixels (canvas
    coordinates / scale, clipped to the image) with the data set's own category ids.

    With `masks` (an instance-segmentation model's soft masks, float [B, K, H/4, W/4] at stride 4 of the canvas)
    and `image_size` (int [B, 2], each image's (h, w) inside the canvas): each result also holds "segmentation",
    the mask pasted at the file's size (det/masks.py paste_masks, as mmdet's SOLOv2 head) as compressed RLE, and its
    "bbox" is that mask's extent (mask_boxes), so box and mask COCOeval read the same instances. One image at a
    time: a batch never holds the file-sized masks of all its images.
    """
    boxes, scores, labels, valid = (t.detach().cpu() for t in (boxes, scores, labels, valid))
    results = []
    for i, meta in enumerate(metas):
        (sy, sx), (h0, w0) = meta["scale"], meta["orig_size"]
        rles = None
        if masks is not None:
            pasted = paste_masks(masks[i][valid[i].to(masks.device)], tuple(image_size[i].tolist()), (h0, w0))
            xyxy, rles = mask_boxes(pasted).double(), encode_rle(pasted)  # [N, 4] file pixels; N RLEs
        else:
            xyxy = boxes[i][valid[i]].double() / torch.tensor([sx, sy, sx, sy], dtype=torch.float64)  # [N, 4]
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w0)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h0)
        xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)
        for k, (box, score, label) in enumerate(zip(xywh.tolist(), scores[i][valid[i]].tolist(),
                                                    labels[i][valid[i]].tolist(), strict=True)):
            results.append({"image_id": meta["image_id"], "category_id": label_to_cat[label],
                            "bbox": box, "score": score})
            if rles is not None:
                results[-1]["segmentation"] = rles[k]
    return results


IOU_TYPES = ("bbox", "segm")  # COCOeval's overlap of a detection with a ground truth: boxes or masks


def save_results(results: list[dict], path: Path) -> None:
    """COCO result dicts as the JSON list COCO's tools read, written to a temporary file and renamed (never torn)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results))
    os.replace(tmp, path)


def coco_evaluate(coco_gt: COCO, results: list[dict], out_file: Path | None = None, *,
                  iou_type: str = "bbox") -> dict[str, float]:
    """COCOeval of `results` (from every rank: gathering is the caller's) against `coco_gt` with IoU of boxes
    (iou_type "bbox": results hold "bbox") or of masks ("segm": results hold an RLE "segmentation", the ground truth
    polygons or RLE); prints the standard summary and returns its 12 numbers by name (STATS), also written as JSON to
    `out_file` when given. No detections at all evaluate to 0. As in COCOeval, an area range without ground truth
    gives -1. For "segm" the results' "bbox" is left out (mmdet's CocoMetric does the same): loadRes would take a
    detection's area from its box, not its mask, and move it between the small / medium / large ranges."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"unknown iou_type {iou_type!r}: choose {', '.join(IOU_TYPES)}")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates every step; only the summary is printed
        if results:
            drop = {"bbox"} if iou_type == "segm" else set()  # copies: loadRes adds keys to its input
            coco_dt = coco_gt.loadRes([{k: v for k, v in r.items() if k not in drop} for r in results])
        else:  # loadRes cannot take an empty list; an empty result set scores 0 like any set of misses
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
    evaluator.summarize()
    stats = {name: float(value) for name, value in zip(STATS, evaluator.stats, strict=True)}
    if out_file is not None:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(json.dumps(stats, indent=1) + "\n")
    return stats

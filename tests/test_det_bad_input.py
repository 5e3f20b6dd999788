"""Bad detection input gets one clear sentence: empty annotation files, boxes holding NaN / inf or strings, and
unreadable or same-named pictures given to det.predict."""
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from det import data
from det.models import build_model
from tests.scripts import run_script


def write_split(root: Path, split: str, images: list[tuple[int, int, int]], annotations: list[dict]) -> Path:
    """A COCO split under root: images (id, width, height) as grey jpgs, annotations as given (ids 1, 2, ...)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    for image_id, w, h in images:
        Image.new("RGB", (w, h), (90, 90, 90)).save(root / f"{split}2017" / f"{image_id}.jpg")
    coco = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": w, "height": h} for i, w, h in images],
            "annotations": [{"id": k + 1, "area": 1.0, "iscrowd": 0, **a} for k, a in enumerate(annotations)],
            "categories": [{"id": 1, "name": "thing"}]}
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    ann_file.write_text(json.dumps(coco))  # json writes float("nan") as NaN, as other tools do
    return ann_file


ONE_IMAGE = ([(1, 64, 48)], [{"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20]}])


@pytest.mark.parametrize("empty", ["train", "val"])
def test_a_split_without_images_is_an_error_naming_the_file(tmp_path, empty):
    for split in ("train", "val"):
        write_split(tmp_path, split, *(([], []) if split == empty else ONE_IMAGE))
    with pytest.raises(ValueError, match=rf"instances_{empty}2017.json lists no images: nothing to "):
        data.build_datasets(str(tmp_path), "ssd", 64)


def test_no_data_makes_no_batch():
    for drop_last in (True, False):
        batches = data.GroupedBatchSampler([], [], batch_size=4, drop_last=drop_last)
        assert len(batches) == 0 and list(batches) == []


def test_boxes_holding_nan_or_inf_are_skipped_and_counted(tmp_path, capsys):
    write_split(tmp_path, "train", [(1, 64, 48), (2, 64, 48)], [
        {"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20]},
        {"image_id": 1, "category_id": 1, "bbox": [math.nan, 4, 20, 20]},
        {"image_id": 2, "category_id": 1, "bbox": [4, 4, math.inf, 20]},
        {"image_id": 2, "category_id": 1, "bbox": [30, 10, 10, -math.inf], "iscrowd": 1},
    ])
    dataset = data.CocoDetection(tmp_path, "train")
    assert "1 objects; left out 0 crowd regions and 0 boxes under 1 px; skipped 3 boxes holding NaN or inf " \
           "(annotation ids 2, 3, 4)" in capsys.readouterr().out
    assert dataset.not_finite == [2, 3, 4] and [len(b) for b in dataset.boxes] == [1, 0]
    _, target, _ = dataset[0]
    assert torch.isfinite(target["boxes"]).all()
    assert sorted(dataset.coco.anns) == [1]  # COCOeval's ground truth leaves them out too


@pytest.mark.parametrize("bbox", [["1", "2", "3", "4"], [1, 2, 3], 7, [1, 2, True, 4], None])
def test_a_bbox_that_is_not_four_numbers_is_an_error_naming_the_file_and_annotation(tmp_path, bbox):
    write_split(tmp_path, "train", [(1, 64, 48)], [{"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20]},
                                                   {"image_id": 1, "category_id": 1, "bbox": bbox}])
    with pytest.raises(ValueError, match=r"instances_train2017.json: annotation 2 has a bbox that is not 4 numbers"):
        data.CocoDetection(tmp_path, "train")


def test_predict_reports_bad_pictures_goes_on_and_keeps_same_named_ones(tmp_path):
    torch.manual_seed(0)
    model = build_model("ssdlite_mobilenet_v2", num_classes=2)
    extra = {"model": "ssdlite_mobilenet_v2", "classes": ["a", "b"], "img_size": 64}
    torch.save({"model": model.state_dict(), "extra": extra}, tmp_path / "ckpt.pth")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / folder / "x.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    inputs = [tmp_path / "a" / "x.jpg", tmp_path / "missing.jpg", tmp_path / "broken.jpg", tmp_path / "b" / "x.jpg"]
    out = run_script("-m", "det.predict", "--weights", str(tmp_path / "ckpt.pth"), "--device", "cpu",
                     "--score-thr", "2", "--out", str(tmp_path / "pictures"), *map(str, inputs), expect_ok=False)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert f"error: {tmp_path / 'missing.jpg'} does not exist; skipped" in out.stderr
    assert f"error: {tmp_path / 'broken.jpg'} is not a picture PIL can read; skipped" in out.stderr
    assert "2 of 4 picture(s) could not be read" in out.stderr
    assert f"{inputs[0]}: 0 detection(s) -> {tmp_path / 'pictures' / 'x.png'}" in out.stdout
    assert f"{inputs[3]}: 0 detection(s) -> {tmp_path / 'pictures' / 'x_1.png'}" in out.stdout
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == ["x.png", "x_1.png"]


def test_unique_stems():
    from det.predict import unique_stem

    taken = set()
    assert [unique_stem(s, taken) for s in ("x", "x", "x_1", "x", "y")] == ["x", "x_1", "x_1_1", "x_2", "y"]


def test_objects_without_a_polygon_are_skipped_and_counted(tmp_path, capsys):
    """with_masks: a polygon part of under 3 points is dropped (mmdet's LoadAnnotations); an object left with none
    (or an empty segmentation) is skipped and counted with its annotation ids, its box and label with it; crowd
    regions stay out before any check; RLEs of the image's size are kept."""
    square = [4, 4, 24, 4, 24, 24, 4, 24]
    write_split(tmp_path, "train", [(1, 64, 48), (2, 64, 48)], [
        {"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "segmentation": [square, [1, 1, 2, 2]]},
        {"image_id": 1, "category_id": 1, "bbox": [30, 4, 20, 20], "segmentation": [[30, 4, 50, 4]]},
        {"image_id": 2, "category_id": 1, "bbox": [4, 4, 20, 20], "segmentation": []},
        {"image_id": 2, "category_id": 1, "bbox": [4, 4, 8, 8], "segmentation": {"size": [48, 64], "counts": [200, 8]}},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1,
         "segmentation": {"size": [1, 1], "counts": [1]}},
    ])
    dataset = data.CocoDetection(tmp_path, "train", with_masks=True)
    assert "2 objects; left out 1 crowd regions and 0 boxes under 1 px; skipped 2 objects without a polygon of 3 " \
           "or more points (annotation ids 2, 3)" in capsys.readouterr().out
    assert dataset.no_polygon == [2, 3] and dataset.mask_anns == [[1], [4]]
    _, target, _ = dataset[0]
    assert target["masks"].shape == (1, 48, 64) and target["masks"].sum() == 400 and len(target["boxes"]) == 1
    assert data.CocoDetection(tmp_path, "train").no_polygon == []  # without masks nothing is checked


@pytest.mark.parametrize("segmentation,message", [
    ({"size": [64, 48], "counts": [5, 10]}, r"annotation 2 has an RLE of size \[64, 48\], but its image is \[48, 64\]"),
    ({"counts": "abc"}, r"annotation 2 has an RLE of size None"),
    ([4, 4, 24, 4, 24, 24], "annotation 2 has a segmentation that is neither a list of polygons"),
    (None, "annotation 2 has a segmentation that is neither"),
])
def test_a_bad_segmentation_is_an_error_naming_the_file_and_annotation(tmp_path, segmentation, message):
    write_split(tmp_path, "train", [(1, 64, 48)], [
        {"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "segmentation": [[4, 4, 24, 4, 24, 24]]},
        {"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "segmentation": segmentation}])
    with pytest.raises(ValueError, match=r"instances_train2017.json: " + message):
        data.CocoDetection(tmp_path, "train", with_masks=True)
    data.CocoDetection(tmp_path, "train")  # a box detector does not read segmentations

"""det.predict as a user calls it: `load` + `detect` on pictures, paths, tensors and lists; the CLI's --max-det,
--scale and --gt pictures; labels that do not cover each other; the README's Python example, run as written."""
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as F

from det import predict
from det.models import build_model
from det.presets import MEAN_COLOR
from tests.scripts import ROOT, run_script

CLASSES = [f"shape_{k}" for k in range(10)]
SURE = 2  # the class the fixture's detector is sure of everywhere


def fake_checkpoint(path: Path) -> None:
    """What train_det.py saves, less the training state: a RetinaNet-R18 on a 96 px canvas (96 x 160) whose
    classifier bias says class SURE at every anchor, so it detects something (random heads score ~0.01)."""
    torch.manual_seed(0)
    model = build_model("retinanet_r18", num_classes=len(CLASSES))
    with torch.no_grad():
        model.bbox_head.retina_cls.bias.view(9, len(CLASSES))[:, SURE] = 3.0  # [A per position * C]: anchor-major
    extra = {"model": "retinanet_r18", "img_size": 96, "classes": CLASSES, "label_to_cat": list(range(1, 11))}
    torch.save({"model": model.state_dict(), "extra": extra}, path)


def picture(width: int = 256, height: int = 192) -> Image.Image:
    image = Image.new("RGB", (width, height), (40, 90, 40))
    ImageDraw.Draw(image).ellipse([60, 40, 150, 130], fill=(230, 40, 40))
    return image


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("det_predict") / "ckpt.pth"
    fake_checkpoint(path)
    return path


def test_detect_takes_pictures_paths_tensors_and_lists(ckpt, tmp_path):
    model = predict.load(ckpt)
    assert model.predict_info == {"model": "retinanet_r18", "preset": "retinanet", "img_size": 96, "classes": CLASSES}
    image = picture()  # 256 x 192 -> exactly half on the 96 x 160 canvas
    image.save(tmp_path / "p.png")
    found = predict.detect(model, image, score_thr=0.0)
    assert found and set(found[0]) == {"box", "score", "label", "class"} and found[0]["class"] == CLASSES[SURE]
    assert [d["score"] for d in found] == sorted((d["score"] for d in found), reverse=True)
    assert all(CLASSES[d["label"]] == d["class"] for d in found)
    # the model's own output on a canvas made by hand, boxes x 2: the picture's pixels
    canvas = torch.tensor(MEAN_COLOR, dtype=torch.uint8).view(1, 3, 1, 1).repeat(1, 1, 96, 160)
    canvas[0, :, :, :128] = F.resize(F.pil_to_tensor(image), [96, 128], antialias=True)
    with torch.no_grad():
        out = model(canvas, image_size=torch.tensor([[96, 128]]))
    keep = out["valid"][0]
    torch.testing.assert_close(torch.tensor([d["box"] for d in found], dtype=torch.float64),
                               (out["boxes"][0][keep] * 2).double())
    assert [d["label"] for d in found] == out["labels"][0][keep].tolist()
    uint8 = F.pil_to_tensor(image)
    for given in (tmp_path / "p.png", str(tmp_path / "p.png"), uint8):
        assert predict.detect(model, given, score_thr=0.0) == found, type(given)
    for given in ([image, tmp_path / "p.png"], uint8.expand(2, -1, -1, -1), [uint8[None], image]):
        assert predict.detect(model, given, score_thr=0.0) == [found, found], type(given)
    as_float = predict.detect(model, uint8.float() / 255, score_thr=0.0)[:5]  # 0-1, rounded back to 0-255
    assert [d["label"] for d in as_float] == [d["label"] for d in found[:5]]
    best = predict.detect(model, image, score_thr=found[2]["score"], max_det=2)
    assert best == found[:2]
    with pytest.raises(ValueError, match="float image tensors are 0-1"):
        predict.detect(model, uint8.float())


def test_a_detector_called_on_a_picture_or_a_list_names_detect():
    model = build_model("retinanet_r18", num_classes=3).eval()
    for wrong in (picture(), [torch.zeros(3, 96, 128, dtype=torch.uint8)]):
        with pytest.raises(TypeError, match=r"expects a uint8/float 0-255 tensor \[B, 3, H, W\] on its canvas.*"
                                            r"det\.predict\.detect\(model, images\)"):
            model(wrong)


def test_labels_of_a_crowd_do_not_overlap():
    """Four detections of one object and a row of narrow boxes with wide labels: "above the box" for all would pile
    them up; the placement spreads them out and keeps them in the picture."""
    boxes = [[40, 40, 80, 100]] * 4 + [[10 + 30 * k, 150, 30 + 30 * k, 180] for k in range(5)]
    sizes = [(50, 12)] * len(boxes)
    placed = predict.place_labels(boxes, sizes, (200, 200))
    naive = [(x1, y1 - h, x1 + w, y1) for (x1, y1, _, _), (w, h) in zip(boxes, sizes, strict=True)]
    assert any(predict._overlap(a, b) > 0 for i, a in enumerate(naive) for b in naive[i + 1:])
    for i, a in enumerate(placed):
        assert a[2] - a[0] == 50 and a[3] - a[1] == 12 and a[0] >= 0 and a[1] >= 0 and a[2] <= 200 and a[3] <= 200
        for b in placed[i + 1:]:
            assert predict._overlap(a, b) == 0, (a, b)
    assert placed[0] == (40, 28, 90, 40)  # the best detection keeps its first choice, above its box
    # above is off the top and the label wider than the room right of the box: shifted into the picture
    assert predict.place_labels([[20, 0, 50, 30]], [(50, 12)], (60, 40)) == [(10, 0, 60, 12)]


def test_cli_max_det_and_scale(ckpt, tmp_path):
    picture().save(tmp_path / "p.jpg")
    out = run_script("-m", "det.predict", "--weights", str(ckpt), "--device", "cpu", str(tmp_path / "p.jpg"),
                     "--score-thr", "0", "--max-det", "3", "--scale", "2", "--out", str(tmp_path / "pictures"))
    assert f"{tmp_path / 'p.jpg'}: 3 detection(s) -> {tmp_path / 'pictures' / 'p.png'}" in out.stdout
    assert len(re.findall(rf"^  {CLASSES[SURE]} +0\.\d+  \[", out.stdout, flags=re.MULTILINE)) == 3
    assert Image.open(tmp_path / "pictures" / "p.png").size == (512, 384)
    default = run_script("-m", "det.predict", "--weights", str(ckpt), "--device", "cpu", str(tmp_path / "p.jpg"),
                         "--score-thr", "0", "--out", str(tmp_path / "default"))
    assert "20 detection(s)" in default.stdout and Image.open(tmp_path / "default" / "p.png").size == (256, 192)


def test_cli_gt_draws_ground_truth_beside_the_prediction(ckpt, tmp_path):
    (tmp_path / "val").mkdir()
    picture().save(tmp_path / "val" / "7.jpg")
    coco = {"images": [{"id": 3, "file_name": "7.jpg", "width": 256, "height": 192}],
            "annotations": [{"id": 1, "image_id": 3, "category_id": 12, "bbox": [60, 40, 90, 90], "iscrowd": 0,
                             "area": 8100}],
            "categories": [{"id": 5, "name": "circle"}, {"id": 12, "name": "square"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    out = run_script("-m", "det.predict", "--weights", str(ckpt), "--device", "cpu", str(tmp_path / "val" / "7.jpg"),
                     "--scale", "1.5", "--gt", str(tmp_path / "ann.json"), "--out", str(tmp_path / "pictures"))
    assert "warning" not in out.stderr
    drawn = Image.open(tmp_path / "pictures" / "7.png").convert("RGB")
    width, height = drawn.size
    assert width == 2 * 384 and 288 < height < 288 + 60  # two 1.5 x pictures side by side under their titles
    strip = height - 288
    # the left panel's ground truth: the square (label 1 of the sorted ids) dashed in its colour at 1.5 x its box
    left_edge = [drawn.getpixel((90, strip + y)) for y in range(70, 190)]
    assert predict.PALETTE[1] in left_edge and left_edge.count(predict.PALETTE[1]) < len(left_edge)
    assert predict.PALETTE[1] not in [drawn.getpixel((384 + 90, strip + y)) for y in range(70, 190)]


def readme_python_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Detecting and classifying in Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


def test_readme_python_example_runs(ckpt, tmp_path):
    code = readme_python_block()
    assert '"output/det/best.pth"' in code and '"street.jpg"' in code
    picture().save(tmp_path / "street.jpg")
    code = code.replace('"output/det/best.pth"', repr(str(ckpt))).replace('"street.jpg"',
                                                                           repr(str(tmp_path / "street.jpg")))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    model = predict.load(ckpt)
    assert lines and len(lines) == len(predict.detect(model, tmp_path / "street.jpg"))
    assert all(line.split(" ", 1)[0] == CLASSES[SURE] and "[" in line for line in lines), lines


class MaskModel(torch.nn.Module):
    """An instance-segmentation model's eval output (the shared interface): 100 padded rows, two valid: class SURE
    over canvas cells rows 4-7, columns 4-11 (stride 4: canvas px 16-32 x 16-48), and class 5 as a lower-scoring
    blob to the right of it."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device to be on
        self.predict_info = {"model": "masks", "preset": "solov2", "img_size": 64, "classes": CLASSES}

    def forward(self, images: torch.Tensor, image_size: torch.Tensor) -> dict[str, torch.Tensor]:
        b, (height, width), k = len(images), images.shape[-2:], 100
        masks = torch.zeros(b, k, height // 4, width // 4)
        masks[:, 0, 4:8, 4:12] = 0.95
        masks[:, 1, 6:10, 14:18] = 0.8
        valid, labels, scores = (torch.zeros(b, k, dtype=dtype) for dtype in (torch.bool, torch.int64, torch.float32))
        valid[:, :2], labels[:, 0], labels[:, 1], scores[:, 0], scores[:, 1] = True, SURE, 5, 0.9, 0.6
        return {"boxes": torch.zeros(b, k, 4), "scores": scores, "labels": labels, "valid": valid, "masks": masks}


def test_detect_and_draw_masks():
    """A 128 x 96 picture on solov2's 64 canvas (scale 2/3): each detection's mask is the model's soft mask pasted
    at the picture's size (det.masks.paste_masks), its box that mask's extent; `draw` blends the mask in its class
    colour (0.45) with a solid border, leaves the rest of the picture alone, and labels it with class and score."""
    from det.masks import mask_boxes, paste_masks

    model = MaskModel().eval()
    image = Image.new("RGB", (128, 96), (40, 90, 40))
    found = predict.detect(model, image, score_thr=0.0)
    assert [d["class"] for d in found] == [CLASSES[SURE], CLASSES[5]] and set(found[0]) == {
        "box", "score", "label", "class", "mask"}
    canvas_out = model(torch.zeros(1, 3, 64, 128), torch.tensor([[64, 85]]))
    expected = paste_masks(canvas_out["masks"][0, :2], (64, 85), (96, 128))
    for d, mask in zip(found, expected, strict=True):
        assert d["mask"].dtype == torch.bool and torch.equal(d["mask"], mask) and mask.any()
        assert d["box"] == mask_boxes(mask[None])[0].tolist()
    assert found[0]["box"] == [24.0, 24.0, 72.0, 48.0]  # canvas px 16-48 x 16-32, x 3/2
    drawn = predict.draw(image, found)
    pixels, before = F.pil_to_tensor(drawn).int(), F.pil_to_tensor(image).int()
    color = torch.tensor(predict.PALETTE[SURE]).view(3, 1)
    inside = pixels[:, 30:44, 30:68].flatten(1)  # well inside the first mask
    assert (inside - (before[:, 30:44, 30:68].flatten(1) * 0.55 + color * 0.45).round()).abs().max() <= 1
    left = found[0]["mask"][:, 24]  # the mask's first column: its border, in the full colour
    assert left.sum() > 15 and (pixels[:, left, 24] == color).all()
    assert (pixels[:, 26:, 24][:, ~left[26:]] != color).any(0).all()  # below the label: outside the mask
    assert torch.equal(pixels[:, 60:, :20], before[:, 60:, :20])  # far from both masks and labels: untouched
    x1, y1, x2, y2 = (round(v) for v in predict.place_labels([found[0]["box"]], [(10, 10)], (128, 96))[0])
    assert (pixels[:, y1:y2, x1:x2] == color.view(3, 1, 1)).all(0).any()  # the label's background
    assert predict.draw(image, found, scale=2).size == (256, 192)

"""det/yolox_data.py: YOLOX's Mosaic / RandomAffine / MixUp / HSV pipeline against mmdet 3.3.0, boxes that follow the
pixels, mmdet's box filters, per-(seed, epoch, index) determinism, the last epochs' mode switch, images without objects.

tests/data/mmdet_yolox_pipeline.json.gz was written once with mmdet 3.3.0 and OpenCV 5.0 (a throw-away venv, script
outside the repo): MultiImageMixDataset with yolox_s_8xb8-300e_coco's pipeline at img_scale 48 over a 6-image COCO
folder (gradients with filled boxes, redrawn here from the annotations), each item after np.random.seed(k), with and
without the mixing transforms; and OpenCV's 8-bit HSV of 512 random colours both ways.
"""
import base64
import gzip
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.sampling import SeededDataset
from det import data, presets
from det import yolox_data as Y

FIXTURE = Path(__file__).parent / "data" / "mmdet_yolox_pipeline.json.gz"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fixture() -> dict:
    with gzip.open(FIXTURE, "rt") as f:
        return json.load(f)


def draw(image_id: int, w: int, h: int, anns: list[dict]) -> np.ndarray:
    """The recorder's picture: a gradient, each object's box filled with its colour. uint8 [h, w, 3] RGB."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // w), (yy * 255 // h), np.full_like(xx, 40 * image_id)], -1).astype(np.uint8)
    for a in anns:
        x, y, bw, bh = a["bbox"]
        img[int(y):int(np.ceil(y + bh)), int(x):int(np.ceil(x + bw))] = a["color"]
    return img


@pytest.fixture(scope="module")
def coco(fixture, tmp_path_factory) -> data.CocoDetection:
    root = tmp_path_factory.mktemp("yolox_coco")
    (root / "annotations").mkdir()
    (root / "train2017").mkdir()
    spec = fixture["coco"]
    for im in spec["images"]:
        anns = [a for a in spec["annotations"] if a["image_id"] == im["id"]]
        Image.fromarray(draw(im["id"], im["width"], im["height"], anns)).save(root / "train2017" / im["file_name"])
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(spec))
    return data.CocoDetection(root, "train")


def test_pipeline_matches_mmdet(fixture, coco):
    """Same draws as mmdet's (RandomState(k) here, np.random.seed(k) there): the same boxes and labels, bit for bit;
    the same pixels without the mixing transforms, and with them up to cv2's rounding in resizes and warps (a level
    here and there, which the HSV jitter can turn into a few)."""
    s = fixture["img_scale"]
    dataset = Y.MosaicMixUpDataset(coco, img_size=s)
    worst = 0
    for rec in fixture["records"]:
        dataset.mix = rec["mix"]
        image, target, meta = dataset.item(rec["index"], np.random.RandomState(rec["seed"]))
        ref = np.frombuffer(base64.b64decode(rec["image"]), np.uint8).reshape(rec["shape"])
        h, w = image.shape[-2:]
        assert [h, w] == rec["img_shape"][:2] or rec["mix"] is False and max(h, w) == s
        ref = torch.from_numpy(ref.copy()).permute(2, 0, 1)
        assert (ref[:, h:] == Y.PAD).all() and (ref[:, :, w:] == Y.PAD).all()  # mmdet's Pad: the canvas's here
        diff = (image.int() - ref[:, :h, :w].int()).abs()
        assert diff.float().mean() < 0.1 if rec["mix"] else diff.max() == 0, rec["seed"]
        worst = max(worst, diff.max().item())
        assert torch.equal(target["boxes"].as_subclass(torch.Tensor), torch.tensor(rec["boxes"]).reshape(-1, 4))
        assert target["labels"].tolist() == rec["labels"]
        assert meta["image_id"] == coco.ids[rec["index"]]
    assert worst <= 8


def test_hsv_matches_opencv(fixture):
    hsv = fixture["hsv"]
    rgb = torch.tensor(hsv["rgb"], dtype=torch.uint8).T[:, None]  # [3, 1, 512]
    assert Y.rgb_to_hsv(rgb)[:, 0].T.tolist() == hsv["hsv_of_rgb"]
    assert Y.hsv_to_rgb(torch.tensor(hsv["hsv"]).T[:, None])[:, 0].T.tolist() == hsv["rgb_of_hsv"]


def test_hsv_matches_opencv_on_every_colour():
    cv2 = pytest.importorskip("cv2")
    c = torch.arange(256, dtype=torch.uint8)
    rgb = torch.stack(torch.meshgrid(c, c, c, indexing="ij")).reshape(3, 4096, 4096)
    bgr = np.ascontiguousarray(rgb.flip(0).permute(1, 2, 0).numpy())
    assert (Y.rgb_to_hsv(rgb).permute(1, 2, 0).numpy() == cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)).all()
    h, s, v = torch.meshgrid(torch.arange(180), c.long(), c.long(), indexing="ij")
    hsv = torch.stack([h, s, v]).reshape(3, 180 * 256, 256)
    ref = cv2.cvtColor(hsv.permute(1, 2, 0).to(torch.uint8).numpy(), cv2.COLOR_HSV2BGR)[..., ::-1]
    assert (Y.hsv_to_rgb(hsv).permute(1, 2, 0).numpy() == ref).all()


PALETTE = torch.tensor([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)], dtype=torch.uint8)


def painted(h: int, w: int, rng: np.random.RandomState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dark image with 3 solid boxes, each filled with its label's colour of PALETTE."""
    image = torch.full((3, h, w), 30, dtype=torch.uint8)
    boxes, labels = [], []
    for label in rng.choice(len(PALETTE), 3, replace=False):
        bw, bh = rng.randint(w // 6, w // 3), rng.randint(h // 6, h // 3)
        x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
        if any(x < b[2] and b[0] < x + bw and y < b[3] and b[1] < y + bh for b in boxes):
            continue  # no overlaps: each box shows its own colour
        image[:, y:y + bh, x:x + bw] = PALETTE[label].view(3, 1, 1)
        boxes.append([x, y, x + bw, y + bh])
        labels.append(int(label))
    return image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels)


def check_colours(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, expected=lambda c: c) -> int:
    checked = 0
    for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist(), strict=True):
        if min(x2 - x1, y2 - y1) >= 6:
            centre = image[:, int((y1 + y2) / 2), int((x1 + x2) / 2)].int()
            assert (centre - expected(PALETTE[label].int())).abs().max() <= 40, (centre, label)
            checked += 1
    return checked


def test_boxes_follow_the_pixels():
    """Mosaic -> RandomAffine -> flip -> resize, and MixUp: the centre of every box still shows its object."""
    rng = np.random.RandomState(0)
    checked = 0
    for _ in range(30):
        parts = [painted(int(rng.randint(40, 120)), int(rng.randint(40, 120)), rng) for _ in range(4)]
        image, boxes, labels = Y.mosaic(*map(list, zip(*parts, strict=True)), rng, img_scale=64)
        assert image.shape == (3, 128, 128)
        checked += check_colours(image, boxes, labels)
        image, boxes, labels = Y.random_affine(image, boxes, labels, rng, border=(-32, -32))
        assert image.shape == (3, 64, 64)
        checked += check_colours(image, boxes, labels)
        image, boxes = Y.hflip(image, boxes)
        image, boxes = Y.resize_keep_ratio(image[:, :, 8:], boxes - torch.tensor([8.0, 0, 8, 0]), 100)
        checked += check_colours(image, Y._clip(boxes, *image.shape[-2:]), labels)
        # MixUp over a flat grey image: inside the other image's boxes, the average of grey and the colour
        grey = torch.full((3, 64, 64), 50, dtype=torch.uint8)
        other, other_boxes, other_labels = painted(90, 70, rng)
        mixed, boxes, labels = Y.mixup(grey, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), other,
                                       other_boxes, other_labels, rng, img_scale=64)
        checked += check_colours(mixed, boxes, labels, lambda c: (c + 50) // 2)
    assert checked > 150


def test_box_filters():
    # is_inside: a box clipped onto the left or top edge is gone, one inside the image stays, however thin
    boxes = torch.tensor([[-9.0, 5, -1, 9], [3, -8, 9, 0], [5, 5, 5.5, 9], [66, 60, 70, 70], [62, 2, 80, 9]])
    assert Y._inside(Y._clip(boxes, 64, 64), 64, 64).tolist() == [False, False, True, False, True]
    # FilterAnnotations(min_gt_bbox_wh=(1, 1)): strictly wider and higher than 1 px
    kept, labels = Y.filter_boxes(torch.tensor([[0, 0, 1, 5], [0, 0, 1.01, 1.01], [2, 2, 9, 3]]), torch.arange(3))
    assert labels.tolist() == [1]
    # RandomAffine keeps boxes warped partly out of the window (clipped) and drops those entirely out
    rng = np.random.RandomState(3)
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0, 8, 8], [56, 56, 64, 64], [20, 20, 40, 40]])
    out, warped, labels = Y.random_affine(image, boxes, torch.arange(3), rng, border=(-16, -16))
    assert out.shape == (3, 32, 32) and len(warped) == len(labels) <= 3
    assert (warped >= 0).all() and (warped <= 32).all() and (warped[:, 2:] > 0).all()
    # the pipeline's end leaves no box under 1 px, and an image whose boxes all vanish keeps none (not dropped)
    transforms = partial(Y.transforms, img_size=64)
    image, target = transforms(torch.zeros(3, 40, 300, dtype=torch.uint8),
                               {"boxes": torch.tensor([[10.0, 10, 12, 30], [100, 5, 200, 6]]),
                                "labels": torch.tensor([1, 2])}, np.random.RandomState(0))
    assert image.shape == (3, 9, 64) and len(target["boxes"]) == len(target["labels"]) == 0


def test_mixup_with_an_image_without_objects_changes_nothing():
    rng = np.random.RandomState(0)
    image, boxes, labels = painted(64, 64, rng)
    state = rng.get_state()[1].copy()
    out = Y.mixup(image, boxes, labels, torch.zeros(3, 30, 40, dtype=torch.uint8), torch.zeros(0, 4),
                  torch.zeros(0, dtype=torch.int64), rng, img_scale=64)
    assert out[0] is image and out[1] is boxes and (rng.get_state()[1] == state).all()  # and no draw


def test_items_are_determined_by_seed_epoch_and_index(coco):
    dataset = SeededDataset(Y.MosaicMixUpDataset(coco, img_size=48), seed=5)
    first = [dataset[i] for i in range(len(dataset))]
    dataset[3]  # other accesses in between change nothing
    for i in reversed(range(len(dataset))):
        image, target, meta = dataset[i]
        assert torch.equal(image, first[i][0]) and torch.equal(target["boxes"], first[i][1]["boxes"])
        assert meta == first[i][2]
    dataset.set_epoch(1)
    assert not all(torch.equal(dataset[i][0], first[i][0]) for i in range(len(dataset)))


def test_mode_switch_and_collate(coco):
    """mix False (mmdet's last 15 epochs): the loaded image through `transforms` alone, keep-ratio; mix True:
    every item is img_size square. Both batch through det/data.py's collate on the yolox canvas."""
    dataset = Y.MosaicMixUpDataset(coco, img_size=48)
    mixed = [dataset.item(i, np.random.RandomState(i)) for i in range(len(coco))]
    assert all(item[0].shape == (3, 48, 48) for item in mixed)
    dataset.mix = False
    for i in range(len(coco)):
        image, target, _ = dataset.item(i, np.random.RandomState(i))
        ref_image, ref_target = Y.transforms(*coco.load(i), np.random.RandomState(i), img_size=48)
        assert torch.equal(image, ref_image) and torch.equal(target["boxes"], ref_target["boxes"])
        info = coco.coco.imgs[coco.ids[i]]
        assert max(image.shape[-2:]) == 48 and (image.shape[-1] >= image.shape[-2]) == (info["width"] >= info["height"])
    for items in (mixed, [dataset.item(i, np.random.RandomState(i)) for i in range(len(coco))]):
        images, targets, _ = data.collate(items, max_gt=None, preset="yolox", img_size=48)
        assert images.shape == (len(coco), 3, 64, 64)  # 48 rounded up to the stride 32
        assert (images[:, :, 48:] == 114).all() and targets["valid"].sum() == sum(len(t["labels"]) for _, t, _ in items)


def test_images_without_objects(coco, tmp_path):
    root = tmp_path / "empty"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    spec = {**json.loads((coco.ann_file).read_text()), "annotations": []}
    for im in spec["images"]:
        Image.new("RGB", (im["width"], im["height"]), (90, 90, 90)).save(root / "train2017" / im["file_name"])
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(spec))
    dataset = Y.MosaicMixUpDataset(data.CocoDetection(root, "train"), img_size=48)
    for mix in (True, False):
        dataset.mix = mix
        items = [dataset.item(i, np.random.RandomState(i)) for i in range(len(dataset))]
        assert all(len(t["boxes"]) == len(t["labels"]) == 0 for _, t, _ in items)
        images, targets, _ = data.collate(items, max_gt=None, preset="yolox", img_size=48)
        assert not targets["valid"].any() and images.shape[-2:] == (64, 64)


def test_preset():
    preset = presets.get_preset("yolox")
    assert preset["canvas_size"](640, False) == (640, 640) and preset["canvas_size"](100, True) == (128, 128)
    assert preset["fill"] == (114, 114, 114)
    image = torch.randint(0, 256, (3, 300, 500), dtype=torch.uint8)
    target = {"boxes": torch.tensor([[10.0, 20, 400, 290]]), "labels": torch.tensor([3])}
    out, out_target = preset["eval_transforms"](640)(image, target)
    assert out.shape == (3, 384, 640)  # mmcv rescale_size: 300 x 1.28 = 384
    torch.testing.assert_close(out_target["boxes"].as_subclass(torch.Tensor), torch.tensor([[12.8, 25.6, 512, 371.2]]))
    out, _ = preset["train_transforms"](640)(image, target)
    assert out.shape == (3, 384, 640)

"""det/data.py: the synthetic COCO set, COCO parsing and its errors, presets, padded batches, grouped and sharded
sampling."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from common.synthetic import SHAPES
from det import data, presets
from det import synthetic_coco as synthetic_coco_module
from det.masks import center_of_mass, downsample_masks, mask_boxes
from det.models import RECIPES
from det.synthetic_coco import SYNTHETIC_CAT_IDS, synthetic_coco


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return synthetic_coco(tmp_path_factory.mktemp("cache") / "synthetic_coco", num_train=48, num_val=20)


@pytest.fixture
def one_thread():
    """One intra-op thread, as in a loader worker: on tiny images a thread pool only adds overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_coco(root: Path, images: list[tuple[int, int, int]], annotations: list[dict], cat_ids=(1, 3)) -> Path:
    """A hand-made COCO folder: images (id, width, height) as grey jpgs, `annotations` ({image_id, category_id, bbox,
    iscrowd?}) as given."""
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    for image_id, w, h in images:
        Image.new("RGB", (w, h), (90, 90, 90)).save(root / "train2017" / f"{image_id}.jpg")
    anns = [{"id": k + 1, "area": 1.0, "iscrowd": 0, **a} for k, a in enumerate(annotations)]
    coco = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": w, "height": h} for i, w, h in images],
            "annotations": anns, "categories": [{"id": c, "name": f"cat{c}"} for c in cat_ids]}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(coco))
    return root


def test_synthetic_set_is_written_once(tmp_path, monkeypatch, synthetic):
    coco = json.loads((synthetic / "annotations" / "instances_train2017.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(SHAPES)
    assert [c["id"] for c in coco["categories"]] == list(SYNTHETIC_CAT_IDS) != list(range(1, 11))  # gapped
    assert {im["width"] > im["height"] for im in coco["images"]} == {True, False}  # landscape and portrait
    assert any(a["iscrowd"] for a in coco["annotations"]) and all(a["segmentation"] for a in coco["annotations"])
    assert len({a["image_id"] for a in coco["annotations"]}) < len(coco["images"])  # some images have no objects
    for ann in coco["annotations"]:
        image = next(im for im in coco["images"] if im["id"] == ann["image_id"])
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]
        assert 0.1 * min(image["width"], image["height"]) < max(w, h) < 0.55 * min(image["width"], image["height"])

    real_write = synthetic_coco_module._write_split

    def write_train_then_fail(root, split, *args, **kwargs):
        if split == "val":
            raise OSError("disk full")
        real_write(root, split, *args, **kwargs)

    monkeypatch.setattr(synthetic_coco_module, "_write_split", write_train_then_fail)
    assert synthetic_coco(synthetic, num_train=48, num_val=20) == synthetic  # complete: not written again
    with pytest.raises(OSError, match="disk full"):  # interrupted: nothing left that looks complete...
        synthetic_coco(tmp_path / "s", num_train=3, num_val=2)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()  # ...and the next call writes it
    root = synthetic_coco(tmp_path / "s", num_train=3, num_val=2)
    assert len(list((root / "val2017").glob("*.jpg"))) == 2 and len(data.CocoDetection(root, "train")) == 3
    assert len(data.CocoDetection(synthetic_coco(root, 4, 2), "train")) == 4  # other arguments: rewritten
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="mine exists and is not a synthetic set"):
        synthetic_coco(tmp_path / "mine", 3, 2)


def test_category_ids_map_to_labels_and_back(synthetic):
    dataset = data.CocoDetection(synthetic, "train")
    assert dataset.label_to_cat == list(SYNTHETIC_CAT_IDS) and dataset.classes == list(SHAPES)
    for index, image_id in enumerate(dataset.ids):
        anns = [a for a in dataset.coco.imgToAnns[image_id] if not a["iscrowd"]]
        assert [dataset.label_to_cat[label] for label in dataset.labels[index]] == [a["category_id"] for a in anns]
        sizes = np.array([a["bbox"][2:] for a in anns]).reshape(-1, 2)
        assert np.allclose(dataset.boxes[index][:, 2:] - dataset.boxes[index][:, :2], sizes, atol=1e-4)


def test_crowd_and_degenerate_boxes_are_left_out(tmp_path, capsys):
    root = write_coco(tmp_path, [(5, 100, 80), (6, 64, 64)], [
        {"image_id": 5, "category_id": 3, "bbox": [10, 10, 20, 30]},
        {"image_id": 5, "category_id": 1, "bbox": [40, 10, 20, 20], "iscrowd": 1},
        {"image_id": 5, "category_id": 1, "bbox": [30, 30, 0, 10]},  # zero width
        {"image_id": 5, "category_id": 1, "bbox": [120, 10, 20, 20]},  # right of the image: nothing once clipped
        {"image_id": 5, "category_id": 1, "bbox": [-10, 60, 50, 40]},  # hangs over the edge: clipped
    ])
    dataset = data.CocoDetection(root, "train")
    assert "2 images (1 without objects), 2 classes, 2 objects; left out 1 crowd regions and 2 boxes" in \
        capsys.readouterr().out
    assert dataset.dropped == 2 and dataset.labels[0].tolist() == [1, 0]
    assert dataset.boxes[0].tolist() == [[10, 10, 30, 40], [0, 60, 40, 80]]
    image, target, meta = dataset[1]  # the empty image
    assert target["boxes"].shape == (0, 4) and image.shape == (3, 64, 64)
    images, targets, _ = data.collate([dataset[1], dataset[1]], max_gt=None, preset="ssd", img_size=64)
    assert not targets["valid"].any() and targets["boxes"].shape == (2, 32, 4)


def test_bad_input_names_the_file(tmp_path):
    root = write_coco(tmp_path / "ok", [(1, 40, 30), (2, 40, 30), (3, 40, 30)],
                      [{"image_id": 1, "category_id": 3, "bbox": [1, 1, 10, 10]}])
    ann_file = root / "annotations" / "instances_train2017.json"
    (root / "train2017" / "1.jpg").unlink()
    (root / "train2017" / "2.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (30, 40)).save(root / "train2017" / "3.jpg")
    dataset = data.CocoDetection(root, "train")
    with pytest.raises(FileNotFoundError, match=r"train2017/1\.jpg does not exist"):
        dataset[0]
    with pytest.raises(RuntimeError, match=r"cannot read image .*train2017/2\.jpg"):
        dataset[1]
    with pytest.raises(ValueError, match=r"train2017/3\.jpg is 30x40 but its annotation says 40x30"):
        dataset[2]
    with pytest.raises(FileNotFoundError, match="instances_val2017.json does not exist"):
        data.CocoDetection(root, "val")
    with pytest.raises(FileNotFoundError, match=r"image folder .*nowhere \(of .*instances_train2017.json\) does not"):
        data.CocoDetection(root, "train", img_dir=root / "nowhere")
    coco = json.loads(ann_file.read_text())
    for broken, message in [
        ("{not json", "cannot read annotation file .*instances_train2017.json"),
        (json.dumps({"images": []}), "instances_train2017.json is not a COCO detection file"),
        (json.dumps({**coco, "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5]}]}),
         "instances_train2017.json: annotation 1 has category_id 2, which is not in its 'categories'"),
        (json.dumps({**coco, "images": [{"id": 1, "file_name": "1.jpg"}]}),
         r"instances_train2017.json: an entry of 'images' lacks \['width', 'height'\]"),
    ]:
        ann_file.write_text(broken)
        with pytest.raises(ValueError, match=message):
            data.CocoDetection(root, "train")


def test_canvas_sizes():
    assert presets.ssd_canvas_size(300, landscape=False) == (300, 300)
    assert presets.retinanet_canvas_size(800, landscape=True) == (800, 1344)
    assert presets.retinanet_canvas_size(800, landscape=False) == (1344, 800)
    assert presets.retinanet_canvas_size(128, landscape=True) == (128, 224)  # 128 * 1333 / 800 = 213 -> 224
    assert set(presets.PRESETS) == {recipe["preset"] for recipe in RECIPES.values()}
    with pytest.raises(ValueError, match="unknown preset 'yolo'"):
        presets.get_preset("yolo")


@pytest.mark.parametrize("preset,img_size", [("ssd", 96), ("retinanet", 96)])
def test_train_augmentation_keeps_boxes_on_the_canvas(synthetic, preset, img_size, one_thread):
    dataset = data.CocoDetection(synthetic, "train", presets.get_preset(preset)["train_transforms"](img_size))
    torch.manual_seed(0)
    objects = 0
    for index in list(range(len(dataset))) * 3:
        image, target, _ = dataset[index]
        h, w = image.shape[-2:]
        height, width = presets.get_preset(preset)["canvas_size"](img_size, landscape=w >= h)
        assert image.dtype == torch.uint8 and h <= height and w <= width
        boxes = target["boxes"]
        assert boxes.dtype == torch.float32 and len(boxes) == len(target["labels"])
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2:] - boxes[:, :2] > 0).all()
        objects += len(boxes)
    assert objects > len(dataset)


@pytest.mark.parametrize("preset", ["ssd", "retinanet"])
def test_labels_follow_their_boxes(preset, one_thread):
    """Solid rectangles coloured by label: after the geometric augmentations (colour jitter left out) the centre
    of every box that survived still has its label's colour."""
    palette = torch.tensor([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)], dtype=torch.uint8)
    rects = torch.tensor([[10, 10, 50, 40], [70, 15, 110, 60], [130, 10, 155, 50], [20, 70, 80, 110],
                          [100, 75, 150, 115]], dtype=torch.float32)
    image = torch.tensor(presets.MEAN_COLOR, dtype=torch.uint8).view(3, 1, 1).repeat(1, 120, 160)
    for (x1, y1, x2, y2), color in zip(rects.int().tolist(), palette, strict=True):
        image[:, y1:y2, x1:x2] = color.view(3, 1, 1)
    transform = v2.Compose([t for t in presets.get_preset(preset)["train_transforms"](128).transforms
                            if not isinstance(t, v2.RandomPhotometricDistort)])
    torch.manual_seed(0)
    checked = 0
    for _ in range(100):
        order = torch.randperm(5)
        target = {"boxes": tv_tensors.BoundingBoxes(rects[order], format="XYXY", canvas_size=(120, 160)),
                  "labels": order}
        out, target = transform(tv_tensors.Image(image), target)
        for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
            if min(x2 - x1, y2 - y1) >= 6:
                centre = out[:, int((y1 + y2) / 2), int((x1 + x2) / 2)].int()
                assert (centre - palette[label].int()).abs().max() < 40
                checked += 1
    assert checked > 150


@pytest.mark.parametrize("preset,img_size", [("ssd", 96), ("retinanet", 64)])
def test_collate_pads_to_the_canvas(synthetic, preset, img_size):
    dataset = data.CocoDetection(synthetic, "val", presets.get_preset(preset)["eval_transforms"](img_size))
    for landscape in (True, False):
        indices = [i for i, flag in enumerate(dataset.landscape) if flag == landscape][:4]
        images, targets, metas = data.collate([dataset[i] for i in indices], max_gt=None, preset=preset,
                                              img_size=img_size)
        height, width = presets.get_preset(preset)["canvas_size"](img_size, landscape)
        assert images.shape == (len(indices), 3, height, width) and images.dtype == torch.uint8
        assert targets["boxes"].shape == (len(indices), 32, 4) and targets["boxes"].dtype == torch.float32
        assert targets["labels"].dtype == torch.int64 and targets["valid"].dtype == torch.bool
        for k, (i, meta) in enumerate(zip(indices, metas, strict=True)):
            n, (sy, sx) = len(dataset.labels[i]), meta["scale"]
            assert meta["image_id"] == dataset.ids[i] and meta["file_name"] == f"{dataset.ids[i]:012d}.jpg"
            h0, w0 = meta["orig_size"]
            h, w = round(h0 * sy), round(w0 * sx)
            assert targets["image_size"][k].tolist() == [h, w]
            assert (images[k, :, h:] == torch.tensor(presets.MEAN_COLOR).view(3, 1, 1)).all()
            assert (images[k, :, :, w:] == torch.tensor(presets.MEAN_COLOR).view(3, 1, 1)).all()
            assert targets["valid"][k].tolist() == [True] * n + [False] * (32 - n)
            assert not targets["boxes"][k, n:].any() and not targets["labels"][k, n:].any()
            assert targets["labels"][k, :n].tolist() == dataset.labels[i].tolist()
            back = targets["boxes"][k, :n] / torch.tensor([sx, sy, sx, sy])  # canvas / scale = file coordinates
            torch.testing.assert_close(back, torch.from_numpy(dataset.boxes[i]), atol=1e-3, rtol=0)


def fake_item(num_objects: int, file_name: str = "a.jpg", size: tuple[int, int] = (10, 12), orig_size=None) -> tuple:
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[1.0, 1.0, 5.0, 5.0]]).repeat(num_objects, 1), format="XYXY",
                                     canvas_size=size)
    meta = {"image_id": 9, "file_name": file_name, "orig_size": orig_size or size, "scale": (1.0, 1.0)}
    return tv_tensors.Image(torch.zeros(3, *size, dtype=torch.uint8)), {"boxes": boxes,
                                                                        "labels": torch.ones(num_objects).long()}, meta


def test_max_gt_buckets_and_overflow():
    def padded_size(counts, max_gt=None):
        _, targets, _ = data.collate([fake_item(n) for n in counts], max_gt=max_gt, preset="ssd", img_size=16)
        return targets["boxes"].shape[1]

    assert padded_size([5, 0]) == 32 and padded_size([0]) == 32 and padded_size([32]) == 32
    assert padded_size([40, 3]) == 64 and padded_size([64]) == 64 and padded_size([65]) == 128
    assert padded_size([5, 0], max_gt=8) == 8
    with pytest.raises(ValueError, match="image crowded.jpg .* has 9 objects, more than max_gt=8"):
        data.collate([fake_item(1), fake_item(9, "crowded.jpg")], max_gt=8, preset="ssd", img_size=16)
    with pytest.raises(ValueError, match="image tall.jpg is 40x10 after transforms, larger than the 32x64 canvas"):
        data.collate([fake_item(1, size=(10, 20)), fake_item(1, "tall.jpg", (40, 10))], max_gt=None,
                     preset="retinanet", img_size=32)
    # a 191 x 190 portrait file resized to 160 x 160 (torchvision truncates 160.8) still takes the portrait canvas
    images, _, _ = data.collate([fake_item(1, size=(160, 160), orig_size=(191, 190)), fake_item(1, size=(190, 160))],
                                max_gt=None, preset="retinanet", img_size=160)
    assert images.shape == (2, 3, 288, 160)


def test_grouped_batches_keep_orientations_apart():
    groups = (np.random.default_rng(0).random(50) < 0.3).astype(int).tolist()
    for world_size in (1, 2, 3):
        counts = set()
        for rank in range(world_size):
            sampler = DistributedSampler(range(50), num_replicas=world_size, rank=rank, shuffle=True, seed=4)
            batches = data.GroupedBatchSampler(sampler, groups, batch_size=4, drop_last=True)
            batches.set_epoch(1)
            first = list(batches)
            torch.manual_seed(123)  # the global RNG plays no part
            assert list(batches) == first
            batches.set_epoch(2)
            assert list(batches) != first
            flat = [i for batch in first for i in batch]
            assert all(len({groups[i] for i in batch}) == 1 and len(batch) == 4 for batch in first)
            assert len(set(flat)) == len(flat)  # no image twice in an epoch
            counts.add(len(first))
            assert len(first) == len(batches) == len(sampler) // 4 - 1
        assert len(counts) == 1  # every rank takes the same number of steps
    everything = data.GroupedBatchSampler(range(50), groups, batch_size=4, drop_last=False)
    flat = sorted(i for batch in everything for i in batch)
    assert flat == list(range(50)) and len(list(everything)) == len(everything)
    assert all(len({groups[i] for i in batch}) == 1 for batch in everything)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_shards_cover_each_image_once(synthetic, world_size):
    train = data.CocoDetection(synthetic, "train", presets.get_preset("retinanet")["train_transforms"](64))
    val = data.CocoDetection(synthetic, "val", presets.get_preset("retinanet")["eval_transforms"](64))
    seen = []
    for rank in range(world_size):
        train_loader, val_loader = data.build_loaders(
            train, val, preset="retinanet", img_size=64, batch_size=4, workers=0, rank=rank, world_size=world_size,
            seed=0, max_gt=16)
        seen += [i for batch in val_loader.batch_sampler for i in batch]
        assert all(len({val.landscape[i] for i in batch}) == 1 for batch in val_loader.batch_sampler)
    assert sorted(seen) == list(range(len(val)))
    images, targets, metas = next(iter(train_loader))
    assert images.shape[0] == 4 and targets["boxes"].shape == (4, 16, 4) and len(metas) == 4
    state = torch.random.get_rng_state()
    sum(len(m) for _, _, m in val_loader)  # a whole evaluation pass...
    assert torch.equal(torch.random.get_rng_state(), state)  # ...leaves the global RNG where it was


def test_16_bit_pictures_are_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale PNG (mode I;16) reaches the detector at 8 bits scaled (common.images.to_rgb), not as
    PIL's convert("RGB") gives it, clipped almost white."""
    gray = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "depth.png")
    with Image.open(tmp_path / "depth.png") as f:
        assert f.mode.startswith("I")
    pixels = data.read_image(tmp_path / "depth.png", width=3, height=1)
    assert pixels.dtype == torch.uint8 and pixels[:, 0].tolist() == [[0, 128, 255]] * 3


def test_multiscale_canvas_is_mmdets_batch_resize_drawn_from_the_step():
    """BatchSyncRandomResize: the canvas for the first 10 iterations, then per block of 10 a short side among the
    multiples of 32 in 480-800 (YOLOX at 640), the aspect ratio kept; the same (seed, iteration) -> the same size."""
    sizes = [data.multiscale_canvas(it, 0, (640, 640), (0.75, 1.25), 640) for it in range(0, 3000, 10)]
    assert sizes[0] == (640, 640) and all(h == w for h, w in sizes)
    assert {h for h, _ in sizes[1:]} == set(range(480, 801, 32))  # every size, none outside
    assert data.multiscale_canvas(19, 0, (640, 640), (0.75, 1.25), 640) == sizes[1]  # one size per block
    assert [data.multiscale_canvas(it, 1, (640, 640), (0.75, 1.25), 640) for it in range(0, 3000, 10)] != sizes
    h, w = data.multiscale_canvas(25, 0, (128, 224), (0.5, 1.0), 128)
    assert h in (64, 96, 128) and w == 32 * int(224 / 128 * h / 32)


def test_resize_batch_scales_boxes_and_image_sizes():
    images = torch.zeros(1, 3, 64, 96, dtype=torch.uint8)
    images[0, :, 16:48, 24:72] = 255  # a white box
    targets = {"boxes": torch.tensor([[[24.0, 16, 72, 48]]]), "labels": torch.zeros(1, 1, dtype=torch.long),
               "valid": torch.ones(1, 1, dtype=torch.bool), "image_size": torch.tensor([[63, 95]])}
    resized, out = data.resize_batch(images, targets, (32, 64))
    assert resized.shape == (1, 3, 32, 64) and resized.dtype == torch.float32
    torch.testing.assert_close(out["boxes"], torch.tensor([[[16.0, 8, 48, 24]]]))
    assert out["image_size"].tolist() == [[31, 63]]  # truncated, as mmdet's img_shape
    assert resized[0, :, 9:23, 17:47].min() == 255 and resized[0, :, :6].max() == 0  # the box moved with its pixels
    same, untouched = data.resize_batch(images, targets, (64, 96))
    assert same is images and untouched is targets


def test_masks_follow_their_boxes_through_the_solov2_preset(synthetic, one_thread):
    """with_masks: one uint8 mask per kept object, in the boxes' order, moved by the keep-ratio resize (nearest) and
    the flip with the image: each mask's extent is its box within the rounding of rasterising the polygon (up to
    1.4 px at the file's resolution, where a sharp tip of a star or triangle covers no pixel centre) and of the
    nearest resize (a row or column more): at most 3 px, under 1 px on average; a forced flip mirrors masks and
    boxes alike."""
    preset = presets.get_preset("solov2")
    dataset = data.CocoDetection(synthetic, "train", preset["train_transforms"](96), with_masks=True)
    assert dataset.mask_anns and sum(map(len, dataset.mask_anns)) == sum(map(len, dataset.labels))
    torch.manual_seed(0)
    errors = []
    for index in list(range(len(dataset))) * 2:
        image, target, _ = dataset[index]
        masks = target["masks"]
        assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8
        assert masks.shape == (len(target["boxes"]), *image.shape[-2:]) and set(masks.unique().tolist()) <= {0, 1}
        errors.append((mask_boxes(masks.bool()) - target["boxes"]).abs().flatten())
    errors = torch.cat(errors)
    assert len(errors) > 4 * len(dataset) and errors.max() <= 3 and errors.mean() < 1
    resize = presets.retinanet_eval_transforms(96)
    plain = data.CocoDetection(synthetic, "train", resize, with_masks=True)
    flipped = data.CocoDetection(synthetic, "train", v2.Compose([resize, v2.RandomHorizontalFlip(1.0)]),
                                 with_masks=True)
    index = max(range(len(plain)), key=lambda i: len(plain.labels[i]))
    (image, target, _), (image_f, target_f, _) = plain[index], flipped[index]
    assert torch.equal(image_f, image.flip(-1)) and len(target["masks"]) >= 2
    assert torch.equal(target_f["masks"], target["masks"].flip(-1))
    width = image.shape[-1]
    torch.testing.assert_close(target_f["boxes"], target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1])
                               + torch.tensor([width, 0, width, 0]))


def masked_item(masks: torch.Tensor, file_name: str = "m.jpg") -> tuple:
    """An item of size masks' [h, w] whose boxes are the masks' extents (any box would do)."""
    h, w = masks.shape[-2:]
    boxes = tv_tensors.BoundingBoxes(mask_boxes(masks), format="XYXY", canvas_size=(h, w))
    meta = {"image_id": 3, "file_name": file_name, "orig_size": (h, w), "scale": (1.0, 1.0)}
    return tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8)), {
        "boxes": boxes, "labels": torch.arange(len(masks)), "masks": tv_tensors.Mask(masks.to(torch.uint8))}, meta


def test_collate_builds_mask_targets_for_training_batches(monkeypatch):
    """solov2 at 64: canvas 64 x 128, masks at stride 4 (16 x 32). An image of 50 x 70 (not multiples of 4) with a
    blob, an empty mask (its gt not valid, as mmdet's valid_mask_flags) and a mask on its last column; the targets
    equal the full-resolution canvas masks down-sampled and their centres of mass; the preset's check_targets sees
    training batches only; evaluation batches carry no masks; a training set built without masks is an error."""
    full = torch.zeros(3, 50, 70, dtype=torch.bool)
    full[0, 10:31, 5:40] = True
    full[2, 20:50, 66:70] = True
    other = torch.zeros(1, 64, 40, dtype=torch.bool)
    other[0, 30:64, :13] = True
    calls = []
    monkeypatch.setitem(presets.PRESETS, "solov2", {**presets.PRESETS["solov2"],
                                                    "check_targets": lambda t, m: calls.append((t, m))})
    images, targets, metas = data.collate([masked_item(full), masked_item(other, "n.jpg")], max_gt=None,
                                          preset="solov2", img_size=64)
    assert images.shape == (2, 3, 64, 128)
    assert targets["masks"].shape == (2, 32, 16, 32) and targets["masks"].dtype == torch.bool
    assert targets["mask_centers"].shape == (2, 32, 2) and targets["mask_centers"].dtype == torch.float32
    assert targets["valid"][0, :4].tolist() == [True, False, True, False] and targets["valid"][1, :2].tolist() == [
        True, False]
    for i, masks in enumerate((full, other)):
        canvas = torch.zeros(len(masks), 64, 128, dtype=torch.bool)
        canvas[:, :masks.shape[1], :masks.shape[2]] = masks
        n = len(masks)
        assert torch.equal(targets["masks"][i, :n], downsample_masks(canvas))
        assert torch.equal(targets["mask_centers"][i, :n], center_of_mass(canvas))
        assert not targets["masks"][i, n:].any() and not targets["mask_centers"][i, n:].any()
    assert targets["masks"][0, 2].any(-2).nonzero().flatten().tolist() == [16, 17]  # columns 66-69 -> cells 16, 17
    assert targets["mask_centers"][0, 0].tolist() == [20.0, 22.0]
    assert len(calls) == 1
    assert calls[0][0]["masks"] is targets["masks"] and [m["file_name"] for m in calls[0][1]] == ["m.jpg", "n.jpg"]
    _, eval_targets, _ = data.collate([masked_item(full)], max_gt=None, preset="solov2", img_size=64,
                                      evaluation=True)
    assert "masks" not in eval_targets and "mask_centers" not in eval_targets and len(calls) == 1
    with pytest.raises(ValueError, match="preset 'solov2' trains on masks, image a.jpg has none"):
        data.collate([fake_item(1)], max_gt=None, preset="solov2", img_size=64)


def test_build_datasets_loads_masks_for_training_only(synthetic):
    train, val = data.build_datasets(str(synthetic), "solov2", 64)
    assert train.with_masks and not val.with_masks
    assert "masks" in train[1][1] and "masks" not in val[1][1]
    assert not data.build_datasets(str(synthetic), "retinanet", 64)[0].with_masks

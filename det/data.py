"""Detection data: COCO-layout folders or the built-in synthetic COCO set, transforms v2 presets, padded batches.

A batch is `(images, targets, metas)` whose shapes are static, so a graph compiler (Ascend) sees a handful of shapes:
- images:  uint8 [B, 3, H, W] on the preset's canvas (det/presets.py), padded bottom/right with its "fill"; the model
           normalises on the device
- targets: {"boxes": float32 [B, M, 4] xyxy canvas pixels, "labels": int64 [B, M] in 0..C-1, "valid": bool [B, M],
           "image_size": int64 [B, 2] (h, w) of each image inside the canvas}; padded rows are 0, 0, False.
           M = `max_gt`, or with None the smallest 32 * 2**n that holds the batch
- metas:   per image {"image_id", "file_name", "orig_size": (H0, W0), "scale": (sy, sx)}; resized size / file size,
           so canvas coordinates / scale = file coordinates (padding is bottom/right: it shifts nothing; SSD's
           training crops do not map back, evaluation has none)
Presets with a "mask_stride" (4: SOLOv2) add to the training batches' targets, from a set built `with_masks`:
- "masks":        bool [B, M, H/4, W/4], each gt's mask on the canvas down-sampled as mmdet's SOLOv2 targets
                  (det/masks.py downsample_masks); 0 for padded rows
- "mask_centers": float32 [B, M, 2], (y, x) centre of mass of each gt's full-resolution canvas mask in canvas
                  pixels (det/masks.py center_of_mass); a gt whose full-resolution mask is empty is not "valid"
                  (mmdet's SOLOv2 skips it)
At 800 x 1344 with M = 64 the masks are 64 x 200 x 336 bytes = 4.3 MB per image. The items reaching collate hold
their full-resolution masks as the transforms left them (uint8 N x h x w: 64 x 800 x 1333 = 68 MB at most here);
collate goes through them one image at a time, with one copy padded to multiples of 4 (as much again), and never
stacks a batch of them (2 images of 64 masks at 800 x 1201: 0.27 s and 65 MB more at peak, on one CPU core).
Evaluation batches carry no masks (COCOeval reads the annotation file).
"""
import contextlib
import io
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors

from common.dist import barrier, is_main_process, print0
from common.images import read_rgb
from common.sampling import ResumableBatches, SeededDataset, item_seed
from det.masks import center_of_mass, check_segmentation, decode_segmentation, downsample_masks
from det.presets import get_preset
from det.synthetic_coco import default_cache, synthetic_coco

REQUIRED_FIELDS = {"images": ("id", "file_name", "width", "height"), "categories": ("id", "name"),
                   "annotations": ("id", "image_id", "category_id", "bbox")}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON's NaN / Infinity are floats


def load_coco(ann_file: Path) -> COCO:
    """pycocotools' index of a COCO annotation file, after checks whose errors name the file (pycocotools' do not)."""
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {ann_file} does not exist") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"cannot read annotation file {ann_file}: {e}") from e
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
        raise ValueError(f"{ann_file} is not a COCO detection file: it needs 'images', 'annotations', 'categories'")
    for key, fields in REQUIRED_FIELDS.items():
        for entry in data[key]:
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise ValueError(f"{ann_file}: an entry of '{key}' lacks {missing}: {str(entry)[:200]}")
    cat_ids = {c["id"] for c in data["categories"]}
    image_ids = {im["id"] for im in data["images"]}
    for ann in data["annotations"]:
        if ann["category_id"] not in cat_ids:
            raise ValueError(f"{ann_file}: annotation {ann['id']} has category_id {ann['category_id']}, which is not "
                             f"in its 'categories' (ids {sorted(cat_ids)})")
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{ann_file}: annotation {ann['id']} has image_id {ann['image_id']}, which is not in "
                             "'images'")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise ValueError(f"{ann_file}: annotation {ann['id']} has a bbox that is not 4 numbers [x, y, w, h]: "
                             f"{str(bbox)[:200]}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # "creating index...", once per rank
        coco.createIndex()
    return coco


def read_image(path: Path, width: int, height: int) -> tv_tensors.Image:
    """uint8 [3, H, W] (any file mode, through `common.images.read_rgb`: JPEGs by torchvision.io.decode_jpeg); errors
    name the file. No EXIF rotation: COCO's boxes refer to the stored pixels."""
    try:
        image = read_rgb(path)  # 16-bit grayscale scaled, not clipped white
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for corrupt or truncated files
        raise RuntimeError(f"cannot read image {path}: {e}") from e
    if image.shape[1:] != (height, width):
        raise ValueError(f"image {path} is {image.shape[2]}x{image.shape[1]} but its annotation says {width}x{height}")
    return tv_tensors.Image(image)


class CocoDetection(Dataset):
    """A COCO-layout detection set: `root/annotations/instances_{split}2017.json` and images in `root/{split}2017/`.

    Category ids (COCO's have gaps: 80 classes in 1..90) become labels 0..C-1 in id order; `label_to_cat[label]` maps
    back, `classes[label]` is the name. Targets leave out crowd regions (iscrowd=1: COCOeval ignores detections on
    them) and boxes under 1 px wide or high once clipped to the image (mmdet's rule); images without objects stay.
    A bbox holding NaN or an infinity (JSON allows both) is skipped, left out of the COCOeval ground truth too, and
    counted in the summary line with its annotation ids: one broken entry of a large file should not stop training.
    Item: (uint8 tv_tensors.Image [3, h, w], {"boxes": BoundingBoxes [N, 4] xyxy, "labels": int64 [N]}, meta) after
    `transforms`, meta as in the module docstring.

    `with_masks` adds "masks": tv_tensors.Mask uint8 [N, h, w] 0/1, one per box in the same order, decoded when the
    item is loaded (det/masks.py decode_segmentation), so every v2 transform moves them with the image (Resize:
    nearest, as mmdet's BitmapMasks.rescale). The segmentations are checked at start-up without decoding (COCO has
    860k): an RLE of another size than its image, or an entry that is neither polygons nor an RLE, is an error
    naming the file and the annotation; an object left with no polygon of 3 or more points (mmdet's LoadAnnotations
    ignores it) is skipped and counted in the summary line like the boxes holding NaN.
    """

    def __init__(self, root: str | Path, split: str = "train", transforms=None, *, ann_file: str | Path | None = None,
                 img_dir: str | Path | None = None, with_masks: bool = False) -> None:
        self.ann_file = Path(ann_file or Path(root) / "annotations" / f"instances_{split}2017.json")
        self.img_dir = Path(img_dir or Path(root) / f"{split}2017")
        self.transforms, self.with_masks = transforms, with_masks
        self.coco = load_coco(self.ann_file)
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.img_dir} (of {self.ann_file}) does not exist")
        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.label_to_cat = [c["id"] for c in cats]
        self.classes = [c["name"] for c in cats]
        cat_to_label = {cat: label for label, cat in enumerate(self.label_to_cat)}
        self.ids = sorted(self.coco.imgs)
        self.landscape = [self.coco.imgs[i]["width"] >= self.coco.imgs[i]["height"] for i in self.ids]
        self.boxes, self.labels, crowd, dropped = [], [], 0, 0  # per image: float32 [N, 4] xyxy, int64 [N]
        self.not_finite = []  # annotation ids whose bbox holds NaN or inf
        self.no_polygon = []  # with_masks: annotation ids whose polygons all have under 3 points
        self.mask_anns = []  # with_masks: per image, the annotation ids of the kept objects, in their order
        for image_id in self.ids:
            info, boxes, labels, anns = self.coco.imgs[image_id], [], [], []
            for ann in self.coco.imgToAnns[image_id]:
                if not all(math.isfinite(v) for v in ann["bbox"]):
                    self.not_finite.append(ann["id"])
                    continue
                if ann.get("iscrowd", 0):
                    crowd += 1
                    continue
                x, y, w, h = ann["bbox"]
                x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, info["width"]), min(y + h, info["height"])
                if x2 - x1 < 1 or y2 - y1 < 1:
                    dropped += 1
                    continue
                if with_masks:
                    try:
                        has_mask = check_segmentation(ann.get("segmentation"), info["height"], info["width"], ann["id"])
                    except ValueError as e:
                        raise ValueError(f"{self.ann_file}: {e}") from None
                    if not has_mask:
                        self.no_polygon.append(ann["id"])
                        continue
                    anns.append(ann["id"])
                boxes.append((x1, y1, x2, y2))
                labels.append(cat_to_label[ann["category_id"]])
            self.boxes.append(np.array(boxes, dtype=np.float32).reshape(-1, 4))
            self.labels.append(np.array(labels, dtype=np.int64))
            self.mask_anns.append(anns)
        self.dropped = dropped
        if self.not_finite:  # COCOeval must not see them either: they would count as objects nobody can find
            skip = set(self.not_finite)
            self.coco.dataset["annotations"] = [a for a in self.coco.dataset["annotations"] if a["id"] not in skip]
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco.createIndex()
        empty = sum(len(labels) == 0 for labels in self.labels)
        skipped = ""
        for ids, what in ((self.not_finite, "boxes holding NaN or inf"),
                          (self.no_polygon, "objects without a polygon of 3 or more points")):
            if ids:
                listed = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
                skipped += f"; skipped {len(ids)} {what} (annotation ids {listed})"
        print0(f"{self.ann_file}: {len(self.ids)} images ({empty} without objects), {len(self.classes)} classes, "
               f"{sum(map(len, self.labels))} objects; left out {crowd} crowd regions and {dropped} boxes under 1 px"
               f"{skipped}")

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[tv_tensors.Image, dict]:
        """Item `index` before `transforms`, without meta: (uint8 [3, H, W], {"boxes" [N, 4], "labels" [N]} and
        with_masks "masks" [N, H, W]), what det/yolox_data.py's mixing wrapper combines."""
        info = self.coco.imgs[self.ids[index]]
        height, width = info["height"], info["width"]
        image = read_image(self.img_dir / info["file_name"], width, height)
        target = {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(self.boxes[index]), format="XYXY",
                                                    canvas_size=(height, width)),
                  "labels": torch.from_numpy(self.labels[index])}
        if self.with_masks:
            try:
                masks = [decode_segmentation(self.coco.anns[a]["segmentation"], height, width, a)
                         for a in self.mask_anns[index]]
            except ValueError as e:
                raise ValueError(f"{self.ann_file}: {e}") from None
            target["masks"] = tv_tensors.Mask(torch.from_numpy(np.stack(masks)) if masks else
                                              torch.zeros(0, height, width, dtype=torch.uint8))
        return image, target

    def meta(self, index: int, image: torch.Tensor) -> dict:
        """The meta of item `index` (module docstring) once its image is `image` ([3, h, w], transformed)."""
        info = self.coco.imgs[self.ids[index]]
        height, width = info["height"], info["width"]
        return {"image_id": info["id"], "file_name": info["file_name"], "orig_size": (height, width),
                "scale": (image.shape[-2] / height, image.shape[-1] / width)}

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict, dict]:
        image, target = self.load(index)
        if self.transforms is not None:
            try:
                image, target = self.transforms(image, target)
            except Exception as e:  # say which sample, whatever went wrong
                path = self.img_dir / self.coco.imgs[self.ids[index]]["file_name"]
                raise RuntimeError(f"transforms failed on {path} (index {index}): {e}") from e
        return image, target, self.meta(index, image)


def collate(batch: Sequence[tuple], *, max_gt: int | None, preset: str, img_size: int,
            evaluation: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[dict]]:
    """Items of CocoDetection -> (images, targets, metas) of the module docstring. The canvas follows the first
    file's orientation (not the resized image's: rounding can make a portrait image square), the batch sampler keeps
    orientations apart; with `evaluation`, the preset's "eval_canvas_size" where it has one. Training batches of a
    preset with a "mask_stride" get the masks' targets, then go to the preset's "check_targets" where it has one
    (SOLOv2's raises for an image with more positives than its fixed budget)."""
    images, targets, metas = zip(*batch, strict=True)
    landscape = metas[0]["orig_size"][1] >= metas[0]["orig_size"][0]
    preset_fns = get_preset(preset)
    canvas_size = preset_fns["canvas_size"]
    if evaluation:
        canvas_size = preset_fns.get("eval_canvas_size", canvas_size)
    height, width = canvas_size(img_size, landscape)
    counts = [len(t["labels"]) for t in targets]
    if max_gt is None:  # 32, 64, 128, ...: a few shapes over a run, as mmdet's Ascend heads pad
        max_gt = 32
        while max_gt < max(counts):
            max_gt *= 2
    out = torch.tensor(preset_fns["fill"], dtype=torch.uint8).view(1, 3, 1, 1).repeat(len(images), 1, height, width)
    boxes = torch.zeros(len(images), max_gt, 4)
    labels = torch.zeros(len(images), max_gt, dtype=torch.int64)
    valid = torch.zeros(len(images), max_gt, dtype=torch.bool)
    image_size = torch.zeros(len(images), 2, dtype=torch.int64)  # (h, w) of each image inside the canvas
    stride = None if evaluation else preset_fns.get("mask_stride")
    if stride:
        masks = torch.zeros(len(images), max_gt, height // stride, width // stride, dtype=torch.bool)
        centers = torch.zeros(len(images), max_gt, 2)
    for i, (image, target, meta, n) in enumerate(zip(images, targets, metas, counts, strict=True)):
        h, w = image.shape[-2:]
        if h > height or w > width:
            raise ValueError(f"image {meta['file_name']} is {h}x{w} after transforms, larger than the {height}x{width} "
                             "canvas: batches must not mix portrait and landscape images (GroupedBatchSampler)")
        if n > max_gt:
            raise ValueError(f"image {meta['file_name']} (id {meta['image_id']}) has {n} objects, more than "
                             f"max_gt={max_gt}: raise --max-gt (or leave it unset to pad per batch)")
        out[i, :, :h, :w] = image
        boxes[i, :n] = target["boxes"]
        labels[i, :n] = target["labels"]
        valid[i, :n] = True
        image_size[i] = torch.tensor([h, w])
        if stride:
            if "masks" not in target:
                raise ValueError(f"preset {preset!r} trains on masks, image {meta['file_name']} has none: build the "
                                 "training set with_masks")
            full = target["masks"].as_subclass(torch.Tensor)  # uint8 [n, h, w]; bottom/right padding moves no centre
            centers[i, :n] = center_of_mass(full)
            valid[i, :n] = full.flatten(1).any(1)  # mmdet's valid_mask_flags
            small = downsample_masks(torch.nn.functional.pad(full, (0, -w % stride, 0, -h % stride)), stride)
            masks[i, :n, :small.shape[1], :small.shape[2]] = small  # [n, ceil(h / s), ceil(w / s)]
    targets = {"boxes": boxes, "labels": labels, "valid": valid, "image_size": image_size}
    if stride:
        targets.update(masks=masks, mask_centers=centers)
    if not evaluation and "check_targets" in preset_fns:
        preset_fns["check_targets"](targets, list(metas))
    return out, targets, list(metas)


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of indices from `sampler` that share a group id (landscape / portrait: one canvas fits the batch), as
    torchvision's detection reference; the order is the sampler's, so a DistributedSampler underneath makes it
    distributed and deterministic in (seed, epoch) via `set_epoch`.

    With drop_last every rank yields len(sampler) // batch_size - (groups - 1) batches, the most any rank can fill
    from its own share without repeating an image (each group loses under one batch), so no rank waits for another
    at the end of an epoch; the rest of the epoch's indices are left out. Without drop_last every index comes once,
    the last batch of each group partial.
    """

    def __init__(self, sampler: Iterable[int], group_ids: Sequence[int], batch_size: int, drop_last: bool) -> None:
        self.sampler, self.group_ids, self.batch_size, self.drop_last = sampler, group_ids, batch_size, drop_last
        self.num_groups = len(set(group_ids))

    def __iter__(self) -> Iterator[list[int]]:
        buffers, emitted, limit = defaultdict(list), 0, len(self)
        for index in self.sampler:
            buffer = buffers[self.group_ids[index]]
            buffer.append(index)
            if len(buffer) == self.batch_size:
                if self.drop_last and emitted == limit:
                    return
                yield buffer[:]
                buffer.clear()
                emitted += 1
        if not self.drop_last:
            yield from (buffer for buffer in buffers.values() if buffer)

    def __len__(self) -> int:
        if self.num_groups == 0:  # no data: no batch (the formula below would say 1)
            return 0
        if self.drop_last:
            return max(0, len(self.sampler) // self.batch_size - (self.num_groups - 1))
        counts = Counter(self.group_ids[i] for i in self.sampler)
        return sum(math.ceil(n / self.batch_size) for n in counts.values())

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def build_loaders(
    train: CocoDetection, val: CocoDetection, *, preset: str, img_size: int, batch_size: int, workers: int, rank: int,
    world_size: int, seed: int, max_gt: int | None, pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Training batches shuffled per epoch by (seed, epoch), each image augmented from generators seeded by (seed,
    epoch, index) (common/sampling.py): call `common.sampling.set_epoch(train_loader, epoch, start_batch)`, and a run
    resumed at any batch sees exactly the batches an uninterrupted run would. Validation split into disjoint strided
    shards, so each image is evaluated exactly once over all ranks, and padded per batch (its targets never reach the
    model: COCOeval reads the json). Batches are grouped by orientation when the preset's canvas depends on it
    (retinanet), not for ssd (mmdet's configs do the same). Both loaders have generators of their own: loading (or
    evaluating) never moves the global RNG that training draws from."""
    canvas_size = get_preset(preset)["canvas_size"]
    by_orientation = canvas_size(img_size, True) != canvas_size(img_size, False)

    def groups(dataset: CocoDetection) -> list[int]:
        return [int(landscape) for landscape in dataset.landscape] if by_orientation else [0] * len(dataset)

    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    common = dict(num_workers=workers, pin_memory=pin_memory)
    batches = ResumableBatches(GroupedBatchSampler(sampler, groups(train), batch_size, True))
    train_loader = DataLoader(SeededDataset(train, seed), batch_sampler=batches, generator=torch.Generator(),
                              collate_fn=partial(collate, max_gt=max_gt, preset=preset, img_size=img_size), **common)
    shard = GroupedBatchSampler(range(rank, len(val), world_size), groups(val), batch_size, drop_last=False)
    val_loader = DataLoader(val, batch_sampler=shard, generator=torch.Generator(),
                            collate_fn=partial(collate, max_gt=None, preset=preset, img_size=img_size,
                                               evaluation=True), **common)
    return train_loader, val_loader


class RepeatDataset(Dataset):
    """mmdet's RepeatDataset: `times` passes over `dataset` make one epoch (SSD's recipes: 5), so small data sets
    spend less time in evaluation and loader start-up. Keeps the orientation of each item for grouping."""

    def __init__(self, dataset: CocoDetection, times: int) -> None:
        self.dataset, self.times = dataset, times
        self.landscape = dataset.landscape * times

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict, dict]:
        return self.dataset[index % len(self.dataset)]


def build_datasets(
    data_path: str | None, preset: str, img_size: int, *, synthetic_train: int = 2000, synthetic_val: int = 500,
    train_ann: str | None = None, val_ann: str | None = None, train_images: str | None = None,
    val_images: str | None = None,
) -> tuple[CocoDetection, CocoDetection]:
    """(train, val) with the preset's transforms, from the COCO layout at `data_path` (annotation files and image
    folders overridable), or with None from the synthetic set in $PLAINVISION_CACHE (default ~/.cache/plainvision),
    written by rank 0 while the others wait. A preset with a "mask_stride" trains on masks: the training set is
    built with_masks (the validation set needs none, COCOeval reads its annotation file)."""
    if data_path is None:
        data_path = default_cache() / f"synthetic_coco_{synthetic_train}_{synthetic_val}"
        if is_main_process():
            synthetic_coco(data_path, synthetic_train, synthetic_val)
        barrier()
    transforms = get_preset(preset)
    train = CocoDetection(data_path, "train", transforms["train_transforms"](img_size), ann_file=train_ann,
                          img_dir=train_images, with_masks="mask_stride" in transforms)
    val = CocoDetection(data_path, "val", transforms["eval_transforms"](img_size), ann_file=val_ann, img_dir=val_images)
    for dataset, purpose in ((train, "train on"), (val, "evaluate")):
        if len(dataset) == 0:
            raise ValueError(f"{dataset.ann_file} lists no images: nothing to {purpose}")
    if val.label_to_cat != train.label_to_cat:
        raise ValueError(f"{train.ann_file} and {val.ann_file} have different categories")
    return train, val


def multiscale_canvas(iteration: int, seed: int, canvas: tuple[int, int], ratio_range: tuple[float, float],
                      img_size: int, interval: int = 10, divisor: int = 32) -> tuple[int, int]:
    """mmdet's BatchSyncRandomResize (YOLOX): the first `interval` iterations keep the canvas (h, w); then every
    `interval` iterations the short side is drawn uniformly from the multiples of `divisor` in ratio_range x img_size
    (YOLOX: 480-800 for 640), the aspect ratio kept. The draw comes from (seed, iteration // interval), not from rank
    0 and a broadcast: every rank agrees without talking, a resumed run draws the same, and the few sizes are each
    one compiled graph."""
    block = iteration // interval
    if block == 0:
        return canvas
    low, high = (round(r * img_size / divisor) for r in ratio_range)
    units = int(torch.randint(low, high + 1, (), generator=torch.Generator().manual_seed(item_seed(seed, -1, block))))
    return divisor * units, divisor * int(canvas[1] / canvas[0] * units)


def resize_batch(images: torch.Tensor, targets: dict[str, torch.Tensor],
                 size: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A batch (on the device) onto a `size` (h, w) canvas, bilinearly as mmdet's BatchSyncRandomResize, boxes and
    image sizes scaled along (image sizes truncated, as mmdet's img_shape). Returns float 0-255 images."""
    height, width = images.shape[-2:]
    if (height, width) == tuple(size):
        return images, targets
    scale = torch.tensor([size[1] / width, size[0] / height], device=images.device)  # (x, y)
    images = torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
    targets = dict(targets, boxes=targets["boxes"] * scale.repeat(2),
                   image_size=(targets["image_size"] * scale.flip(0)).long())
    return images, targets

"""Classification data: ImageNet-layout folders or the built-in synthetic set, transforms v2 presets, loaders."""
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets
from torchvision.transforms import InterpolationMode, v2

from cls.models.efficientnet import INPUT_SIZES
from common.images import read_rgb
from common.sampling import ResumableBatches, SeededDataset
from common.synthetic import classification_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_sizes(arch: str, synthetic: bool) -> tuple[int, int, int, InterpolationMode]:
    """(train crop, val resize, val crop, interpolation) of the recipe: 224/256/224 bilinear, as mmcls; EfficientNet
    at its own resolution with bicubic and mmcls's 32-pixel crop padding (B4: 380/412/380). The synthetic set is
    drawn at 64 px and trained at 64 px."""
    if synthetic:
        return 64, 73, 64, InterpolationMode.BILINEAR
    if arch in INPUT_SIZES:
        size = INPUT_SIZES[arch]
        return size, size + 32, size, InterpolationMode.BICUBIC
    return 224, 256, 224, InterpolationMode.BILINEAR


def train_transform(
    crop_size: int,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    auto_augment: str | None = None,
    random_erase: float = 0.0,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """RandomResizedCrop + horizontal flip (+ RandAugment / TrivialAugmentWide / AugMix / AutoAugment,
    + random erasing)."""
    ops = [v2.PILToTensor(), v2.RandomResizedCrop(crop_size, interpolation=interpolation, antialias=True),
           v2.RandomHorizontalFlip()]
    if auto_augment == "ra":
        ops.append(v2.RandAugment(interpolation=interpolation))
    elif auto_augment == "ta_wide":
        ops.append(v2.TrivialAugmentWide(interpolation=interpolation))
    elif auto_augment == "augmix":
        ops.append(v2.AugMix(interpolation=interpolation))
    elif auto_augment == "imagenet":  # AutoAugment's ImageNet policy (Cubuk et al. 2019), mmcls's "imagenet"
        ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interpolation))
    elif auto_augment is not None:
        raise ValueError(f"unknown --auto-augment {auto_augment!r}: choose ra, ta_wide, augmix or imagenet")
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if random_erase > 0:
        ops.append(v2.RandomErasing(p=random_erase))
    return v2.Compose(ops)


def eval_transform(
    resize_size: int,
    crop_size: int,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """Resize the short side, centre-crop."""
    return v2.Compose([
        v2.PILToTensor(), v2.Resize(resize_size, interpolation=interpolation, antialias=True),
        v2.CenterCrop(crop_size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
    ])


class SyntheticShapes(Dataset):
    """`size` procedural 64 px images, 10 classes (one shape each, class-typical hue); image i depends only on
    (seed, i), so every worker and every run sees the same data set without storing it."""

    def __init__(self, size: int, seed: int, transform=None, num_classes: int = 10, image_size: int = 64) -> None:
        self.size, self.seed, self.transform = size, seed, transform
        self.image_size = image_size
        self.classes = [f"class_{k}" for k in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = classification_image(self.seed, index, len(self.classes), self.image_size)
        return (self.transform(image) if self.transform else image), label


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder whose errors name the path, with an opt-in to skip unreadable images, read by `read_rgb`.

    With `skip_bad`, an unreadable image is counted in `self.skipped`, a shared-memory tensor with one slot per
    loader worker (no cross-process races; `skipped_images` sums it), and then
    - with `replace_bad` (training): replaced by the next readable one, so the batch keeps its size;
    - without it (validation): the sample is None, which `drop_unreadable` takes out of the batch, so every readable
      image is counted exactly once and no image twice.
    """

    def __init__(self, root: Path, transform=None, skip_bad: bool = False, replace_bad: bool = True) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"expected the ImageNet layout {root}/<class>/<image>, but {root} does not exist")
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            if not any(f.is_file() for f in class_dir.iterdir()):
                raise FileNotFoundError(f"class folder {class_dir} has no images")
        super().__init__(str(root), transform=transform)
        self.skip_bad, self.replace_bad = skip_bad, replace_bad
        self.skipped = torch.zeros(256, dtype=torch.int64).share_memory_()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = read_rgb(path)  # uint8 [3, H, W]; JPEGs by torchvision.io.decode_jpeg
            except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for corrupt or truncated files
                if not self.skip_bad:
                    raise RuntimeError(f"cannot read image {path}: {e} (use --skip-bad-images to skip)") from e
                worker = torch.utils.data.get_worker_info()
                self.skipped[0 if worker is None else worker.id + 1] += 1
                print(f"warning: skipping unreadable image {path}: {e}", flush=True)
                if not self.replace_bad:
                    return None
                continue
            return (self.transform(image) if self.transform else image), target
        raise RuntimeError(f"no readable image in {self.root}")


def skipped_images(dataset: Dataset) -> int:
    """Unreadable images skipped so far by `dataset` (a CheckedImageFolder, or a Subset of one) in this process and
    its loader workers; 0 for a set without files (synthetic). Per rank: all-reduce it for the whole run."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    skipped = getattr(dataset, "skipped", None)
    return 0 if skipped is None else int(skipped.sum())


def drop_unreadable(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The validation collate_fn: default_collate of the samples that are not None (unreadable images under
    `skip_bad`), or None when no image of the batch could be read, a batch the caller must skip."""
    batch = [sample for sample in batch if sample is not None]
    return torch.utils.data.default_collate(batch) if batch else None


def build_datasets(
    data_path: str | None, train_tf, val_tf, *, skip_bad: bool = False, synthetic_size: int = 2000, seed: int = 0
) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, class names) from DATA/train and DATA/val, or the synthetic set when `data_path` is None. With
    `skip_bad`, an unreadable training image is replaced by the next one, an unreadable validation image dropped."""
    if data_path is None:
        train = SyntheticShapes(synthetic_size, seed, train_tf)
        val = SyntheticShapes(max(synthetic_size // 4, 10), seed + 1, val_tf)  # other seed: unseen images
        return train, val, train.classes
    train = CheckedImageFolder(Path(data_path) / "train", train_tf, skip_bad)
    val = CheckedImageFolder(Path(data_path) / "val", val_tf, skip_bad, replace_bad=False)  # each image once
    if val.classes != train.classes:
        raise ValueError(f"{data_path}/train and {data_path}/val have different class folders")
    return train, val, train.classes


def mixup_cutmix(num_classes: int, mixup_alpha: float, cutmix_alpha: float) -> v2.Transform | None:
    """MixUp or CutMix (one of them per batch, at random) for a stacked batch `(images, labels)`, or None. Applied
    by the training loop to the batch on the device, drawing from the global generator that checkpoints restore
    (in a collate_fn it would draw from the loader worker's, which a mid-epoch resume cannot replay). Targets become
    class probabilities [B, num_classes]."""
    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    return v2.RandomChoice(mixers) if mixers else None


def build_loaders(
    train: Dataset, val: Dataset, *, batch_size: int, workers: int, rank: int, world_size: int, seed: int,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Training batches shuffled per epoch by (seed, epoch), last partial batch dropped so every step has the same
    shape, each image augmented from generators seeded by (seed, epoch, index) (common/sampling.py): call
    `common.sampling.set_epoch(train_loader, epoch, start_batch)`, and a run resumed at any batch sees exactly the
    batches an uninterrupted run would. Validation split into disjoint strided shards, so each image is counted
    exactly once over all ranks (no padding duplicates); its batches drop unreadable images and are None when none
    is left (`drop_unreadable`). Both loaders have generators of their own: loading (or evaluating) never moves the
    global RNG that training draws from."""
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    common = dict(num_workers=workers, pin_memory=pin_memory)
    batches = ResumableBatches(BatchSampler(sampler, batch_size, drop_last=True))
    train_loader = DataLoader(SeededDataset(train, seed), batch_sampler=batches, generator=torch.Generator(), **common)
    shard = Subset(val, range(rank, len(val), world_size))
    val_loader = DataLoader(shard, batch_size, shuffle=False, collate_fn=drop_unreadable, generator=torch.Generator(),
                            **common)
    return train_loader, val_loader

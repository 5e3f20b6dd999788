"""cls/data.py: image modes, the synthetic set, presets, MixUp/CutMix, the loaders' sharding and unreadable
validation images; cls/convert.py formats."""
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2.functional import pil_to_tensor

from cls import data
from common import images
from common.images import read_rgb, to_rgb
from common.sampling import set_epoch


def write_png16(path: Path, pixels: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (PIL cannot write gray + alpha at 16 bits): pixels [H, W, C] uint16."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter byte 0: no filter
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


GRADIENT16 = np.array([[0, 128, 129, 32896, 33024, 65279, 65535]], dtype=np.uint16)  # [1, 7]
GRADIENT8 = [0, 0, 1, 128, 128, 254, 255]  # round(v / 257)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_to_rgb_scales_16_bit_gray(tmp_path, mode):
    if mode == "I":  # what older PIL gave for a 16-bit PNG; 32-bit, so made in memory (PNG cannot hold it)
        image = Image.fromarray(GRADIENT16.astype(np.int32))
    else:
        raw = GRADIENT16.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
        Image.frombytes(mode, (7, 1), raw).save(tmp_path / "gray16.png")
        image = Image.open(tmp_path / "gray16.png")
    assert image.mode == mode or (mode == "I;16B" and image.mode == "I;16")  # PIL reads big-endian back as I;16
    assert image.convert("RGB").getpixel((3, 0)) == (255, 255, 255)  # the bug: PIL clips
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and np.asarray(rgb).tolist() == [[[v] * 3 for v in GRADIENT8]]


def test_to_rgb_clips_wide_integers_and_scales_floats():
    wide = Image.fromarray(np.array([[-5, 70000, 257]], dtype=np.int32))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 255, 1]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], dtype=np.float32))
    assert floats.mode == "F" and np.asarray(to_rgb(floats))[0].tolist() == [[v] * 3 for v in
                                                                                    [0, 128, 255, 255, 0, 0]]


def test_to_rgb_leaves_8_bit_modes_as_convert_did(tmp_path):
    rgb = Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4)
    for image in (rgb, rgb.convert("P"), rgb.convert("LA"), rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("1")):
        assert to_rgb(image).tobytes() == image.convert("RGB").tobytes(), image.mode
    # 16-bit gray + alpha and 16-bit colour: PIL itself reads them at 8 bits (RGBA / RGB), with the right values
    gray_alpha = np.stack([GRADIENT16, np.full_like(GRADIENT16, 65535)], axis=-1)  # [1, 7, 2]
    write_png16(tmp_path / "la16.png", gray_alpha, color_type=4)
    with Image.open(tmp_path / "la16.png") as image:
        assert np.asarray(to_rgb(image))[0, [0, 3, 6]].tolist() == [[0] * 3, [128] * 3, [255] * 3]
    write_png16(tmp_path / "rgb16.png", np.array([[[0, 32896, 65535]]], dtype=np.uint16), color_type=2)
    with Image.open(tmp_path / "rgb16.png") as image:
        assert to_rgb(image).getpixel((0, 0)) == (0, 128, 255)


def test_read_rgb_decodes_jpegs_with_torchvision_pixel_for_pixel_as_pil(tmp_path, monkeypatch):
    calls, torchvision_decode = [], images.decode_jpeg
    monkeypatch.setattr(images, "decode_jpeg", lambda *a, **k: calls.append(1) or torchvision_decode(*a, **k))
    rng = np.random.default_rng(0)
    smooth = (rng.random((37, 50, 3)) * 255).cumsum(1) / np.arange(1, 51)[None, :, None]  # JPEG-like content
    rgb = Image.fromarray(smooth.astype(np.uint8))
    files = {}
    for mode in ("RGB", "L", "CMYK"):
        for subsampling in (0, 2):
            files[f"{mode}_{subsampling}.jpg"] = dict(image=rgb.convert(mode), quality=85, subsampling=subsampling)
    files["progressive.jpg"] = dict(image=rgb, quality=75, progressive=True)
    files["rgb.png"], files["gray16.png"] = dict(image=rgb), dict(image=Image.fromarray(GRADIENT16))
    for name, options in files.items():
        options.pop("image").save(tmp_path / name, **options)
        calls.clear()
        with Image.open(tmp_path / name) as f:
            expected = pil_to_tensor(to_rgb(f))
        got = read_rgb(tmp_path / name)
        assert got.dtype == torch.uint8 and got.shape == (3, *expected.shape[1:]) and torch.equal(got, expected), name
        assert len(calls) == name.endswith(".jpg"), name  # JPEGs try torchvision first; CMYK then falls back to PIL
    assert read_rgb(tmp_path / "gray16.png")[:, 0, 3].tolist() == [128] * 3  # to_rgb's 16-bit scaling kept
    truncated = (tmp_path / "RGB_0.jpg").read_bytes()[:300]
    (tmp_path / "truncated.jpg").write_bytes(truncated)
    with pytest.raises(OSError, match="(?i)truncated"):  # PIL's error, which the data sets turn into one sentence
        read_rgb(tmp_path / "truncated.jpg")


def test_synthetic_set_is_deterministic_and_balanced():
    a, b = data.SyntheticShapes(40, seed=0), data.SyntheticShapes(40, seed=0)
    img_a, label_a = a[7]
    img_b, label_b = b[7]
    assert label_a == label_b == 7 and img_a.tobytes() == img_b.tobytes()
    assert data.SyntheticShapes(40, seed=1)[7][0].tobytes() != img_a.tobytes()
    assert [a[i][1] for i in range(40)].count(3) == 4
    assert img_a.size == (64, 64) and len(a.classes) == 10


def test_default_sizes_follow_the_recipes():
    assert data.default_sizes("resnet50", synthetic=False) == (224, 256, 224, InterpolationMode.BILINEAR)
    assert data.default_sizes("efficientnet_b4", synthetic=False) == (380, 412, 380, InterpolationMode.BICUBIC)
    assert data.default_sizes("efficientnet_b4", synthetic=True)[:3] == (64, 73, 64)


@pytest.mark.parametrize("auto_augment", [None, "ra", "ta_wide", "augmix", "imagenet"])
def test_presets(auto_augment):
    image, _ = data.SyntheticShapes(1, seed=0)[0]
    x = data.train_transform(48, auto_augment=auto_augment, random_erase=0.5)(image)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    y = data.eval_transform(56, 48)(image)
    assert y.shape == (3, 48, 48) and abs(y.mean()) < 3  # normalised
    with pytest.raises(ValueError, match="unknown --auto-augment"):
        data.train_transform(48, auto_augment="autoaug")


def test_mixup_cutmix_gives_probability_targets():
    assert data.mixup_cutmix(10, 0.0, 0.0) is None
    mix = data.mixup_cutmix(10, 0.2, 1.0)
    images, targets = mix(torch.rand(4, 3, 8, 8), torch.arange(4))  # a stacked batch, as the training loop has it
    assert images.shape == (4, 3, 8, 8) and targets.shape == (4, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_shards_cover_every_image_once(world_size):
    dataset = data.SyntheticShapes(10, seed=0)
    seen = []
    for rank in range(world_size):
        _, val = data.build_loaders(dataset, dataset, batch_size=4, workers=0, rank=rank, world_size=world_size, seed=0)
        seen += list(val.dataset.indices)
    assert sorted(seen) == list(range(10))


def make_solid_folder(root: Path) -> list[int]:
    """train/ and val/ with classes c0 (3 images and broken.png, sorted last) and c1 (3 images); image i is solid
    red i * 10, so a loaded image names itself. Returns the red values of the readable images of each split."""
    for split in ("train", "val"):
        for k in range(2):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (10 * (3 * k + i), 0, 0)).save(root / split / f"c{k}" / f"{i}.png")
        (root / split / "c0" / "broken.png").write_bytes(b"not a png")
    return [10 * i for i in range(6)]


@pytest.mark.parametrize(("batch_size", "workers"), [(2, 0), (1, 0), (3, 1)])
def test_unreadable_validation_image_is_dropped_and_counted_once(tmp_path, batch_size, workers):
    readable = make_solid_folder(tmp_path)
    tf = v2.PILToTensor()
    train, val, classes = data.build_datasets(str(tmp_path), tf, tf, skip_bad=True)
    assert classes == ["c0", "c1"] and len(val) == 7
    assert train[3][0][0, 0, 0] == 30  # training replaces broken.png (index 3) by the next image: batches keep size
    _, loader = data.build_loaders(train, val, batch_size=batch_size, workers=workers, rank=0, world_size=1, seed=0)
    batches = list(loader)
    # batch 1 holds broken.png alone: nothing left, so None (evaluate skips it); other sizes just shrink one batch
    assert [b is None for b in batches].count(True) == (batch_size == 1)
    seen = [(int(image[0, 0, 0]), int(target))
            for b in batches if b is not None for image, target in zip(*b, strict=True)]
    assert sorted(seen) == [(red, red // 30) for red in readable]  # every readable image once, with its label
    assert data.skipped_images(loader.dataset) == 1  # counted in the workers' shared slots
    assert data.skipped_images(data.SyntheticShapes(4, seed=0)) == 0


def test_drop_unreadable_collate():
    images, targets = data.drop_unreadable([None, (torch.zeros(3, 4, 4), 1), (torch.ones(3, 4, 4), 0), None])
    assert images.shape == (2, 3, 4, 4) and targets.tolist() == [1, 0]
    assert data.drop_unreadable([None, None]) is None


def test_training_order_depends_on_seed_and_epoch_only():
    dataset = data.SyntheticShapes(12, seed=0)
    train, _ = data.build_loaders(dataset, dataset, batch_size=4, workers=0, rank=0, world_size=1, seed=3)
    set_epoch(train, 1)
    order = list(train.batch_sampler)
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(train.batch_sampler) == order
    set_epoch(train, 2)
    assert list(train.batch_sampler) != order
    assert len(train) == 3  # drop_last: every step has the same shape


class NoisyShapes(data.SyntheticShapes):
    """Synthetic images plus augmentation noise drawn from the global torch and numpy generators, as transforms do."""

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return v2.functional.pil_to_tensor(image).float() + torch.rand(1) + float(np.random.rand()), label


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_epoch_sees_the_same_batches(workers):
    """Starting an epoch at batch k gives exactly batches k.. of the whole epoch, augmentation included, whatever the
    worker count; loading leaves the caller's generators alone."""
    train, _ = data.build_loaders(NoisyShapes(16, seed=0), NoisyShapes(4, seed=1), batch_size=4, workers=workers,
                                  rank=0, world_size=1, seed=5)
    set_epoch(train, 2)
    torch.manual_seed(0)
    whole = list(train)
    after_loading = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after_loading, torch.rand(1))  # the global generator did not move
    set_epoch(train, 2, start=1)
    assert len(train) == 4  # the whole epoch's length, wherever it starts
    resumed = list(train)
    assert len(resumed) == 3
    for (a, la), (b, lb) in zip(whole[1:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    set_epoch(train, 3)
    assert not torch.equal(list(train)[0][0], whole[0][0])  # another epoch, other batches and noise

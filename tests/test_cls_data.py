"""cls/data.py: the synthetic set, presets, MixUp/CutMix, and the loaders' sharding; cls/convert.py formats."""
import pytest
import torch
from torchvision.transforms import InterpolationMode

from cls import data
from cls.convert import to_our_names
from cls.models import MODELS, TORCHVISION_TWINS, build_model


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
    collate = data.mixup_cutmix(10, 0.2, 1.0)
    images, targets = collate([(torch.rand(3, 8, 8), i) for i in range(4)])
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


def test_training_order_depends_on_seed_and_epoch_only():
    dataset = data.SyntheticShapes(12, seed=0)
    train, _ = data.build_loaders(dataset, dataset, batch_size=4, workers=0, rank=0, world_size=1, seed=3)
    train.sampler.set_epoch(1)
    order = list(train.sampler)
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(train.sampler) == order
    train.sampler.set_epoch(2)
    assert list(train.sampler) != order
    assert len(train) == 3  # drop_last: every step has the same shape


def test_models_dict_covers_the_zoo():
    seed_zoo = {"resnet50", "resnext50_32x4d", "hrnet_w18", "resnetv1d152", "seresnet50", "vgg11",
                "shufflenet_v2_x1_0", "mobilenet_v2", "mobilenet_v3_small", "cspresnext50", "efficientnet_b4",
                "densenet121"}
    assert seed_zoo <= set(MODELS) and set(TORCHVISION_TWINS) <= set(MODELS)
    with pytest.raises(ValueError, match="unknown architecture 'resnet9'.*resnet18, resnet34"):
        build_model("resnet9")


def test_to_our_names_accepts_every_format():
    model = build_model("resnet18", num_classes=10)
    sd = model.state_dict()
    for checkpoint in (sd, {"model": sd}, {f"module.{k}": v for k, v in sd.items()}):
        assert to_our_names("resnet18", checkpoint).keys() == sd.keys()
    mm = {"state_dict": {**{f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")},
                         "head.fc.weight": sd["fc.weight"], "head.fc.bias": sd["fc.bias"]}}
    assert to_our_names("resnet18", mm).keys() == sd.keys()

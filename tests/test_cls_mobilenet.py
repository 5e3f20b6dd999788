"""MobileNetV2 / V3: parameter counts, a train step, torchvision and mmpretrain parity, detection taps."""
import pytest
import torch
import torchvision.models

from cls.models import mobilenet_v2, mobilenet_v3
from tests.cls_model_checks import (
    check_mmpretrain_parity,
    check_torchvision_parity,
    check_train_step,
    count_params,
)
from tests.mmpretrain_fixture import load_fixture, seeded_state_dict

MODULES = {
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3,
    "mobilenet_v3_large": mobilenet_v3,
}
# Parameters at 1000 classes.
PARAMS = {
    "mobilenet_v2": 3_504_872,  # figures.md (mobilenet-v2_8xb32_in1k)
    "mobilenet_v3_small": 2_542_856,  # figures.md (mobilenet-v3-small_8xb128_in1k)
    # torchvision 0.29.1 mobilenet_v3_large, measured; mmpretrain 1.2.0 mobilenet-v3-large_8xb128_in1k agrees
    "mobilenet_v3_large": 5_483_032,
}
# mobilenet_v3_large's fixture (mobilenet-v3-large_8xb128_in1k) checks the key arithmetic where block 1 has
# neither an expand conv nor squeeze-excite, which the small net never exercises.
FIXTURES = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"]


def build(arch: str, **kwargs) -> torch.nn.Module:
    return getattr(MODULES[arch], arch)(**kwargs)


@pytest.mark.parametrize("arch", PARAMS)
def test_params_and_train_step(arch: str) -> None:
    model = build(arch, num_classes=1000)
    assert count_params(model) == PARAMS[arch]
    check_train_step(model, num_classes=1000, size=64)


@pytest.mark.parametrize("arch", PARAMS)
def test_torchvision_parity(arch: str) -> None:
    check_torchvision_parity(build(arch), getattr(torchvision.models, arch)())


@pytest.mark.parametrize("arch", FIXTURES)
def test_mmpretrain_parity(arch: str) -> None:
    check_mmpretrain_parity(arch, getattr(MODULES[arch], arch), MODULES[arch].from_mmpretrain)


@pytest.mark.parametrize("width_mult", [0.5, 1.4])
def test_mobilenet_v2_width_mult(width_mult: float) -> None:
    """Widths round to multiples of 8 as torchvision's; the last conv only grows (1280 -> 1792 at 1.4)."""
    ours = mobilenet_v2.mobilenet_v2(num_classes=10, width_mult=width_mult)
    assert ours.last_channel == (1280 if width_mult < 1 else 1792)
    check_torchvision_parity(ours, torchvision.models.mobilenet_v2(num_classes=10, width_mult=width_mult))


def test_mobilenet_v2_detection_taps() -> None:
    """SSDLite (mmdet out_indices=(4, 7)) reads features[13] (96 ch, stride 16) and features[18] (1280, /32)."""
    features = mobilenet_v2.mobilenet_v2().features.eval()
    assert isinstance(features, torch.nn.Sequential) and len(features) == 19
    with torch.no_grad():
        c4 = features[:14](torch.randn(1, 3, 64, 64))
        c5 = features[14:](c4)
    assert c4.shape == (1, 96, 4, 4) and c5.shape == (1, 1280, 2, 2)


@pytest.mark.parametrize("arch", FIXTURES)
def test_from_mmpretrain_is_pure_and_total(arch: str) -> None:
    """A new dict with one renamed key per checkpoint key; the checkpoint itself is untouched."""
    ckpt = seeded_state_dict(load_fixture(arch)["keys"])
    before = dict(ckpt)
    ours = MODULES[arch].from_mmpretrain(ckpt)
    assert ckpt.keys() == before.keys() and all(ckpt[k] is before[k] for k in before)
    assert len(ours) == len(ckpt) and set(ours) == set(build(arch).state_dict())
    with pytest.raises(KeyError):
        MODULES[arch].from_mmpretrain({"neck.gap.weight": torch.zeros(1)})

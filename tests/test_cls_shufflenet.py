"""ShuffleNetV2: parameter counts, a train step, torchvision and mmpretrain parity, the channel shuffle."""
import pytest
import torch
import torchvision.models

from cls.models import shufflenet_v2
from tests.cls_model_checks import (
    check_mmpretrain_parity,
    check_torchvision_parity,
    check_train_step,
    count_params,
)
from tests.mmpretrain_fixture import load_fixture, seeded_state_dict

# Parameters at 1000 classes. mmpretrain 1.2.0 ships a config for the 1x width only.
PARAMS = {
    "shufflenet_v2_x0_5": 1_366_792,  # torchvision 0.29.1 shufflenet_v2_x0_5, measured
    "shufflenet_v2_x1_0": 2_278_604,  # figures.md (shufflenet-v2-1x_16xb64_in1k)
    "shufflenet_v2_x1_5": 3_503_624,  # torchvision 0.29.1 shufflenet_v2_x1_5, measured
    "shufflenet_v2_x2_0": 7_393_996,  # torchvision 0.29.1 shufflenet_v2_x2_0, measured
}
FIXTURES = ["shufflenet_v2_x1_0"]


@pytest.mark.parametrize("arch", PARAMS)
def test_params_and_train_step(arch: str) -> None:
    model = getattr(shufflenet_v2, arch)(num_classes=1000)
    assert count_params(model) == PARAMS[arch]
    check_train_step(model, num_classes=1000, size=64)


@pytest.mark.parametrize("arch", PARAMS)
def test_torchvision_parity(arch: str) -> None:
    check_torchvision_parity(getattr(shufflenet_v2, arch)(), getattr(torchvision.models, arch)())


@pytest.mark.parametrize("arch", FIXTURES)
def test_mmpretrain_parity(arch: str) -> None:
    check_mmpretrain_parity(arch, getattr(shufflenet_v2, arch), shufflenet_v2.from_mmpretrain)


def test_channel_shuffle_interleaves_halves() -> None:
    """Two groups [a0 a1 a2 | b0 b1 b2] become [a0 b0 a1 b1 a2 b2] (ShuffleNet V1, Zhang et al. 2018, fig. 1(c))."""
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert shufflenet_v2.channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def test_from_mmpretrain_is_pure_and_total() -> None:
    """A new dict with one renamed key per checkpoint key; the checkpoint itself is untouched."""
    ckpt = seeded_state_dict(load_fixture("shufflenet_v2_x1_0")["keys"])
    before = dict(ckpt)
    ours = shufflenet_v2.from_mmpretrain(ckpt)
    assert ckpt.keys() == before.keys() and all(ckpt[k] is before[k] for k in before)
    assert len(ours) == len(ckpt) and set(ours) == set(shufflenet_v2.shufflenet_v2_x1_0().state_dict())
    with pytest.raises(KeyError):
        shufflenet_v2.from_mmpretrain({"neck.gap.weight": torch.zeros(1)})

"""DenseNet: parameter counts, a train step, torchvision and mmpretrain parity, the converter."""
import pytest
import torch
import torchvision.models as tvm
from torch import nn

from cls.models import densenet
from tests.cls_model_checks import (
    check_mmpretrain_parity,
    check_torchvision_parity,
    check_train_step,
    count_params,
)
from tests.mmpretrain_fixture import load_fixture

# Parameters at 1000 classes. densenet121: /work/shared/reference/figures.md. The others: count_params of the
# torchvision 0.29.1 twin, equal to its weights' meta["num_params"] and to mmpretrain 1.2.0's densenet*_in1k.
PARAMS = {
    "densenet121": 7_978_856,  # figures.md (torchvision densenet121, mmpretrain densenet121_4xb256_in1k)
    "densenet161": 28_681_000,  # torchvision densenet161 = mmpretrain densenet161_4xb256_in1k
    "densenet169": 14_149_480,  # torchvision densenet169 = mmpretrain densenet169_4xb256_in1k
    "densenet201": 20_013_928,  # torchvision densenet201 = mmpretrain densenet201_4xb256_in1k
}
MMPRETRAIN_FIXTURES = list(PARAMS)  # recorded at 64 px from each model's *_4xb256_in1k config


@pytest.mark.parametrize("name", PARAMS)
def test_params_and_train_step(name: str) -> None:
    torch.manual_seed(0)
    model = getattr(densenet, name)()
    assert count_params(model) == PARAMS[name]
    check_train_step(model, num_classes=1000, size=64)


@pytest.mark.parametrize("name", PARAMS)
def test_torchvision_parity(name: str) -> None:
    check_torchvision_parity(getattr(densenet, name)(), getattr(tvm, name)())


@pytest.mark.parametrize("arch", MMPRETRAIN_FIXTURES)
def test_mmpretrain_parity(arch: str) -> None:
    check_mmpretrain_parity(arch, getattr(densenet, arch), densenet.from_mmpretrain)


@pytest.mark.parametrize("name", PARAMS)
def test_depth_counts_weight_layers(name: str) -> None:
    # "DenseNet-n" counts weight layers: the stem conv, two convs per dense layer, one per transition, the fc.
    with torch.device("meta"):
        model = getattr(densenet, name)()
    assert sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules()) == int(name.removeprefix("densenet"))


@pytest.mark.parametrize("arch", MMPRETRAIN_FIXTURES)
def test_from_mmpretrain_maps_every_key_onto_ours_without_mutating(arch: str) -> None:
    keys = load_fixture(arch)["keys"]
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in keys}
    converted = densenet.from_mmpretrain(state_dict)
    assert list(state_dict) == [k for k, _ in keys]
    with torch.device("meta"):
        ours = getattr(densenet, arch)()
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_from_mmpretrain_refuses_unknown_keys() -> None:
    with pytest.raises(KeyError, match="no DenseNet rule"):
        densenet.from_mmpretrain({"neck.unknown.weight": torch.empty(0)})


def test_drop_rate_is_active_only_in_training() -> None:
    model = densenet.DenseNet(block_config=(2, 2), num_init_features=16, growth_rate=8, drop_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    first = model(x)
    assert not torch.allclose(first, model(x))  # fresh dropout masks

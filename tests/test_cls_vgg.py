"""VGG: parameter counts, a train step, torchvision and mmpretrain parity, the cfg tables and the converter."""
from collections.abc import Callable

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from cls.models import vgg
from tests.cls_model_checks import (
    check_mmpretrain_parity,
    check_torchvision_parity,
    check_train_step,
    count_params,
)
from tests.mmpretrain_fixture import load_fixture

# Parameters at 1000 classes. vgg11: /work/shared/reference/figures.md. The others: count_params of the
# torchvision 0.29.1 twin, equal to its weights' meta["num_params"] (and, for vgg11_bn, to mmpretrain 1.2.0's).
PARAMS = {
    "vgg11": 132_863_336,  # figures.md (torchvision vgg11, mmpretrain vgg11_8xb32_in1k)
    "vgg13": 133_047_848,  # torchvision vgg13
    "vgg16": 138_357_544,  # torchvision vgg16
    "vgg19": 143_667_240,  # torchvision vgg19
    "vgg11_bn": 132_868_840,  # torchvision vgg11_bn; mmpretrain vgg11bn_8xb32_in1k measured equal
    "vgg13_bn": 133_053_736,  # torchvision vgg13_bn
    "vgg16_bn": 138_365_992,  # torchvision vgg16_bn
    "vgg19_bn": 143_678_248,  # torchvision vgg19_bn
}
# mmpretrain's VGG flattens its last feature map into Linear(512*7*7) with no adaptive pool, so these
# fixtures were recorded at 224 px.
MMPRETRAIN_FIXTURES = ["vgg11", "vgg11_bn"]


def _uninitialised(build: Callable[[], nn.Module]) -> nn.Module:
    # Parity overwrites every weight, so skip the init of ~140M parameters: build on meta, then allocate.
    with torch.device("meta"):
        model = build()
    return model.to_empty(device="cpu")


@pytest.mark.parametrize("name", PARAMS)
def test_params_train_step_and_torchvision_parity(name: str) -> None:
    # One test per builder so each 133-144M parameter model is built once (the file's time budget).
    torch.manual_seed(0)
    model = getattr(vgg, name)()
    assert count_params(model) == PARAMS[name]
    check_train_step(model, num_classes=1000, size=64)
    check_torchvision_parity(model, _uninitialised(getattr(tvm, name)))


@pytest.mark.parametrize("arch", MMPRETRAIN_FIXTURES)
def test_mmpretrain_parity(arch: str) -> None:
    check_mmpretrain_parity(arch, getattr(vgg, arch), vgg.from_mmpretrain)


@pytest.mark.parametrize("depth", vgg.VGG_CFGS)
def test_depth_counts_weight_layers(depth: int) -> None:
    # "VGG-n" counts weight layers: the convs of the cfg plus three fully connected layers (paper, Table 1).
    with torch.device("meta"):
        model = vgg.VGG(cfg=vgg.VGG_CFGS[depth])
    assert sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules()) == depth
    assert sum(v == "M" for v in vgg.VGG_CFGS[depth]) == 5  # five pools: 224 px -> 7x7 for the fc layers


@pytest.mark.parametrize("arch", MMPRETRAIN_FIXTURES)
def test_from_mmpretrain_maps_every_key_onto_ours_without_mutating(arch: str) -> None:
    # On meta tensors: checks the index arithmetic by names and shapes in no time, and purity.
    keys = load_fixture(arch)["keys"]
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in keys}
    converted = vgg.from_mmpretrain(state_dict)
    assert list(state_dict) == [k for k, _ in keys]
    with torch.device("meta"):
        ours = getattr(vgg, arch)()
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_num_classes_and_input_size() -> None:
    model = vgg.vgg11(num_classes=10).eval()
    with torch.no_grad():
        # 32 px is the smallest input five 2x2 pools accept; 97 px exercises uneven adaptive pooling bins.
        for size in (32, 97):
            assert model(torch.randn(1, 3, size, size)).shape == (1, 10)

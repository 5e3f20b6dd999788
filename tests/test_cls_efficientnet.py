"""EfficientNet B0-B7: parameter counts, a train step, torchvision and mmpretrain parity, TF "SAME" padding."""
import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torch.nn import functional as F

from cls.models import efficientnet
from cls.models.efficientnet import Conv2dSame, from_mmpretrain
from cls.models.layers import SqueezeExcitation
from tests.cls_model_checks import (
    check_mmpretrain_parity,
    check_torchvision_parity,
    check_train_step,
    count_params,
)
from tests.mmpretrain_fixture import load_fixture

# Parameters at 1000 classes. efficientnet_b4: /work/shared/reference/figures.md. The others: count_params of the
# torchvision 0.29.1 twin, equal to mmpretrain 1.2.0's efficientnet-b*_8xb32_in1k (both measured).
PARAMS = {
    "efficientnet_b0": 5_288_548,  # torchvision efficientnet_b0 = mmpretrain efficientnet-b0_8xb32_in1k
    "efficientnet_b1": 7_794_184,  # torchvision efficientnet_b1 = mmpretrain efficientnet-b1_8xb32_in1k
    "efficientnet_b2": 9_109_994,  # torchvision efficientnet_b2 = mmpretrain efficientnet-b2_8xb32_in1k
    "efficientnet_b3": 12_233_232,  # torchvision efficientnet_b3 = mmpretrain efficientnet-b3_8xb32_in1k
    "efficientnet_b4": 19_341_616,  # figures.md (mmpretrain efficientnet-b4_8xb32-01norm_in1k, torchvision)
    "efficientnet_b5": 30_389_784,  # torchvision efficientnet_b5 = mmpretrain efficientnet-b5_8xb32_in1k
    "efficientnet_b6": 43_040_704,  # torchvision efficientnet_b6 = mmpretrain efficientnet-b6_8xb32_in1k
    "efficientnet_b7": 66_347_960,  # torchvision efficientnet_b7 = mmpretrain efficientnet-b7_8xb32_in1k
}
# Recorded at 64 px with builder_kwargs {"tf_same_padding": true}: b4 from the seed's
# efficientnet-b4_8xb32-01norm_in1k, b0 from efficientnet-b0_8xb32_in1k (the smallest sibling, whose last
# merged mmpretrain layer splits 3 + 1 blocks where b4's splits 8 + 2).
MMPRETRAIN_FIXTURES = ["efficientnet_b0", "efficientnet_b4"]


@pytest.fixture(scope="module", params=list(PARAMS))
def built(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    """Each builder's model, built once (B7 alone is 66 M parameters) and shared by the tests below."""
    torch.manual_seed(0)
    return request.param, getattr(efficientnet, request.param)()


def test_params_and_train_step(built: tuple[str, nn.Module]) -> None:
    name, model = built
    assert count_params(model) == PARAMS[name]
    check_train_step(model, num_classes=1000, size=64)


def test_torchvision_parity(built: tuple[str, nn.Module]) -> None:
    name, model = built
    check_torchvision_parity(model, getattr(tvm, name)())


@pytest.mark.parametrize("arch", MMPRETRAIN_FIXTURES)
def test_mmpretrain_parity(arch: str) -> None:
    assert load_fixture(arch)["builder_kwargs"] == {"tf_same_padding": True}
    check_mmpretrain_parity(arch, getattr(efficientnet, arch), from_mmpretrain)


def test_mmpretrain_b4_needs_tf_same_padding() -> None:
    # With PyTorch's symmetric padding and eps 1e-5 the TF-trained network computes something else.
    def without_switch(tf_same_padding: bool) -> nn.Module:
        return efficientnet.efficientnet_b4(tf_same_padding=False)

    with pytest.raises(AssertionError, match="not close"):
        check_mmpretrain_parity("efficientnet_b4", without_switch, from_mmpretrain)


@pytest.mark.parametrize("arch", MMPRETRAIN_FIXTURES)
def test_from_mmpretrain_maps_every_key_onto_ours_without_mutating(arch: str) -> None:
    keys = load_fixture(arch)["keys"]
    state_dict = {k: torch.empty(shape, device="meta") for k, shape in keys}
    converted = from_mmpretrain(state_dict)
    assert list(state_dict) == [k for k, _ in keys]
    with torch.device("meta"):
        ours = getattr(efficientnet, arch)()
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_from_mmpretrain_refuses_unknown_keys() -> None:
    with pytest.raises(KeyError, match="no EfficientNet rule"):
        from_mmpretrain({"neck.unknown.weight": torch.empty(0)})


@pytest.mark.parametrize(
    ("kernel", "stride", "size", "pad"),
    [
        # pad = [left, right, top, bottom]: TF puts the odd pixel bottom / right
        (3, 1, (64, 64), [1, 1, 1, 1]),
        (5, 1, (64, 64), [2, 2, 2, 2]),
        (3, 2, (64, 64), [0, 1, 0, 1]),
        (5, 2, (64, 64), [1, 2, 1, 2]),
        (3, 2, (65, 65), [1, 1, 1, 1]),
        (3, 2, (64, 65), [1, 1, 0, 1]),
    ],
)
def test_conv2d_same_pads_as_tensorflow(kernel: int, stride: int, size: tuple[int, int], pad: list[int]) -> None:
    conv = Conv2dSame(4, 4, kernel, stride, groups=2)
    x = torch.randn(1, 4, *size)
    expected = F.conv2d(F.pad(x, pad), conv.weight, stride=stride, groups=2)
    assert expected.shape[-2:] == tuple(-(-s // stride) for s in size)  # ceil(size / stride)
    torch.testing.assert_close(conv(x), expected)


def test_tf_same_padding_keeps_names_and_switches_every_conv_and_norm() -> None:
    with torch.device("meta"):
        plain, tf = efficientnet.efficientnet_b0(), efficientnet.efficientnet_b0(tf_same_padding=True)
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    assert shapes == {k: v.shape for k, v in tf.state_dict().items()}  # either one loads torchvision's weights
    # SE's 1x1 convs act on a 1x1 map, where padding cannot matter (mmpretrain leaves them plain too)
    se_convs = {id(c) for m in tf.modules() if isinstance(m, SqueezeExcitation) for c in (m.fc1, m.fc2)}
    convs = [m for m in tf.modules() if isinstance(m, nn.Conv2d) and id(m) not in se_convs]
    # stem, 16 MBConvs x (expand, depthwise, project) less B0's first block's expand (ratio 1), head
    assert len(convs) == 1 + 16 * 3 - 1 + 1
    assert all(isinstance(m, Conv2dSame) for m in convs)
    assert not any(isinstance(m, Conv2dSame) for m in plain.modules())
    assert {m.eps for m in tf.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}
    assert {m.eps for m in plain.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-5}


def test_input_sizes_cover_every_builder() -> None:
    assert set(efficientnet.INPUT_SIZES) == set(PARAMS)

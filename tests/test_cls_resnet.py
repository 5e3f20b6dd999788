import pytest
import torch
import torchvision

from cls.models import resnet
from tests.cls_model_checks import (
    check_mmpretrain_parity,
    check_torchvision_parity,
    check_train_step,
    count_params,
)
from tests.mmpretrain_fixture import load_fixture, seeded_state_dict

# Parameters at 1000 classes. Seed models: /work/shared/reference/figures.md. Siblings: the torchvision twin
# (torchvision 0.29.1, equal to mmpretrain's count) or, where there is none, mmpretrain 1.2.0 built from the
# named config; all siblings measured with sum(p.numel()) on the built model.
PARAMS = {
    "resnet18": 11_689_512,  # torchvision resnet18; mmpretrain resnet/resnet18_8xb32_in1k
    "resnet34": 21_797_672,  # torchvision resnet34; mmpretrain resnet/resnet34_8xb32_in1k
    "resnet50": 25_557_032,  # figures.md (resnet50_8xb32_in1k); torchvision resnet50
    "resnet101": 44_549_160,  # torchvision resnet101; mmpretrain resnet/resnet101_8xb32_in1k
    "resnet152": 60_192_808,  # torchvision resnet152; mmpretrain resnet/resnet152_8xb32_in1k
    "resnext50_32x4d": 25_028_904,  # figures.md (resnext50-32x4d_8xb32_in1k); torchvision resnext50_32x4d
    "resnext101_32x4d": 44_177_704,  # mmpretrain resnext/resnext101-32x4d_8xb32_in1k (no torchvision twin)
    "resnext101_32x8d": 88_791_336,  # torchvision resnext101_32x8d; mmpretrain resnext101-32x8d_8xb32_in1k
    "resnetv1d50": 25_576_264,  # mmpretrain resnet/resnetv1d50_8xb32_in1k
    "resnetv1d101": 44_568_392,  # mmpretrain resnet/resnetv1d101_8xb32_in1k
    "resnetv1d152": 60_212_040,  # figures.md (resnetv1d152_8xb32_in1k)
    "seresnet50": 28_088_024,  # figures.md (seresnet50_8xb32_in1k)
    "seresnet101": 49_326_872,  # mmpretrain seresnet/seresnet101_8xb32_in1k
}
TORCHVISION_TWINS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
]
FIXTURES = ["resnet50", "resnext50_32x4d", "resnetv1d152", "seresnet50"]


@pytest.mark.parametrize("name", PARAMS)
def test_param_count_and_train_step(name: str) -> None:
    model = getattr(resnet, name)()
    assert count_params(model) == PARAMS[name]
    check_train_step(model, num_classes=1000)


@pytest.mark.parametrize("name", TORCHVISION_TWINS)
def test_torchvision_parity(name: str) -> None:
    check_torchvision_parity(getattr(resnet, name)(), getattr(torchvision.models, name)())


@pytest.mark.parametrize("arch", FIXTURES)
def test_mmpretrain_parity(arch: str) -> None:
    check_mmpretrain_parity(arch, getattr(resnet, arch), resnet.from_mmpretrain)


@pytest.mark.parametrize("name", ["resnet18", "resnetv1d50"])
def test_stages_feed_the_head(name: str) -> None:
    """stages() gives C2-C5 at strides 4..32 (the detection backbone's contract); forward is built on it."""
    model = getattr(resnet, name)(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model.stages(x)
        expansion = 1 if name == "resnet18" else 4
        for feat, stride, planes in zip(feats, (4, 8, 16, 32), (64, 128, 256, 512), strict=True):
            assert feat.shape == (1, planes * expansion, 64 // stride, 96 // stride)
        torch.testing.assert_close(model(x), model.fc(feats[-1].mean((2, 3))))


def test_variant_switches_change_the_network() -> None:
    """Deep stem, avg-down shortcut and SE gate each leave the names they are meant to, and only those."""
    plain = set(resnet.resnet50().state_dict())
    v1d = set(resnet.resnetv1d50().state_dict())
    se_model = resnet.seresnet50()
    se = set(se_model.state_dict())
    assert {"stem.0.conv.weight", "stem.2.bn.running_var", "layer2.0.downsample.1.weight"} <= v1d
    assert "conv1.weight" not in v1d and "layer2.0.downsample.2.weight" not in plain
    # layer1's shortcut keeps its stride-1 conv, so no pool is put in front of it (mmcls ResLayer)
    assert "layer1.0.downsample.0.weight" in v1d
    assert se - plain == {
        f"{k}.se_layer.conv{i}.conv.{p}"
        for k, m in se_model.named_modules()
        if isinstance(m, resnet.Bottleneck)
        for i in (1, 2)
        for p in ("weight", "bias")
    }
    assert plain - se == set()


def test_zero_init_residual_makes_blocks_start_as_identity() -> None:
    """mmcls's default: each block's last BN starts at 0, so an identity block passes its input through."""
    model = resnet.resnet18(num_classes=10)
    assert all(not m.bn2.weight.any() for m in model.modules() if isinstance(m, resnet.BasicBlock))
    block = model.layer1[1].eval()
    x = torch.rand(1, 64, 8, 8)  # non-negative, like the post-ReLU inputs a block sees
    torch.testing.assert_close(block(x), x)
    other = resnet.ResNet(resnet.Bottleneck, (1, 1, 1, 1), zero_init_residual=False)
    assert all(m.bn3.weight.all() for m in other.modules() if isinstance(m, resnet.Bottleneck))


def test_from_mmpretrain_is_pure_and_renames() -> None:
    keys = load_fixture("resnet50")["keys"]
    sd = seeded_state_dict(keys)
    converted = resnet.from_mmpretrain(sd)
    assert list(sd) == [k for k, _ in keys]
    assert set(converted) == set(resnet.resnet50().state_dict())
    assert converted["fc.weight"] is sd["head.fc.weight"]


def test_basic_block_rejects_bottleneck_switches() -> None:
    with pytest.raises(ValueError):
        resnet.ResNet(resnet.BasicBlock, (2, 2, 2, 2), groups=32, width_per_group=4)

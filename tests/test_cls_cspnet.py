"""CSPNet family: parameter counts, a train step, mmpretrain parity, mmpretrain's initialisation.

torchvision has no CSPNet, so there is no torchvision parity test; mmpretrain's checkpoints load through
`from_mmpretrain` (a prefix change) and reproduce its logits (fixtures written by tools outside the repo).
"""
import math

import pytest
import torch
from torch import nn

from cls.models import cspnet
from cls.models.layers import ConvModule
from tests.cls_model_checks import check_mmpretrain_parity, check_train_step, count_params

PARAMS = {
    "cspresnext50": 20_569_896,  # figures.md (cspresnext50_8xb32_in1k)
    "cspresnet50": 21_616_168,  # mmpretrain 1.2.0 cspresnet50_8xb32_in1k, measured
    "cspdarknet53": 27_642_184,  # mmpretrain 1.2.0 cspdarknet50_8xb32_in1k (CSPDarkNet depth 53), measured
}


@pytest.mark.parametrize("arch", sorted(PARAMS))
def test_params_and_train_step(arch: str) -> None:
    model = getattr(cspnet, arch)(num_classes=1000)
    assert count_params(model) == PARAMS[arch]
    check_train_step(model, num_classes=1000, size=64)


@pytest.mark.parametrize("arch", sorted(PARAMS))
def test_mmpretrain_parity(arch: str) -> None:
    check_mmpretrain_parity(arch, getattr(cspnet, arch), cspnet.from_mmpretrain)


def test_from_mmpretrain_is_pure_and_strict() -> None:
    sd = {"backbone.stem.conv.weight": torch.zeros(1), "head.fc.bias": torch.zeros(1)}
    before = dict(sd)
    assert set(cspnet.from_mmpretrain(sd)) == {"stem.conv.weight", "fc.bias"}
    assert sd == before
    with pytest.raises(KeyError):  # a neck with weights would be a different model: refuse, don't drop it
        cspnet.from_mmpretrain({"neck.gap.weight": torch.zeros(1)})


@pytest.mark.parametrize("arch", sorted(PARAMS))
def test_init_matches_mmpretrain(arch: str) -> None:
    """Every conv ends Kaiming-normal with fan_out (mmcv ConvModule / CSPNet init_cfg), even in CSPDarkNet
    whose own init_cfg asks for torch's fan_in uniform; head Normal(0.01) with zero bias."""
    torch.manual_seed(0)
    model = getattr(cspnet, arch)()
    slope = {id(m.conv): m.activate.negative_slope for m in model.modules()
             if isinstance(m, ConvModule) and isinstance(m.activate, nn.LeakyReLU)}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight
            fan_out = w.shape[0] * w[0, 0].numel()
            expected = math.sqrt(2 / (1 + slope.get(id(m), 0) ** 2) / fan_out)
            # >= 864 samples per conv: the sample std is within ~3 % of its expectation; fan_in init would be
            # off by 2x or more in most convs.
            assert abs(w.std().item() / expected - 1) < 0.15, name
            assert abs(w.mean().item()) < 0.2 * expected, name
    assert abs(model.fc.weight.std().item() / 0.01 - 1) < 0.05
    assert torch.count_nonzero(model.fc.bias) == 0

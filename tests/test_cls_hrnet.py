import math

import pytest
import torch
from torch import nn

from cls.models import hrnet
from tests.cls_model_checks import check_mmpretrain_parity, check_train_step, count_params
from tests.mmpretrain_fixture import load_fixture, seeded_state_dict

# Parameters at 1000 classes. hrnet_w18: /work/shared/reference/figures.md (hrnet-w18_4xb32_in1k). Siblings:
# mmpretrain 1.2.0 built from the named config, measured with sum(p.numel()). No torchvision twin exists.
PARAMS = {
    "hrnet_w18": 21_295_164,  # figures.md; mmpretrain hrnet/hrnet-w18_4xb32_in1k gives the same
    "hrnet_w32": 41_228_840,  # mmpretrain hrnet/hrnet-w32_4xb32_in1k
    "hrnet_w48": 77_466_024,  # mmpretrain hrnet/hrnet-w48_4xb32_in1k
}
FIXTURES = ["hrnet_w18", "hrnet_w32", "hrnet_w48"]


@pytest.mark.parametrize("name", PARAMS)
def test_param_count_and_train_step(name: str) -> None:
    model = getattr(hrnet, name)()
    assert count_params(model) == PARAMS[name]
    check_train_step(model, num_classes=1000)


@pytest.mark.parametrize("arch", FIXTURES)
def test_mmpretrain_parity(arch: str) -> None:
    check_mmpretrain_parity(arch, getattr(hrnet, arch), hrnet.from_mmpretrain)


def test_from_mmpretrain_is_a_pure_prefix_change() -> None:
    """Every checkpoint key keeps its tail; only the three prefixes change, and the input is left alone."""
    keys = load_fixture("hrnet_w18")["keys"]
    ckpt = seeded_state_dict(keys)
    before = dict(ckpt)
    ours = hrnet.from_mmpretrain(ckpt)
    assert ckpt.keys() == before.keys() and all(ckpt[k] is before[k] for k in before)
    prefixes = {"backbone.": "", "neck.0.": "neck.", "head.fc.": "fc."}
    expected = {new + k.removeprefix(old) for k in ckpt for old, new in prefixes.items() if k.startswith(old)}
    assert set(ours) == expected and len(ours) == len(ckpt)


@pytest.fixture(scope="module")
def w18() -> hrnet.HRNet:
    """One freshly initialised hrnet_w18 for the read-only structural tests (building it costs ~1 s)."""
    torch.manual_seed(0)
    return hrnet.hrnet_w18()


def test_branches_resolutions_and_widths(w18: hrnet.HRNet) -> None:
    """Stage 4 ends with 4 branches at strides 4/8/16/32 and widths w * 2^i; the neck lands at stride 32."""
    seen = {}
    hooks = [w18.stage4.register_forward_hook(lambda m, i, out: seen.__setitem__("branches", out)),
             w18.neck.register_forward_hook(lambda m, i, out: seen.__setitem__("neck", out))]
    for height, width in [(64, 64), (64, 96)]:
        with torch.no_grad():
            assert w18.eval()(torch.randn(1, 3, height, width)).shape == (1, 1000)
        shapes = [tuple(x.shape) for x in seen["branches"]]
        assert shapes == [(1, 18 * 2**i, height // 2 ** (i + 2), width // 2 ** (i + 2)) for i in range(4)]
        assert seen["neck"].shape == (1, 2048, height // 32, width // 32)
    for hook in hooks:
        hook.remove()


def test_fuse_layers_follow_the_paper(w18: hrnet.HRNet) -> None:
    """Output branch i takes branch j > i through 1x1 conv + nearest x2^(j-i), branch j < i through i-j
    stride-2 convs (only the last without ReLU), and branch i itself unchanged."""
    module = w18.stage4[0]
    for i, fuse in enumerate(module.fuse_layers):
        for j, layer in enumerate(fuse):
            if j > i:
                assert layer[2].scale_factor == 2 ** (j - i) and layer[0].kernel_size == (1, 1)
            elif j == i:
                assert isinstance(layer, nn.Identity)
            else:
                assert [conv[0].stride for conv in layer] == [(2, 2)] * (i - j)
                assert [len(conv) for conv in layer] == [3] * (i - j - 1) + [2]


def test_init_follows_mmpretrain(w18: hrnet.HRNet) -> None:
    """Kaiming fan_out on backbone convs and the neck's ConvModules, PyTorch default in the neck's
    Bottlenecks, fc ~ N(0, 0.01) with zero bias (values of mmpretrain's init_weights, measured)."""
    def std(w: torch.Tensor) -> float:
        return w.std().item()

    def kaiming(w: torch.Tensor) -> float:
        return math.sqrt(2 / (w.shape[0] * w[0, 0].numel()))

    for w in (w18.transition1[0][0].weight, w18.neck.final_layer.conv.weight):
        assert std(w) == pytest.approx(kaiming(w), rel=0.05)
    neck_conv = w18.neck.increase_layers[3][0].conv2.weight
    assert std(neck_conv) == pytest.approx(1 / math.sqrt(3 * neck_conv[0].numel()), rel=0.05)
    assert std(w18.fc.weight) == pytest.approx(0.01, rel=0.05)
    assert (w18.fc.bias == 0).all()

"""Checks every classification family runs: build, train step, parameter count, checkpoint parity."""
from collections.abc import Callable

import torch
from torch import nn

from tests.mmpretrain_fixture import fixed_input, load_fixture, seeded_state_dict


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_train_step(model: nn.Module, num_classes: int, size: int = 64) -> None:
    """Forward + backward on a batch of 2: output shape, finite loss, a finite gradient on every parameter."""
    model.train()
    x = torch.randn(2, 3, size, size)
    logits = model(x)
    assert logits.shape == (2, num_classes), logits.shape
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, num_classes - 1]))
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"


def _state_dict_shapes(model: nn.Module) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


def check_torchvision_parity(ours: nn.Module, theirs: nn.Module, size: int = 64) -> None:
    """torchvision's state dict loads into ours unchanged (strict) and both give the same eval outputs."""
    theirs.load_state_dict(seeded_state_dict(_state_dict_shapes(theirs)))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = fixed_input(size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def check_mmpretrain_parity(arch: str, build: Callable[..., nn.Module], convert: Callable[[dict], dict]) -> None:
    """A converted mmpretrain checkpoint loads strictly and reproduces mmpretrain's recorded logits."""
    fx = load_fixture(arch)
    model = build(**fx["builder_kwargs"]).eval()
    model.load_state_dict(convert(seeded_state_dict(fx["keys"])), strict=True)
    with torch.no_grad():
        logits = model(fixed_input(fx["input_size"]))
    expected = torch.tensor(fx["logits"])
    # Recorded in another process (and possibly another torch build): allow float32 reordering noise
    # relative to the logits' scale, no more.
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

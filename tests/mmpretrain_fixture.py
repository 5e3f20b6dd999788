"""mmpretrain checkpoints without mmpretrain: key names, shapes and reference outputs, recorded once.

Each `tests/data/mmpretrain/<arch>.json.gz` holds the state-dict keys and shapes of the OpenMMLab model built
from the config the seed names, and that model's logits for a fixed input after its weights were filled by
`seeded_state_dict` (deterministic, so the test can refill ours identically). The files were written with
mmpretrain 1.2.0 in a separate environment; the tests need only torch.
"""
import gzip
import json
import math
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data" / "mmpretrain"


def seeded_state_dict(keys: list[tuple[str, list[int]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Fill every key in checkpoint order from one generator, scaled so deep nets stay numerically tame."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in keys:
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean"):
            out[key] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1 and key.endswith("weight"):  # norm scales
            out[key] = 1 + torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:  # biases
            out[key] = torch.randn(shape, generator=g) * 0.1
        else:  # conv / linear weights: He-style scale keeps activations O(1)
            fan_in = math.prod(shape[1:])
            out[key] = torch.randn(shape, generator=g) * math.sqrt(1.0 / fan_in)
    return out


def fixed_input(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def load_fixture(arch: str) -> dict:
    with gzip.open(DATA / f"{arch}.json.gz", "rt") as f:
        return json.load(f)


def available() -> list[str]:
    return sorted(p.name.removesuffix(".json.gz") for p in DATA.glob("*.json.gz"))

"""det/models/__init__.py: every family file follows the protocol its docstring states, and the registry is
exactly the families' builders and recipes."""
import inspect

import pytest

from det import models
from det.eval import IOU_TYPES, STATS
from det.presets import PRESETS


@pytest.mark.parametrize("family", models.FAMILIES, ids=lambda f: f.__name__.rsplit(".", 1)[-1])
def test_family_protocol(family):
    for function in ("from_mmdet", "load_backbone_weights"):
        assert inspect.isfunction(getattr(family, function)), function
    assert family.from_mmdet({}) == {}
    builders = {name for name, builder in models.MODELS.items() if models.family(name) is family}
    assert builders and builders == set(family.RECIPES)
    for name in builders:
        recipe = family.RECIPES[name]
        assert recipe["preset"] in PRESETS and recipe["iou_type"] in IOU_TYPES and recipe["metric"] in STATS, name


def test_registry_is_the_families():
    assert set(models.MODELS) == set(models.RECIPES)
    assert {models.family(name) for name in models.MODELS} == set(models.FAMILIES)
    with pytest.raises(ValueError, match="unknown detector 'yolo'"):
        models.build_model("yolo")

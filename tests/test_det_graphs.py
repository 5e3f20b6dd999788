"""Inference in one graph: every detector's eval forward (network, decoding, candidate selection, NMS or Matrix NMS,
padding to K) compiles with fullgraph=True and no host sync, and gives the eager outputs."""
import pytest
import torch

from det.models import MODELS, RECIPES, build_model
from det.presets import get_preset
from tests.det_compare import decisive
from tests.graph_check import compiled_outputs


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_forward_is_one_graph(name):
    recipe = RECIPES[name]
    preset = get_preset(recipe["preset"])
    size = max(64, recipe.get("min_img_size", 0))
    height, width = preset.get("eval_canvas_size", preset["canvas_size"])(size, True)
    torch.manual_seed(0)
    model = build_model(name, num_classes=3).eval()
    images = torch.rand(2, 3, height, width) * 255
    decisive(model, images)  # scores that pass the thresholds and lie far apart
    image_size = torch.tensor([[height, width], [height * 3 // 4, width // 2]])
    with torch.no_grad():
        want = model(images, image_size=image_size)
        got = compiled_outputs(model, images, image_size=image_size)
    assert got.keys() == want.keys()
    assert want["valid"].any(), "nothing detected: the test would compare padding only"
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=f"{name} {key}")

"""det/export.py and cls/export.py: every detector, decoding and NMS included, exported at a small canvas to
torch.export's .pt2 gives the eager outputs, and so does its ONNX file in ONNX Runtime (those tests skip without
onnx, onnxscript and onnxruntime, optional test dependencies); a classifier both ways; both commands from a
checkpoint."""
import math
import re
import sys

import pytest
import torch
from torch import nn

from cls import export as cls_export
from cls.models import build_model as build_classifier
from common.export import check_output_path, export_file, max_differences, run_file
from det import export as det_export
from det.models import MODELS, RECIPES, build_model
from tests.det_compare import assert_same_detections, decisive

CLASSES = [f"shape_{k}" for k in range(3)]


def detector(name: str) -> tuple[nn.Module, dict, dict, dict]:
    """(`name` with 3 classes and decisive heads as its file runs it, export inputs, check inputs, eager outputs on
    the check inputs) on its smallest test canvas, 2 images each, of random sizes inside it."""
    canvas = det_export.canvas_size(name, max(64, RECIPES[name].get("min_img_size", 0)))
    inputs, check = (det_export.random_inputs(canvas, 2, torch.Generator().manual_seed(s)) for s in (0, 1))
    torch.manual_seed(0)
    model = build_model(name, num_classes=len(CLASSES)).eval()
    decisive(model, inputs["images"])
    module = det_export.CanvasDetector(model).eval()
    with torch.no_grad():
        want = module(*check.values())
    assert want["valid"].any(), "nothing detected: the test would compare padding only"
    return module, inputs, check, want


@pytest.mark.parametrize("name", list(MODELS))
def test_detector_exports_to_pt2(name, tmp_path):
    module, inputs, check, want = detector(name)
    export_file(module, inputs, tmp_path / f"{name}.pt2", output_names=list(want))
    got = run_file(tmp_path / f"{name}.pt2", check)  # other values than the export's: none are baked in
    assert got.keys() == want.keys()
    for key in want:  # the same kernels as eager: equal up to float noise, labels and valid identical
        torch.testing.assert_close(got[key], want[key], msg=f"{name} {key}")


def test_padding_rows_are_zeros_and_real_ones_untouched():
    class Fixed(nn.Module):  # a detector whose padding rows hold what a top-k left there
        def forward(self, images, image_size=None):
            valid = torch.tensor([[True, False, True, False]])
            return {"boxes": torch.arange(16.0).view(1, 4, 4), "scores": torch.tensor([[0.9, 0.0, 0.5, 0.0]]),
                    "labels": torch.tensor([[2, 1, 0, 1]]), "valid": valid, "masks": torch.ones(1, 4, 2, 3)}

    out = det_export.CanvasDetector(Fixed())(torch.zeros(1, 3, 8, 12), torch.tensor([[8, 12]]))
    raw = Fixed()(None)
    for key, value in out.items():
        torch.testing.assert_close(value[raw["valid"]], raw[key][raw["valid"]])
        assert not value[~raw["valid"]].any(), key


def assert_same_masks(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], b: int, tol: float = 1e-4) -> None:
    """Image b's soft masks: each eager one has an exported one of its label within `tol` everywhere (order free,
    as assert_same_detections pairs the boxes)."""
    w, g = want["valid"][b], got["valid"][b]
    err = (want["masks"][b][w][:, None] - got["masks"][b][g][None]).abs().flatten(2).amax(-1)  # [n_want, n_got]
    err = err.masked_fill(want["labels"][b][w][:, None] != got["labels"][b][g][None], float("inf"))
    assert err.shape[1] and (err.amin(1) <= tol).all(), f"masks without a partner: {(err.amin(1) > tol).sum()}"


@pytest.mark.parametrize("name", list(MODELS))
def test_detector_exports_to_onnx(name, tmp_path):
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package)
    module, inputs, check, want = detector(name)
    export_file(module, inputs, tmp_path / f"{name}.onnx", output_names=list(want))
    got = run_file(tmp_path / f"{name}.onnx", check)
    assert got.keys() == want.keys() and all(got[k].dtype == want[k].dtype for k in want)
    # float32 boxes are exact to a fraction of their size: the canvas's, or of YOLOv3's unclipped boxes beyond it
    extent = max(*check["images"].shape[-2:], math.ceil(want["boxes"].abs().max()))
    for b in range(2):  # other kernels: float rounding may swap near-equal scores, so compared as sets
        expected = {k: want[k][b][want["valid"][b]].tolist() for k in ("boxes", "scores", "labels")}
        assert_same_detections({k: got[k][b] for k in ("boxes", "scores", "labels", "valid")}, expected,
                               max_det=want["valid"].shape[1], canvas=extent)
        if "masks" in want:
            assert_same_masks(got, want, b)


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_classifier_exports_and_a_wrong_output_is_caught(suffix, tmp_path):
    if suffix == ".onnx":
        for package in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(package)
    torch.manual_seed(0)
    model = cls_export.Logits(build_classifier("resnet18", num_classes=10)).eval()
    inputs, check = ({"images": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(s))} for s in (0, 1))
    export_file(model, inputs, tmp_path / f"resnet18{suffix}", output_names=["logits"])
    got = run_file(tmp_path / f"resnet18{suffix}", check)
    with torch.no_grad():
        want = model(*check.values())
        torch.testing.assert_close(got, want)
        model.model.fc.bias[3] += 1e-3  # a stale file: the model changed after the export
        changed = model(*check.values())
    assert max_differences(got, changed)["logits"] == pytest.approx(1e-3, rel=0.01)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, changed)


def test_onnx_without_its_exporter_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    with pytest.raises(ValueError, match=r"pip install onnx onnxscript"):
        check_output_path("model.onnx")
    with pytest.raises(ValueError, match=r"ends neither in \.onnx nor in \.pt2"):
        check_output_path("model.pth")


def run_command(main, monkeypatch, capsys, *args: str) -> str:
    """`main()` of an export command with these arguments, in this process (an interpreter of its own would add
    seconds of imports): its stdout."""
    monkeypatch.setattr(sys, "argv", ["export", *args])
    main()
    return capsys.readouterr().out


def test_det_export_command_from_a_checkpoint(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = build_model("centernet_r18", num_classes=len(CLASSES))
    extra = {"model": "centernet_r18", "img_size": 64, "classes": CLASSES}  # what det.predict.load reads
    torch.save({"model": model.state_dict(), "extra": extra}, tmp_path / "ckpt.pth")
    out = run_command(det_export.main, monkeypatch, capsys, "--weights", str(tmp_path / "ckpt.pth"),
                      "--batch-size", "2", "--out", str(tmp_path / "centernet.pt2"))
    assert "images [2, 3, 96, 96] float32 0-255" in out  # CenterNet evaluates on 1.25 x its img_size, to 32
    assert re.search(r"centernet\.pt2: [\d.]+ MiB .* boxes 0, scores 0, labels 0, valid 0$", out.strip()), out
    program = torch.export.load(tmp_path / "centernet.pt2").module()
    found = program(torch.zeros(2, 3, 96, 96), torch.tensor([[96, 96], [64, 80]]))
    assert {k: tuple(v.shape) for k, v in found.items()} == {"boxes": (2, 100, 4), "scores": (2, 100),
                                                             "labels": (2, 100), "valid": (2, 100)}
    with pytest.raises(SystemExit):
        run_command(det_export.main, monkeypatch, capsys, "--out", str(tmp_path / "x.pt2"))
    assert "give --weights" in capsys.readouterr().err


def test_cls_export_command_from_a_checkpoint(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = build_classifier("resnet18", num_classes=len(CLASSES))
    args = {"arch": "resnet18", "data_path": None}  # synthetic: the 64 px crop, as cls.predict.load rebuilds it
    torch.save({"model": model.state_dict(), "args": args, "extra": {"arch": "resnet18", "classes": CLASSES}},
               tmp_path / "ckpt.pth")
    out = run_command(cls_export.main, monkeypatch, capsys, "--weights", str(tmp_path / "ckpt.pth"), "--out",
                      str(tmp_path / "resnet18.pt2"))
    assert "images [1, 3, 64, 64] float32, normalised" in out
    assert re.search(r"resnet18\.pt2: [\d.]+ MiB .* logits [\d.e-]+$", out.strip()), out
    assert torch.export.load(tmp_path / "resnet18.pt2").module()(torch.zeros(1, 3, 64, 64))["logits"].shape == (1, 3)

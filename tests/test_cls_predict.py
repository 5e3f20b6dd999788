"""cls/predict.py as a user runs it: top-k classes per picture from a train_cls.py checkpoint, bad files reported."""
import re

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from cls import predict
from cls.models import build_model, efficientnet
from common.synthetic import classification_image
from tests.scripts import run_script

CLASSES = [f"shape_{k}" for k in range(10)]


def fake_checkpoint(path, arch: str = "resnet18", **args) -> None:
    """What train_cls.py saves, less the training state: model, args (plain dict), extra (arch, classes)."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=len(CLASSES), **({"tf_same_padding": True} if args.get("advprop") else {}))
    plain = {"arch": arch, "data_path": None, "train_crop_size": None, "val_resize_size": None,
             "val_crop_size": None, "interpolation": None, "advprop": False, **args}
    torch.save({"model": model.state_dict(), "args": plain, "extra": {"arch": arch, "classes": CLASSES}}, path)


def test_prints_top5_per_picture_and_reports_unreadable_ones(tmp_path):
    fake_checkpoint(tmp_path / "ckpt.pth")
    good = []
    for i in range(2):
        image, _ = classification_image(0, i, 10, 64)
        image.save(tmp_path / f"good{i}.png")
        good.append(tmp_path / f"good{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    out = run_script("-m", "cls.predict", "--weights", str(tmp_path / "ckpt.pth"), "--device", "cpu", str(good[0]),
                     str(tmp_path / "broken.jpg"), str(good[1]), str(tmp_path / "missing.jpg"), expect_ok=False)
    assert out.returncode == 1, out.stderr
    assert f"cannot read image {tmp_path / 'broken.jpg'}" in out.stderr
    assert f"cannot read image {tmp_path / 'missing.jpg'}" in out.stderr and "2 of 4 picture(s)" in out.stderr
    blocks = out.stdout.split(f"{good[1]}:\n")
    assert blocks[0].startswith(f"{good[0]}:\n") and len(blocks) == 2 and "broken" not in out.stdout
    for block in blocks:
        rows = re.findall(r"^  (\S+) +([0-9.]+)$", block, flags=re.MULTILINE)
        assert len(rows) == 5 and len({name for name, _ in rows}) == 5 and {name for name, _ in rows} <= set(CLASSES)
        probs = [float(p) for _, p in rows]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 5e-4  # 4 printed digits


def test_load_builds_the_validation_transform_train_cls_did(tmp_path):
    fake_checkpoint(tmp_path / "synthetic.pth")
    info = predict.load(str(tmp_path / "synthetic.pth")).predict_info
    image, _ = classification_image(0, 0, 10, 64)
    assert info["classes"] == CLASSES and info["transform"](image).shape == (3, 64, 64)  # the synthetic set's 73 / 64
    fake_checkpoint(tmp_path / "folder.pth", data_path="/data", val_resize_size=40, val_crop_size=32)
    assert predict.load(tmp_path / "folder.pth").predict_info["transform"](image).shape == (3, 32, 32)
    # --advprop: TF "SAME" padding (the state dict loads only into that model: same names) and [-1, 1] inputs
    fake_checkpoint(tmp_path / "advprop.pth", arch="efficientnet_b0", advprop=True, interpolation="bicubic")
    model = predict.load(str(tmp_path / "advprop.pth"))
    transform = model.predict_info["transform"]
    assert any(isinstance(m, efficientnet.Conv2dSame) for m in model.modules()) and not model.training
    normalize = transform.transforms[-1]
    assert normalize.mean == [0.5] * 3 and transform.transforms[1].interpolation == InterpolationMode.BICUBIC


def test_top_classes_match_softmax():
    model = build_model("resnet18", num_classes=3).eval()
    images = torch.randn(2, 3, 32, 32)
    top = predict._top_classes(model, images, ["a", "b", "c"], k=5)  # k above the class count: all classes
    probs = model(images).softmax(1)
    for row, expected in zip(top, probs, strict=True):
        assert [d["label"] for d in row] == expected.argsort(descending=True).tolist()
        assert [d["class"] for d in row] == [["a", "b", "c"][d["label"]] for d in row]
        torch.testing.assert_close(torch.tensor([d["score"] for d in row]), expected.sort(descending=True).values)


def test_classify_takes_pictures_paths_tensors_and_lists(tmp_path):
    fake_checkpoint(tmp_path / "ckpt.pth")
    model = predict.load(tmp_path / "ckpt.pth")
    images = [classification_image(0, i, 10, 64)[0] for i in range(2)]
    images[1].save(tmp_path / "b.png")
    one = predict.classify(model, images[0], topk=3)
    assert len(one) == 3 and set(one[0]) == {"class", "label", "score"}
    assert [d["score"] for d in one] == sorted((d["score"] for d in one), reverse=True)
    assert all(CLASSES[d["label"]] == d["class"] for d in one)
    uint8 = torch.stack([F.pil_to_tensor(im) for im in images])  # [2, 3, 64, 64]
    expected = predict.classify(model, images, topk=3)
    assert expected[0] == one
    for given in ([images[0], tmp_path / "b.png"], [images[0], str(tmp_path / "b.png")], uint8, list(uint8),
                  [uint8[:1], uint8[1]]):
        assert predict.classify(model, given, topk=3) == expected, type(given)
    assert predict.classify(model, uint8[1], topk=3) == expected[1]
    as_float = predict.classify(model, uint8.float() / 255, topk=3)  # resized in float: not bit-equal to uint8
    for row, want in zip(as_float, expected, strict=True):
        assert [d["label"] for d in row] == [d["label"] for d in want]
        torch.testing.assert_close([d["score"] for d in row], [d["score"] for d in want], atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="float image tensors are 0-1"):
        predict.classify(model, uint8.float())


def test_a_classifier_called_on_a_picture_or_a_list_names_classify():
    model = build_model("resnet18", num_classes=3).eval()
    image, _ = classification_image(0, 0, 10, 64)
    for wrong in (image, [torch.zeros(3, 64, 64)]):
        with pytest.raises(TypeError, match=r"expects a normalised float tensor \[B, 3, H, W\].*"
                                            r"cls\.predict\.classify\(model, images\)"):
            model(wrong)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_checkpoint_without_class_names_is_refused(tmp_path):
    torch.save({"model": build_model("resnet18", num_classes=10).state_dict()}, tmp_path / "plain.pth")
    (tmp_path / "x.png").write_bytes(b"")
    out = run_script("-m", "cls.predict", "--weights", str(tmp_path / "plain.pth"), str(tmp_path / "x.png"),
                     expect_ok=False)
    assert out.returncode == 1 and "has no architecture or class names" in out.stderr
    assert "Traceback" not in out.stderr

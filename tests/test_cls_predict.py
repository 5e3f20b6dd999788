"""cls/predict.py as a user runs it: top-k classes per picture from a train_cls.py checkpoint, bad files reported."""
import re

import torch
from torchvision.transforms import InterpolationMode

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
    _, classes, transform = predict.load(str(tmp_path / "synthetic.pth"))
    image, _ = classification_image(0, 0, 10, 64)
    assert classes == CLASSES and transform(image).shape == (3, 64, 64)  # the synthetic set's 73 / 64
    fake_checkpoint(tmp_path / "folder.pth", data_path="/data", val_resize_size=40, val_crop_size=32)
    assert predict.load(str(tmp_path / "folder.pth"))[2](image).shape == (3, 32, 32)
    # --advprop: TF "SAME" padding (the state dict loads only into that model: same names) and [-1, 1] inputs
    fake_checkpoint(tmp_path / "advprop.pth", arch="efficientnet_b0", advprop=True, interpolation="bicubic")
    model, _, transform = predict.load(str(tmp_path / "advprop.pth"))
    assert any(isinstance(m, efficientnet.Conv2dSame) for m in model.modules()) and not model.training
    normalize = transform.transforms[-1]
    assert normalize.mean == [0.5] * 3 and transform.transforms[1].interpolation == InterpolationMode.BICUBIC


def test_top_classes_match_softmax():
    model = build_model("resnet18", num_classes=3).eval()
    images = torch.randn(2, 3, 32, 32)
    top = predict._top_classes(model, images, ["a", "b", "c"], k=5)  # k above the class count: all classes
    probs = model(images).softmax(1)
    for row, expected in zip(top, probs, strict=True):
        assert [name for name, _ in row] == [["a", "b", "c"][i] for i in expected.argsort(descending=True)]
        torch.testing.assert_close(torch.tensor([p for _, p in row]).sort(descending=True).values,
                                   expected.sort(descending=True).values)


def test_checkpoint_without_class_names_is_refused(tmp_path):
    torch.save({"model": build_model("resnet18", num_classes=10).state_dict()}, tmp_path / "plain.pth")
    (tmp_path / "x.png").write_bytes(b"")
    out = run_script("-m", "cls.predict", "--weights", str(tmp_path / "plain.pth"), str(tmp_path / "x.png"),
                     expect_ok=False)
    assert out.returncode == 1 and "has no architecture or class names" in out.stderr
    assert "Traceback" not in out.stderr

"""train_det.py and det.predict end to end on the synthetic COCO set: exact resume, torchrun, checkpoint formats,
pictures, and (marked convergence) a detector that learns."""
import json
import random
import re
import sys

import pytest
import torch

from common.checkpoint import load_checkpoint
from det.models import build_model, to_our_names
from tests.det_compare import load_mmdet_fixture
from tests.scripts import run_and_signal, run_script

# RetinaNet-R18 on a 96 px canvas (96 x 160): the smallest that keeps all five FPN levels, seconds per epoch
TINY = ["--model", "retinanet_r18", "--device", "cpu", "--img-size", "96", "--synthetic-size", "16",
        "--batch-size", "4", "--print-freq", "1", "--warmup-iters", "2"]


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    """Synthetic data sets are written here, not to ~/.cache."""
    path = tmp_path_factory.getbasetemp() / "plainvision-cache"
    monkeypatch.setenv("PLAINVISION_CACHE", str(path))
    return path


def train(*args: str, expect_ok: bool = True, launcher: tuple[str, ...] = (sys.executable,)):
    return run_script("train_det.py", *args, expect_ok=expect_ok, launcher=launcher)


def test_resume_at_an_epoch_end_or_after_sigterm_at_a_random_step_is_bit_exact(tmp_path, cache):
    """Two epochs in one go == one epoch, stop, resume, one more; and SIGTERM at a random step of the two epochs (or
    during an evaluation): last.pth is written, exit 0, and `--resume auto` ends bit for bit where the uninterrupted
    run ends (the batch sampler continues at the next unseen batch, each image augmented as it would have been)."""
    common = [*TINY, "--workers", "2", "--deterministic", "--eval-interval", "2", "--lr", "0.01",
              "--synthetic-size", "24"]
    at = random.randint(1, 7)  # of 10 steps: 24 images in batches of 4, one lost per epoch to grouping
    train(*common, "--epochs", "2", "--output-dir", str(tmp_path / "straight"))
    train(*common, "--epochs", "1", "--output-dir", str(tmp_path / "resumed"))
    log = train(*common, "--epochs", "2", "--output-dir", str(tmp_path / "resumed"), "--resume", "auto")
    assert "resumed from" in log.stdout
    records = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert {"AP", "AP50", "ARl"} <= records[-1].keys() and records[-1]["mode"] == "val"
    out = run_and_signal("train_det.py", *common, "--epochs", "2", "--output-dir", str(tmp_path / "cut"),
                         log_file=tmp_path / "cut" / "log.jsonl", at_record=at)
    assert out.returncode == 0, f"signal after {at} steps: " + out.stdout[-2000:] + out.stderr[-2000:]
    assert "stopped by SIGTERM after step" in out.stdout
    assert 0 < load_checkpoint(tmp_path / "cut" / "last.pth")["step"] < 10, f"signal after {at} steps"
    train(*common, "--epochs", "2", "--output-dir", str(tmp_path / "cut"), "--resume", "auto")
    a = load_checkpoint(tmp_path / "straight" / "last.pth")
    for run in ("resumed", "cut"):
        b = load_checkpoint(tmp_path / run / "last.pth")
        assert a["step"] == b["step"] == 10, run
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (run, key)


def test_torchrun_two_processes(tmp_path, cache):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541")
    out = train(*TINY, "--epochs", "1", "--workers", "0", "--batch-size", "2", "--amp", "--output-dir", str(tmp_path),
                launcher=launcher)
    assert "2 process(es)" in out.stdout and "global batch 4" in out.stdout
    assert "Average Precision  (AP) @[ IoU=0.50 " in out.stdout  # COCOeval ran once, on rank 0
    coco = json.loads((tmp_path / "coco_bbox_summary.json").read_text())
    assert set(coco) >= {"AP", "AP50"}
    detections = json.loads((tmp_path / "detections_val.json").read_text())  # COCO results format (may be
    assert isinstance(detections, list)  # empty after one tiny epoch: RetinaNet's scores start at its 0.01 prior)
    assert all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in detections)
    assert load_checkpoint(tmp_path / "last.pth")["extra"]["label_to_cat"] == [1, 2, 4, 5, 7, 9, 12, 13, 16, 20]


def test_torchrun_yolox_with_mosaic_and_multiscale(tmp_path, cache):
    """Two processes train YOLOX-s with its Mosaic/MixUp data set in loader workers and the batch multiscale (a new
    canvas every 2 iterations, drawn from the seed alone, so the ranks' DDP buckets agree without talking)."""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29542")
    out = train("--model", "yolox_s", "--device", "cpu", "--img-size", "64", "--synthetic-size", "16",
                "--batch-size", "2", "--epochs", "1", "--workers", "1", "--lr-warmup-epochs", "1", "--hold-epochs", "0",
                "--no-aug-epochs", "0", "--multiscale-interval", "2", "--print-freq", "1",
                "--output-dir", str(tmp_path), launcher=launcher)
    assert "2 process(es)" in out.stdout and "global batch 4" in out.stdout
    assert (tmp_path / "last.pth").exists() and (tmp_path / "coco_bbox_summary_ema.json").exists()  # EMA instead


def test_predict_draws_pictures_and_test_only(tmp_path, cache):
    train(*TINY, "--epochs", "1", "--workers", "0", "--output-dir", str(tmp_path / "run"))
    image = next((cache / "synthetic_coco_16_8" / "val2017").glob("*.jpg"))
    out = run_script("-m", "det.predict", "--weights", str(tmp_path / "run" / "last.pth"), str(image),
                     "--score-thr", "0", "--out", str(tmp_path / "pictures"))
    assert f"{image}: " in out.stdout and "detection(s)" in out.stdout
    assert (tmp_path / "pictures" / f"{image.stem}.png").stat().st_size > 0
    test = train(*TINY, "--test-only", "--weights", str(tmp_path / "run" / "last.pth"),
                 "--output-dir", str(tmp_path / "test"))
    assert "Average Precision" in test.stdout and "Epoch [" not in test.stdout
    last = str(tmp_path / "run" / "last.pth")
    other = ["--model", "ssdlite_mobilenet_v2", "--device", "cpu", "--img-size", "96", "--synthetic-size", "16",
             "--output-dir", str(tmp_path / "other")]
    for flags, says in [(["--resume", last], "this checkpoint is for retinanet_r18, not ssdlite_mobilenet_v2"),
                        (["--weights", last, "--test-only"], "does not fit this model: .* of retinanet_r18")]:
        out = train(*other, *flags, expect_ok=False)
        assert out.returncode == 1 and re.search(says, out.stderr) and "Traceback" not in out.stderr, out.stderr


def test_backbone_trains_whole_without_weights_and_frozen_over_them(tmp_path, cache):
    """No weights: every backbone stage trains and BatchNorm learns its statistics (it starts at mean 0, variance 1);
    over --backbone-weights the recipe's frozen stem + stage 1 and norm_eval hold; flags override either, and a
    resumed run keeps what its checkpoint used."""
    from torchvision.models import resnet18

    scratch = train(*TINY, "--epochs", "1", "--workers", "0", "--output-dir", str(tmp_path / "scratch"))
    assert "backbone: 5 of 5 stages train, BatchNorm in train mode (no --backbone-weights" in scratch.stdout
    state = load_checkpoint(tmp_path / "scratch" / "last.pth")
    assert state["extra"]["backbone"] == {"frozen_stages": -1, "norm_eval": False}
    assert not torch.equal(state["model"]["backbone.bn1.running_var"], torch.ones(64))

    imagenet = resnet18(num_classes=1000).state_dict()
    torch.save(imagenet, tmp_path / "r18.pth")  # torchvision's format
    out = train(*TINY, "--epochs", "1", "--workers", "0", "--backbone-weights", str(tmp_path / "r18.pth"),
                "--output-dir", str(tmp_path / "pretrained"))
    assert "backbone: 3 of 5 stages train, BatchNorm statistics frozen (norm_eval) (over pretrained" in out.stdout
    state = load_checkpoint(tmp_path / "pretrained" / "last.pth")
    assert state["extra"]["backbone"] == {"frozen_stages": 1, "norm_eval": True}
    for key in ("conv1.weight", "layer1.0.conv1.weight", "bn1.running_var", "layer3.0.bn1.running_mean"):
        assert torch.equal(state["model"][f"backbone.{key}"], imagenet[key]), key  # frozen / statistics kept
    assert not torch.equal(state["model"]["backbone.layer3.0.conv1.weight"], imagenet["layer3.0.conv1.weight"])

    flags = train(*TINY, "--epochs", "2", "--workers", "0", "--backbone-weights", str(tmp_path / "r18.pth"),
                  "--trainable-backbone-layers", "5", "--no-norm-eval", "--output-dir", str(tmp_path / "pretrained"),
                  "--resume", "auto")
    assert "as the resumed checkpoint was trained" in flags.stdout  # the checkpoint's settings, not the flags
    assert load_checkpoint(tmp_path / "pretrained" / "last.pth")["extra"]["backbone"]["frozen_stages"] == 1
    out = train(*TINY, "--epochs", "1", "--workers", "0", "--backbone-weights", str(tmp_path / "r18.pth"),
                "--trainable-backbone-layers", "5", "--no-norm-eval", "--output-dir", str(tmp_path / "flags"))
    assert "backbone: 5 of 5 stages train, BatchNorm in train mode (set by flags)" in out.stdout
    small = ["--device", "cpu", "--synthetic-size", "16", "--output-dir", str(tmp_path / "refused")]
    ssd = train("--model", "ssdlite_mobilenet_v2", *small, "--trainable-backbone-layers", "3", expect_ok=False)
    assert ssd.returncode == 1 and "counts ResNet stages" in ssd.stderr
    ssd = train("--model", "ssdlite_mobilenet_v2", *small, "--norm-eval", expect_ok=False)
    assert ssd.returncode == 1 and "is for the ResNet and Darknet detectors" in ssd.stderr
    yolo = train("--model", "yolov3_d53", *small, "--trainable-backbone-layers", "3", expect_ok=False)
    assert yolo.returncode == 1 and "counts ResNet stages" in yolo.stderr and "--norm-eval applies" in yolo.stderr


def test_mmdet_checkpoint_names_load():
    """An mmdet checkpoint ({"state_dict": ...}, mmdet's names: here SSDLite's, the one family with renames) loads
    strictly after `to_our_names`."""

    keys = load_mmdet_fixture("ssdlite_mobilenet_v2")["keys"]
    mmdet = {"meta": {}, "state_dict": {k: torch.zeros(shape) for k, shape in keys}}
    model = build_model("ssdlite_mobilenet_v2")
    model.load_state_dict(to_our_names("ssdlite_mobilenet_v2", mmdet), strict=True)


def test_bad_data_path_and_canvas_are_reported(tmp_path, cache):
    out = train(*TINY, "--data-path", str(tmp_path / "coco"), expect_ok=False)
    assert out.returncode == 1 and "instances_train2017.json" in out.stderr and "Traceback" not in out.stderr
    ssd = train("--model", "ssd300", "--img-size", "160", expect_ok=False)
    assert ssd.returncode == 1 and "need --img-size 257 or more" in ssd.stderr and "Traceback" not in ssd.stderr


def test_ssd_preset_trains_on_a_small_canvas(tmp_path, cache):
    """The SSD pipeline (expand, min-IoU crop, photometric distortion) and scaled default boxes through train_det."""
    out = train("--model", "ssdlite_mobilenet_v2", "--device", "cpu", "--img-size", "96", "--synthetic-size", "16",
                "--batch-size", "4", "--epochs", "1", "--repeat", "1", "--workers", "0", "--print-freq", "1",
                "--output-dir", str(tmp_path))
    assert "canvas 96" in out.stdout and "Epoch [0] [4/4]" in out.stdout
    assert "the warmup (500 iterations) is as long as the whole run (4 steps)" in out.stdout  # the recipe's
    assert (tmp_path / "best.pth").exists()  # the first evaluation always writes one, even at AP 0
    assert set(json.loads((tmp_path / "coco_bbox_summary.json").read_text())) >= {"AP", "AP50"}


@pytest.mark.convergence
def test_yolox_learns_synthetic_shapes_from_scratch(tmp_path, cache):
    """YOLOX-s from scratch with its whole pipeline (Mosaic, RandomAffine, MixUp, HSV, flip; the batch multiscale;
    the mode switch for the last epoch; ExpMomentumEMA), 256 steps on a 128 px canvas (~2 min here). AdamW for the
    short run; the recipe's quadratic warmup over the first epoch. The EMA, evaluated in place of the model as mmdet
    does, reached AP50 0.146 after these 4 epochs (the raw model 0.144), and AP 0.392 / AP50 0.691 after 8; the
    assertion asks for 0.08."""
    train("--model", "yolox_s", "--device", "cpu", "--epochs", "4", "--img-size", "128", "--synthetic-size", "512",
          "--batch-size", "8", "--opt", "adamw", "--lr", "1e-3", "--lr-warmup-epochs", "1", "--hold-epochs", "0",
          "--no-aug-epochs", "1", "--eval-interval", "4", "--print-freq", "64", "--workers", "1",
          "--output-dir", str(tmp_path))
    steps = [r for line in (tmp_path / "log.jsonl").read_text().splitlines() if (r := json.loads(line))["mode"] ==
             "train"]
    assert "loss_l1" in steps[-1] and "loss_l1" not in steps[0]  # mmdet's mode switch: epochs 2 and 3 of 0-3
    stats = json.loads((tmp_path / "coco_bbox_summary_ema.json").read_text())  # the EMA, evaluated instead
    print("synthetic YOLOX-s:", {k: round(v, 3) for k, v in stats.items()})
    assert stats["AP50"] > 0.08


def test_darknet_backbone_settings_follow_the_weights_rule(capsys):
    """YOLOv3's Darknet has mmdet's norm_eval and nothing frozen: BatchNorm trains from scratch, keeps its
    statistics over weights, and --norm-eval decides either way."""
    from det.models import RECIPES
    from train_det import backbone_settings, parse_args

    def settings(*flags: str) -> dict:
        return backbone_settings(parse_args(["--model", "yolov3_d53", *flags]), RECIPES["yolov3_d53"], None)

    assert settings() == {"norm_eval": False}
    assert "backbone: BatchNorm in train mode (no --backbone-weights" in capsys.readouterr().out
    assert settings("--backbone-weights", "darknet53.pth") == {"norm_eval": True}
    assert settings("--backbone-weights", "darknet53.pth", "--no-norm-eval") == {"norm_eval": False}
    assert settings("--norm-eval") == {"norm_eval": True}


def test_recipe_keys_that_only_some_recipes_set(monkeypatch):
    """Optional recipe keys (YOLOX's Nesterov SGD, quadratic warmup, final LR and its hold, ExpMomentumEMA) become
    the flags' defaults where a recipe sets them; elsewhere the flags keep theirs, and norm layers decay as --wd
    (mmdet decays every parameter unless its config says otherwise)."""
    import train_det
    from det.models import RECIPES

    plain = train_det.parse_args(["--model", "retinanet_r18"])
    assert (plain.nesterov, plain.warmup, plain.min_lr_ratio, plain.hold_epochs, plain.ema) == (False, "linear", 0, 0,
                                                                                                  False)
    assert plain.norm_weight_decay is None and plain.ema_gamma is None
    extra = dict(norm_weight_decay=0.0, nesterov=True, warmup="quadratic", min_lr_ratio=0.05, hold_epochs=15, ema=True,
                 ema_decay=0.9999, ema_gamma=2000)
    monkeypatch.setitem(RECIPES, "retinanet_r18", RECIPES["retinanet_r18"] | extra)
    args = train_det.parse_args(["--model", "retinanet_r18"])
    assert {k: getattr(args, k) for k in extra} == extra
    assert train_det.parse_args(["--model", "retinanet_r18", "--no-nesterov", "--hold-epochs", "2"]).hold_epochs == 2


def test_yolox_short_run_warns_about_its_300_epoch_recipe(tmp_path, cache):
    """The recipe's 5-epoch warmup, 15 held and 15 unmixed epochs do not fit a 1-epoch run: each is named with the
    flag that fixes it, and the run still trains and evaluates (padded, with its Mosaic pipeline). Mixing is YOLOX's:
    --no-aug-epochs on another model is refused."""
    out = train("--model", "yolox_s", "--device", "cpu", "--img-size", "64", "--synthetic-size", "16",
                "--batch-size", "4", "--epochs", "1", "--workers", "0", "--output-dir", str(tmp_path))
    for flag in ("--warmup-iters", "--hold-epochs 15 of 1 epochs", "--no-aug-epochs 15 of 1 epochs"):
        assert flag in out.stdout, flag
    assert (tmp_path / "best.pth").exists() and (tmp_path / "coco_bbox_summary_ema.json").exists()
    # mmdet's EMAHook: the average alone is evaluated and is what predict (and --weights) load from best.pth
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in records if r["mode"].startswith("val")] == ["val_ema"]
    from det.predict import load
    best, model = load_checkpoint(tmp_path / "best.pth"), load(tmp_path / "best.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(value, best["model_ema"][f"module.{key}"]), key
    assert not all(torch.equal(v, best["model"][k]) for k, v in model.state_dict().items())
    refused = train(*TINY, "--no-aug-epochs", "2", "--output-dir", str(tmp_path / "retina"), expect_ok=False)
    assert refused.returncode == 1 and "switches YOLOX's mixing off" in refused.stderr

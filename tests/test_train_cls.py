"""train_cls.py end to end: exact resume, checkpoint formats for --weights, torchrun, bad input, and learning."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.synthetic import classification_image
from tests.scripts import ROOT, run_and_signal, run_script

TINY = ["--arch", "resnet18", "--device", "cpu", "--batch-size", "16", "--print-freq", "1"]


def train(*args: str, expect_ok: bool = True, launcher: tuple[str, ...] = (sys.executable,)):
    return run_script("train_cls.py", *args, expect_ok=expect_ok, launcher=launcher)


def make_image_folder(root: Path, per_class: int = 4, classes: int = 2) -> Path:
    for split, seed in (("train", 0), ("val", 1)):
        for k in range(classes):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(per_class):
                image, _ = classification_image(seed, i * classes + k, classes, 40)
                image.save(root / split / f"c{k}" / f"{i}.jpg")
    return root


def test_resume_is_bit_exact(tmp_path):
    """4 steps in one go == 2 steps, stop, resume, 2 more: weights, optimizer, EMA and RNG all carried over."""
    common = [*TINY, "--synthetic-size", "32", "--workers", "1", "--deterministic", "--ema", "--warmup-epochs", "1",
              "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--eval-interval", "2"]
    train(*common, "--epochs", "2", "--output-dir", str(tmp_path / "straight"))
    train(*common, "--epochs", "1", "--output-dir", str(tmp_path / "resumed"))
    log = train(*common, "--epochs", "2", "--output-dir", str(tmp_path / "resumed"), "--resume", "auto")
    assert "resumed from" in log.stdout
    a, b = (load_checkpoint(tmp_path / d / "last.pth") for d in ("straight", "resumed"))
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["model_ema"]:
        assert torch.equal(a["model_ema"][key], b["model_ema"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for part in ("model", "model_ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])


def test_sigterm_at_a_random_step_then_resume_is_bit_exact(tmp_path):
    """SIGTERM lands at a random step (or during an evaluation): the run finishes that step, writes last.pth and
    exits 0; `--resume auto` then ends bit for bit where the uninterrupted run ends (sampler order, per-image
    augmentation, MixUp / CutMix, EMA and optimizer all carried over mid-epoch)."""
    common = [*TINY, "--synthetic-size", "64", "-b", "8", "-j", "2", "--deterministic", "--ema", "--epochs", "3",
              "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--lr-warmup-epochs", "1"]
    at = random.randint(1, 14)  # of 24 steps (8 per epoch)
    train(*common, "--output-dir", str(tmp_path / "straight"))
    out = run_and_signal("train_cls.py", *common, "--output-dir", str(tmp_path / "cut"),
                         log_file=tmp_path / "cut" / "log.jsonl", at_record=at)
    assert out.returncode == 0, f"signal after {at} steps: " + out.stdout[-2000:] + out.stderr[-2000:]
    assert "stopped by SIGTERM after step" in out.stdout and "Traceback" not in out.stderr
    cut = load_checkpoint(tmp_path / "cut" / "last.pth")
    assert 0 < cut["step"] < 24, f"signal after {at} steps"
    log = train(*common, "--output-dir", str(tmp_path / "cut"), "--resume", "auto")
    assert f"step {cut['step']}" in log.stdout.split("resumed from")[1].splitlines()[0]
    assert_same_training_state(load_checkpoint(tmp_path / "straight" / "last.pth"),
                               load_checkpoint(tmp_path / "cut" / "last.pth"))


def test_weights_from_torchvision_and_mmpretrain_formats(tmp_path):
    from torchvision.models import resnet18

    from tests.mmpretrain_fixture import load_fixture, seeded_state_dict

    tv = resnet18(num_classes=10).state_dict()
    torch.save(tv, tmp_path / "tv.pth")
    out = train(*TINY, "--synthetic-size", "32", "--test-only", "--weights", str(tmp_path / "tv.pth"))
    assert "weights:" not in out.stdout and "top-1" in out.stdout  # every key fitted: nothing reported
    # an mmpretrain ResNet-50 checkpoint (1000 classes) into a 10-class model: only the head is reported
    mm = {"meta": {"epoch": 100}, "state_dict": seeded_state_dict(load_fixture("resnet50")["keys"])}
    torch.save(mm, tmp_path / "mm.pth")
    out = train("--arch", "resnet50", "--device", "cpu", "--synthetic-size", "32", "--batch-size", "16",
                "--test-only", "--weights", str(tmp_path / "mm.pth"))
    assert "2 shape mismatch key(s)" in out.stdout and "fc.weight: checkpoint (1000, 2048)" in out.stdout
    assert "missing" not in out.stdout and "unexpected" not in out.stdout


def test_torchrun_two_processes(tmp_path):
    """DDP over gloo with AMP (bf16 on CPU), channels-last, gradient accumulation and clipping; validation
    images sharded without padding, so each is counted once."""
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531")
    out = train(*TINY, "--synthetic-size", "72", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--amp",
                "--channels-last", "--accum-steps", "2", "--clip-grad", "1.0", "--sync-bn",
                "--output-dir", str(tmp_path), launcher=launcher)
    assert "2 process(es)" in out.stdout
    assert "(18 images)" in out.stdout  # 72 // 4 validation images over 2 ranks
    assert "global batch 32" in out.stdout  # 8 per device x 2 devices x 2 micro-batches
    assert "--sync-bn ignored" in out.stdout  # torch has no CPU SyncBatchNorm
    state = load_checkpoint(tmp_path / "last.pth")
    assert state["step"] == 2 and len(state["rng"]) == 2  # 36 images per rank = 4 micro-batches = 2 steps
    assert (tmp_path / "best.pth").exists()


def worker_pid(marker: str, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` whose command line holds `marker` (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            if marker in (proc / "cmdline").read_text() and f"\0RANK={rank}\0" in "\0" + (proc / "environ").read_text():
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def test_torchrun_restarts_a_killed_worker_and_resumes(tmp_path):
    """`torchrun --standalone --max-restarts 1 ... --resume auto` with one worker killed (-9): the restarted workers
    join a fresh process group (not the dead attempt's addresses: common/dist.py) and continue from last.pth."""
    out_dir = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--max-restarts", "1"]
    command = [*launcher, "train_cls.py", *TINY, "--synthetic-size", "96", "-b", "4", "--epochs", "3", "-j", "0",
               "--save-every", "2", "--output-dir", str(out_dir), "--resume", "auto"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (out_dir / "last.pth").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = worker_pid(str(out_dir), rank=1)
    assert pid is not None and process.poll() is None, "no worker to kill"
    os.kill(pid, signal.SIGKILL)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-4000:]
    assert "resumed from" in output and "connectFullMesh" not in output
    assert load_checkpoint(out_dir / "last.pth")["step"] == 3 * 12  # 96 images / (2 ranks x 4) per step, 3 epochs


def test_image_folder_training_and_bad_input(tmp_path):
    root = make_image_folder(tmp_path / "data")
    (root / "train" / "c0" / "broken.jpg").write_bytes(b"this is not a jpeg")
    fail = train(*TINY, "--data-path", str(root), "--epochs", "1", "--workers", "0", "--batch-size", "3",
                 "--output-dir", str(tmp_path / "o1"), expect_ok=False)
    assert fail.returncode != 0 and "cannot read image" in fail.stderr and "broken.jpg" in fail.stderr
    ok = train(*TINY, "--data-path", str(root), "--epochs", "1", "--workers", "0", "--batch-size", "3",
               "--skip-bad-images", "--output-dir", str(tmp_path / "o2"))
    assert "skipping unreadable image" in ok.stdout and "unreadable training images skipped" in ok.stdout
    assert "9 train / 8 val images, 2 classes" in ok.stdout
    assert load_checkpoint(tmp_path / "o2" / "last.pth")["extra"]["classes"] == ["c0", "c1"]

    missing = train(*TINY, "--data-path", str(tmp_path / "nowhere"), expect_ok=False)
    assert "expected the ImageNet layout" in missing.stderr and "nowhere/train" in missing.stderr
    for image in (root / "val" / "c1").iterdir():
        image.unlink()
    empty = train(*TINY, "--data-path", str(root), expect_ok=False)
    assert f"class folder {root / 'val' / 'c1'} has no images" in empty.stderr
    unknown = train("--arch", "resnet9000", expect_ok=False)
    assert "invalid choice: 'resnet9000'" in unknown.stderr and "efficientnet_b4" in unknown.stderr


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    args = [*TINY, "--synthetic-size", "32", "--workers", "0", "--output-dir", str(tmp_path)]
    train(*args, "--epochs", "1")
    before = load_checkpoint(tmp_path / "last.pth")
    out = train(*args, "--epochs", "2", "--resume", "auto", "--lr", "1e30", expect_ok=False)
    assert out.returncode == 1 and "loss became non-finite in epoch 1" in out.stderr
    after = load_checkpoint(tmp_path / "last.pth")
    assert after["epoch"] == before["epoch"] == 1
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_non_finite_loss_is_caught_before_any_checkpoint(tmp_path):
    """Two steps per epoch, --print-freq far above them: the check still runs before the first save, so no
    last.pth / best.pth full of NaN is written, and the message does not name a checkpoint that does not exist."""
    out = train(*TINY, "--synthetic-size", "8", "-b", "4", "--epochs", "2", "--print-freq", "50", "--workers", "0",
                "--lr", "1e30", "--output-dir", str(tmp_path), expect_ok=False)
    assert out.returncode == 1 and "loss became non-finite in epoch 0" in out.stderr
    assert "No checkpoint was written" in out.stderr and not list(tmp_path.glob("*.pth"))


def test_lr_is_absolute_and_foreign_checkpoints_are_refused(tmp_path):
    """--lr is the LR itself (torchvision's meaning); resuming or loading another architecture's checkpoint, or a
    folder, stops with one sentence."""
    run = train(*TINY, "--synthetic-size", "32", "--epochs", "1", "--workers", "0", "--lr", "0.05",
                "--output-dir", str(tmp_path / "r18"))
    assert "LR 0.05 (--lr, as given), global batch 16" in run.stdout
    assert re.search(r"done in \d+:\d\d:\d\d: best top-1 \d", run.stdout)  # the run's total time
    records = [json.loads(line) for line in (tmp_path / "r18" / "log.jsonl").read_text().splitlines()]
    assert {r["lr"] for r in records if r["mode"] == "train"} == {0.05}
    last = str(tmp_path / "r18" / "last.pth")
    for flags, says in [(["--arch", "resnet50", "--resume", last], "this checkpoint is for resnet18, not resnet50"),
                        (["--arch", "mobilenet_v2", "--weights", last, "--test-only"],
                         "does not fit this model: .* it is a checkpoint of resnet18"),
                        (["--arch", "resnet18", "--resume", str(tmp_path)], "is a folder, not a file")]:
        out = train("--device", "cpu", "--synthetic-size", "16", "-b", "8", *flags, expect_ok=False)
        assert out.returncode == 1 and re.search(says, out.stderr) and "Traceback" not in out.stderr, out.stderr


@pytest.mark.convergence
def test_resnet18_learns_synthetic_shapes(synthetic_resnet18):
    """The session's synthetic ResNet-18 (tests/conftest.py): it reached 64-75 % top-1 in our runs; the assertion
    asks for five times chance (10 %), far from run-to-run noise."""
    records = [json.loads(line) for line in (synthetic_resnet18 / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if r["mode"] == "val"]
    print("top-1 per epoch:", [r["top1"] for r in val])
    assert len(val) == 6 and val[-1]["top1"] > 50.0
    assert val[-1]["loss"] < 0.5 * val[0]["loss"]

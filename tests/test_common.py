"""common/: checkpoints (atomic, keep-N, RNG round trip, weight reports), the LR schedule, optimizer groups, logging."""
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from common import checkpoint as ckpt
from common.logger import log_every, new_meters
from common.optim import build_optimizer, lr_at, param_groups, scaled_lr


def test_atomic_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, tmp_path)
    real_save = torch.save

    def crash_midway(obj, f):
        real_save({"partial": True}, f)  # something lands in the temporary file...
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, tmp_path)
    monkeypatch.undo()
    state = ckpt.load_checkpoint(tmp_path / "last.pth")
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_best_and_keep(tmp_path):
    for epoch in range(1, 5):
        ckpt.save_checkpoint({"epoch": epoch}, tmp_path, is_best=epoch == 2, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["best.pth", "epoch_0003.pth", "epoch_0004.pth",
                                                               "last.pth"]
    assert ckpt.load_checkpoint(tmp_path / "best.pth")["epoch"] == 2
    assert ckpt.load_checkpoint(tmp_path / "last.pth")["epoch"] == 4


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    cpu = torch.device("cpu")
    torch.save({"rng": ckpt.rng_state(cpu)}, tmp_path / "r.pth")
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "r.pth")["rng"], cpu)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_resume_path(tmp_path):
    assert ckpt.resume_path("", tmp_path) is None
    assert ckpt.resume_path("auto", tmp_path) is None  # nothing yet: a fresh start
    ckpt.save_checkpoint({"epoch": 1}, tmp_path)
    assert ckpt.resume_path("auto", tmp_path) == tmp_path / "last.pth"
    with pytest.raises(SystemExit, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pth")


def test_load_model_weights_reports_differences(capsys):
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    source = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 10)).state_dict()
    source["extra.weight"] = torch.zeros(1)
    del source["0.bias"]
    report = ckpt.load_model_weights(model, source)
    assert report["missing"] == ["0.bias"]
    assert report["unexpected"] == ["extra.weight"]
    assert [r.split(":")[0] for r in report["shape_mismatch"]] == ["1.weight", "1.bias"]
    assert torch.equal(model[0].weight, source["0.weight"])  # what fits is loaded
    assert "2 shape mismatch key(s)" in capsys.readouterr().out


def test_plain_args_are_weights_only_loadable(tmp_path):
    import argparse
    from pathlib import Path
    args = argparse.Namespace(lr=0.1, steps=[1, 2], out=Path("x"), fmt=torch.channels_last, name=None)
    torch.save({"args": ckpt.plain_args(args)}, tmp_path / "a.pth")
    assert ckpt.load_checkpoint(tmp_path / "a.pth")["args"] == {"lr": 0.1, "steps": [1, 2], "out": "x", "name": None}


def test_lr_schedules():
    kw = dict(base_lr=1.0, total_steps=100)
    assert lr_at(0, **kw) == 1.0 and lr_at(100, **kw) == pytest.approx(0.0)
    assert lr_at(50, **kw) == pytest.approx(0.5)
    assert lr_at(50, **kw, min_lr=0.2) == pytest.approx(0.6)
    assert [lr_at(s, **kw, schedule="poly") for s in (0, 25, 100)] == pytest.approx([1.0, 0.75, 0.0])
    steps = dict(base_lr=1.0, total_steps=100, schedule="multistep", milestones=[30, 60], gamma=0.1)
    assert [lr_at(s, **steps) for s in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    warm = dict(steps, warmup_steps=10, warmup_factor=0.001)
    assert lr_at(0, **warm) == pytest.approx(0.001)
    assert lr_at(5, **warm) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_at(10, **warm) == 1.0
    # cosine with warmup starts decaying only after the warmup
    assert lr_at(10, base_lr=1.0, total_steps=110, warmup_steps=10) == 1.0
    assert lr_at(60, base_lr=1.0, total_steps=110, warmup_steps=10) == pytest.approx(0.5)
    assert scaled_lr(0.1, 512) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, base_lr=1.0, total_steps=10, schedule="exponential")


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 1e-4)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
    for name in ("sgd", "adamw", "rmsprop"):
        assert build_optimizer(name, model, 0.1).param_groups[0]["weight_decay"] == 1e-4
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("lamb", model, 0.1)


def test_log_every_prints_and_writes_json(tmp_path, capsys):
    meters = new_meters()
    log_file = tmp_path / "log.jsonl"
    for i in log_every(range(5), meters, print_freq=2, header="Epoch [0]", device=torch.device("cpu"),
                       images_per_iter=8, log_file=log_file, tags={"epoch": 0}):
        meters["loss"].append(torch.tensor(float(i)))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("Epoch [0] [2/5]") and "img/s" in lines[0]
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["iter"] for r in records] == [2, 4, 5]
    assert records[-1]["loss_avg"] == pytest.approx(2.0) and records[-1]["loss"] == pytest.approx(2.0)
    assert records[-1]["epoch"] == 0 and math.isfinite(records[-1]["img_s"])

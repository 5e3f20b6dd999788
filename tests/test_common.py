"""common/: checkpoints (atomic, keep-N, RNG round trip, weight reports), the LR schedule, optimizer groups, logging."""
import argparse
import json
import math
import os
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from common import checkpoint as ckpt
from common.logger import log_every, new_meters
from common.optim import apply_gradients, build_optimizer, ema_model, lr_at, param_groups, scaled_lr


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


@pytest.mark.parametrize("killed_at", [0, 1, 2])
def test_a_kill_during_any_write_leaves_every_file_loadable(tmp_path, killed_at):
    """A child process saves an improved epoch 2 (best.pth, epoch_0002.pth, last.pth: three writes) and dies with
    os._exit (as under kill -9: no cleanup) half-way through write number `killed_at`. Every visible *.pth still
    loads; whenever last.pth says epoch 2 is the best, best.pth holds epoch 2 (or a resume repeats epoch 2 and
    writes it); the torn temporary file is what remove_stale_temp_files clears at the next start."""
    ckpt.save_checkpoint({"epoch": 1, "best_metric": 0.1}, tmp_path, is_best=True, keep=5)
    pid = os.fork()
    if pid == 0:  # the child: torch.save writes half a zip, then the process is gone
        writes = []

        def torn_save(obj, f):
            if len(writes) == killed_at:
                f.write(b"PK\x03\x04 half a checkpoint")
                f.flush()
                os._exit(9)
            writes.append(obj)
            real_save(obj, f)

        real_save = torch.save
        torch.save = torn_save
        ckpt.save_checkpoint({"epoch": 2, "best_metric": 0.2}, tmp_path, is_best=True, keep=5)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] >> 8 == 9
    states = {p.name: ckpt.load_checkpoint(p) for p in tmp_path.glob("*.pth")}  # loads, or SystemExit fails here
    assert states["last.pth"]["epoch"] == 1  # last.pth is written last: the kill came before it
    assert states["best.pth"]["epoch"] == (2 if killed_at > 0 else 1)
    stale = ckpt.remove_stale_temp_files(tmp_path)
    assert len(stale) == 1 and not stale[0].exists() and not list(tmp_path.glob(".*"))


def test_unreadable_checkpoints_get_one_sentence(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.ones(1000)}}, good)
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    torch.save({"optimizer": torch.optim.SGD}, tmp_path / "code.pth")  # pickled code: weights_only refuses it
    expected = {"empty.pth": "is empty", "truncated.pth": "truncated or not a PyTorch checkpoint",
                "notes.pth": "truncated or not a PyTorch checkpoint", "code.pth": "truncated or not a PyTorch"}
    for name, says in expected.items():
        with pytest.raises(SystemExit, match=says) as e:
            ckpt.load_checkpoint(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="is a folder, not a file"):
        ckpt.load_checkpoint(tmp_path)


def restore(path, model, identity):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return ckpt.restore_training_state(ckpt.load_resume(str(path), path.parent, identity), model=model,
                                       optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False),
                                       model_ema=None, rank=0, world_size=1, device=torch.device("cpu"))


def test_resume_refuses_another_model_in_one_sentence(tmp_path):
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = ckpt.training_state(model=model, optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False),
                                model_ema=None, epoch=1, batch=3, step=7, best=0.5, args=argparse.Namespace(),
                                extra={"arch": "resnet50"}, device=torch.device("cpu"))
    torch.save(state, tmp_path / "last.pth")
    with pytest.raises(SystemExit, match="this checkpoint is for resnet50, not resnet18"):
        restore(tmp_path / "last.pth", nn.Linear(4, 2), {"arch": "resnet18"})
    with pytest.raises(SystemExit, match="do not fit this model"):
        restore(tmp_path / "last.pth", nn.Linear(4, 3), {"arch": "resnet50"})
    assert restore(tmp_path / "last.pth", nn.Linear(4, 2), {"arch": "resnet50"}) == {
        "epoch": 1, "batch": 3, "step": 7, "best_metric": 0.5}
    torch.save({"model": model.state_dict()}, tmp_path / "weights.pth")
    with pytest.raises(SystemExit, match="not a training checkpoint.*--weights"):
        restore(tmp_path / "weights.pth", nn.Linear(4, 2), {"arch": "resnet50"})


def test_weights_of_another_model_are_refused():
    from cls.models import resnet

    with torch.device("meta"):
        other = resnet.resnet50().state_dict()
    says = r"r50\.pth does not fit this model: \d+% .* are unknown to it; it is a checkpoint of resnet50"
    with pytest.raises(SystemExit, match=says):
        ckpt.load_model_weights(resnet.resnet18(), other, source="r50.pth",
                                holds=ckpt.describe({"model": other, "extra": {"arch": "resnet50"}}))
    assert ckpt.describe({"state_dict": {"backbone.conv1.weight": 0, "neck.x": 0}}) == \
        "it holds 2 entries under backbone.*, neck.*"


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
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 3))  # the matching first layer holds most of the values
    source = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 10)).state_dict()
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
    # YOLOX (mmdet's QuadraticWarmupLR, CosineAnnealingLR to eta_min, ConstantLR): 10 warmup steps from 0, cosine
    # over steps 10-90 to 0.05, held there for the last 10
    yolox = dict(base_lr=1.0, total_steps=100, warmup_steps=10, warmup="quadratic", min_lr=0.05, hold_steps=10)
    assert [lr_at(s, **yolox) for s in (0, 4, 9)] == pytest.approx([0.01, 0.25, 1.0])
    assert lr_at(50, **yolox) == pytest.approx(0.525) and lr_at(90, **yolox) == pytest.approx(0.05)
    assert lr_at(99, **yolox) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="unknown warmup"):
        lr_at(0, base_lr=1.0, total_steps=10, warmup_steps=2, warmup="cubic")
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
    assert len(lines) == 3 and re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d Epoch \[0\] \[2/5\]", lines[0])
    assert "img/s" in lines[0]
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["iter"] for r in records] == [2, 4, 5]
    assert records[-1]["loss_avg"] == pytest.approx(2.0) and records[-1]["loss"] == pytest.approx(2.0)
    assert records[-1]["epoch"] == 0 and math.isfinite(records[-1]["img_s"])


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--batch-size", "0"], ["-b", "-2"], ["--lr", "nan"],
                                   ["--lr", "inf"], ["--lr", "-0.1"], ["--device", "npu:abc"], ["--device", "cpu:abc"],
                                   ["--device", "tpu"], ["--workers", "-1"], ["--print-freq", "0"]])
@pytest.mark.parametrize("script", ["train_cls", "train_det"])
def test_bad_flags_are_argparse_errors(script, flags, capsys):
    module = __import__(script)
    parse = module.parse_args if script == "train_det" else module.get_args_parser().parse_args
    with pytest.raises(SystemExit) as e:
        parse(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: argument (\S+/)?{flags[0]}[/:]", err), err


def test_train_det_help_shows_the_chosen_recipe(capsys):
    import train_det

    with pytest.raises(SystemExit):
        train_det.parse_args(["--model", "retinanet_r18", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "retinanet_r18's mmdet recipe" in text and "--blr BLR the recipe's LR for --lr-batch images per step " \
        "(default: 0.005)" in text and "(default: 800)" in text
    args = train_det.parse_args(["--model", "ssd300", "--lr", "0.02", "-b", "4", "--wd", "1e-3"])
    assert (args.blr, args.lr, args.batch_size, args.weight_decay, args.img_size) == (2e-3, 0.02, 4, 1e-3, 300)
    assert train_det.parse_args(["--model", "ssd300", "--lr-scheduler", "cosine"]).lr_scheduler == "cosine"
    assert train_det.parse_args(["--schedule", "cosine"]).lr_scheduler == "cosine"  # the old name still works


def test_torchvision_reference_names():
    import train_cls
    import train_det

    cls = train_cls.get_args_parser().parse_args(
        ["--model", "resnet18", "--lr-scheduler", "cosineannealinglr", "--lr-min", "1e-5", "--clip-grad-norm", "2",
         "--norm-weight-decay", "1e-5", "--start-epoch", "3", "--model-ema", "--use-deterministic-algorithms",
         "-j", "3", "--lr-warmup-epochs", "2"])
    assert (cls.arch, cls.lr_scheduler, cls.min_lr, cls.clip_grad, cls.norm_weight_decay, cls.start_epoch) == \
        ("resnet18", "cosine", 1e-5, 2.0, 1e-5, 3)
    assert cls.ema and cls.deterministic and cls.workers == 3 and cls.warmup_epochs == 2
    assert train_cls.get_args_parser().parse_args(["--lr-scheduler", "steplr"]).lr_scheduler == "step"
    det = train_det.parse_args(["--model", "retinanet_r18", "--weights-backbone", "r18.pth", "--lr-scheduler",
                                "multisteplr", "--clip-grad-norm", "10", "--weight-decay", "1e-3"])
    assert (det.backbone_weights, det.lr_scheduler, det.clip_grad, det.weight_decay) == \
        ("r18.pth", "multistep", 10.0, 1e-3)


def test_norm_weight_decay_and_start_epoch():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    groups = build_optimizer("sgd", model, 0.1, weight_decay=1e-4, norm_weight_decay=1e-5).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 1e-4), (3, 1e-5)]
    fresh = ckpt.restore_training_state(None, model=model, optimizer=None, scaler=None, model_ema=None, rank=0,
                                        world_size=1, device=torch.device("cpu"), start_epoch=3, steps_per_epoch=10)
    assert fresh == {"epoch": 3, "batch": 0, "step": 30, "best_metric": float("-inf")}


def test_bias_lr_mult_and_bias_decay_follow_mmengine():
    """FCOS's paramwise_cfg (bias_lr_mult 2, bias_decay_mult 0) as mmengine's DefaultOptimWrapperConstructor applies
    it: conv biases at 2 x the LR without decay, norm shifts at the LR without decay, norm scales and other
    parameters of at most one dimension (FCOS's Scale) decaying as before. The defaults keep two groups."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, bias=False))
    model.scale = nn.Parameter(torch.tensor(1.0))
    optimizer = build_optimizer("sgd", model, 0.1, weight_decay=1e-4, norm_weight_decay=1e-4, bias_weight_decay=0.0,
                                bias_lr_mult=2.0)
    groups = optimizer.param_groups
    assert [{id(p) for p in g["params"]} for g in groups] == [
        {id(model[0].weight), id(model[2].weight)}, {id(model.scale), id(model[1].weight)}, {id(model[0].bias)},
        {id(model[1].bias)}]
    assert [g["weight_decay"] for g in groups] == [1e-4, 1e-4, 0.0, 0.0]
    apply_gradients(optimizer, torch.amp.GradScaler("cpu", enabled=False), model.parameters(), lr=0.05)
    assert [g["lr"] for g in groups] == [0.05, 0.05, 0.1, 0.05]
    assert [len(g["params"]) for g in param_groups(model, 1e-4)] == [2, 4]
    assert [g["weight_decay"] for g in param_groups(model, 1e-4, 1e-5, bias_lr_mult=2.0)] == [1e-4, 1e-5, 1e-5, 1e-5]


def test_a_signal_on_another_rank_stops_this_one_too(monkeypatch):
    """A rank that did not receive the signal still gets a name to print, not an IndexError."""
    from common import loop

    monkeypatch.setattr(loop, "_STOP", [])
    monkeypatch.setattr(loop, "any_rank", lambda flag: True)  # another rank got SIGTERM
    assert loop.stop_requested() == "a signal on another rank"
    monkeypatch.setattr(loop, "any_rank", lambda flag: flag)
    assert loop.stop_requested() is None


def test_exp_momentum_ema_follows_mmdet():
    """ema_model with gamma is mmdet's ExpMomentumEMA: the first update copies, the n-th after it mixes the new
    weights in with (1 - m) exp(-(1 + n) / gamma) + m; integer buffers are copied."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).train()
    ema = ema_model(model, decay=0.9, gamma=3.0)  # m = 0.1: large enough that a wrong weight shows
    want = {}
    for n in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model(torch.randn(4, 2, generator=torch.Generator().manual_seed(n)))
        ema.update_parameters(model)
        weight = 0.9 * math.exp(-(1 + n) / 3.0) + 0.1
        for k, v in model.state_dict().items():
            want[k] = v.clone() if n == 0 or not v.is_floating_point() else want[k] * (1 - weight) + v * weight
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, want[k], msg=k)


def test_ema_evaluated_instead_of_the_model(tmp_path):
    """--ema-eval instead (mmdet's EMAHook): only the average is evaluated, its figures pick best.pth, and the
    checkpoint's weights for --weights / predict are the average's; beside (torchvision's): both evaluated, the
    model's figures and weights count."""
    from common.loop import evaluate_and_log
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ema_model(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # the model moves on; the average stays behind
    evaluated = []

    def evaluate(m, header):
        evaluated.append(header)
        return {"AP": float(m(torch.ones(3, 2)).sum().detach())}

    for mode, headers in (("beside", ["Test", "Test (EMA)"]), ("instead", ["Test (EMA)"])):
        evaluated.clear()
        args = argparse.Namespace(ema_eval=mode, log_file=tmp_path / f"{mode}.jsonl")
        stats = evaluate_and_log(evaluate, model, ema, args, epoch=0)
        logged = [json.loads(line) for line in args.log_file.read_text().splitlines()]
        assert evaluated == headers and [r["mode"] for r in logged] == ["val", "val_ema"][-len(headers):]
        assert stats == {k: v for k, v in logged[0 if mode == "beside" else -1].items() if k == "AP"}
        checkpoint = {"model": model.state_dict(), "model_ema": ema.state_dict(), "args": {"ema_eval": mode}}
        want = (model if mode == "beside" else ema.module).state_dict()
        got = ckpt.state_dict_of(checkpoint)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(model[0].weight, ema.module[0].weight)  # the two cases differ
    assert ckpt.state_dict_of({"state_dict": {"w": 1}}) == {"w": 1}  # OpenMMLab's, and bare state dicts
    assert ckpt.state_dict_of({"w": 1}) == {"w": 1}


def _rank_norm_statistics(rank: int, init_file: str, out_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from common.dist import average_norm_statistics
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.BatchNorm2d(2, track_running_stats=False))
    model[1].running_mean.fill_(rank + 1.0)
    model[1].running_var.fill_(10.0 * (rank + 1))
    average_norm_statistics(model)
    torch.save(model.state_dict(), f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()


def test_norm_statistics_are_averaged_over_ranks(tmp_path):
    """mmdet's SyncNormHook before evaluation: each rank's BatchNorm running statistics become the ranks' mean."""
    torch.multiprocessing.spawn(_rank_norm_statistics, args=(str(tmp_path / "init"), str(tmp_path / "bn")), nprocs=2)
    for rank in range(2):
        state = torch.load(tmp_path / f"bn.{rank}")
        assert torch.equal(state["1.running_mean"], torch.full((2,), 1.5))
        assert torch.equal(state["1.running_var"], torch.full((2,), 15.0))


def test_full_batch_repeats_the_first_row_and_keeps_the_layout():
    from common.compile import full_batch

    images = torch.rand(3, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    full = full_batch(images, 8)
    assert full.shape == (8, 3, 4, 5) and full.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(full[:3], images) and all(torch.equal(row, images[0]) for row in full[3:])
    sizes = torch.tensor([[4, 5], [2, 3]])
    assert full_batch(sizes, 4).tolist() == [[4, 5], [2, 3], [4, 5], [4, 5]]
    assert full_batch(images, 3) is images and full_batch(images, 2) is images  # a full batch is left alone

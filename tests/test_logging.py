"""common/logger.py and common/plot.py: timestamps, an ETA over the whole run, the current LR, a line at least every
`max_interval` seconds, TensorBoard scalars; the curves PNG; progress while the synthetic COCO set is written."""
import datetime
import json
import re
import sys
import time

import pytest
import torch

from common import logger, plot
from common.logger import log_every, new_meters, write_json

CPU = torch.device("cpu")


class SlowSet(torch.utils.data.Dataset):
    """Items that take `seconds` each, as a slow step does."""

    def __init__(self, n: int, seconds: float):
        self.n, self.seconds = n, seconds

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.seconds)
        return i


def slow(n: int, seconds: float) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(SlowSet(n, seconds), batch_size=None)


def run(iterable, log_file=None, **kwargs) -> list[dict]:
    meters = new_meters()
    for i in log_every(iterable, meters, header="Epoch [0]", device=CPU, images_per_iter=4, log_file=log_file,
                       **{"print_freq": 2, **kwargs}):
        meters["loss"].append(torch.tensor(1.0 / (i + 1)))
        meters["lr"].append(0.1 - 0.01 * i)
    return [json.loads(line) for line in log_file.read_text().splitlines()] if log_file else []


def test_lines_and_records_carry_a_timestamp(tmp_path, capsys):
    before = datetime.datetime.now().astimezone().replace(microsecond=0)
    records = run(range(4), tmp_path / "log.jsonl")
    write_json(tmp_path / "log.jsonl", {"mode": "val", "epoch": 0, "top1": 50.0})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line, i in zip(lines, (2, 4), strict=True):
        assert re.match(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d Epoch \[0\] \[{i}/4\] eta ", line), line
    records.append(json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1]))
    for r in records:
        stamp = datetime.datetime.fromisoformat(r["timestamp"])
        assert stamp.tzinfo is not None and before <= stamp <= before + datetime.timedelta(seconds=60)
    assert records[-1]["mode"] == "val"  # evaluation records get one too


def test_eta_covers_the_rest_of_the_run(tmp_path):
    log_file = tmp_path / "log.jsonl"
    for epoch in range(2):  # two epochs of 4 batches: at the end of the first, 4 batches are left
        run(slow(4, 0.01), log_file, print_freq=4, run_done=epoch * 4, run_total=2 * 4)
    first, second = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert first["eta_s"] == pytest.approx(4 * first["time"]) and first["eta_s"] > 0.03
    assert second["eta_s"] == 0
    alone = run(slow(4, 0.01), tmp_path / "pass.jsonl", print_freq=2)  # an evaluation pass: its own ETA
    assert alone[0]["eta_s"] == pytest.approx(2 * alone[0]["time"]) and alone[-1]["eta_s"] == 0


def test_lr_is_shown_as_its_current_value(tmp_path, capsys):
    records = run(range(6), tmp_path / "log.jsonl", print_freq=6)
    assert records[-1]["lr"] == pytest.approx(0.05) and "lr_avg" not in records[-1]  # not the median 0.075
    assert records[-1]["loss"] == pytest.approx((1 / 3 + 1 / 4) / 2) and "loss_avg" in records[-1]
    line = capsys.readouterr().out
    assert " lr 0.05 time" in line and " loss 0.2917 (0.4083) " in line


def test_a_line_comes_every_max_interval_seconds(capsys):
    run(slow(8, 0.03), print_freq=1000, max_interval=0.05)
    quick = capsys.readouterr().out.splitlines()
    run(slow(8, 0.03), print_freq=1000)
    assert len(quick) >= 3 and len(capsys.readouterr().out.splitlines()) == 1  # the 30 s default: the last only


def test_tensorboard_gets_every_record(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(logger, "_TENSORBOARD", {})
    log_file = tmp_path / "log.jsonl"
    run(range(4), log_file, tensorboard=True, tags={"mode": "train", "epoch": 1})
    write_json(log_file, {"mode": "val", "epoch": 1, "step": 4, "top1": 50.0})
    logger._TENSORBOARD[log_file][0].close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0])).Reload()
    assert {"train/loss", "train/lr", "train/eta_s", "val/top1"} <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("train/lr")] == [(6, pytest.approx(0.09)), (8, pytest.approx(0.07))]
    assert [(e.step, e.value) for e in acc.Scalars("val/top1")] == [(8, 50.0)]  # at the last train record's step


def test_tensorboard_missing_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(SystemExit, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
        run(range(2), tmp_path / "log.jsonl", tensorboard=True)


@pytest.mark.parametrize("script", ["train_cls", "train_det"])
def test_tensorboard_flag(script):
    module = __import__(script)
    parse = module.parse_args if script == "train_det" else module.get_args_parser().parse_args
    assert parse(["--tensorboard"]).tensorboard and not parse([]).tensorboard


def write_log(path, train: list[dict], val: list[dict]):
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in train + val) + '{"mode": "tra')  # a line cut short


def test_plot_overlays_runs_in_one_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cls_log, det_log = tmp_path / "cls_run" / "log.jsonl", tmp_path / "det_run" / "log.jsonl"
    write_log(cls_log, [{"mode": "train", "epoch": e, "iter": i, "total": 4, "loss": 2.0 / (e * 4 + i), "loss_avg": 1,
                         "lr": 0.1} for e in range(2) for i in (2, 4)],
              [{"mode": "val", "epoch": e, "step": 4 * e + 4, "top1": 10.0 * e} for e in range(2)])
    write_log(det_log, [{"mode": "train", "epoch": 0, "iter": i, "total": 2, "loss": 1.0, "loss_cls": 0.6,
                         "loss_bbox": 0.4, "lr": 0.01 * i} for i in (1, 2)],
              [{"mode": "val", "epoch": 0, "step": 2, "AP": 1.0, "AP50": 3.0},
               {"mode": "val_ema", "epoch": 0, "step": 2, "AP": 1.5, "AP50": 3.5}])
    assert plot.curves(plot.read_log(cls_log))["loss"]["train"][:2] == [(0.5, 1.0), (1.0, 0.5)]
    out = tmp_path / "curves.png"
    plot.main([str(cls_log), str(det_log), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "loss, loss_bbox, loss_cls, lr, top1, AP, AP50" in capsys.readouterr().out


def test_plot_without_matplotlib_is_one_sentence(tmp_path, monkeypatch):
    log = tmp_path / "run" / "log.jsonl"
    write_log(log, [{"mode": "train", "epoch": 0, "iter": 1, "total": 1, "loss": 1.0, "lr": 0.1}], [])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"^common.plot needs matplotlib: pip install matplotlib$"):
        plot.main([str(log), "--out", str(tmp_path / "c.png")])


def test_synthetic_coco_prints_progress(tmp_path, capsys):
    from det.synthetic_coco import synthetic_coco

    synthetic_coco(tmp_path / "s", num_train=16, num_val=4)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "writing synthetic set: 20/20 images" and 3 <= len(lines) <= 11
    assert all(re.fullmatch(r"writing synthetic set: \d+/20 images", line) for line in lines)

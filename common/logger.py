"""Training logs: one line every `print_freq` iterations (or every `max_interval` seconds, whichever comes first),
the same records as JSON lines in OUTPUT_DIR/log.jsonl and, with --tensorboard, as TensorBoard scalars.

Meters are a plain dict of lists that the loop appends to (`meters["loss"].append(loss.detach())`). Appending
a device tensor costs no host sync; the values are turned into floats only when a line is printed, so a
step does not wait for the device except where a line is printed.
"""
import datetime
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from common.device import max_memory_mb
from common.dist import is_main_process, print0

LAST_VALUE_METERS = ("lr",)  # shown as their current value: a median over the window lags behind a schedule
_STARTED = time.perf_counter()  # the train scripts import this module first thing: the process's start
_TENSORBOARD: dict[Path, list] = {}  # log file -> [SummaryWriter, global step of the latest train record]


def new_meters() -> dict[str, list]:
    return defaultdict(list)


def elapsed() -> str:
    """H:MM:SS since this process started (since a resume, for a resumed run)."""
    return str(datetime.timedelta(seconds=int(time.perf_counter() - _STARTED)))


def _now() -> datetime.datetime:
    return datetime.datetime.now().astimezone().replace(microsecond=0)


def _to_floats(meters: dict[str, list]) -> None:
    for name, values in meters.items():
        meters[name] = [float(v) for v in values]  # the host sync, once per printed line


def open_tensorboard(log_file: Path | None) -> None:
    """From now on, every record written to `log_file` also goes to TensorBoard, in log_file's folder /tensorboard
    (rank 0 only). Exits with one sentence when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("error: --tensorboard needs the tensorboard package: pip install tensorboard") from None
    if log_file is not None and is_main_process() and log_file not in _TENSORBOARD:
        _TENSORBOARD[log_file] = [SummaryWriter(str(Path(log_file).parent / "tensorboard")), 0]


def _write_tensorboard(state: list, record: dict) -> None:
    writer = state[0]
    if {"epoch", "iter", "total"} <= record.keys():  # a train record: steps counted in batches
        state[1] = record["epoch"] * record["total"] + record["iter"]
    mode = record.get("mode", "train")
    for key, value in record.items():
        if key not in ("epoch", "iter", "total", "step") and isinstance(value, int | float) \
                and not isinstance(value, bool):
            writer.add_scalar(f"{mode}/{key}", value, state[1])  # val records: at the step of the last train one
    writer.flush()


def write_json(log_file: Path | None, record: dict) -> None:
    """Append one record, with its "timestamp" (ISO-8601 local time), to the JSON-lines log (rank 0 only); and to
    TensorBoard once open_tensorboard(log_file) was called."""
    if log_file is not None and is_main_process():
        record = {"timestamp": _now().isoformat(), **record}
        with open(log_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if log_file in _TENSORBOARD:
            _write_tensorboard(_TENSORBOARD[log_file], record)


def log_every(
    iterable: Iterable,
    meters: dict[str, list],
    *,
    print_freq: int,
    header: str,
    device: torch.device,
    images_per_iter: int,
    log_file: Path | None = None,
    tags: dict | None = None,
    window: int = 20,
    start: int = 0,
    run_done: int = 0,
    run_total: int | None = None,
    max_interval: float = 30.0,
    tensorboard: bool = False,
) -> Iterator:
    """Yield the items of `iterable`, printing progress every `print_freq` iterations, whenever `max_interval`
    seconds passed since the last line, and at the last iteration.
    `start`: the iterations already done before this call (a run resumed mid-epoch); `len(iterable)` is the total.
    `run_done`, `run_total`: the run's iterations before this pass's first one and in all (the epochs of a training
    run), so the ETA covers the whole run; without `run_total` it covers this pass only (an evaluation).
    `tensorboard`: also send the records of `log_file` to TensorBoard (open_tensorboard).

    A line shows its local time, each meter's median over the last `window` values and (in brackets) its mean so
    far (meters in LAST_VALUE_METERS: the current value), the iteration and data-loading times averaged since the
    last line, images/s over all ranks, ETA and peak memory.
    """
    if tensorboard:
        open_tensorboard(log_file)
    total = len(iterable)
    run_total = total + run_done if run_total is None else run_total
    last_print = end = time.perf_counter()
    data_time, since_print = 0.0, 0
    for i, item in enumerate(iterable, start=start):
        data_time += time.perf_counter() - end
        yield item
        since_print += 1
        end = time.perf_counter()
        if (i + 1) % print_freq and i + 1 != total and end - last_print < max_interval:
            continue
        _to_floats(meters)
        iter_time = (time.perf_counter() - last_print) / since_print
        shown = {k: v for k, v in meters.items() if v}
        record = {
            **(tags or {}),
            "iter": i + 1,
            "total": total,
            **{k: v[-1] if k in LAST_VALUE_METERS else statistics.median(v[-window:]) for k, v in shown.items()},
            **{f"{k}_avg": statistics.fmean(v) for k, v in shown.items() if k not in LAST_VALUE_METERS},
            "time": iter_time,
            "data": data_time / since_print,
            "img_s": images_per_iter / iter_time,
            "eta_s": iter_time * max(run_total - run_done - i - 1, 0),
            "mem_mb": max_memory_mb(device),
        }
        fields = "".join(f"{k} {record[k]:.4g}" + ("" if k in LAST_VALUE_METERS else f" ({record[k + '_avg']:.4g})")
                         + " " for k in shown)
        eta = datetime.timedelta(seconds=int(record["eta_s"]))
        print0(
            f"{_now():%Y-%m-%d %H:%M:%S} {header} [{i + 1:>{len(str(total))}}/{total}] eta {eta} {fields}"
            f"time {iter_time:.3f} data {record['data']:.3f} img/s {record['img_s']:.1f} mem {record['mem_mb']:.0f}MB"
        )
        write_json(log_file, record)
        last_print, data_time, since_print = time.perf_counter(), 0.0, 0

"""Training logs: one line every `print_freq` iterations, the same records as JSON lines in OUTPUT_DIR/log.jsonl.

Meters are a plain dict of lists that the loop appends to (`meters["loss"].append(loss.detach())`). Appending
a device tensor costs no host sync; the values are turned into floats only when a line is printed, so a
step does not wait for the device except every `print_freq` iterations.
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


def new_meters() -> dict[str, list]:
    return defaultdict(list)


def _to_floats(meters: dict[str, list]) -> None:
    for name, values in meters.items():
        meters[name] = [float(v) for v in values]  # the host sync, once per printed line


def write_json(log_file: Path | None, record: dict) -> None:
    """Append one record to the JSON-lines log (rank 0 only)."""
    if log_file is not None and is_main_process():
        with open(log_file, "a") as f:
            f.write(json.dumps(record) + "\n")


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
) -> Iterator:
    """Yield the items of `iterable`, printing progress every `print_freq` iterations and at the last one.
    `start`: the iterations already done before this call (a run resumed mid-epoch); `len(iterable)` is the total.

    A line shows each meter's median over the last `window` values and (in brackets) its mean so far, the
    iteration and data-loading times averaged since the last line, images/s over all ranks, ETA and peak memory.
    """
    total = len(iterable)
    last_print = end = time.perf_counter()
    data_time, since_print = 0.0, 0
    for i, item in enumerate(iterable, start=start):
        data_time += time.perf_counter() - end
        yield item
        since_print += 1
        end = time.perf_counter()
        if (i + 1) % print_freq and i + 1 != total:
            continue
        _to_floats(meters)
        iter_time = (time.perf_counter() - last_print) / since_print
        record = {
            **(tags or {}),
            "iter": i + 1,
            "total": total,
            **{k: statistics.median(v[-window:]) for k, v in meters.items() if v},
            **{f"{k}_avg": statistics.fmean(v) for k, v in meters.items() if v},
            "time": iter_time,
            "data": data_time / since_print,
            "img_s": images_per_iter / iter_time,
            "eta_s": iter_time * (total - i - 1),
            "mem_mb": max_memory_mb(device),
        }
        fields = " ".join(f"{k} {record[k]:.4g} ({record[k + '_avg']:.4g})" for k in meters if meters[k])
        eta = datetime.timedelta(seconds=int(record["eta_s"]))
        print0(
            f"{header} [{i + 1:>{len(str(total))}}/{total}] eta {eta} {fields} time {iter_time:.3f} "
            f"data {record['data']:.3f} img/s {record['img_s']:.1f} mem {record['mem_mb']:.0f}MB"
        )
        write_json(log_file, record)
        last_print, data_time, since_print = time.perf_counter(), 0.0, 0

"""Pieces of the training loop that classification and detection share, kept as plain functions."""
import argparse
import os
import signal
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.compile import compile_model
from common.dist import any_rank, average_norm_statistics, print0, stop_if_not_finite
from common.logger import write_json
from common.optim import apply_gradients, ema_model


def wrap_model(model: nn.Module, args: argparse.Namespace, device: torch.device):
    """Move `model` to the device and wrap it as the runtime flags ask: SyncBatchNorm (npu/cuda only: torch has no
    CPU kernel), an EMA copy, --compile (common/compile.py), DistributedDataParallel under torchrun. Returns (model
    for the step, the unwrapped model that checkpoints hold, the EMA model or None)."""
    model.to(device, memory_format=args.memory_format)
    if args.sync_bn and args.world_size > 1:
        if device.type == "cpu":
            print0("warning: --sync-bn ignored: torch's SyncBatchNorm runs on npu/cuda only")
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    unwrapped = model
    model_ema = ema_model(unwrapped, args.ema_decay, args.ema_gamma) if args.ema else None  # copied before compiling
    if args.compile:  # in place: the module (and its state_dict names) stays the same, DDP wraps the compiled one
        compile_model(unwrapped, device)
        if model_ema is not None:
            compile_model(model_ema.module, device)
    if args.world_size > 1:
        model = DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device.index])
    return model, unwrapped, model_ema


def evaluate_and_log(evaluate: Callable[..., dict], model: nn.Module, model_ema: nn.Module | None,
                     args: argparse.Namespace, **tags) -> dict:
    """Run the script's `evaluate(model, header=...)` on the model and, with --ema, on its average (--ema-eval
    instead: on the average alone); append the results to the JSON log (modes "val", "val_ema") with `tags` (epoch,
    step); return the ones that pick best.pth: the model's, or the average's with --ema-eval instead. Each evaluated
    model's BatchNorm statistics are first averaged over the ranks (mmdet's SyncNormHook)."""
    stats = None
    if model_ema is None or args.ema_eval == "beside":
        average_norm_statistics(model)
        stats = evaluate(model, header="Test")
        write_json(args.log_file, {"mode": "val", **tags, **stats})
    if model_ema is not None:
        average_norm_statistics(model_ema)
        ema_stats = evaluate(model_ema, header="Test (EMA)")
        write_json(args.log_file, {"mode": "val_ema", **tags, **ema_stats})
        stats = stats if args.ema_eval == "beside" else ema_stats
    return stats


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   model_ema: nn.Module | None, *, step: int, lr: float, args: argparse.Namespace) -> int:
    """The end of an accumulation: one optimizer step at `lr` (clipped as --clip-grad says), the EMA updated every
    --ema-steps steps. Returns the new global step."""
    apply_gradients(optimizer, scaler, model.parameters(), lr=lr, clip_grad=args.clip_grad or 0.0)
    step += 1
    if model_ema is not None and step % args.ema_steps == 0:
        model_ema.update_parameters(model.module if isinstance(model, DistributedDataParallel) else model)
    return step


_STOP: list[str] = []  # the name of the signal that asked the run to stop, once one has


def _request_stop(signum: int, frame) -> None:
    if not _STOP:
        _STOP.append(signal.Signals(signum).name)
        os.write(2, f"{_STOP[0]}: finishing this step, then saving a checkpoint and stopping\n".encode())
    if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops at once


def install_stop_handlers() -> None:
    """SIGTERM (what cluster schedulers send before they kill a job) and SIGINT (Ctrl-C) let the current step finish;
    the loop then writes a checkpoint and the script exits 0 (`stop_requested`). Installed before the data loaders
    start their workers, which inherit it: they keep serving the last batches instead of dying with the signal."""
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)


def stop_requested() -> str | None:
    """Once any rank received SIGTERM or SIGINT, the signal's name (on the ranks that did not, "a signal on another
    rank"); every rank gets an answer at the same step. None otherwise."""
    if not any_rank(bool(_STOP)):
        return None
    return _STOP[0] if _STOP else "a signal on another rank"


def after_optimizer_step(finite: torch.Tensor, *, epoch: int, batch: int, step: int, args: argparse.Namespace,
                         save: Callable[..., None]) -> bool:
    """Called after each optimizer step: with a stop signal, or every --save-every steps, check the loss is finite
    and `save(epoch=, batch=, step=)` a mid-epoch checkpoint (`batch`: the epoch's batches trained so far). Returns
    True when the run must stop now."""
    stop = stop_requested()
    if stop or (args.save_every and step % args.save_every == 0):
        stop_if_not_finite(finite, epoch, step, args.output_dir)
        save(epoch=epoch, batch=batch, step=step)
    return stop is not None


def stopped_message(args: argparse.Namespace, step: int) -> str:
    return (f"stopped by {_STOP[0] if _STOP else 'a signal'} after step {step}: {args.output_dir}/last.pth holds it; "
            "the same command with --resume auto continues exactly there")

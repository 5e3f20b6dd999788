"""Checkpoints as one plain dict, written atomically by rank 0, read back with `weights_only=True`.

A training checkpoint holds: model, optimizer, scaler, model_ema (or None), epoch (the next one to run),
step (global optimizer step: the LR is recomputed from it), best_metric, args, extra (e.g. class names) and
rng (python / numpy / torch / device generator states), so `--resume` continues exactly where it stopped.
"""
import argparse
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.dist import all_gather_objects, is_main_process, print0


def rng_state(device: torch.device) -> dict:
    """Every random generator a training step draws from, in a form `weights_only` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if device.type != "cpu":
        state["device"] = getattr(torch, device.type).get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "device" in state and device.type != "cpu":
        getattr(torch, device.type).set_rng_state(state["device"], device)


def restore_rng(states: list[dict], rank: int, world_size: int, device: torch.device) -> None:
    """Give each rank back its own generators (the checkpoint stores one state per rank)."""
    if len(states) == world_size:
        set_rng_state(states[rank], device)
    else:
        print0(f"warning: checkpoint was written by {len(states)} processes, this run has {world_size}: "
               "training continues, but not bit-exactly")


def prepare_output_dir(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def plain_args(args: argparse.Namespace) -> dict:
    """The command-line arguments as plain values (loadable with `weights_only=True`)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
            if v is None or isinstance(v, (bool, int, float, str, list, tuple, Path))}


def _atomic_save(obj: object, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a torn checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(state: dict, output_dir: str | Path, *, is_best: bool = False, keep: int = 0) -> None:
    """Rank 0 writes `last.pth`; also `best.pth` when `is_best`, and `epoch_NNNN.pth`, keeping the newest `keep`."""
    if not is_main_process():
        return
    output_dir = prepare_output_dir(output_dir)
    last = output_dir / "last.pth"
    _atomic_save(state, last)
    if is_best:
        shutil.copyfile(last, output_dir / ".best.pth.tmp")
        os.replace(output_dir / ".best.pth.tmp", output_dir / "best.pth")
    if keep > 0:
        numbered = output_dir / f"epoch_{state['epoch']:04d}.pth"
        shutil.copyfile(last, numbered)
        for old in sorted(output_dir.glob("epoch_*.pth"))[:-keep]:
            old.unlink()


def load_checkpoint(path: str | Path) -> dict:
    """Load on CPU without executing pickled code (`weights_only=True`)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: checkpoint {path} does not exist") from None


def resume_path(resume: str, output_dir: str | Path) -> Path | None:
    """`--resume auto` means OUTPUT_DIR/last.pth if it exists (a fresh start otherwise); any other value is a path."""
    if not resume:
        return None
    if resume == "auto":
        last = Path(output_dir) / "last.pth"
        return last if last.exists() else None
    return Path(resume)


def training_state(
    *, model: nn.Module, optimizer, scaler, model_ema, epoch: int, step: int, best: float, args, extra: dict,
    device: torch.device,
) -> dict:
    """Everything `--resume` needs, as one plain dict. Collective: every rank must call it (RNG states are gathered)."""
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "model_ema": model_ema.state_dict() if model_ema is not None else None,
        "epoch": epoch, "step": step, "best_metric": best, "rng": all_gather_objects(rng_state(device)),
        "args": plain_args(args), "extra": extra,
    }


def restore_training_state(
    resume: str, output_dir: str | Path, *, model: nn.Module, optimizer, scaler, model_ema, rank: int,
    world_size: int, device: torch.device,
) -> tuple[int, int, float]:
    """`--resume PATH|auto`: load a `training_state` checkpoint into the live objects and return (next epoch, global
    step, best metric); (0, 0, 0.0), a fresh start, when there is nothing to resume."""
    path = resume_path(resume, output_dir)
    if path is None:
        return 0, 0, 0.0
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if model_ema is not None and state["model_ema"] is not None:
        model_ema.load_state_dict(state["model_ema"])
    restore_rng(state["rng"], rank, world_size, device)
    print0(f"resumed from {path}: epoch {state['epoch']}, step {state['step']}")
    return state["epoch"], state["step"], state["best_metric"]


def load_model_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load what fits, report what does not: missing keys, unexpected keys, and keys whose shapes differ
    (e.g. a 1000-class head into a 10-class model). Returns the three lists; prints them when not empty."""
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    fitting = {k: v for k, v in state_dict.items() if k not in mismatched}
    result = model.load_state_dict(fitting, strict=False)
    report = {
        "missing": [k for k in result.missing_keys if k not in mismatched],
        "unexpected": list(result.unexpected_keys),
        "shape_mismatch": [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                           for k in mismatched],
    }
    for what, keys in report.items():
        if keys:
            print0(f"weights: {len(keys)} {what.replace('_', ' ')} key(s):\n  " + "\n  ".join(keys))
    return report

"""Checkpoints as one plain dict, written atomically by rank 0, read back with `weights_only=True`.

A training checkpoint holds: model, optimizer, scaler, model_ema (or None), epoch (the next one to run, or the one
in progress), batch (batches of that epoch already trained: 0 at an epoch's end, more in a mid-epoch checkpoint),
step (global optimizer step: the LR is recomputed from it), best_metric, args, extra (e.g. class names) and
rng (python / numpy / torch / device generator states), so `--resume` continues exactly where it stopped.
"""
import argparse
import os
import pickle
import random
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


TEMP_SUFFIX = ".tmp"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself reaches the disk
    finally:
        os.close(fd)


def _atomic_save(obj: object, path: Path) -> None:
    """Write to `.NAME.tmp` in the same folder, flush it to the disk (fsync), then rename it over `path`
    (`os.replace` is atomic): a kill or a power cut at any moment leaves the old file or the new one, never a torn
    one."""
    tmp = path.with_name(f".{path.name}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def remove_stale_temp_files(output_dir: str | Path) -> list[Path]:
    """Delete the `.*.pth.tmp` files a killed run left behind (rank 0, at start); returns them."""
    stale = sorted(Path(output_dir).glob(f".*.pth{TEMP_SUFFIX}")) if Path(output_dir).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict, output_dir: str | Path, *, is_best: bool = False, keep: int = 0) -> None:
    """Rank 0 writes `best.pth` when `is_best`, `epoch_NNNN.pth` when `keep` > 0 (the newest `keep` are kept), then
    `last.pth`, each atomically. The order matters: `last.pth` is what `--resume auto` continues from, so it is
    written last; a kill before it leaves the previous `last.pth`, the resumed run repeats the same steps exactly and
    writes the same `best.pth` again, so no best checkpoint is ever lost. Only epoch ends (state["batch"] == 0) make
    numbered copies."""
    if not is_main_process():
        return
    output_dir = prepare_output_dir(output_dir)
    if is_best:
        _atomic_save(state, output_dir / "best.pth")
    if keep > 0 and state.get("batch", 0) == 0:
        _atomic_save(state, output_dir / f"epoch_{state['epoch']:04d}.pth")
        for old in sorted(output_dir.glob("epoch_*.pth"))[:-keep]:
            old.unlink()
    _atomic_save(state, output_dir / "last.pth")


def load_checkpoint(path: str | Path) -> dict:
    """Load on CPU without executing pickled code (`weights_only=True`). A missing, empty, truncated or foreign file
    stops the run with one sentence naming it."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"error: checkpoint {path} does not exist")
    if path.is_dir():
        raise SystemExit(f"error: checkpoint {path} is a folder, not a file (did you mean {path / 'last.pth'}?)")
    if path.stat().st_size == 0:
        raise SystemExit(f"error: checkpoint {path} is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        # truncated zip ("PytorchStreamReader failed ..."), not a torch file, or pickled code weights_only refuses
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: cannot read checkpoint {path}: it is truncated or not a PyTorch checkpoint "
                         f"({reason})") from None
    if not isinstance(state, dict):
        raise SystemExit(f"error: checkpoint {path} holds a {type(state).__name__}, not a dict of tensors")
    return state


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
    device: torch.device, batch: int = 0,
) -> dict:
    """Everything `--resume` needs, as one plain dict: `epoch` is the epoch to run next, or the one in progress
    when `batch` (the batches of it already trained) is not 0. Collective: every rank must call it (RNG states are
    gathered)."""
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "model_ema": model_ema.state_dict() if model_ema is not None else None,
        "epoch": epoch, "batch": batch, "step": step, "best_metric": best, "rng": all_gather_objects(rng_state(device)),
        "args": plain_args(args), "extra": extra,
    }


def load_resume(resume: str, output_dir: str | Path, identity: dict[str, str]) -> dict | None:
    """`--resume PATH|auto`: {"path", "state"} of the training checkpoint to continue, None for a fresh start.
    `identity` (e.g. {"arch": "resnet18"}) must match the checkpoint's `extra`, so a checkpoint of another model is
    refused in one sentence, as is a weights-only file. Loaded before the model is built: its `extra` may say how
    (train_det.py's backbone settings)."""
    path = resume_path(resume, output_dir)
    if path is None:
        return None
    state = load_checkpoint(path)
    if not {"model", "optimizer", "epoch", "step"} <= state.keys():
        raise SystemExit(f"error: {path} is not a training checkpoint of this script (it has no optimizer state or "
                         "step count): pass it with --weights to start from its weights")
    for key, name in identity.items():
        theirs = state.get("extra", {}).get(key)
        if theirs != name:
            raise SystemExit(f"error: cannot resume from {path}: this checkpoint is for {theirs}, not {name}")
    return {"path": path, "state": state}


def restore_training_state(
    resume: dict | None, *, model: nn.Module, optimizer, scaler, model_ema, rank: int, world_size: int,
    device: torch.device, start_epoch: int = 0, steps_per_epoch: int = 0,
) -> dict:
    """Load `load_resume`'s checkpoint into the live objects. Returns {"epoch": epoch to run, "batch": batches of it
    already trained (0: from its start), "step": global optimizer step, "best_metric"}. With `resume` None, a fresh
    start at `start_epoch` (torchvision's --start-epoch: the step, hence the LR, as if the earlier epochs had run),
    whose best metric is -inf so that the first evaluation writes best.pth whatever it scores."""
    if resume is None:
        return {"epoch": start_epoch, "batch": 0, "step": start_epoch * steps_per_epoch, "best_metric": float("-inf")}
    if start_epoch:
        print0(f"--start-epoch {start_epoch} ignored: --resume continues where the checkpoint stopped")
    path, state = resume["path"], resume["state"]
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # e.g. another number of classes: torch lists every key, say it in one sentence
        raise SystemExit(f"error: cannot resume from {path}: its weights do not fit this model "
                         f"({str(e).splitlines()[-1].strip()[:200]})") from None
    kernels = {k: v for k, v in optimizer.defaults.items() if k in ("fused", "foreach")}
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:  # this device's kernels, not those of the device that saved the state
        group.update(kernels)
    scaler.load_state_dict(state["scaler"])
    if model_ema is not None and state["model_ema"] is not None:
        model_ema.load_state_dict(state["model_ema"])
    restore_rng(state["rng"], rank, world_size, device)
    batch = state.get("batch", 0)
    print0(f"resumed from {path}: epoch {state['epoch']}" + (f" after batch {batch}" if batch else "")
           + f", step {state['step']}")
    return {"epoch": state["epoch"], "batch": batch, "step": state["step"], "best_metric": state["best_metric"]}


def state_dict_of(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint: for a training checkpoint of ours ({"model": ...}) the ones it is used with
    (--weights, --test-only, predict), which are its EMA's when the run evaluated the average in place of the model
    (--ema-eval instead, as mmdet's EMAHook saves the average as the weights); OpenMMLab's {"state_dict": ...}; or
    the checkpoint itself (a bare state dict, torchvision's). Names as stored (`module.` prefixes included)."""
    if "model" not in checkpoint:
        return checkpoint.get("state_dict", checkpoint)
    ema, args = checkpoint.get("model_ema"), checkpoint.get("args") or {}
    if ema is None or args.get("ema_eval") != "instead":
        return checkpoint["model"]
    return {k.removeprefix("module."): v for k, v in ema.items() if k != "n_averaged"}  # AveragedModel's names


def describe(checkpoint: dict) -> str:
    """What a checkpoint holds, for error messages: our scripts' model name, else its leading key prefixes."""
    extra = checkpoint.get("extra") if isinstance(checkpoint.get("extra"), dict) else {}
    if extra.get("arch") or extra.get("model"):
        return f"it is a checkpoint of {extra.get('arch') or extra.get('model')}"
    tensors = state_dict_of(checkpoint)
    prefixes = sorted({k.removeprefix("module.").split(".")[0] for k in tensors if isinstance(k, str)})
    return f"it holds {len(tensors)} entries under {', '.join(p + '.*' for p in prefixes[:6])}"


def load_model_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str = "the checkpoint",
                       holds: str = "") -> dict[str, list[str]]:
    """Load what fits, report what does not: missing keys, unexpected keys, and keys whose shapes differ
    (e.g. a 1000-class head into a 10-class model). Returns the three lists; prints them when not empty.
    Refuses (SystemExit) when the checkpoint plainly belongs to another model: under half of the model's values
    (elements of its state dict) find a same-named, same-shaped tensor, or over half of the checkpoint's tensors have
    no name in the model (ResNet-50 weights into a ResNet-18 match half of its values, its 3x3 convs, but bring 200
    tensors it does not have). A new classification head, or a classifier left unused by a detector's backbone, is a
    near miss: loaded, and reported. `source` names the file and `holds` (from `describe`) says what it is."""
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    fitting = {k: v for k, v in state_dict.items() if k not in mismatched}
    total = sum(v.numel() for v in own.values())
    matched = sum(own[k].numel() for k in fitting if k in own)
    foreign = sum(k not in own for k in state_dict)
    if total and (matched < total / 2 or foreign > len(state_dict) / 2):
        raise SystemExit(f"error: {source} does not fit this model: {matched / total:.0%} of the model's values find "
                         f"a same-named, same-shaped tensor, and {foreign} of its {len(state_dict)} tensors are "
                         "unknown to it" + (f"; {holds}" if holds else ""))
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

"""Command-line pieces both training scripts share: the help formatter, the runtime flags and their set-up."""
import argparse
import math
import os
import re

import torch

from common.checkpoint import prepare_output_dir, remove_stale_temp_files
from common.device import resolve_device, seed_everything
from common.dist import bind_cores, init_distributed, is_main_process, print0
from common.logger import open_tensorboard
from common.loop import install_stop_handlers


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keep the description's line breaks (it holds example commands) and show every flag's default, except the
    None / False of optional flags and switches, whose help says what their absence means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action) if action.help else "(default: %(default)s)"


# argparse `type=` checks: a bad value is an argparse error at start ("argument --epochs: ..."), not a late crash
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite float >= 0 (learning rates, decays, clipping norms): 'nan' and 'inf' are refused."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return value


# torchvision's references name the schedules after their torch classes
TORCHVISION_SCHEDULERS = {"steplr": "step", "multisteplr": "multistep", "cosineannealinglr": "cosine"}


def scheduler_name(text: str) -> str:
    """Ours (multistep, step, cosine, poly) or torchvision's (steplr, multisteplr, cosineannealinglr)."""
    return TORCHVISION_SCHEDULERS.get(text.lower(), text.lower())


def device_name(text: str) -> str:
    """auto, cpu, npu, cuda, or npu:N / cuda:N (N a device index)."""
    if not re.fullmatch(r"auto|cpu|(npu|cuda)(:\d+)?", text.lower()):
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, cpu, npu, cuda, npu:N or cuda:N (N a device index)")
    return text.lower()


def add_runtime_args(parser: argparse.ArgumentParser, output_dir: str) -> None:
    """Where and how a run executes, saves and logs: the same flags for classification and detection."""
    g = parser.add_argument_group("device and performance")
    g.add_argument("--device", default="auto", type=device_name,
                   help="auto (npu, then cuda, then cpu), npu, cuda, cpu; or npu:N, cuda:N")
    g.add_argument("-j", "--workers", type=non_negative_int,
                   help="data-loader processes per device (default: its CPUs - 1, at most 8)")
    g.add_argument("--amp", action="store_true", help="mixed precision: fp16 + loss scaling on npu/cuda, bf16 on cpu")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convs on GPUs)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward, in training the whole step's (detection: network, "
                        "assignment and loss), and the evaluation's: inductor on cpu/cuda, torchair on npu; one "
                        "graph per input shape, each logged when compiled; checkpoints stay those of the eager model")
    g.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across devices")
    g.add_argument("--bind-cores", action="store_true",
                   help="ARM servers: pin each rank and its loader workers to its own CPU slice (dist_train_arm.sh)")
    g.add_argument("--jit-compile", action="store_true", help="NPU: compile operators online (default: binary kernels)")
    g = parser.add_argument_group("checkpoints, logging, evaluation")
    g.add_argument("--output-dir", default=output_dir, help="checkpoints (last.pth, best.pth) and log.jsonl")
    g.add_argument("--resume", default="", help="checkpoint to continue exactly, or 'auto' for OUTPUT_DIR/last.pth")
    g.add_argument("--weights", help="initial model weights only (ours, torchvision's or OpenMMLab's; see README)")
    g.add_argument("--start-epoch", type=non_negative_int, default=0,
                   help="start a fresh run at this epoch, its LR as if the earlier ones had run (torchvision's flag; "
                        "--resume sets it from the checkpoint)")
    g.add_argument("--keep", type=non_negative_int, default=0, help="also keep the newest N epoch_NNNN.pth files")
    g.add_argument("--save-every", type=non_negative_int, default=0,
                   help="also write last.pth every N optimizer steps (0: at epoch ends only); SIGTERM / Ctrl-C "
                        "always writes one before stopping")
    g.add_argument("--test-only", action="store_true", help="evaluate --weights (or --resume) and exit")
    g.add_argument("--eval-interval", type=positive_int, default=1, help="evaluate every N epochs (and after the last)")
    g.add_argument("--print-freq", type=positive_int, default=20,
                   help="iterations between log lines (and a line at least every 30 s)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the log's scalars to OUTPUT_DIR/tensorboard (needs: pip install tensorboard)")
    g.add_argument("--ema", "--model-ema", action=argparse.BooleanOptionalAction, default=False,
                   help="keep and evaluate an exponential moving average of the weights")
    g.add_argument("--ema-eval", choices=["beside", "instead"], default="beside",
                   help="beside: the model and its average are both evaluated, best.pth by the model (torchvision's "
                        "references); instead: the average alone is evaluated, picks best.pth, and is what "
                        "--weights, --test-only and predict load from the checkpoint (mmdet's EMAHook)")
    g.add_argument("--ema-decay", "--model-ema-decay", type=non_negative_float, default=0.9998,
                   help="EMA weight of the old average per update")
    g.add_argument("--ema-gamma", type=positive_float,
                   help="mmdet's ExpMomentumEMA (YOLOX): the new weights' share starts near 1 and decays to "
                        "1 - --ema-decay over ~gamma updates (default: a constant decay)")
    g.add_argument("--ema-steps", "--model-ema-steps", type=positive_int, default=1,
                   help="update the EMA every this many optimizer steps")
    g.add_argument("--seed", type=int, default=0, help="seeds sampling, augmentation and initialisation")
    g.add_argument("--deterministic", "--use-deterministic-algorithms", action="store_true",
                   help="deterministic kernels: bit-exact reruns and resumes")


def default_workers() -> int:
    """The CPUs this process may use, shared among the ranks on this node, one left for the training loop; at most 8."""
    per_rank = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(8, max(0, per_rank - 1))


def setup_runtime(args: argparse.Namespace) -> tuple[torch.device, int]:
    """Act on the runtime flags: pick the device, join torchrun's process group, bind cores, seed, and prepare
    OUTPUT_DIR. Sets args.world_size, args.workers, args.memory_format and args.log_file; returns (device, rank)."""
    device = resolve_device(args.device, args.jit_compile)
    rank, args.world_size = init_distributed(device)
    cores = bind_cores() if args.bind_cores else None
    if args.workers is None:
        args.workers = len(cores) if cores else default_workers()
    seed_everything(args.seed + rank, args.deterministic)
    args.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    args.log_file = prepare_output_dir(args.output_dir) / "log.jsonl"
    if is_main_process() and (stale := remove_stale_temp_files(args.output_dir)):
        print0(f"removed {len(stale)} unfinished checkpoint file(s) of a killed run: "
               + ", ".join(p.name for p in stale))
    install_stop_handlers()
    if args.tensorboard:
        open_tensorboard(args.log_file)  # at start: a missing package is one sentence before any work
    print0(f"device {device}, {args.world_size} process(es), {args.workers} loader workers each"
           + (f", bound to CPUs {cores[0]}-{cores[-1]}" if cores else ""))
    return device, rank

"""Distributed training from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and nothing else."""
import os
from pathlib import Path

import torch
import torch.distributed as dist

from common.device import dist_backend

_HOST_GROUP: list = []  # a gloo group over the same ranks, for flags that live on the host (see `any_rank`)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes, with the device's backend; return (rank, world_size).

    A plain `python train_*.py` (no WORLD_SIZE) runs as rank 0 of 1 without a process group.

    Under `torchrun --max-restarts`, the workers share the agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE), which
    outlives a failed attempt with its keys: a restarted rank could read the dead attempt's gloo/NCCL addresses
    and die with "connectFullMesh failed ... Connection refused" (pytorch/pytorch#135712; torch 2.14 rebuilds the
    shared store only at the first rendezvous). Each attempt therefore gets keys of its own, under a prefix named
    by TORCHELASTIC_RESTART_COUNT, which all workers of one torchrun agree on.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store, rank, world_size = next(dist.rendezvous("env://"))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend=dist_backend(device), store=dist.PrefixStore(f"attempt_{attempt}", store),
                                    rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=dist_backend(device))
        _HOST_GROUP.append(dist.new_group(backend="gloo") if dist_backend(device) != "gloo" else None)
    return get_rank(), world_size


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only; other ranks stay quiet (builtins are left alone)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all ranks, as a new tensor (the argument is not modified)."""
    out = tensor.clone()
    if dist.is_initialized():
        dist.all_reduce(out)
    return out


def average_norm_statistics(model: torch.nn.Module) -> None:
    """Replace every BatchNorm's running mean and variance by their average over the ranks (mmdet's SyncNormHook,
    run before each evaluation): without SyncBatchNorm each rank's statistics follow its own shard of the data, so
    the ranks would evaluate, and rank 0 would save, slightly different models. One all-reduce of all of them."""
    if not dist.is_initialized():
        return
    stats = [buf for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats for buf in (m.running_mean, m.running_var)]
    if stats:
        flat = torch.cat([s.flatten() for s in stats])
        dist.all_reduce(flat)
        for s, avg in zip(stats, (flat / get_world_size()).split([s.numel() for s in stats]), strict=True):
            s.copy_(avg.view_as(s))


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any: a host-side all-reduce (gloo), so the device is not synced."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor(int(flag))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_HOST_GROUP[0] if _HOST_GROUP else None)
    return bool(value)


def stop_if_not_finite(finite: torch.Tensor, epoch: int, step: int, output_dir: str) -> None:
    """Stop every rank together once any rank saw a non-finite loss (`finite` is a running bool tensor). The loop
    calls it where it syncs anyway (log lines) and before anything is saved, so no checkpoint ever holds NaN."""
    if all_reduce_sum((~finite).float()) > 0:
        last = Path(output_dir) / "last.pth"
        raise SystemExit(f"error: the loss became non-finite in epoch {epoch} (near step {step}); stopping "
                         "without saving. " + (f"The last good checkpoint is {last}" if last.exists() else
                                               "No checkpoint was written before it (lower --lr?)"))


def all_gather_objects(obj: object) -> list:
    """Every rank's `obj`, in rank order (for variable-length results such as detections)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
        _HOST_GROUP.clear()


def bind_cores() -> list[int]:
    """Pin this process to its own slice of the CPUs it may use, as the seed's `dist_train_arm.sh` does.

    On ARM servers (Kunpeng 920) eight ranks preempting each other's cores cost ~10 % of step time
    (seed: 0.9 s -> 0.8 s per iteration for ResNet-50 on 8 NPUs). Local rank r of n gets the r-th of n equal
    slices of `os.sched_getaffinity(0)`; data-loader workers, forked later, inherit it. Returns the slice.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cpus = sorted(os.sched_getaffinity(0))
    per_rank = max(1, len(cpus) // local_world)
    mine = cpus[local_rank * per_rank:(local_rank + 1) * per_rank] or cpus[-per_rank:]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    return mine

"""The tiny device helper: pick Ascend NPU, CUDA or CPU, and answer the few things that differ between them.

torch_npu is imported only here, only when an NPU is asked for or probed by `auto`: importing it needs Huawei's
CANN runtime (libhccl.so and friends), which CPU and CUDA machines do not have.
"""
import contextlib
import importlib.util
import os
import random
import resource

import numpy as np
import torch

NPU_INSTALL = (
    "install the torch_npu release that matches torch {torch} (`pip install torch_npu=={torch}`; see README, "
    "'Ascend NPU') on a machine with Ascend CANN, and `source /usr/local/Ascend/ascend-toolkit/set_env.sh`"
)


def _load_torch_npu() -> str | None:
    """Import torch_npu (it registers `torch.npu` and the "npu" device type); return why it failed, or None."""
    torch_version = torch.__version__.split("+")[0]
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed: " + NPU_INSTALL.format(torch=torch_version)
    try:
        import torch_npu  # noqa: F401
    except (ImportError, OSError) as e:  # typically "libhccl.so: cannot open shared object file"
        return f"torch_npu is installed but cannot load ({e}): " + NPU_INSTALL.format(torch=torch_version)
    return None


def resolve_device(name: str = "auto", jit_compile: bool = False) -> torch.device:
    """Turn `--device auto|npu|cuda|cpu[:N]` into a torch.device and make it current.

    `auto` picks npu, then cuda, then cpu. Without an index, each torchrun process takes LOCAL_RANK.
    On NPU, operator JIT compilation is off unless `jit_compile` (Ascend's advice for dynamic shapes and
    what mmcv does: binary kernels start faster). Exits with one sentence when the device cannot be had.
    """
    kind, _, index = name.lower().partition(":")
    if kind == "auto":
        if importlib.util.find_spec("torch_npu") is not None and _load_torch_npu() is None and torch.npu.is_available():
            kind = "npu"
        else:
            kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "npu":
        reason = _load_torch_npu()
        if reason is not None:
            raise SystemExit(f"error: --device {name}: {reason}")
        if not torch.npu.is_available():
            raise SystemExit(f"error: --device {name}: torch_npu loaded but sees no NPU (check `npu-smi info`)")
        torch.npu.set_compile_mode(jit_compile=jit_compile)
    elif kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {name}: torch sees no CUDA device (torch.cuda.is_available() is False)")
    else:
        raise SystemExit(f"error: unknown --device {name!r}: choose auto, npu, cuda or cpu (or npu:N, cuda:N)")
    device = torch.device(kind, int(index) if index else int(os.environ.get("LOCAL_RANK", 0)))
    getattr(torch, kind).set_device(device)
    return device


def dist_backend(device: torch.device) -> str:
    """The collective backend: HCCL on Ascend, NCCL on NVIDIA, gloo on CPU."""
    return {"npu": "hccl", "cuda": "nccl"}.get(device.type, "gloo")


def amp_dtype(device: torch.device) -> torch.dtype:
    """fp16 on accelerators (what the seed's NPU configs train with), bf16 on CPU (no fp16 kernels worth using)."""
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=enabled)


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16; disabled for bf16 and fp32. torch_npu ships its own (NPU overflow flags)."""
    enabled = enabled and amp_dtype(device) == torch.float16
    if device.type == "npu":
        return torch.npu.amp.GradScaler(enabled=enabled)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so host timers measure the device's work."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def max_memory_mb(device: torch.device) -> float:
    """Peak memory: the device allocator's on npu/cuda, the process's peak resident set on CPU."""
    if device.type == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return getattr(torch, device.type).max_memory_allocated(device) / 2**20


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); with `deterministic`, also forbid non-deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds cuda and npu generators too
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS for reproducibility
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True

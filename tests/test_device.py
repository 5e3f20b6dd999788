"""The device helper: auto order, the NPU branch (through fake torch_npu packages), and its answers."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import device as dev

ROOT = Path(__file__).resolve().parents[1]
FAKES = Path(__file__).parent / "fake_npu"

PROBE = """
import json, torch
from common import device as dev
d = dev.resolve_device({name!r}, jit_compile={jit})
out = {{"device": str(d)}}
if d.type == "npu":
    import torch_npu
    dev.grad_scaler(d, enabled=True)
    out.update(backend=dev.dist_backend(d), dtype=str(dev.amp_dtype(d)), calls=torch_npu.calls)
print(json.dumps(out))
"""


def run_probe(name: str, fake: str | None, jit: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """Resolve `name` in a fresh interpreter (renaming the PrivateUse1 backend cannot be undone in-process)."""
    paths = [str(FAKES / fake)] if fake else []
    full_env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    full_env.update(PYTHONPATH=os.pathsep.join(paths + [str(ROOT)]), **(env or {}))
    return subprocess.run([sys.executable, "-c", PROBE.format(name=name, jit=jit)], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=120)


def test_auto_picks_npu_first_and_configures_it():
    result = run_probe("auto", "working")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["device"] == "npu:0"
    assert out["backend"] == "hccl"
    assert out["dtype"] == "torch.float16"
    assert ["set_compile_mode", False] in out["calls"]  # binary kernels by default
    assert ["set_device", "npu:0"] in out["calls"]
    assert ["GradScaler", True] in out["calls"]  # torch_npu's own scaler, enabled for fp16


def test_npu_index_jit_flag_and_local_rank():
    out = json.loads(run_probe("npu:5", "working", jit=True).stdout)
    assert out["device"] == "npu:5" and ["set_compile_mode", True] in out["calls"]
    out = json.loads(run_probe("npu", "working", env={"LOCAL_RANK": "3"}).stdout)
    assert out["device"] == "npu:3"


def test_npu_without_cann_fails_with_one_sentence():
    result = run_probe("npu", "no_cann")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "libhccl.so" in result.stderr and "set_env.sh" in result.stderr


def test_auto_falls_back_when_torch_npu_cannot_load():
    result = run_probe("auto", "no_cann")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_npu_not_installed_message(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch_npu" else real_find_spec(n, *a))
    with pytest.raises(SystemExit, match="torch_npu is not installed.*pip install torch_npu"):
        dev.resolve_device("npu")
    assert dev.resolve_device("auto").type in ("cuda", "cpu")


def test_train_script_reports_missing_npu_without_traceback():
    env = {**os.environ, "PYTHONPATH": str(FAKES / "no_cann")}
    result = subprocess.run([sys.executable, "train_cls.py", "--device", "npu", "--epochs", "1"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "error: --device npu" in result.stderr


def test_cpu_and_cuda_answers():
    cpu = dev.resolve_device("cpu")
    assert cpu == torch.device("cpu")
    assert dev.dist_backend(cpu) == "gloo"
    assert dev.amp_dtype(cpu) == torch.bfloat16
    assert not dev.grad_scaler(cpu, enabled=True).is_enabled()  # bf16 needs no loss scaling
    assert dev.dist_backend(torch.device("cuda", 0)) == "nccl"
    assert dev.amp_dtype(torch.device("cuda", 0)) == torch.float16
    assert dev.max_memory_mb(cpu) > 0
    with dev.autocast(cpu, enabled=True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_bad_device_names():
    with pytest.raises(SystemExit, match="unknown --device 'tpu'"):
        dev.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            dev.resolve_device("cuda")

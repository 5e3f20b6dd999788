"""A stand-in for torch_npu on machines without Ascend hardware (tests only).

Like the real package it names PyTorch's PrivateUse1 backend "npu" and installs `torch.npu`; here that namespace
only records what the device helper asks of it, so the NPU branches can be tested on any machine.
"""
import types

import torch

calls = []


class GradScaler:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        calls.append(("GradScaler", enabled))


torch.utils.rename_privateuse1_backend("npu")
torch.npu = types.SimpleNamespace(
    is_available=lambda: True,
    device_count=lambda: 8,
    set_compile_mode=lambda jit_compile=False: calls.append(("set_compile_mode", jit_compile)),
    set_device=lambda device: calls.append(("set_device", str(device))),
    amp=types.SimpleNamespace(GradScaler=GradScaler),
)

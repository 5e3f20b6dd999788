"""`--compile`: a model's forward as compiled graphs, in place, and a count of the graphs a run makes.

The module is compiled with `nn.Module.compile`, which keeps the module itself (no `OptimizedModule` wrapper), so
its state_dict has the names of the eager model: checkpoints of compiled and eager runs load into each other.
Inductor on CPU and CUDA; on Ascend, torch_npu's graph backend (torchair) where it is installed, else eager with
one line saying why. Every input shape the model sees (a canvas of multi-scale training, the eval canvas) is one
graph of its own (`dynamic=False`: static shapes are what the NPU's graph mode and inductor's kernels want).
"""
import time
from collections.abc import Callable

import torch
from torch import nn

from common.dist import print0

TORCHAIR_MISSING = ("--compile on npu needs torch_npu's graph backend torchair (`import torchair` failed: {error}); "
                    "install the torchair of your torch_npu release; the model runs eager")


def graph_backend(device: torch.device) -> Callable | None:
    """The compiler for `device`: inductor on cpu/cuda, torchair's NPU backend on npu; None where there is none."""
    if device.type != "npu":
        return torch._dynamo.lookup_backend("inductor")
    try:
        import torchair
    except ImportError as e:
        print0(TORCHAIR_MISSING.format(error=e))
        return None
    return torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())


def image_shapes(graph: torch.fx.GraphModule) -> str:
    """The shapes of a dynamo graph's 4-d inputs that come from the call, not from the module's parameters."""
    shapes = []
    for node in graph.graph.nodes:
        value = node.meta.get("example_value")
        if node.op == "placeholder" and "self" not in node.name and isinstance(value, torch.Tensor) and value.ndim == 4:
            shapes.append("x".join(map(str, value.shape)))
    return ", ".join(shapes) or "none"


_GRAPHS: list[str] = []  # the image shapes of each graph this process compiled, in order


def compile_model(model: nn.Module, device: torch.device, *, recompile_limit: int = 64) -> bool:
    """Compile `model`'s forward in place for `device`; False where the device has no graph backend and the model
    stays eager. Each graph is logged when it is compiled, with its image shapes and the time it took, and counted
    (`graphs_compiled`). `recompile_limit` raises dynamo's default of 8 graphs per function, which YOLOX's 11
    training canvases and its eval canvas would pass (after it, dynamo would run the model eager)."""
    backend = graph_backend(device)
    if backend is None:
        return False

    def counted(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        start = time.perf_counter()
        compiled = backend(graph, example_inputs)
        _GRAPHS.append(image_shapes(graph))
        print0(f"torch.compile: graph {len(_GRAPHS)} ({'training' if model.training else 'eval'}, images "
               f"{_GRAPHS[-1]}): the backend took {time.perf_counter() - start:.1f} s (after dynamo's tracing)")
        return compiled

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6's name
    setattr(config, name, max(getattr(config, name), recompile_limit))
    model.compile(backend=counted, dynamic=False)
    return True


def full_batch(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`tensor` [n, ...] with its first row repeated up to [batch_size, ...] (unchanged when n >= batch_size): a
    compiled model's last, smaller evaluation batch (or one that lost unreadable images) then runs in the full
    batch's graph instead of compiling one of its own. In eval mode every image's output depends on itself alone, so
    the caller keeps the first n outputs."""
    missing = batch_size - tensor.shape[0]
    if missing <= 0:
        return tensor
    full = torch.cat([tensor, tensor[:1].expand(missing, *tensor.shape[1:])])
    nhwc = tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)
    return full.contiguous(memory_format=torch.channels_last) if nhwc else full  # the graph's strides, kept


def graphs_compiled() -> int:
    """How many graphs compile_model's models have compiled in this process so far."""
    return len(_GRAPHS)

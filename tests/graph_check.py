"""One graph and no host sync, checked: `compiled_outputs(fn, *args)`.

torch 2.14's dynamo traces `.item()`, `.nonzero()` and boolean-mask indexing without a graph break (as unbacked
symbolic values), so `torch.compile(fullgraph=True)` alone no longer proves that a training step never waits for the
device nor changes shape with the data. Here the step is compiled with fullgraph=True through aot_eager's pieces,
every operator of the traced graph is recorded, and those that need the device to answer the host fail the test.
"""
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop

# operators of a data-dependent size or a device -> host read, as they appear in an aot graph
SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "_assert_scalar", "sym_size", "sym_constrain_range")


def compiled_outputs(fn, *args, **kwargs):
    """fn(*args, **kwargs), run as one compiled graph; fails if the graph holds a SYNCING operator."""
    ops = []

    def record(graph: torch.fx.GraphModule, example_inputs):
        ops.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return boxed_nop(graph, example_inputs)

    backend = aot_autograd(fw_compiler=record, inference_compiler=record)
    out = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)(*args, **kwargs)
    syncing = sorted({op for op in ops if any(name in op for name in SYNCING)})
    assert ops, "nothing was compiled"
    assert not syncing, f"host syncs or data-dependent shapes in the compiled graph: {syncing}"
    return out

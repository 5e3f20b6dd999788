"""A stand-in for torch_npu's graph backend torchair (tests only): records the config its backend was built with;
the backend runs each graph as it is."""
calls = []


class CompilerConfig:
    pass


def get_npu_backend(compiler_config: CompilerConfig):
    def backend(graph, example_inputs):
        return graph.forward

    calls.append(type(compiler_config).__name__)
    return backend

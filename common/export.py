"""Export a model to one file of static shapes and check it: the pieces det/export.py and cls/export.py share.

The suffix picks the format. `.pt2`: torch.export's program (torch.export.save; run it with
`torch.export.load(path).module()(*inputs)`). `.onnx`: torch.onnx's dynamo exporter (it needs the onnx and onnxscript
packages), one file with the weights inside, for ONNX Runtime or Ascend's ATC. The exported module takes its inputs
positionally and returns a dict; the file's inputs and outputs are named by their keys. The check runs the file (the
loaded program, or ONNX Runtime when it is installed) and the eager module on one input and reports the largest
difference of each output.
"""
import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from common.cli import positive_int

FORMATS = {".pt2": "torch.export", ".onnx": "ONNX"}


def check_output_path(path: str | Path) -> Path:
    """`path` if its suffix names a format whose exporter is installed, else a ValueError in one sentence."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ValueError(f"{path} ends neither in .onnx nor in .pt2: the suffix picks the format")
    if path.suffix == ".onnx":
        try:
            import onnx  # noqa: F401  torch.onnx's dynamo exporter builds its graph with these two
            import onnxscript  # noqa: F401
        except ImportError:
            raise ValueError("exporting to ONNX needs the onnx and onnxscript packages: pip install onnx onnxscript "
                             "(and onnxruntime to check the file)") from None
    return path


def _output_path(text: str) -> Path:
    try:
        return check_output_path(text)
    except ValueError as e:  # argparse replaces a ValueError's message by "invalid value"
        raise argparse.ArgumentTypeError(str(e)) from None


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """The flags both export commands share: where to, how many images per call, which ONNX opset."""
    parser.add_argument("--out", required=True, type=_output_path,
                        help="the file to write: NAME.onnx (ONNX) or NAME.pt2 (torch.export)")
    parser.add_argument("--batch-size", type=positive_int, default=1,
                        help="images per call: the file's shapes are static, so this is the only batch it takes")
    parser.add_argument("--opset", type=positive_int, default=18,
                        help="ONNX opset (torch's exporter writes 20 and converts down; 18 reaches older runtimes)")


def export_file(module: nn.Module, inputs: dict[str, Tensor], path: str | Path, *, output_names: list[str],
                opset: int = 18) -> None:
    """`module(*inputs.values())` -> {name: Tensor} written to `path` (.pt2 or .onnx) for exactly the shapes and
    dtypes of `inputs`; `output_names`: the dict's keys in order (they name the ONNX outputs)."""
    path = check_output_path(path)
    module = module.eval()
    args = tuple(inputs.values())
    if path.suffix == ".pt2":
        torch.export.save(torch.export.export(module, args), path)
    else:
        # external_data=False: the weights inside the one file (all of ours are far below protobuf's 2 GB)
        torch.onnx.export(module, args, path, dynamo=True, input_names=list(inputs), output_names=output_names,
                          opset_version=opset, external_data=False, verbose=False)


def run_file(path: str | Path, inputs: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The outputs of the exported file at `path` on `inputs`, by name; None for an ONNX file when onnxruntime is
    not installed."""
    path = Path(path)
    if path.suffix == ".pt2":
        with torch.no_grad():
            return dict(torch.export.load(path).module()(*inputs.values()))
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {name: t.numpy() for name, t in inputs.items()})
    return {o.name: torch.from_numpy(v) for o, v in zip(session.get_outputs(), outputs, strict=True)}


def max_differences(got: dict[str, Tensor], want: dict[str, Tensor]) -> dict[str, float]:
    """max |got - want| of each output (bool and integer outputs too: 0 when they are identical)."""
    if got.keys() != want.keys():
        raise ValueError(f"the exported file returns {list(got)}, the model {list(want)}")
    return {k: (got[k].double() - want[k].double()).abs().max().item() for k in want}


def export_and_check(module: nn.Module, inputs: dict[str, Tensor], check_inputs: dict[str, Tensor],
                     path: str | Path, *, opset: int = 18) -> str:
    """Export `module` for the shapes of `inputs` to `path` (`export_file`), run the file and the eager module on
    `check_inputs` (other values, the same shapes) and say in one line what was written and how far apart they are."""
    with torch.no_grad():
        want = module.eval()(*check_inputs.values())
    export_file(module, inputs, path, output_names=list(want), opset=opset)
    path = Path(path)
    got = run_file(path, check_inputs)
    written = f"{path}: {path.stat().st_size / 2**20:.1f} MiB ({FORMATS[path.suffix]})"
    if got is None:
        return f"{written}; not checked: onnxruntime is not installed (pip install onnxruntime)"
    runner = "ONNX Runtime" if path.suffix == ".onnx" else "the loaded program"
    diffs = ", ".join(f"{k} {v:.3g}" for k, v in max_differences(got, want).items())
    return f"{written}; {runner} vs eager on a random input, max |difference|: {diffs}"

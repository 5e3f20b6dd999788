"""--compile (common/compile.py) in both training scripts: graphs compiled in place (checkpoints keep the eager
names and load both ways), one graph per input shape and counted, the NPU backend or its one-line fallback. Marked
`compile`: inductor's code generation takes about a minute per model on 2 CPU cores (`-m "not compile"` skips)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from cls.models import build_model as build_classifier
from common.checkpoint import load_checkpoint
from det.models import build_model as build_detector
from tests.scripts import ROOT, run_script

pytestmark = pytest.mark.compile
FAKES = ROOT / "tests" / "fake_npu"


def graph_lines(out: str) -> list[str]:
    return re.findall(r"torch\.compile: graph \d+ \((training|eval), images ([^)]*)\)", out)


def test_train_cls_compiled_with_inductor_checkpoints_load_both_ways(tmp_path):
    """Inductor on the CPU: the compiled first step's loss equals eager's within float reordering; the compiled run's
    checkpoint has the eager names, an eager run resumes it, and a compiled run evaluates the eager run's weights."""
    common = ["train_cls.py", "--arch", "resnet18", "--device", "cpu", "--synthetic-size", "16", "--batch-size", "8",
              "--print-freq", "1", "--workers", "0", "--epochs", "1"]
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # cold, as on a fresh machine
    compiled = run_script(*common, "--compile", "--output-dir", str(tmp_path / "compiled"), env=env)
    run_script(*common, "--output-dir", str(tmp_path / "eager"))
    graphs = graph_lines(compiled.stdout)  # training: batches of 8; eval: of 8, its last batch padded to 8
    assert graphs == [("training", "8x3x64x64"), ("eval", "8x3x64x64")], graphs
    assert "torch.compile made 2 graphs" in compiled.stdout
    first = [json.loads(line)["loss"] for d in ("compiled", "eager")
             for line in (tmp_path / d / "log.jsonl").read_text().splitlines()[:1]]
    assert first[0] == pytest.approx(first[1], rel=1e-4)
    state = load_checkpoint(tmp_path / "compiled" / "last.pth")
    assert list(state["model"]) == list(build_classifier("resnet18", num_classes=10).state_dict())
    run_script(*common[:-2], "--epochs", "2", "--output-dir", str(tmp_path / "compiled"), "--resume", "auto")
    assert load_checkpoint(tmp_path / "compiled" / "last.pth")["step"] == 4
    out = run_script(*common, "--compile", "--test-only", "--weights", str(tmp_path / "eager" / "last.pth"),
                     "--output-dir", str(tmp_path / "test"), env=env)
    assert graph_lines(out.stdout) == [("eval", "8x3x64x64")]
    top1 = [json.loads(line)["top1"] for line in (tmp_path / "eager" / "log.jsonl").read_text().splitlines()
            if '"val"' in line]
    assert f"{top1[-1]:.3f}" in out.stdout


# train_det.py with aot_eager (dynamo's graphs, no code generation: seconds instead of minutes per graph)
AOT_EAGER = """
import sys, torch
import common.compile
common.compile.graph_backend = lambda device: torch._dynamo.lookup_backend("aot_eager")
import train_det
train_det.main(train_det.parse_args(sys.argv[1:]))
"""


def test_train_det_multiscale_compiles_each_canvas_once(tmp_path):
    """YOLOX-s with the batch multiscale (a canvas of 32, 64 or 96 px drawn every iteration): each canvas is one
    training graph compiled once, evaluation (NMS included) one more; the log counts them; the checkpoint loads
    into the eager model (the classification test resumes one in an eager run)."""
    args = ["--model", "yolox_s", "--device", "cpu", "--img-size", "64", "--synthetic-size", "16", "--batch-size",
            "2", "--workers", "0", "--lr-warmup-epochs", "1", "--hold-epochs", "0", "--no-aug-epochs", "0",
            "--multiscale", "0.5", "1.5", "--multiscale-interval", "1", "--print-freq", "1", "--epochs", "1",
            "--compile", "--output-dir", str(tmp_path)]
    out = run_script("-c", AOT_EAGER, *args, env={"PLAINVISION_CACHE": str(tmp_path / "cache")})
    graphs = graph_lines(out.stdout)
    train_shapes = [shapes.split(",")[0] for kind, shapes in graphs if kind == "training"]
    assert len(train_shapes) == len(set(train_shapes)) >= 2, graphs  # each canvas once
    assert {s.split("x", 2)[2] for s in train_shapes} <= {"32x32", "64x64", "96x96"}
    assert sum(kind == "eval" for kind, _ in graphs) >= 1
    assert f"torch.compile made {len(graphs)} graphs" in out.stdout
    eager = build_detector("yolox_s", num_classes=10)
    eager.load_state_dict(load_checkpoint(tmp_path / "last.pth")["model"])  # strict: the eager names exactly


NPU_PROBE = """
import torch, torch_npu
from torch import nn
from common.compile import compile_model
print("compiled", compile_model(nn.Linear(2, 2), torch.device("npu")))
"""


@pytest.mark.parametrize("torchair", [False, True])
def test_npu_compiles_with_torchair_or_says_why_not(torchair):
    """On the NPU the backend is torchair's (fake packages here: no graph runs, the backend is only built)."""
    paths = [FAKES / "working"] + ([FAKES / "torchair"] if torchair else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*paths, ROOT]))}
    probe = NPU_PROBE + ("import torchair; print('torchair', torchair.calls)" if torchair else "")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    if torchair:
        assert "compiled True" in out.stdout and "torchair ['CompilerConfig']" in out.stdout
    else:
        assert "compiled False" in out.stdout
        assert "needs torch_npu's graph backend torchair" in out.stdout and "the model runs eager" in out.stdout


def test_optimizer_kernels_follow_the_device():
    from common.optim import build_optimizer

    model = torch.nn.Linear(2, 2)
    assert build_optimizer("sgd", model, 0.1).defaults["fused"] is True
    assert build_optimizer("adamw", model, 0.1).defaults["fused"] is True
    assert build_optimizer("rmsprop", model, 0.1).defaults["foreach"] is True

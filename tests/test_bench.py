"""cls.bench and det.bench: their --json rows from real (tiny) child measurements, the FLOP count against the
formula, the roofline, the loader and decode timings, the compiled measurement, and the table."""
import json

import pytest
import torch
from torch import nn

from common import bench

TINY = ["--batch-size", "2", "--iters", "1", "--warmup", "0", "--repeats", "1", "--no-compile", "--no-loader",
        "--roofline-size", "256", "--json"]
KEYS = {"model", "ours_eager_s", "ours_compiled_s", "twin_eager_s", "loss_share", "peak_mem_mb", "gflops_per_s",
        "roofline_gflops_per_s", "flops_per_step", "roofline_fraction", "batch_size", "device", "amp",
        "loader_img_s", "step_img_s", "compile_s", "graphs", "compiled_vs_twin", "eager_vs_twin"}


def json_rows(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def check_measured(row: dict) -> None:
    assert KEYS <= row.keys() and "errors" not in row
    assert row["ours_eager_s"] > 0 and row["peak_mem_mb"] > 0 and row["flops_per_step"] > 0
    assert row["ours_compiled_s"] is None and row["compile_s"] is None and row["loader_img_s"] is None  # skipped
    assert row["gflops_per_s"] == pytest.approx(row["flops_per_step"] / row["ours_eager_s"] / 1e9)
    assert row["roofline_gflops_per_s"] > 0
    assert row["roofline_fraction"] == pytest.approx(row["gflops_per_s"] / row["roofline_gflops_per_s"])
    assert row["step_img_s"] == pytest.approx(2 / row["ours_eager_s"])


def test_cls_bench_json_row_with_twin(capsys):
    from cls import bench as cls_bench

    cls_bench.main(["--model", "resnet18", "--image-size", "32", *TINY])
    (row,) = json_rows(capsys)
    check_measured(row)
    assert row["model"] == "resnet18" and row["image_size"] == 32 and row["loss_share"] is None
    assert row["twin_eager_s"] > 0 and row["eager_vs_twin"] == pytest.approx(row["ours_eager_s"] / row["twin_eager_s"])


def test_det_bench_json_row_without_twin(capsys):
    from det import bench as det_bench

    det_bench.main(["--model", "centernet_r18", "--img-size", "64", "--num-classes", "3", *TINY])
    (row,) = json_rows(capsys)
    check_measured(row)
    assert row["model"] == "centernet_r18" and row["canvas"] == [64, 64]
    assert row["twin_eager_s"] is None and row["eager_vs_twin"] is None
    assert 0 < row["loss_share"] < 1


def test_flop_count_of_a_linear_forward_and_backward():
    layer, x = nn.Linear(64, 32), torch.randn(8, 64, requires_grad=True)
    flops = bench.count_flops(lambda: layer(x).sum().backward())
    assert flops == 3 * 2 * 8 * 64 * 32  # forward, grad of input, grad of weight: each 2 * B * in * out


def test_flop_count_of_grouped_convolutions():
    """Input and weight gradients each do the forward's multiply-adds, also for grouped and depthwise convs (torch's
    own formula counts the weight gradient `groups` times)."""
    x = torch.randn(2, 32, 16, 16, requires_grad=True)
    for groups in (1, 4, 32):
        conv = nn.Conv2d(32, 32, 3, padding=1, groups=groups, bias=False)
        forward = 2 * 2 * 16 * 16 * 32 * (32 // groups) * 9  # 2 * B * H * W * C_out * C_in / groups * 3 * 3
        assert bench.count_flops(lambda conv=conv: conv(x).sum().backward()) == 3 * forward


def test_roofline_is_positive():
    roof = bench.roofline(torch.device("cpu"), amp=False, size=64)
    assert roof["roofline_gflops_per_s"] == max(roof["roofline_matmul_gflops_per_s"],
                                                roof["roofline_conv_gflops_per_s"]) > 0


def test_compiled_measurement_counts_graphs(monkeypatch):
    import common.compile  # aot_eager: dynamo's graph without inductor's code generation (tests/test_compile.py's)

    monkeypatch.setattr(common.compile, "graph_backend", lambda device: torch._dynamo.lookup_backend("aot_eager"))
    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(4, 8)
    step = bench.train_step(model, lambda: model(x).sum(), torch.device("cpu"), amp=False, lr=0.01)
    out = bench.measure_step("compiled", model, step, torch.device("cpu"), iters=2, warmup=1, flops=False)
    assert out["graphs"] == 1 and out["step_s"] > 0 and out["compile_s"] > 0


def test_loader_and_decode_speeds(monkeypatch):
    from cls import bench as cls_bench

    out = cls_bench.measure_loader("resnet18", 32, 2, 1, None, torch.device("cpu"))
    assert out["img_s"] > 0 and out["workers"] >= 0
    monkeypatch.setattr(bench, "DECODE_IMAGES", 2)
    rows = bench.decode_speed()
    assert [r["decode"] for r in rows] == ["500x375", "640x480"]
    assert all(r["pil_img_s"] > 0 and r["torchvision_img_s"] > 0 and r["read_rgb_img_s"] > 0 for r in rows)


def test_rows_medians_errors_and_table(capsys):
    roof = {"device": "cpu", "roofline_gflops_per_s": 100.0, "roofline_matmul_gflops_per_s": 100.0,
            "roofline_conv_gflops_per_s": 50.0}
    runs = {"ours": [{"step_s": 1.0, "peak_mb": 10.0, "flops": 2e10, "loss_s": 0.1}, {"step_s": 3.0, "peak_mb": 20.0}],
            "compiled": [{"step_s": 0.5, "compile_s": 9.0, "graphs": 2}, {"step_s": 0.5}],
            "twin": [{"error": "RuntimeError: boom"}]}
    settings = {"model": "m", "batch_size": 4, "canvas": [64, 96], "amp": False, "channels_last": False, "iters": 1,
                "repeats": 2}
    row = bench.make_row("m", runs, roof, settings)
    assert row["ours_eager_s"] == 2.0 and row["peak_mem_mb"] == 15.0 and row["loss_share"] is None  # loss_s: 1 round
    assert row["gflops_per_s"] == 10.0 and row["roofline_fraction"] == 0.1 and row["compiled_roofline_fraction"] == 0.4
    assert row["twin_eager_s"] is None and row["errors"] == {"twin": "RuntimeError: boom"}
    assert row["compile_s"] == 9.0 and row["graphs"] == 2 and row["step_img_s"] == 2.0
    bench.print_row(row, as_json=False, first=True)
    out = capsys.readouterr().out
    assert "64x96" in out and "eager s" in out and "the twin measurement failed: RuntimeError: boom" in out
    assert bench.expand_models(["b", "all", "a"], ("a", "b", "c")) == ["b", "a", "c"]

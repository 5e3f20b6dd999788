"""What cls.bench and det.bench share: their flags, step timing, FLOP counting, the machine's roofline, a fresh
child process per measurement, loader and JPEG-decode throughput, and the rows they print (JSON lines or a table)."""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count
from torchvision.io import decode_jpeg, read_file
from torchvision.transforms.v2.functional import pil_to_tensor

from common.cli import device_name, non_negative_int, positive_int
from common.compile import compile_model, graphs_compiled
from common.device import autocast, grad_scaler, max_memory_mb, resolve_device, synchronize
from common.images import read_rgb, to_rgb
from common.synthetic import class_color, draw_polygon, shape_polygon, textured_background

# the end of both benches' --help: what every row holds and how it is counted
SHARED_HELP = """
Every row also has:
  ours_eager_s, ours_compiled_s, twin_eager_s: seconds per step (null: not measured, or no twin);
  compiled_vs_twin, eager_vs_twin: their ratios (< 1: ours is faster); compile_s, graphs: the first compiled step's
  time beyond a timed one (inductor's on-disk cache can make it short), dynamo's graph count;
  peak_mem_mb (our eager step's), compiled_peak_mem_mb, twin_peak_mem_mb;
  flops_per_step, gflops_per_s (of our eager step), compiled_gflops_per_s; roofline_gflops_per_s (the best of
  roofline_matmul_gflops_per_s and roofline_conv_gflops_per_s), roofline_fraction, compiled_roofline_fraction;
  errors: {measurement: the last line of its error}, only where one failed.
Without --json: the same figures as a table, one row per model.

--decode runs no model: it writes 32 JPEGs at 500 x 375 (ImageNet-like) and 640 x 480 (COCO-like) and prints the
images/s of reading them with PIL (PIL open + common.images.to_rgb: pil_img_s; + pil_to_tensor: pil_tensor_img_s),
with torchvision.io.decode_jpeg(read_file(path)) (torchvision_img_s) and as the data sets do (common.images.read_rgb,
decode_jpeg with PIL for what it cannot read: read_rgb_img_s), each the median of 3 passes after 1.

FLOPs per step are those of the matmuls and convolutions of forward + backward, counted once with
torch.utils.flop_counter.FlopCounterMode (its convolution-backward formula replaced: it counts grouped convolutions'
weight gradients `groups` times). The roofline is the best GFLOP/s of a large matmul and a large 3x3
convolution, measured once per run in the steps' precision.
"""
ROOT = Path(__file__).resolve().parents[1]  # children run `python -m <module>` from here
DECODE_SIZES = ((500, 375), (640, 480))  # (width, height): ImageNet's typical picture, COCO's
DECODE_IMAGES = 32  # per size; each reader decodes them all 4 times, the median of the last 3 counts


def add_bench_args(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    """The flags both benches take."""
    parser.add_argument("--device", default="auto", type=device_name, help="auto, cpu, cuda, npu (or cuda:N, npu:N)")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=batch_size, help="images per step")
    parser.add_argument("--iters", type=positive_int, default=5, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=non_negative_int, default=3,
                        help="untimed steps first (lazy imports, allocator, kernel selection; compiled: after the "
                             "compiling step)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="rounds of ours eager / ours compiled / twin, alternating in fresh processes")
    parser.add_argument("--amp", action="store_true", help="mixed precision: fp16 on npu/cuda, bf16 on cpu")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and images")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip our compiled step (inductor on CPU compiles a big model for minutes)")
    parser.add_argument("--no-loader", action="store_true", help="skip the data loader's throughput")
    parser.add_argument("--loader-batches", type=positive_int, default=20,
                        help="batches the loader is timed over, after its first (the workers' start-up)")
    parser.add_argument("--roofline-size", type=positive_int, default=2048,
                        help="roofline: N x N @ N x N matmul and a 3x3 conv of N/8 -> N/8 channels, batch 8, 56 x 56")
    parser.add_argument("--json", action="store_true", help="one JSON object per model per line, no table")
    parser.add_argument("--decode", action="store_true",
                        help="only compare PIL's JPEG decode with torchvision.io.decode_jpeg (no model is run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON settings of one measurement, in a child process


def expand_models(names: Sequence[str], every: Sequence[str]) -> list[str]:
    """`names` with "all" replaced by `every`, each model once, in order."""
    return list(dict.fromkeys(model for name in names for model in (every if name == "all" else [name])))


def timed(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `iters` calls, after `warmup` untimed ones."""
    times = []
    for i in range(warmup + iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(model: nn.Module, loss_of: Callable[[], torch.Tensor], device: torch.device, amp: bool,
               lr: float) -> Callable[[], None]:
    """One training step as a function: forward and loss (`loss_of`), backward, SGD with momentum."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    scaler = grad_scaler(device, amp)

    def step() -> None:
        with autocast(device, amp):
            loss = loss_of()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def conv_backward_flops(grad_out_shape: list[int], x_shape: list[int], w_shape: list[int], _bias, _stride, _padding,
                        _dilation, transposed: bool, _output_padding, _groups, output_mask: list[bool],
                        **kwargs) -> int:
    """Each of a convolution's input and weight gradients does the forward's multiply-adds; FlopCounterMode's own
    formula (torch 2.14) counts a grouped convolution's weight gradient `groups` times."""
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (output_mask[0] + output_mask[1])


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attention `fn()` runs, forward and backward (FlopCounterMode counts
    2 per multiply-add and nothing for elementwise ops or the optimizer's update)."""
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def measure_step(kind: str, model: nn.Module, step: Callable[[], None], device: torch.device, *, iters: int,
                 warmup: int, flops: bool) -> dict[str, float]:
    """Median step seconds and peak memory; kind "compiled" first compiles `model` in place and times the first,
    compiling step (compile_s: its time beyond a median step; graphs: the graphs compiled, 0 where the device has no
    graph backend and the model ran eager). With `flops`, one more step under the FLOP counter, after the peak."""
    out, graphs_before = {}, graphs_compiled()
    if kind == "compiled":
        compile_model(model, device)
        first_s = timed(step, 1, 0, device)
    out["step_s"] = timed(step, iters, warmup, device)
    out["peak_mb"] = max_memory_mb(device)
    if kind == "compiled":
        out |= {"compile_s": first_s - out["step_s"], "graphs": graphs_compiled() - graphs_before}
    if flops:
        out["flops"] = count_flops(step)
    return out


def roofline(device: torch.device, amp: bool, size: int = 2048) -> dict[str, float]:
    """GFLOP/s this machine reaches on a size x size matmul and on a 3x3 convolution (batch 8, size/8 channels in
    and out, 56 x 56; NCHW and NHWC), each the median of 3 after 1 warmup, in the steps' precision; the best of them
    is the roofline."""
    g, c, nhwc = torch.Generator(device).manual_seed(0), max(size // 8, 1), torch.channels_last
    a, b = (torch.randn(size, size, device=device, generator=g) for _ in range(2))
    x, w = torch.randn(8, c, 56, 56, device=device, generator=g), torch.randn(c, c, 3, 3, device=device, generator=g)
    conv_flops = 2 * 8 * 56 * 56 * c * c * 9
    runs = {"matmul": (2 * size**3, partial(torch.mm, a, b)),
            "nchw": (conv_flops, partial(nn.functional.conv2d, x, w, padding=1)),
            "nhwc": (conv_flops, partial(nn.functional.conv2d, x.to(memory_format=nhwc), w.to(memory_format=nhwc),
                                         padding=1))}
    with torch.no_grad(), autocast(device, amp):
        speed = {name: flops / timed(fn, 3, 1, device) / 1e9 for name, (flops, fn) in runs.items()}
    return {"roofline_gflops_per_s": max(speed.values()), "roofline_matmul_gflops_per_s": speed["matmul"],
            "roofline_conv_gflops_per_s": max(speed["nchw"], speed["nhwc"])}


def loader_speed(loader: torch.utils.data.DataLoader, batches: int) -> float:
    """Images/s of `loader` over `batches` batches after its first (which waits for the workers to start)."""
    iterator = iter(loader)
    next(iterator)
    images, start = 0, time.perf_counter()
    for _, batch in zip(range(batches), iterator, strict=False):
        images += len(batch[0])
    return images / (time.perf_counter() - start)


def write_jpegs(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """`count` photo-like JPEGs: textured background with pixel noise, three shapes, quality 90 (as synthetic_coco)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng(i)
        image = textured_background(rng, width, height)
        for radius in rng.uniform(0.1, 0.3, size=3) * min(width, height):
            centre = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
            draw_polygon(image, shape_polygon("star", *centre, radius, 0.0), class_color(rng, 0, 1))
        image.save(folder / f"{i:06d}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))


DECODERS = {  # a JPEG's path -> its picture: PIL's way (then pil_to_tensor), torchvision's, the data sets' read_rgb
    "pil": lambda path: to_rgb(Image.open(path)), "pil_tensor": lambda path: pil_to_tensor(to_rgb(Image.open(path))),
    "torchvision": lambda path: decode_jpeg(read_file(str(path))), "read_rgb": read_rgb,
}


def decode_rate(read: Callable[[Path], object], paths: list[Path]) -> float:
    return len(paths) / timed(lambda: [read(path) for path in paths], 3, 1, torch.device("cpu"))


def decode_speed() -> list[dict]:
    """Images/s of DECODERS on the same JPEGs, at each of DECODE_SIZES; the data sets (cls/data.py, det/data.py's
    read_image) read with common.images.read_rgb, which is decode_jpeg for these files."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width, height in DECODE_SIZES:
            paths = write_jpegs(Path(tmp) / f"{width}x{height}", DECODE_IMAGES, width, height)
            kb = sum(path.stat().st_size for path in paths) / 1e3 / len(paths)
            row = {"decode": f"{width}x{height}", "kb_per_image": kb}
            row |= {f"{name}_img_s": decode_rate(read, paths) for name, read in DECODERS.items()}
            rows.append(row | {"torchvision_vs_pil_tensor": row["torchvision_img_s"] / row["pil_tensor_img_s"]})
    return rows


def run_child(module: str, settings: dict) -> dict:
    """`python -m module --child SETTINGS` in a fresh process: its last line of output as a dict, or {"error": the
    last line of its stderr} when it failed."""
    out = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(settings)], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def medians(results: list[dict]) -> dict[str, float]:
    """The median over rounds of each number the children measured; {} if any round failed."""
    if not results or any("error" in r for r in results):
        return {}
    return {k: statistics.median(r[k] for r in results) for k, v in results[0].items()
            if isinstance(v, int | float) and all(k in r for r in results)}


def ratio(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    return None if a is None or not b else scale * a / b


def make_row(model: str, runs: dict[str, list[dict]], roof: dict, settings: dict) -> dict:
    """One model's figures (the keys of the benches' --json) from its children's measurements."""
    ours, compiled, twin, loader = (medians(runs.get(kind, [])) for kind in ("ours", "compiled", "twin", "loader"))
    eager_s, compiled_s, twin_s = ours.get("step_s"), compiled.get("step_s"), twin.get("step_s")
    flops = runs["ours"][0].get("flops")
    first_compile = runs.get("compiled", [{}])[0]
    row = {
        "model": model, "ours_eager_s": eager_s, "ours_compiled_s": compiled_s,
        "compile_s": first_compile.get("compile_s"), "graphs": first_compile.get("graphs"), "twin_eager_s": twin_s,
        "compiled_vs_twin": ratio(compiled_s, twin_s), "eager_vs_twin": ratio(eager_s, twin_s),
        "loss_share": ratio(ours.get("loss_s"), eager_s), "peak_mem_mb": ours.get("peak_mb"),
        "compiled_peak_mem_mb": compiled.get("peak_mb"), "twin_peak_mem_mb": twin.get("peak_mb"),
        "flops_per_step": flops, "gflops_per_s": ratio(flops, eager_s, 1e-9),
        "compiled_gflops_per_s": ratio(flops, compiled_s, 1e-9), **roof,
    }
    row["roofline_fraction"] = ratio(row["gflops_per_s"], roof["roofline_gflops_per_s"])
    row["compiled_roofline_fraction"] = ratio(row["compiled_gflops_per_s"], roof["roofline_gflops_per_s"])
    row |= {"loader_img_s": loader.get("img_s"), "loader_workers": loader.get("workers"),
            "step_img_s": ratio(settings["batch_size"], eager_s)}
    row |= {k: v for k, v in settings.items() if k != "device_name"}
    if errors := {kind: r["error"] for kind, rs in runs.items() for r in rs if "error" in r}:
        row["errors"] = errors
    return row


COLUMNS = (  # the table's: header (also its width), row key, format, scale
    ("eager s", "ours_eager_s", ".3f", 1), ("compiled s", "ours_compiled_s", ".3f", 1),
    ("twin s", "twin_eager_s", ".3f", 1), ("comp/twin", "compiled_vs_twin", ".3f", 1),
    ("eager/twin", "eager_vs_twin", ".3f", 1), ("loss %", "loss_share", ".1f", 100),
    ("peak MB", "peak_mem_mb", ".0f", 1), ("GFLOP/s", "gflops_per_s", ".1f", 1),
    ("roof %", "roofline_fraction", ".1f", 100), ("comp roof %", "compiled_roofline_fraction", ".1f", 100),
    ("compile s", "compile_s", ".1f", 1), ("graphs", "graphs", ".0f", 1), ("loader img/s", "loader_img_s", ".1f", 1),
    ("step img/s", "step_img_s", ".2f", 1),
)


def print_row(row: dict, as_json: bool, first: bool) -> None:
    """`row` as one JSON line, or as a table line (after the run's settings and the header, for the first)."""
    if as_json:
        print(json.dumps(row), flush=True)
        return
    if first:
        print(f"device {row['device']}  amp {row['amp']}  channels_last {row['channels_last']}  roofline "
              f"{row['roofline_gflops_per_s']:.1f} GFLOP/s (matmul {row['roofline_matmul_gflops_per_s']:.1f}, conv "
              f"{row['roofline_conv_gflops_per_s']:.1f})  median of {row['repeats']} rounds x {row['iters']} steps")
        print(f"{'model':<22} {'batch':>5} {'size':>9}  " + "  ".join(header for header, *_ in COLUMNS))
    size = "x".join(map(str, row["canvas"])) if "canvas" in row else str(row["image_size"])
    cells = ["-" if row[key] is None else format(scale * row[key], spec) for _, key, spec, scale in COLUMNS]
    print(f"{row['model']:<22} {row['batch_size']:>5} {size:>9}  "
          + "  ".join(f"{cell:>{len(header)}}" for cell, (header, *_) in zip(cells, COLUMNS, strict=True)), flush=True)
    for kind, error in row.get("errors", {}).items():
        print(f"  {row['model']}: the {kind} measurement failed: {error}")


def print_decode(as_json: bool) -> None:
    for row in decode_speed():
        print(json.dumps(row) if as_json else
              f"JPEG {row['decode']} ({row['kb_per_image']:.0f} kB): PIL {row['pil_img_s']:.0f} img/s, PIL + "
              f"pil_to_tensor {row['pil_tensor_img_s']:.0f}, torchvision.io.decode_jpeg {row['torchvision_img_s']:.0f} "
              f"({row['torchvision_vs_pil_tensor']:.2f}x PIL + pil_to_tensor), the data sets' read_rgb "
              f"{row['read_rgb_img_s']:.0f}")


def bench_main(module: str, args: argparse.Namespace, models: list[str], settings_of: Callable[[str], dict],
               has_twin: Callable[[str], bool], measure: Callable[..., dict], notes: str) -> None:
    """The benches' main: a child's one measurement, the decode comparison, or every model's row."""
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    if args.decode:
        print_decode(args.json)
        return
    device = resolve_device(args.device)
    roof = {"device": str(device), **roofline(device, args.amp, args.roofline_size)}  # once: every row uses it
    for i, name in enumerate(models):
        settings = settings_of(name)
        kinds = ["ours"] + ["compiled"] * (not args.no_compile) + ["twin"] * has_twin(name)
        runs = {kind: [] for kind in kinds}
        for repeat in range(args.repeats):  # alternating, so machine noise hits each alike
            for kind in kinds:
                runs[kind].append(run_child(module, {"kind": kind, "flops": repeat == 0 and kind == "ours",
                                                     **settings}))
        if not args.no_loader:
            runs["loader"] = [run_child(module, {"kind": "loader", "flops": False, **settings})]
        print_row(make_row(name, runs, roof, settings | {"repeats": args.repeats}), args.json, first=i == 0)
    if not args.json:
        print(notes)

"""Training throughput and peak memory of our model against its torchvision twin, in the same run.

  python -m cls.bench --arch resnet50 --device cpu --batch-size 16
  python -m cls.bench --arch efficientnet_b0 --device cuda --batch-size 128 --amp --channels-last

Each measurement runs in a fresh child process (so peak memory, the resident set on CPU, belongs to one model),
and ours and torchvision's alternate for `--repeats` rounds so that machine noise hits both alike; the medians
are compared. Ratios > 1 mean ours trains faster / < 1 that ours needs less memory.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from cls.models import TORCHVISION_TWINS, build_model
from common.device import autocast, grad_scaler, max_memory_mb, resolve_device, synchronize


def measure(impl: str, arch: str, device_name: str, batch_size: int, image_size: int, iters: int, warmup: int,
            amp: bool, channels_last: bool) -> dict[str, float]:
    """Images/s of full training steps (forward, loss, backward, SGD step) and the peak memory they reach."""
    device = resolve_device(device_name)
    torch.manual_seed(0)
    if impl == "ours":
        model = build_model(arch)
    else:
        import torchvision

        model = torchvision.models.get_model(arch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = grad_scaler(device, amp)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device).to(memory_format=fmt)
    targets = torch.randint(0, 1000, (batch_size,), device=device)
    for i in range(warmup + iters):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        with autocast(device, amp):
            loss = nn.functional.cross_entropy(model(images), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return {"img_s": iters * batch_size / (time.perf_counter() - start), "peak_mb": max_memory_mb(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=TORCHVISION_TWINS, metavar="ARCH",
                   help="an architecture with a torchvision twin")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--iters", type=int, default=10, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, autotuning)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of ours / torchvision")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--child", choices=["ours", "torchvision"], help=argparse.SUPPRESS)
    args = p.parse_args()
    settings = dict(arch=args.arch, device_name=args.device, batch_size=args.batch_size, image_size=args.image_size,
                    iters=args.iters, warmup=args.warmup, amp=args.amp, channels_last=args.channels_last)
    if args.child:
        print(json.dumps(measure(args.child, **settings)))
        return

    runs = {"ours": [], "torchvision": []}
    for _ in range(args.repeats):
        for impl in runs:
            out = subprocess.run([sys.executable, "-m", "cls.bench", *sys.argv[1:], "--child", impl],
                                 capture_output=True, text=True, check=True)
            runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    median = {impl: {k: statistics.median(r[k] for r in rs) for k in ("img_s", "peak_mb")} for impl, rs in runs.items()}
    print(f"{args.arch}  device {args.device}  batch {args.batch_size}  {args.image_size}px  amp {args.amp}  "
          f"channels_last {args.channels_last}  (median of {args.repeats})")
    for impl, m in median.items():
        print(f"  {impl:<12} {m['img_s']:9.1f} img/s   peak {m['peak_mb']:9.0f} MB")
    ours, tv = median["ours"], median["torchvision"]
    print(f"  ratio ours/torchvision: speed {ours['img_s'] / tv['img_s']:.3f}  "
          f"memory {ours['peak_mb'] / tv['peak_mb']:.3f}")


if __name__ == "__main__":
    main()

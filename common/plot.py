"""Training curves from log.jsonl files, several runs overlaid, in one PNG:

  python -m common.plot output/cls/log.jsonl [output/other/log.jsonl ...] --out curves.png

One panel per loss of the train records (loss, loss_cls, loss_bbox, ...), one for the LR, one per evaluation metric
of the val records (top1, top5; AP, AP50), all against epochs; each run is a colour, named by its folder. EMA
evaluations are dashed. Needs matplotlib, an optional extra (not in requirements.txt).
"""
import argparse
import json
from pathlib import Path

METRICS = ("top1", "top5", "AP", "AP50")  # the val-record keys worth a panel, where present
TITLES = {"lr": "LR", "top1": "top-1 (%)", "top5": "top-5 (%)", "AP": "AP (0.50:0.95)", "AP50": "AP50"}


def read_log(path: Path) -> list[dict]:
    """The records of one JSON-lines log; a line cut short by a killed run is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def curves(records: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{panel: {mode: [(epoch, value), ...] sorted by epoch}}. Train records sit at epoch + iter / total (their
    median-smoothed values), val records at the end of their epoch; a resumed run's repeated iterations keep the
    latest value."""
    out: dict[str, dict[str, dict[float, float]]] = {}
    for r in records:
        mode = r.get("mode")
        if mode == "train" and {"epoch", "iter", "total"} <= r.keys():
            x = r["epoch"] + r["iter"] / r["total"]
            keys = [k for k in r if k.startswith("loss") and not k.endswith("_avg")] + ["lr"]
        elif mode in ("val", "val_ema") and "epoch" in r:
            x, keys = r["epoch"] + 1, [k for k in METRICS if k in r]
        else:
            continue  # --test-only records have no epoch
        for k in keys:
            if isinstance(r.get(k), int | float):
                out.setdefault(k, {}).setdefault(mode, {})[x] = r[k]
    return {k: {mode: sorted(points.items()) for mode, points in modes.items()} for k, modes in out.items()}


def run_names(paths: list[Path]) -> list[str]:
    """Each log's folder name; the whole folder path where two runs share a name."""
    names = [Path(p).resolve().parent.name for p in paths]
    return [str(Path(p).parent) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def plot(paths: list[Path], out: Path) -> list[str]:
    """Draw the curves of the logs at `paths` into the PNG `out`; returns the panels' names."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        raise SystemExit("common.plot needs matplotlib: pip install matplotlib") from None
    runs = [curves(read_log(p)) for p in paths]
    losses = sorted({k for run in runs for k in run if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    panels = losses + [k for k in ("lr", *METRICS) if any(k in run for run in runs)]
    if not panels:
        raise SystemExit(f"error: no train or val records in {', '.join(map(str, paths))}")
    cols = 2 if len(panels) in (2, 4) else min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels, strict=False):
        for j, run in enumerate(runs):
            for mode, points in run.get(panel, {}).items():
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, color=colors[j % len(colors)], linestyle="--" if mode == "val_ema" else "-",
                        marker="o" if mode.startswith("val") and len(xs) < 30 else None, markersize=3)
        ax.set_title(TITLES.get(panel, panel))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ys = [y for run in runs for points in run.get(panel, {}).values() for _, y in points]
        if panel.startswith("loss") and min(ys) > 0 and max(ys) > 10 * min(ys):
            ax.set_yscale("log")  # a loss that falls by orders of magnitude
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    names = run_names(paths)
    handles = [Line2D([], [], color=colors[j % len(colors)]) for j in range(len(names))]
    if any("val_ema" in modes for run in runs for modes in run.values()):
        handles, names = handles + [Line2D([], [], color="gray", linestyle="--")], names + ["EMA (dashed)"]
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 4), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.0 * rows)))  # room at the top for the legend
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return panels


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", type=Path, help="OUTPUT_DIR/log.jsonl of each run")
    p.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write")
    args = p.parse_args(argv)
    for path in args.logs:
        if not path.is_file():
            p.error(f"{path} is not a file")
    panels = plot(args.logs, args.out)
    print(f"wrote {args.out}: {', '.join(panels)}")


if __name__ == "__main__":
    main()

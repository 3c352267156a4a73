"""
Accuracy against training cost on one CPU core: UniNeXt (window and conv mixers, N32) beside the baselines
that every number should be read against, a linear classifier on the pixels and a small CNN, all trained by
`train_minimal.py` with the same data, augmentation, test set and recipe, each for a few training lengths.

    OMP_NUM_THREADS=1 python experiments/short_budget.py --jobs 2     # Fashion-MNIST, all 60,000 images; hours on 2 cores
    python experiments/short_budget.py --tiny                         # seconds: synthetic data, the same code

The cost of a run is the CPU time its process spent training (`cpu_seconds` in its summary.json): with one
thread it is about what one idle core would take, and other jobs on the machine inflate it far less than
wall time (the same model's CPU time per epoch varied by up to a quarter between the runs of
results/short_budget.csv, through contended caches). The lengths are chosen (in epochs) so that
the runs land near 5, 10, 20 and 60 CPU-minutes; each run's own measured cost is what the figure shows.

Each run is `train_minimal.train(...)` in its own folder under --runs. A finished run (summary.json) is read,
never redone; a run cut short resumes from its last.pt, so the same command continues a stopped sweep.
Writes into --results, after every run: short_budget.csv (a row per run, with its command; the rows of
models left out of --models are kept), short_budget.png and short_budget.md (the table).
"""

import argparse
import csv
import json
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # uninext.py and train_minimal.py
import train_minimal

# What each model is, as train_minimal options.
MODELS = {
    "UniNeXt-N32 window": ["--model", "uninext", "--size", "N32", "--mixer", "window"],
    "UniNeXt-N32 conv": ["--model", "uninext", "--size", "N32", "--mixer", "conv"],
    "CNN (0.14M)": ["--model", "cnn"],
    "linear": ["--model", "linear"],
}
# Epochs for about 10, 5, 60 and 20 CPU-minutes on one core of the machine of results/short_budget.csv (an
# epoch of UniNeXt-N32 cost 5.6-6.7 CPU-minutes there with window, 5.1-6.3 with conv, depending on what else
# ran, the CNN 2.5-2.8, the linear classifier seconds), in order of value, so that a sweep cut short has
# the most useful runs; the CNN's longest run comes last.
EPOCHS = {
    "UniNeXt-N32 window": [2, 1, 9, 3],
    "UniNeXt-N32 conv": [2, 1, 10, 3],
    "CNN (0.14M)": [3, 2, 7, 21],
    "linear": [1, 4, 16],
}
COLORS = {"UniNeXt-N32 window": "#0072B2", "UniNeXt-N32 conv": "#56B4E9", "CNN (0.14M)": "#D55E00",
          "linear": "#999999"}
COLUMNS = ["label", "epochs", "test_acc1", "cpu_seconds", "wall_seconds", "params", "date", "device", "command"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=list(train_minimal.SMALL_DATASETS))
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="LABEL",
                   help=f"which of {', '.join(MODELS)} (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default="experiments/results", help="where the CSV, figure and table go (default: %(default)s)")
    p.add_argument("--runs", default="runs/short_budget", help="where each run's folder goes (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process with one thread (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="seconds: synthetic data, 256 images, 1 epoch per model")
    return p


def planned_runs(args):
    """(label, epochs, train_minimal argv) for every run, the first length of every model first."""
    plan = []
    for i in range(max(map(len, EPOCHS.values()))):
        for label in args.models:
            if i < len(EPOCHS[label]) and not (args.tiny and i):
                epochs = 1 if args.tiny else EPOCHS[label][i]
                out = Path(args.runs) / f"{args.dataset}-{label.split(' (')[0].replace(' ', '-')}-{epochs}ep"
                argv = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--device", "cpu",
                        "--epochs", str(epochs), "--seed", str(args.seed), "--eval-every", "0", *MODELS[label],
                        *(["--train-size", "256"] if args.tiny else []), "--out", str(out)]
                plan.append((label, epochs, argv))
    return plan


def train_one(argv):
    """Train one run in this process with one thread (resuming it if it was cut short); its summary."""
    torch.set_num_threads(1)
    out = Path(argv[argv.index("--out") + 1])
    if (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
        seed = int(argv[argv.index("--seed") + 1])
        if summary["config"]["seed"] != seed:
            raise SystemExit(f"{out} holds a run with seed {summary['config']['seed']}, not {seed}: give this "
                             f"seed its own --runs folder")
        return summary
    if (out / "last.pt").exists():  # the same options, continued in place
        argv = [*argv[:argv.index("--out")], "--resume", str(out)]
    return train_minimal.train(train_minimal.build_parser().parse_args(argv))


def row(label, epochs, argv, summary):
    return {"label": label, "epochs": epochs, "test_acc1": summary["test_acc1"],
            "cpu_seconds": round(summary["cpu_seconds"], 2), "wall_seconds": round(summary["seconds"], 2),
            "params": summary["params"], "date": summary["date"], "device": summary["device"],
            "command": f"OMP_NUM_THREADS=1 python train_minimal.py {shlex.join(argv)}"}


def write_table(rows, path):
    lines = ["| model | params | epochs | CPU-minutes (training) | test top-1 |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (list(MODELS).index(r["label"]), float(r["cpu_seconds"]))):
        lines.append(f"| {r['label']} | {int(r['params']) / 1e6:.2f}M | {r['epochs']} | "
                     f"{float(r['cpu_seconds']) / 60:.2f} | {float(r['test_acc1']):.2f}% |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows, args, path):
    """Test accuracy against CPU-minutes on a log axis, a line per model. The linear classifier trains in
    seconds, far left of the others, so it is drawn as a level line at its best accuracy; the accuracy axis
    starts just below it, at what any model must beat to have learned anything."""
    fig = Figure(figsize=(7.5, 4.8))  # drawn on its own canvas: pyplot's backend stays as it was
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label in MODELS:
        points = sorted((float(r["cpu_seconds"]) / 60, float(r["test_acc1"])) for r in rows if r["label"] == label)
        if not points:
            continue
        if label == "linear":
            minutes, best = max(points, key=lambda p: p[1])
            ax.axhline(best, color=COLORS[label], ls="--", label=f"linear classifier, best ({best:.1f}% in "
                                                                   f"{minutes * 60:.0f} CPU-s)")
            ax.set_ylim(bottom=best - 1)
        else:
            ax.plot(*zip(*points), marker="o", color=COLORS[label], label=label)
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10, 20, 60, 120], labels=["1", "2", "5", "10", "20", "60", "120"])
    ax.xaxis.set_minor_formatter(NullFormatter())
    minutes = [float(r["cpu_seconds"]) / 60 for r in rows if r["label"] != "linear"] or [10]
    ax.set_xlim(min(3, min(minutes) / 1.3), max(80, max(minutes) * 1.3))
    ax.set(xlabel="training cost (CPU-minutes, one thread; log scale)", ylabel="test top-1 accuracy (%)",
           title=f"{args.dataset}, all training images, full test set, seed {args.seed}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.dataset = "synthetic"
        args.runs = args.results = str(Path(args.runs) / "tiny")  # never into the committed results/
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    plan = planned_runs(args)
    rows = []
    if (results / "short_budget.csv").exists():  # the rows of models not asked for this time are kept
        with open(results / "short_budget.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["label"] not in args.models]
    kept, started = len(rows), time.time()

    def record(label, epochs, run_argv, summary):
        rows.append(row(label, epochs, run_argv, summary))
        print(f"{label}, {epochs} epochs: {summary['test_acc1']:.2f}% in {summary['cpu_seconds'] / 60:.1f} "
              f"CPU-min ({len(rows) - kept} of {len(plan)} runs, {(time.time() - started) / 60:.0f} min)", flush=True)
        with open(results / "short_budget.csv.tmp", "w", newline="") as f:  # after every run: nothing lost
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(results / "short_budget.csv.tmp", results / "short_budget.csv")
        write_table(rows, results / "short_budget.md")
        plot(rows, args, results / "short_budget.png")

    if args.jobs == 1:
        for label, epochs, run_argv in plan:
            record(label, epochs, run_argv, train_one(run_argv))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(train_one, run_argv): (label, epochs, run_argv) for label, epochs, run_argv in plan}
            for future in as_completed(futures):
                record(*futures[future], future.result())


if __name__ == "__main__":
    main()

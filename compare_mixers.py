"""
The paper's claim, measured: every mixer in the vanilla and in the UniNeXt architecture, same data, same
recipe, same budget, several seeds. UniNeXt claims that its architecture (1) lifts every mixer, (2) narrows
the gap between mixers and (3) changes their ranking; this script trains the grid and says whether each
holds, whatever the answer.

    python compare_mixers.py --jobs 2                          # Fashion-MNIST, 6,000 images, N32, 2 seeds
    python compare_mixers.py --ablation                        # window: vanilla + one ingredient at a time
    python compare_mixers.py --dataset cifar100 --size T32 --train-size 0 --epochs 100   # with a GPU
    python compare_mixers.py --tiny                            # seconds, for CI: synthetic data

Each run is `train_minimal.train(...)`, with its own folder under --runs (metrics.csv, curves.png, last.pt).
Finished runs are rows of the CSV and are never redone; a run that was stopped half way resumes from its
last.pt. So an interrupted sweep continues where it stopped when the same command is given again.

Writes into --results: mixer_comparison.csv (a row per run: dataset, train_size, mixer, arch, seed, epochs,
params, test_acc1, seconds, device), mixer_comparison.png, mixer_comparison.md (the three claims, from the
numbers) and mixer_comparison.log; with --ablation the same four files named ablation_window.*.
"""

import argparse
import csv
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import train_minimal  # noqa: E402
import uninext  # noqa: E402

COLUMNS = ["dataset", "train_size", "mixer", "arch", "seed", "epochs", "params", "test_acc1", "seconds", "device"]
# The ablation ladder: the vanilla architecture, each UniNeXt ingredient added on its own,
# and all four, which is UniNeXt. Adding EC drops the mixer's original position encoding (uninext.create_model).
LADDER = {
    "vanilla": ["--arch", "vanilla"],
    "+conv stem": ["--arch", "vanilla", "--conv-stem"],
    "+EC": ["--arch", "vanilla", "--ec"],
    "+HdC": ["--arch", "vanilla", "--hdc"],
    "+PC": ["--arch", "vanilla", "--pc"],
    "uninext": ["--arch", "uninext"],
}
COLORS = {"vanilla": "#E69F00", "uninext": "#0072B2"}  # Okabe-Ito orange and blue: safe for colour blindness


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=list(train_minimal.SMALL_DATASETS))
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--train-size", type=int, default=6000, help="class-balanced training images, 0 = all (default: %(default)s)")
    p.add_argument("--size", default="N32", choices=list(uninext.PRESETS), help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="(default: 0 1)")
    p.add_argument("--mixers", nargs="+", default=list(uninext.MIXERS), choices=list(uninext.MIXERS))
    p.add_argument("--ablation", action="store_true",
                   help="instead of every mixer x both architectures: the window mixer, vanilla plus one "
                        "UniNeXt ingredient at a time, and all four")
    p.add_argument("--results", default="results", help="where the CSV, plot, summary and log go (default: %(default)s)")
    p.add_argument("--runs", default="runs/compare", help="where each run's folder goes (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, in separate processes sharing the CPU cores (small models on a "
                        "CPU use several cores poorly; keep 1 on a GPU) (default: %(default)s)")
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long smoke run of the same code: synthetic data, 256 images, 1 epoch, 1 seed")
    return p


def planned_runs(args):
    """(label, arch, mixer, train_minimal options) for every cell, seed by seed so that a sweep cut short
    has whole seeds."""
    cells = ([(label, "window", options) for label, options in LADDER.items()] if args.ablation else
             [(arch, mixer, ["--arch", arch]) for mixer in args.mixers for arch in uninext.ARCHS])
    return [(seed, label, mixer, options) for seed in args.seeds for label, mixer, options in cells]


def train_one(args, seed, label, mixer, options, threads=None):
    """Train one cell (resuming its folder if it was cut short) and return its CSV row and what to log."""
    if threads:
        torch.set_num_threads(threads)
    notes = []
    out = Path(args.runs) / f"{args.dataset}-{args.train_size}-{mixer}-{label.replace(' ', '').replace('+', 'plus-')}-seed{seed}"
    argv = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--size", args.size, "--mixer", mixer,
            "--epochs", str(args.epochs), "--seed", str(seed), "--eval-every", "0", "--device", args.device,
            *options, *(["--train-size", str(args.train_size)] if args.train_size else [])]
    argv += ["--resume", str(out)] if (out / "last.pt").exists() else ["--out", str(out)]
    notes.append(f"run: python train_minimal.py {shlex.join(argv)}")
    try:
        summary = train_minimal.train(train_minimal.build_parser().parse_args(argv))
    except train_minimal.Diverged as e:  # recorded as a failed run, not hidden: its accuracy is NaN
        notes.append(f"diverged: {e}")
        summary = {"params": "", "test_acc1": float("nan"), "seconds": "", "device": ""}
    return {"dataset": args.dataset, "train_size": args.train_size, "mixer": mixer, "arch": label, "seed": seed,
            "epochs": args.epochs, "params": summary["params"], "test_acc1": summary["test_acc1"],
            "seconds": round(summary["seconds"], 1) if summary["seconds"] != "" else "",
            "device": summary["device"]}, notes


def key(row):
    return tuple(str(row[c]) for c in ("dataset", "train_size", "mixer", "arch", "seed", "epochs"))


def read_rows(path):
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path, rows):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# What the numbers say


def accuracies(rows):
    """{(mixer, arch): [test_acc1 per seed]}, in the order the rows came."""
    acc = {}
    for r in rows:
        acc.setdefault((r["mixer"], r["arch"]), []).append(float(r["test_acc1"]))
    return acc


def ranking(means, arch, mixers):
    return sorted(mixers, key=lambda m: -means[m, arch])


def summarise(rows, args):
    """The three claims, answered from the rows, as Markdown."""
    acc = accuracies(rows)
    means = {k: statistics.fmean(v) for k, v in acc.items()}
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    lines = [f"{args.dataset}, {args.train_size or 'all'} training images, {args.size}, {args.epochs} epochs, "
             f"seeds {', '.join(map(str, args.seeds))}; test top-1 in %, mean (min-max over seeds)", "",
             "| mixer | vanilla | UniNeXt | UniNeXt - vanilla |", "|---|---|---|---|"]
    for m in mixers:
        cells = [f"{means[m, a]:.2f} ({min(acc[m, a]):.2f}-{max(acc[m, a]):.2f})" for a in uninext.ARCHS]
        lines.append(f"| {m} | {cells[1]} | {cells[0]} | {means[m, 'uninext'] - means[m, 'vanilla']:+.2f} |")
    lifted = [m for m in mixers if means[m, "uninext"] > means[m, "vanilla"]]
    spread = {a: (max(means[m, a] for m in mixers) - min(means[m, a] for m in mixers),
                  statistics.pstdev([means[m, a] for m in mixers])) for a in uninext.ARCHS}
    ranks = {a: ranking(means, a, mixers) for a in uninext.ARCHS}
    lines += ["",
              f"1. UniNeXt lifts every mixer: {'yes' if len(lifted) == len(mixers) else 'no'} "
              f"({len(lifted)} of {len(mixers)} mixers higher; "
              f"{', '.join(m for m in mixers if m not in lifted) or 'none'} not).",
              f"2. UniNeXt narrows the gap between mixers: {'yes' if spread['uninext'][0] < spread['vanilla'][0] else 'no'} "
              f"(best - worst mixer: {spread['vanilla'][0]:.2f} vanilla, {spread['uninext'][0]:.2f} UniNeXt; "
              f"standard deviation of the means: {spread['vanilla'][1]:.2f} vs {spread['uninext'][1]:.2f}).",
              f"3. UniNeXt changes the ranking: {'yes' if ranks['vanilla'] != ranks['uninext'] else 'no'} "
              f"(vanilla: {' > '.join(ranks['vanilla'])}; UniNeXt: {' > '.join(ranks['uninext'])})."]
    return "\n".join(lines)


def summarise_ablation(rows, args):
    acc = accuracies(rows)
    base = statistics.fmean(acc["window", "vanilla"])
    lines = [f"window mixer, {args.dataset}, {args.train_size or 'all'} training images, {args.size}, "
             f"{args.epochs} epochs, seeds {', '.join(map(str, args.seeds))}; test top-1 in %", "",
             "| architecture | mean | min-max | vs vanilla |", "|---|---|---|---|"]
    for label in LADDER:
        a = acc["window", label]
        lines.append(f"| {label} | {statistics.fmean(a):.2f} | {min(a):.2f}-{max(a):.2f} | "
                     f"{statistics.fmean(a) - base:+.2f} |")
    return "\n".join(lines)


def plot(rows, args, path):
    """Accuracy per mixer (or ablation step): a dot per seed, a bar at the mean, per architecture."""
    acc = accuracies(rows)
    labels = list(LADDER) if args.ablation else list(dict.fromkeys(r["mixer"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels) + 2), 4.5), dpi=110)
    if args.ablation:
        for i, label in enumerate(labels):
            a = acc["window", label]
            ax.bar(i, statistics.fmean(a), color=COLORS["uninext" if label == "uninext" else "vanilla"], alpha=0.6)
            ax.plot([i] * len(a), a, "o", color="black", ms=4)
        ax.set_title(f"Window mixer: the vanilla architecture plus one UniNeXt ingredient at a time\n"
                     f"{args.dataset}, {args.train_size or 'all'} images, {args.size}, {args.epochs} epochs; dots = seeds")
    else:
        for j, arch in enumerate(uninext.ARCHS):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(labels))]
            means = [statistics.fmean(acc[m, arch]) for m in labels]
            ax.bar(xs, means, width=0.36, color=COLORS[arch], alpha=0.7,
                   label="UniNeXt" if arch == "uninext" else "vanilla")
            for x, m in zip(xs, labels):
                ax.plot([x] * len(acc[m, arch]), acc[m, arch], "o", color="black", ms=3.5)
        ax.set_title(f"Every mixer, vanilla vs UniNeXt architecture\n{args.dataset}, {args.train_size or 'all'} "
                     f"images, {args.size}, {args.epochs} epochs; bars = mean, dots = seeds")
        ax.legend(loc="lower right")
    values = [v for a in acc.values() for v in a]
    ax.set_ylim(max(0, min(values) - 5), min(100, max(values) + 2))
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("ablation step" if args.ablation else "spatial token mixer")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.dataset, args.train_size, args.epochs, args.seeds = "synthetic", 256, 1, [0]
    name = "ablation_window" if args.ablation else "mixer_comparison"
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    csv_path = results / f"{name}.csv"
    rows = read_rows(csv_path)
    done = {key(r) for r in rows}
    if args.ablation:  # the two ends of the ladder are cells of the mixer comparison: reuse them when there
        for r in read_rows(results / "mixer_comparison.csv"):
            if r["mixer"] == "window" and key(r) not in done:
                rows.append(r)
                done.add(key(r))

    with open(results / f"{name}.log", "a") as log_file:
        def log(message):
            print(message, flush=True)
            log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            log_file.flush()

        log(f"sweep: python compare_mixers.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
        plan = planned_runs(args)
        wanted, todo = set(), []
        for seed, label, mixer, options in plan:
            cell = {"dataset": args.dataset, "train_size": args.train_size, "mixer": mixer, "arch": label,
                    "seed": seed, "epochs": args.epochs}
            wanted.add(key(cell))
            if key(cell) not in done:
                todo.append((seed, label, mixer, options))
        log(f"{len(plan) - len(todo)} of {len(plan)} runs done before, {len(todo)} to go, {args.jobs} at a time")

        def record(row, notes):
            for note in notes:
                log(note)
            log(f"result: {row}")
            rows.append(row)
            write_rows(csv_path, rows)  # after every run, so an interruption loses at most the runs in flight

        if args.jobs == 1:
            for seed, label, mixer, options in todo:
                log(f"start: {mixer} {label} seed {seed}")
                record(*train_one(args, seed, label, mixer, options))
        else:
            threads = max(1, (os.cpu_count() or 1) // args.jobs)
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                running = [pool.submit(train_one, args, *cell, threads=threads) for cell in todo]
                for future in as_completed(running):
                    record(*future.result())

        write_rows(csv_path, rows)
        rows = [r for r in rows if key(r) in wanted]
        text = summarise_ablation(rows, args) if args.ablation else summarise(rows, args)
        (results / f"{name}.md").write_text(text + "\n")
        plot(rows, args, results / f"{name}.png")
        log("summary:\n" + text)


if __name__ == "__main__":
    main()

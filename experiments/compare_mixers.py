"""
The paper's claim, measured where the models have learned: every mixer in the vanilla and in the UniNeXt
architecture, same data, same recipe, several seeds, beside a linear classifier and a small CNN trained the
same way. UniNeXt claims that its architecture (1) lifts every mixer, (2) narrows the gap between mixers and
(3) changes their ranking. This script trains the grid and answers each claim with an interval over the
seeds and one of three verdicts: holds, does not hold, or cannot tell at this scale.

    OMP_NUM_THREADS=1 python experiments/compare_mixers.py --jobs 2            # Fashion-MNIST, all 60,000 images, N32
    OMP_NUM_THREADS=1 python experiments/compare_mixers.py --ablation --jobs 2 # window: vanilla + one ingredient at a time
    python experiments/compare_mixers.py --dataset cifar100 --size T32 --epochs 100 --device cuda   # with a GPU
    python experiments/compare_mixers.py --report-only                          # the table and figure of what has run
    python experiments/compare_mixers.py --tiny                                 # seconds: synthetic data, the same code

Two views of the same question. Equal epochs: both architectures see the same images the same number of
times. Equal CPU time: UniNeXt costs 1.4 to 1.7 times vanilla's CPU time per image at N32 (measured on
Fashion-MNIST, results/mixer_comparison.csv), so vanilla is also trained for the epochs that cost what
UniNeXt's run cost (measured on the first seed, then the same for all).

"Vanilla" is one shared skeleton with the four UniNeXt ingredients off: a 4x4 patch stem (2x2 at the 32x32
presets), 3x3 stride-2 downsampling, a projection after every mixer and each mixer's original position
encoding; it is not each mixer's original network (CSWin and PoolFormer, for example, were published with
overlapping conv stems). At N32, `swin` is left out: its one shifted block lies in stage 3, whose 4x4 grid
is a single window, so it computes exactly what `window` does.

Any other train_minimal.py option (the recipe: --lr, --batch-size, --crop, ...) is passed on to every run.
A run is keyed by everything that changes its result (dataset, training images, preset, mixer,
architecture, epochs, seed and the whole recipe, train_minimal's defaults included), so a sweep with other
settings never reuses or mixes in these runs. Finished runs are rows of the CSV and are never redone; a run
stopped half way resumes from its last.pt; a run that diverged is recorded as diverged and left out of the
summary. Writes into --results: mixer_comparison.csv (a row per run, with its command), .md (the verdicts),
.png and .log; with --ablation the same four files named ablation_window.*.
"""

import argparse
import csv
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import shlex
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import Bbox
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # uninext.py and train_minimal.py
import train_helpers
import train_minimal
import uninext

COLUMNS = ["dataset", "train_size", "size", "model", "mixer", "arch", "view", "seed", "epochs", "params", "macs",
           "test_acc1", "cpu_seconds", "seconds", "status", "device", "date", "key", "command"]
# The ablation ladder: the vanilla architecture, each UniNeXt ingredient added on its own, and all four,
# which is UniNeXt. EC takes the place of the mixer's own position encoding, as in UniNeXt: for window that
# drops Swin's relative position bias (and for cswin, EC and LePE are the same 3x3 depthwise conv).
LADDER = {
    "vanilla": ["--arch", "vanilla"],
    "+conv stem": ["--arch", "vanilla", "--conv-stem"],
    "+EC": ["--arch", "vanilla", "--ec"],
    "+HdC": ["--arch", "vanilla", "--hdc"],
    "+PC": ["--arch", "vanilla", "--pc"],
    "uninext": ["--arch", "uninext"],
}
BASELINES = ["cnn", "linear"]
SWEEP_OPTIONS = {"--out", "--resume", "--model", "--mixer", "--arch", "--epochs", "--seed", "--eval-only"}
COLORS = {"vanilla": "#E69F00", "uninext": "#0072B2", "ingredient": "#009E73"}  # Okabe-Ito: colour-blind safe
CONFIDENCE = 0.95
VERDICTS = ("holds", "does not hold", "cannot tell at this scale")


class UsageError(Exception):
    """Bad input: reported as one line and exit code 2."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # so that train_minimal's --seed is not taken for --seeds
    p.add_argument("--dataset", default="fashion-mnist", choices=list(train_minimal.SMALL_DATASETS))
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--train-size", type=int, default=0, help="class-balanced training images, 0 = all (default: all)")
    p.add_argument("--size", default="N32", choices=list(uninext.PRESETS), help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4,
                   help="the budget of every UniNeXt run and of the equal-epoch vanilla runs (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: 0 1 2)")
    p.add_argument("--mixers", nargs="+", choices=list(uninext.MIXERS),
                   help="(default: every mixer that is a distinct network at --size)")
    p.add_argument("--ablation", action="store_true",
                   help="instead of every mixer x both architectures: the window mixer, vanilla plus one "
                        "UniNeXt ingredient at a time, and all four")
    p.add_argument("--results", help="where the CSV, plot, summary and log go (default: experiments/results; with --tiny, "
                                     "the --runs folder)")
    p.add_argument("--runs", default="runs/compare", help="where each run's folder goes (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, in separate processes sharing the CPU cores (small models on a "
                        "CPU use several cores poorly; keep 1 on a GPU) (default: %(default)s)")
    p.add_argument("--report-only", action="store_true",
                   help="write the table, verdicts and figure from the runs recorded so far; train nothing")
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long smoke run of the same code: synthetic data, 256 images, 1 epoch, 1 seed")
    return p


def parse(argv):
    """(options, the train_minimal.py options to pass on), checked."""
    args, recipe = build_parser().parse_known_args(argv)
    if args.tiny:
        args.dataset, args.train_size, args.epochs, args.seeds = "synthetic", 256, 1, [0]
        args.results = args.results or str(Path(args.runs) / "results")
    args.results = args.results or "experiments/results"
    taken = sorted({a.split("=")[0] for a in recipe if a.split("=")[0] in SWEEP_OPTIONS})
    identical = args.mixers and "swin" in args.mixers and not swin_shifts(args.size)
    problems = [message for bad, message in [
        (bool(taken), f"{', '.join(taken)}: set by the sweep for each run; give the sweep's own options instead"),
        (args.epochs < 1, "--epochs must be at least 1"),
        (args.jobs < 1, "--jobs must be at least 1"),
        (args.train_size < 0, "--train-size is a number of images, 0 = all"),
        (len(set(args.seeds)) != len(args.seeds), "--seeds: each seed once"),
        (identical, f"--mixers swin: at {args.size} swin never shifts a window and is the same network as window; "
                    f"leave it out or use a larger preset"),
    ] if bad]
    if problems:
        raise UsageError("; ".join(problems))
    if args.mixers is None:
        args.mixers = [m for m in uninext.MIXERS if m != "swin" or swin_shifts(args.size)]
    return args, recipe


def swin_shifts(size):
    """Whether swin at this preset shifts any window: it shifts every second block of a stage, and a shift
    changes nothing in a stage whose whole grid is one window."""
    cfg = uninext.config(size, "swin")
    grid = cfg.img_size // cfg.stem_stride  # the first stage's grid; each later stage halves it
    return any(depth > 1 and grid >> i > window for i, (depth, window) in enumerate(zip(cfg.depths, cfg.mixer_size)))


# ----------------------------------------------------------------------------------------------------------
# The runs


def planned_runs(args, recipe, rows):
    """Every run that can be planned from what is known so far: a dict per run with its row fields and
    train_minimal arguments. The equal-epoch runs and the baselines come seed by seed, then the equal-CPU
    vanilla runs, so that a sweep cut short has whole seeds of the main view first. The equal-CPU run of a
    mixer appears once the first seed's two equal-epoch runs of that mixer are done."""
    def run(seed, model, mixer, arch, view, epochs, options):
        argv = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--device", args.device,
                "--epochs", str(epochs), "--seed", str(seed), "--eval-every", "0", "--model", model,
                *(["--size", args.size, "--mixer", mixer] if model == "uninext" else []),
                *(["--train-size", str(args.train_size)] if args.train_size else []), *options, *recipe]
        return {"model": model, "mixer": mixer, "arch": arch, "view": view, "seed": seed, "epochs": epochs,
                "argv": argv, "key": run_key(argv)}

    def equal_epochs(seed, mixer, arch):
        return run(seed, "uninext", mixer, arch, "epochs", args.epochs, ["--arch", arch])

    by_key = {r["key"]: r for r in rows}
    plan = []
    for seed in args.seeds:
        if args.ablation:
            plan += [run(seed, "uninext", "window", label, "epochs", args.epochs, options)
                     for label, options in LADDER.items()]
        else:
            plan += [equal_epochs(seed, mixer, arch) for mixer in args.mixers for arch in uninext.ARCHS]
        plan += [run(seed, model, "", model, "epochs", args.epochs, []) for model in BASELINES]
    if args.ablation:
        return plan
    cpu_epochs = {}  # mixer: vanilla's epochs at UniNeXt's CPU time, from the first seed's two runs
    for mixer in args.mixers:
        done = [by_key.get(equal_epochs(args.seeds[0], mixer, arch)["key"]) for arch in uninext.ARCHS]
        if all(r and r["status"] == "ok" for r in done):
            ratio = float(done[0]["cpu_seconds"]) / float(done[1]["cpu_seconds"])  # UniNeXt's over vanilla's
            cpu_epochs[mixer] = max(1, round(args.epochs * ratio))
    return plan + [run(seed, "uninext", mixer, "vanilla", "cpu", epochs, ["--arch", "vanilla"])
                   for seed in args.seeds for mixer, epochs in cpu_epochs.items()]


def run_key(argv):
    """A short hash of every setting that changes a run's result: train_minimal's resolved options (its
    device-dependent defaults filled in) without those that only say where and how to run, and without
    those that are unset (None), so that an option added later, off by default, keeps every key."""
    args = train_minimal.resolve(train_minimal.build_parser().parse_args(argv))
    settings = {k: v for k, v in vars(args).items() if k not in train_helpers.RUNTIME_OPTIONS and v is not None}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def macs_per_image(args, dataset):
    """Multiply-accumulates of one forward pass on one image, counted by torch.utils.flop_counter on the
    manual attention path (`record_attention`): the counter sees no MACs inside SDPA's fused kernels."""
    in_chans = 1 if dataset == "fashion-mnist" else 3
    model = train_minimal.build_model(args, train_minimal.SMALL_DATASETS[dataset], in_chans).eval()
    with uninext.record_attention(model), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, in_chans, 32, 32))
    return counter.get_total_flops() // 2


def train_one(args, run, threads=None):
    """Train one run (resuming its folder if it was cut short); return its CSV row and what to log."""
    if threads:
        torch.set_num_threads(threads)
    name = run["mixer"] + "-" + run["arch"].replace(" ", "").replace("+", "plus-") if run["mixer"] else run["model"]
    out = Path(args.runs) / f"{args.dataset}-{name}-{run['epochs']}ep-seed{run['seed']}-{run['key']}"
    argv = [*run["argv"], *(["--resume", str(out)] if (out / "last.pt").exists() else ["--out", str(out)])]
    command = f"python train_minimal.py {shlex.join(run['argv'] + ['--out', str(out)])}"
    notes = [f"run: {command}"]
    options = train_minimal.build_parser().parse_args(argv)
    row = {"dataset": args.dataset, "train_size": args.train_size or "all", "size": args.size if run["mixer"] else "",
           **{k: run[k] for k in ("model", "mixer", "arch", "view", "seed", "epochs", "key")},
           "macs": macs_per_image(train_minimal.resolve(options), args.dataset), "command": command,
           "date": time.strftime("%Y-%m-%d")}
    try:
        summary = train_minimal.train(options)
    except train_minimal.Diverged as e:  # recorded, so that the sweep moves on and the summary says so
        notes.append(f"diverged: {e}")
        return {**row, "status": "diverged", "params": "", "test_acc1": "", "cpu_seconds": "", "seconds": "",
                "device": ""}, notes
    return {**row, "status": "ok", "params": summary["params"], "test_acc1": summary["test_acc1"],
            "cpu_seconds": round(summary["cpu_seconds"], 1), "seconds": round(summary["seconds"], 1),
            "device": summary["device"]}, notes


def read_rows(path):
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "key" not in rows[0]:
        raise UsageError(f"{path} was written by an earlier version of this script (its rows have no run key); "
                         f"move it away or give another --results")
    return rows


def write_rows(path, rows):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def sweep(args, recipe, rows, record, log):
    """Train every planned run not yet in `rows`, `args.jobs` at a time, re-planning after each run (the
    equal-CPU runs wait for the runs that set their epochs)."""
    pool = None
    if args.jobs > 1:
        pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    running = {}
    try:
        while True:
            done = {r["key"] for r in rows}
            for run in planned_runs(args, recipe, rows):
                if len(running) >= args.jobs:
                    break
                if run["key"] in done or run["key"] in running.values():
                    continue
                log(f"start: {run['mixer'] or run['model']} {run['arch']} ({run['view']}) seed {run['seed']}, "
                    f"{run['epochs']} epochs")
                if pool is None:
                    future = Future()
                    future.set_result(train_one(args, run))
                else:
                    future = pool.submit(train_one, args, run, threads)
                running[future] = run["key"]
            if not running:
                return
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                del running[future]
                record(*future.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------
# Statistics: intervals over seeds, and verdicts from them


def t_quantile(p, df):
    """The p-quantile of Student's t distribution with df degrees of freedom (df may be fractional, as in
    Welch's test): the density integrated by Simpson's rule, the quantile found by bisection."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda t: math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    def cdf(x, n=400):
        h = x / n
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
        return 0.5 + h / 3 * (density(0) + inner + density(x))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def difference_interval(a, b):
    """mean(a) - mean(b) with its Welch t-interval, as (difference, low, high); low and high are None with
    fewer than two values on either side (no spread to judge by)."""
    d = statistics.fmean(a) - statistics.fmean(b)
    if min(len(a), len(b)) < 2:
        return d, None, None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return d, d, d
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile((1 + CONFIDENCE) / 2, df) * se
    return d, d - half, d + half


def bootstrap(cells, statistic, n=2000, seed=0):
    """The percentile interval of statistic({cell: mean}) when each cell's seeds are resampled with
    replacement; None unless every cell has two seeds or more: a cell of one seed has no spread to resample,
    and holding it fixed would make the interval far too narrow."""
    if any(len(v) < 2 for v in cells.values()):
        return None
    rng = random.Random(seed)
    draws = sorted(statistic({k: statistics.fmean(rng.choices(v, k=len(v))) for k, v in cells.items()})
                   for _ in range(n))
    return draws[int(n * (1 - CONFIDENCE) / 2)], draws[int(n * (1 + CONFIDENCE) / 2) - 1]


def verdict(low, high):
    """holds when the whole interval is above zero, does not hold when it is below, else cannot tell."""
    if low is None:
        return VERDICTS[2]
    return VERDICTS[0] if low > 0 else VERDICTS[1] if high < 0 else VERDICTS[2]


def kendall_tau(x, y):
    """Kendall's tau-b of two equally long score lists: (concordant - discordant) pairs over the geometric
    mean of the pairs untied in each list; tied pairs count as neither. The one definition used here."""
    concordant = discordant = untied_x = untied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sx, sy = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
        untied_x += sx != 0
        untied_y += sy != 0
        concordant += sx * sy > 0
        discordant += sx * sy < 0
    return (concordant - discordant) / math.sqrt(untied_x * untied_y) if untied_x and untied_y else float("nan")


def interval_text(low, high, how=""):
    return ("no interval (one seed)" if low is None else
            f"{CONFIDENCE:.0%} interval {low:+.2f} to {high:+.2f}{', ' + how if how else ''}")


# ----------------------------------------------------------------------------------------------------------
# What the numbers say


def ok_rows(rows):
    return [r for r in rows if r["status"] == "ok"]


def accuracies(rows):
    """{(mixer or model, arch, view): [test_acc1 per seed]} of the runs that finished."""
    acc = {}
    for r in ok_rows(rows):
        acc.setdefault((r["mixer"] or r["model"], r["arch"], r["view"]), []).append(float(r["test_acc1"]))
    return acc


def mean_of(rows, column, **match):
    values = [float(r[column]) for r in ok_rows(rows) if all(str(r[k]) == str(v) for k, v in match.items())]
    return statistics.fmean(values) if values else float("nan")


def number(x, digits=1):
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def cell_text(values):
    return (f"{statistics.fmean(values):.2f} ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else
            f"{values[0]:.2f}") if values else "-"


def claims(acc, mixers, vanilla_view):
    """The three claims for one view (vanilla at equal epochs or at equal CPU time), as Markdown lines."""
    paired = [m for m in mixers if (m, "uninext", "epochs") in acc and (m, "vanilla", vanilla_view) in acc]
    if not paired:
        return ["No mixer has finished in both architectures yet."]
    cells = {(m, a): acc[m, a, "epochs" if a == "uninext" else vanilla_view] for m in paired for a in uninext.ARCHS}
    gains = {m: difference_interval(cells[m, "uninext"], cells[m, "vanilla"]) for m in paired}
    sure_up = [m for m, (_, lo, _) in gains.items() if lo is not None and lo > 0]
    sure_down = [m for m, (_, _, hi) in gains.items() if hi is not None and hi < 0]
    lift = VERDICTS[0] if len(sure_up) == len(paired) else VERDICTS[1] if sure_down else VERDICTS[2]
    lines = [
        f"1. **UniNeXt lifts every mixer: {lift}.** Lifted beyond the seed noise: {len(sure_up)} of {len(paired)} "
        f"({', '.join(sure_up) or 'none'}); lowered beyond it: {', '.join(sure_down) or 'none'}. Per mixer, "
        "UniNeXt - vanilla: " + "; ".join(f"{m} {d:+.2f} ({interval_text(lo, hi)})" for m, (d, lo, hi) in gains.items())
        + "."]
    if len(paired) < 2:
        return lines + ["2.-3. The gap and the ranking need two mixers finished in both architectures."]

    def spread(means, arch):
        return statistics.pstdev([means[m, arch] for m in paired])

    means = {k: statistics.fmean(v) for k, v in cells.items()}
    narrowing = spread(means, "vanilla") - spread(means, "uninext")
    interval = bootstrap(cells, lambda ms: spread(ms, "vanilla") - spread(ms, "uninext"))
    low, high = interval or (None, None)

    tau = kendall_tau([means[m, "vanilla"] for m in paired], [means[m, "uninext"] for m in paired])
    tau_interval = bootstrap(cells, lambda ms: kendall_tau([ms[m, "vanilla"] for m in paired],
                                                           [ms[m, "uninext"] for m in paired]))
    order = {}
    for p, q in itertools.combinations(paired, 2):
        signs = []
        for a in uninext.ARCHS:
            _, lo, hi = difference_interval(cells[p, a], cells[q, a])
            signs.append(0 if lo is None or lo <= 0 <= hi else 1 if lo > 0 else -1)
        order[p, q] = signs
    flipped = [f"{p}/{q}" for (p, q), (u, v) in order.items() if u * v < 0]
    kept = [1 for u, v in order.values() if u * v > 0]
    ranking = VERDICTS[0] if flipped else VERDICTS[1] if len(kept) == len(order) else VERDICTS[2]
    by = {a: " > ".join(sorted(paired, key=lambda m: -means[m, a])) for a in uninext.ARCHS}
    return lines + [
        f"2. **UniNeXt narrows the gap between mixers: {verdict(low, high)}.** Standard deviation of the mixer "
        f"means: {spread(means, 'vanilla'):.2f} vanilla, {spread(means, 'uninext'):.2f} UniNeXt; narrowing "
        f"{narrowing:+.2f} ({interval_text(low, high, 'seeds resampled')}). Best - worst mixer: "
        f"{max(means[m, 'vanilla'] for m in paired) - min(means[m, 'vanilla'] for m in paired):.2f} vanilla, "
        f"{max(means[m, 'uninext'] for m in paired) - min(means[m, 'uninext'] for m in paired):.2f} UniNeXt.",
        f"3. **UniNeXt changes the ranking: {ranking}.** Pairs of mixers ordered beyond the seed noise in both "
        f"architectures: {len(kept) + len(flipped)} of {len(order)}, of which flipped: "
        f"{', '.join(flipped) or 'none'}. Kendall tau-b of the two rankings "
        + ("undefined (tied means)" if math.isnan(tau) else f"{tau:.2f}")
        + (f" ({CONFIDENCE:.0%} interval {tau_interval[0]:.2f} to {tau_interval[1]:.2f}, seeds resampled)"
           if tau_interval else "") + f". Vanilla: {by['vanilla']}; UniNeXt: {by['uninext']}.",
    ]


def baseline_lines(rows, acc):
    """The baselines' table, trained with the same recipe and epochs as the runs they stand beside."""
    macs = {r["model"]: int(r["macs"]) for r in rows if r["model"] in BASELINES}
    return ["", "Baselines, the same recipe and epochs:", "", "| model | test top-1 | CPU-min | MMAC |",
            "|---|---|---|---|"] + [
        f"| {b} | {cell_text(acc.get((b, b, 'epochs')))} | {number(mean_of(rows, 'cpu_seconds', model=b) / 60)} | "
        f"{number(macs.get(b, math.nan) / 1e6, 3)} |" for b in BASELINES]


def summarise(rows, args):
    """The table and the verdicts of the mixer comparison, as Markdown."""
    acc = accuracies(rows)
    mixers = [m for m in args.mixers if any(k[0] == m for k in acc)]
    cpu_epochs = {r["mixer"]: r["epochs"] for r in rows if r["view"] == "cpu"}
    minutes = lambda **match: number(mean_of(rows, "cpu_seconds", **match) / 60)
    macs = {(r["mixer"] or r["model"], r["arch"]): int(r["macs"]) for r in rows}
    lines = [f"{args.dataset}, {args.train_size or 'all'} training images, {args.size}, {args.epochs} epochs, "
             f"seeds {', '.join(map(str, args.seeds))}. Test top-1 in %: mean (lowest-highest over seeds); "
             "CPU-min: CPU-minutes of training per run (one thread); MMAC: multiply-accumulates per image.", "",
             "| mixer | vanilla, equal epochs | CPU-min | vanilla, equal CPU time | epochs | CPU-min | UniNeXt "
             "| CPU-min | MMAC vanilla / UniNeXt |", "|---|---|---|---|---|---|---|---|---|"]
    for m in mixers:
        lines.append(
            f"| {m} | {cell_text(acc.get((m, 'vanilla', 'epochs')))} "
            f"| {minutes(mixer=m, arch='vanilla', view='epochs')} "
            f"| {cell_text(acc.get((m, 'vanilla', 'cpu')))} | {cpu_epochs.get(m, '-')} "
            f"| {minutes(mixer=m, arch='vanilla', view='cpu')} | {cell_text(acc.get((m, 'uninext', 'epochs')))} "
            f"| {minutes(mixer=m, arch='uninext')} | {number(macs.get((m, 'vanilla'), math.nan) / 1e6)} / "
            f"{number(macs.get((m, 'uninext'), math.nan) / 1e6)} |")
    lines += baseline_lines(rows, acc)
    diverged = [f"{r['mixer'] or r['model']} {r['arch']} ({r['view']}) seed {r['seed']}" for r in rows
                if r["status"] == "diverged"]
    if diverged:
        lines += ["", f"Diverged, left out: {'; '.join(diverged)}."]
    for view, title in [("epochs", "at equal epochs"), ("cpu", "at equal CPU time (vanilla trained longer)")]:
        lines += ["", f"**The claims {title}** ({CONFIDENCE:.0%} Welch t-intervals over seeds, unless said):", ""]
        lines += claims(acc, mixers, view)
    return "\n".join(lines)


def summarise_ablation(rows, args):
    acc = accuracies(rows)
    steps = [label for label in LADDER if ("window", label, "epochs") in acc]
    lines = [f"window mixer, {args.dataset}, {args.train_size or 'all'} training images, {args.size}, "
             f"{args.epochs} epochs, seeds {', '.join(map(str, args.seeds))}; test top-1 in %", "",
             "| architecture | test top-1 | CPU-min | vs vanilla | this step lifts vanilla |", "|---|---|---|---|---|"]
    if "vanilla" not in steps:
        return "\n".join(lines[:1] + ["", "The vanilla runs have not finished yet."])
    base = acc["window", "vanilla", "epochs"]
    for label in steps:
        d, lo, hi = difference_interval(acc["window", label, "epochs"], base)
        lines.append(f"| {label} | {cell_text(acc['window', label, 'epochs'])} | "
                     f"{number(mean_of(rows, 'cpu_seconds', arch=label) / 60)} | "
                     + ("| |" if label == "vanilla" else f"{d:+.2f} ({interval_text(lo, hi)}) | {verdict(lo, hi)} |"))
    lines += baseline_lines(rows, acc)
    if {"+conv stem", "uninext"} <= set(steps):
        cells = {label: acc["window", label, "epochs"] for label in ("vanilla", "+conv stem", "uninext")}
        share = lambda ms: (ms["+conv stem"] - ms["vanilla"]) / (ms["uninext"] - ms["vanilla"])
        means = {k: statistics.fmean(v) for k, v in cells.items()}
        interval = bootstrap(cells, lambda ms: share(ms) - 0.5)
        low, high = interval or (None, None)
        lines += ["", f"**The conv stem alone gives most of UniNeXt's lift: {verdict(low, high)}.** Its share of "
                      f"the lift: {share(means):.0%}"
                      + (f" ({CONFIDENCE:.0%} interval {low + 0.5:.0%} to {high + 0.5:.0%}, seeds resampled)"
                         if interval else "") + "."]
    return "\n".join(lines)


def label_points(axis, points):
    """Name each point in its colour, from the top down: to its right, else to its left, else a line lower
    or higher, wherever the name stays inside the axes and covers no name or point already drawn; a name
    moved off its point's line gets a thin line to its point. Call it once the layout is final."""
    renderer = axis.figure.canvas.get_renderer()
    scale = axis.figure.dpi / 72  # pixels per typographic point
    axis.get_xlim()  # the autoscaled limits, before data coordinates become pixels
    pixels = [axis.transData.transform((x, y)) for x, y, _, _ in points]
    taken = [Bbox.from_extents(px - 4 * scale, py - 4 * scale, px + 4 * scale, py + 4 * scale)  # the markers
             for px, py in pixels]
    frame = axis.get_window_extent(renderer)
    for x, y, text, color in sorted(points, key=lambda p: -p[1]):
        label = axis.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=7, color=color)
        line = label.get_window_extent(renderer).height / scale + 1
        places = [(side, -3 + line * k * sign)  # right, left, a line lower (right, left), a line higher, ...
                  for k in range(8) for sign in ((1,) if k == 0 else (-1, 1)) for side in (1, -1)]
        for side, dy in places:  # the first free place; if none is, the last one tried
            label.set_position((5 * side, dy))
            label.set_horizontalalignment("left" if side > 0 else "right")
            box = label.get_window_extent(renderer)
            if frame.contains(*box.p0) and frame.contains(*box.p1) and not any(box.overlaps(t) for t in taken):
                break
        if dy != -3:  # off its point's line: a thin line from the name's near end to its point
            px, py = axis.transData.transform((x, y))
            ex, ey = box.x0 if side > 0 else box.x1, (box.y0 + box.y1) / 2
            gap = 4 * scale / max(math.hypot(ex - px, ey - py), 1e-9)  # start at the marker's edge, not its centre
            ends = axis.transData.inverted().transform([(px + (ex - px) * gap, py + (ey - py) * gap), (ex, ey)])
            axis.add_artist(Line2D(*zip(*ends), color=color, lw=0.6))
        taken.append(box)


def plot(rows, args, path):
    """Test accuracy per mixer (or ablation step), a dot per seed and the mean with its t-interval, the
    baselines as lines, the axis from the linear baseline up; beside it, accuracy against CPU time."""
    acc = accuracies(rows)
    fig = Figure(figsize=(13, 4.8), dpi=110)  # drawn on its own canvas: pyplot's backend stays as it was
    FigureCanvasAgg(fig)
    ax, cost = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    if args.ablation:
        series = [(label, [(("window", label, "epochs"), COLORS["vanilla" if label == "vanilla" else
                                                               "uninext" if label == "uninext" else "ingredient"])])
                  for label in LADDER]
    else:
        series = [(m, [((m, "vanilla", "epochs"), COLORS["vanilla"]), ((m, "vanilla", "cpu"), "#B07800"),
                       ((m, "uninext", "epochs"), COLORS["uninext"])]) for m in args.mixers]
    names = []  # (CPU-minutes, accuracy, name, colour) of each point of the cost panel, labelled once all are drawn
    ends = []  # the ends of every interval, so that the axis shows them whole
    for i, (_, cells) in enumerate(series):
        for j, (cell, color) in enumerate(cells):
            if cell not in acc:
                continue
            x, values = i + (j - (len(cells) - 1) / 2) * 0.25, acc[cell]
            mean = statistics.fmean(values)
            if len(values) > 1:
                half = t_quantile((1 + CONFIDENCE) / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
                ax.errorbar(x, mean, half, color=color, capsize=3, lw=1.2)
                ends += [mean - half, mean + half]
            ax.plot(x, mean, "o", color=color, ms=7, mfc="white" if cell[2] == "cpu" else color)
            ax.plot([x] * len(values), values, ".", color="black", ms=3)
            spent = mean_of(rows, "cpu_seconds", mixer=cell[0], arch=cell[1], view=cell[2]) / 60
            cost.plot(spent, mean, "o", color=color, mfc="white" if cell[2] == "cpu" else color)
            names.append((spent, mean, cell[1] if args.ablation else cell[0], color))
    floor = None
    for b, style in zip(BASELINES, ["--", ":"]):
        if (b, b, "epochs") in acc:
            level = statistics.fmean(acc[b, b, "epochs"])
            floor = level if b == "linear" else floor
            for axis in (ax, cost):
                axis.axhline(level, color="grey", ls=style, lw=1, label=f"{b}, {args.epochs} epochs: {level:.1f}%")
    values = [v for seeds in acc.values() for v in seeds] + ends
    if values:
        ax.set_ylim(min(floor if floor is not None else min(values), min(values)) - 1, max(values) + 0.5)
        cost.set_ylim(ax.get_ylim())
    cost.margins(x=0.12)  # room for the names of the rightmost points
    ax.set_xticks(range(len(series)), [s[0] for s in series])
    ax.set_xlim(-0.6, len(series) - 0.4)  # a slot for every mixer, finished or not
    if not args.ablation:
        for cell, color, text in [("vanilla", COLORS["vanilla"], "vanilla, equal epochs"),
                                  ("cpu", "#B07800", "vanilla, equal CPU time"),
                                  ("uninext", COLORS["uninext"], "UniNeXt")]:
            ax.plot([], [], "o", color=color, mfc="white" if cell == "cpu" else color, label=text)
    low, high = ax.get_ylim()  # the legend sits just above the linear classifier's line, not over it
    ax.legend(fontsize=7, loc="lower right",
              bbox_to_anchor=(1, 0 if floor is None else (floor - low) / (high - low) + 0.01))
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(("Window mixer: vanilla, + one UniNeXt ingredient, all four" if args.ablation else
                  "Every mixer, vanilla vs UniNeXt") + f"\n{args.dataset}, {args.train_size or 'all'} images, "
                 f"{args.size}, {args.epochs} epochs; mean, {CONFIDENCE:.0%} t-interval, dots = seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    cost.set_xlabel("CPU-minutes of training per run (one thread)")
    cost.set_title("What it cost", fontsize=9)
    cost.grid(alpha=0.3)
    fig.tight_layout()
    label_points(cost, names)
    fig.savefig(path)


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, recipe = parse(argv)
        planned_runs(args, recipe, [])  # every run's options checked by train_minimal before anything starts
        name = "ablation_window" if args.ablation else "mixer_comparison"
        results = Path(args.results)
        results.mkdir(parents=True, exist_ok=True)
        csv_path = results / f"{name}.csv"
        own = read_rows(csv_path)  # every run this file ever recorded, whatever its settings: keys keep them apart
        other = "mixer_comparison" if args.ablation else "ablation_window"
        shared = [r for r in read_rows(results / f"{other}.csv") if r["key"] not in {o["key"] for o in own}]
    except (UsageError, train_minimal.UsageError) as e:
        build_parser().exit(2, f"compare_mixers.py: error: {e}\n")
    rows = own + shared  # the runs shared with the other sweep (window, baselines) are trained once

    with open(results / f"{name}.log", "a") as log_file:
        def log(message):
            print(message, flush=True)
            log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            log_file.flush()

        def save():  # after every run, so that an interruption loses at most the runs in flight
            wanted = {run["key"] for run in planned_runs(args, recipe, rows)}
            write_rows(csv_path, own + [r for r in shared if r["key"] in wanted])

        def report():  # the table, verdicts and figure of what has finished, so a stopped sweep has them too
            by_key = {r["key"]: r for r in rows}  # one run can serve two views (equal CPU time at equal epochs)
            selected = [{**by_key[run["key"]], "arch": run["arch"], "view": run["view"]}
                        for run in planned_runs(args, recipe, rows) if run["key"] in by_key]
            text = summarise_ablation(selected, args) if args.ablation else summarise(selected, args)
            (results / f"{name}.md").write_text(text + "\n")
            plot(selected, args, results / f"{name}.png")
            return text

        def record(row, notes):
            for note in notes:
                log(note)
            log(f"result: {row['mixer'] or row['model']} {row['arch']} ({row['view']}) seed {row['seed']}: "
                + (f"{row['test_acc1']}% in {row['cpu_seconds']} CPU-seconds" if row["status"] == "ok" else "diverged"))
            own.append(row)
            rows.append(row)
            save()
            report()

        if args.report_only:
            print(report())
            return
        log(f"sweep: python experiments/compare_mixers.py {shlex.join(argv)}")
        plan = {run["key"] for run in planned_runs(args, recipe, rows)}  # a run may serve both views: count it once
        todo = plan - {r["key"] for r in rows}
        log(f"{len(plan) - len(todo)} of {len(plan)} planned runs done before, {len(todo)} to go, {args.jobs} at a "
            "time (the equal-CPU runs are planned as their epochs become known)")
        sweep(args, recipe, rows, record, log)
        save()
        log("summary:\n" + report())


if __name__ == "__main__":
    main()

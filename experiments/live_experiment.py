"""
The class-sized experiments of notebooks 02 and 04, each measured once with three seeds: how far a run of a
few minutes can be trusted. Each experiment trains a few configurations with train_minimal.py on
Fashion-MNIST with the CPU recipe, at its own budget (BUDGETS: a class-balanced subset of the training
images, the same whatever the seed, and a number of epochs), and tests them on the full test set. A
notebook trains the same runs with one seed in class and reads this file for the spread between seeds; it
builds its commands with `command` below, so the two cannot differ.

    pool       notebook 02: PoolFormer's mixer in vanilla and in UniNeXt, one epoch of all 60,000 images.
               UniNeXt's lift on pool is large at the full budget (mixer_comparison.csv: +2.6 points after
               4 epochs); at 5,000 images x 3 epochs it could not be told from the seed noise (the rows of
               that budget are kept in the CSV)
    window     notebook 02's first live experiment: window in vanilla, vanilla + conv stem and UniNeXt, 5,000
               images x 3 epochs; it could not tell UniNeXt from vanilla either
    no-mixer   notebook 04's question: no mixer but EC, HdC and PC (three 3x3 depthwise convs per block)
               against one 7x7 depthwise conv as the mixer, both in the vanilla skeleton, 5,000 images x 3 epochs

    OMP_NUM_THREADS=1 python experiments/live_experiment.py --experiment pool   # 6 runs, 32 CPU-minutes
    python experiments/live_experiment.py --tiny --experiment pool              # seconds: synthetic data

Measured on one thread of a 2-core AMD EPYC (experiments/README.md gives the results); each run's CPU time
is in the CSV. Writes
experiments/results/live_experiment.csv, a row per run, after every run: its experiment, configuration and
test accuracy, the CPU time of the whole call (data, training and test, `process_cpu_seconds`) beside
train_minimal's own training CPU time, the command, date and machine. Runs already in the CSV are not
trained again, so the same command continues a stopped measurement. The spread between seeds is that of
the initialisation and the order of the batches, not of which images were drawn.
"""

import argparse
import csv
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # uninext.py and train_minimal.py
import train_minimal

EXPERIMENTS = {  # experiment: {configuration: the train_minimal options that make it}
    "pool": {"vanilla": ["--mixer", "pool", "--arch", "vanilla"],
             "UniNeXt": ["--mixer", "pool", "--arch", "uninext"]},
    "window": {"vanilla": ["--mixer", "window", "--arch", "vanilla"],
               "vanilla + conv stem": ["--mixer", "window", "--arch", "vanilla", "--conv-stem"],
               "UniNeXt": ["--mixer", "window", "--arch", "uninext"]},
    "no-mixer": {"vanilla, conv mixer": ["--mixer", "conv", "--arch", "vanilla"],
                 "vanilla, no mixer + EC, HdC, PC": ["--mixer", "identity", "--arch", "vanilla", "--ec", "--hdc",
                                                     "--pc"]},
}
# Each experiment's budget: training images (a class-balanced subset, the same whatever the seed), epochs, seeds
BUDGETS = {"pool": (60000, 1, (0, 1, 2)), "window": (5000, 3, (0, 1, 2)), "no-mixer": (5000, 3, (0, 1, 2))}
# train_minimal's CPU recipe, spelled out: a GPU would otherwise resolve its own defaults (T32, 100 epochs,
# crop, drop path), and the experiment must be the same on every device.
RECIPE = ["--size", "N32", "--batch-size", "64", "--lr", "2e-3", "--crop", "0", "--drop-path", "0"]
COLUMNS = ["experiment", "config", "seed", "dataset", "train_size", "epochs", "test_acc1", "process_cpu_seconds",
           "cpu_seconds", "seconds", "params", "device", "cores", "torch", "date", "command"]


def command(experiment, config, seed, device, out, dataset, train_size, epochs, data_dir="./data"):
    """train_minimal's argv for one run of an experiment; train_size None trains on every image."""
    if config not in EXPERIMENTS.get(experiment, {}):
        raise ValueError(f"no configuration {config!r} in experiment {experiment!r}; the experiments and their "
                         f"configurations: { {e: list(c) for e, c in EXPERIMENTS.items()} }")
    return ["--dataset", dataset, "--data-dir", data_dir, "--device", device, "--model", "uninext",
            *EXPERIMENTS[experiment][config], *RECIPE, "--epochs", str(epochs), "--seed", str(seed),
            *(["--train-size", str(train_size)] if train_size else []), "--eval-every", "0", "--out", str(out),
            "--overwrite"]


def folder_name(experiment, config, seed, dataset="fashion-mnist"):
    """A run's folder name, e.g. fashion-mnist-pool-vanilla-seed0."""
    words = "".join(ch if ch.isalnum() else " " for ch in f"{dataset} {experiment} {config}").split()
    return "-".join(words) + f"-seed{seed}"


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="experiments/results",
                   help="where live_experiment.csv goes (default: %(default)s)")
    p.add_argument("--runs", default="runs/live_experiment", help="where each run's folder goes (default: %(default)s)")
    p.add_argument("--experiment", required=True, choices=list(EXPERIMENTS),
                   help="which experiment: its configurations are in EXPERIMENTS")
    p.add_argument("--tiny", action="store_true", help="seconds: synthetic data, 128 images, 1 epoch, seed 0")
    args = p.parse_args(argv)
    dataset, train_size, epochs, seeds = ("synthetic", 128, 1, (0,)) if args.tiny else \
        ("fashion-mnist", *BUDGETS[args.experiment])
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / "live_experiment.csv"
    rows = read_rows(path)
    for seed in seeds:
        for config in EXPERIMENTS[args.experiment]:
            key = (args.experiment, config, str(seed), dataset, str(train_size), str(epochs))
            if any((r["experiment"], r["config"], r["seed"], r["dataset"], r["train_size"], r["epochs"]) == key
                   for r in rows):
                continue
            out = Path(args.runs) / folder_name(args.experiment, config, seed, dataset)
            run_argv = command(args.experiment, config, seed, "cpu", out, dataset, train_size, epochs)
            start = time.process_time()
            summary = train_minimal.train(train_minimal.build_parser().parse_args(run_argv))
            rows.append({"experiment": args.experiment, "config": config, "seed": seed, "dataset": dataset,
                         "train_size": train_size, "epochs": epochs, "test_acc1": summary["test_acc1"],
                         "process_cpu_seconds": round(time.process_time() - start, 1),
                         "cpu_seconds": round(summary["cpu_seconds"], 1), "seconds": round(summary["seconds"], 1),
                         "params": summary["params"], "device": summary["device"], "cores": os.cpu_count(),
                         "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                         "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python train_minimal.py "
                                    f"{shlex.join(run_argv)}"})
            write_rows(path, rows)
            print(f"{args.experiment}, {config}, seed {seed}: {summary['test_acc1']:.2f}% in "
                  f"{rows[-1]['process_cpu_seconds']} CPU-seconds", flush=True)


if __name__ == "__main__":
    main()

"""
The live experiment of notebook 02, measured once with three seeds: how far a run of a few minutes can be
trusted. One mixer (window) in three architectures, vanilla, vanilla + UniNeXt's conv stem, and UniNeXt,
trained by train_minimal.py on a class-balanced subset of Fashion-MNIST (5,000 images, 3 epochs, the CPU
recipe) and tested on the full test set. The notebook trains the same three runs with seed 0 in class and
reads this file for the spread between seeds; it builds its commands with `command` below, so the two
cannot differ.

    OMP_NUM_THREADS=1 python experiments/live_experiment.py     # 9 runs: 13 CPU-minutes, 1 thread of a 2-core AMD EPYC
    python experiments/live_experiment.py --tiny                # seconds: synthetic data, the same code

Writes experiments/results/live_experiment.csv, a row per run, after every run: its test accuracy, the CPU
time of the whole call (data, training and test, `process_cpu_seconds`) beside train_minimal's own training
CPU time, the command, date and machine. Runs already in the CSV are not trained again, so the same command
continues a stopped measurement. The subset is the same for every seed (train_minimal's --train-size), so
the spread is that of the initialisation and the order of the batches, not of which images were drawn.
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

MIXER = "window"
CONFIGS = {  # label: the train_minimal options that make the architecture
    "vanilla": ["--arch", "vanilla"],
    "vanilla + conv stem": ["--arch", "vanilla", "--conv-stem"],
    "UniNeXt": ["--arch", "uninext"],
}
# Each configuration's name in the window ablation at the full budget (ablation_window.csv), which the
# notebook draws beside it
ABLATION_LABEL = {"vanilla": "vanilla", "vanilla + conv stem": "+conv stem", "UniNeXt": "uninext"}
TRAIN_SIZE, EPOCHS, SEEDS = 5000, 3, (0, 1, 2)
# train_minimal's CPU recipe, spelled out: a GPU would otherwise resolve its own defaults (T32, 100 epochs,
# crop, drop path), and the experiment must be the same on every device.
RECIPE = ["--size", "N32", "--batch-size", "64", "--lr", "2e-3", "--crop", "0", "--drop-path", "0"]
COLUMNS = ["config", "seed", "dataset", "train_size", "epochs", "test_acc1", "process_cpu_seconds", "cpu_seconds",
           "seconds", "params", "device", "cores", "torch", "date", "command"]


def command(config, seed, device, out, dataset="fashion-mnist", train_size=TRAIN_SIZE, epochs=EPOCHS,
            data_dir="./data"):
    """train_minimal's argv for one run of the experiment; train_size None trains on every image."""
    return ["--dataset", dataset, "--data-dir", data_dir, "--device", device, "--model", "uninext",
            "--mixer", MIXER, *CONFIGS[config], *RECIPE, "--epochs", str(epochs), "--seed", str(seed),
            *(["--train-size", str(train_size)] if train_size else []), "--eval-every", "0", "--out", str(out),
            "--overwrite"]


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
    p.add_argument("--tiny", action="store_true", help="seconds: synthetic data, 128 images, 1 epoch, seed 0")
    args = p.parse_args(argv)
    dataset, train_size, epochs, seeds = ("synthetic", 128, 1, (0,)) if args.tiny else \
        ("fashion-mnist", TRAIN_SIZE, EPOCHS, SEEDS)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / "live_experiment.csv"
    rows = read_rows(path)
    for seed in seeds:
        for config in CONFIGS:
            done = [r for r in rows if (r["config"], r["seed"], r["dataset"], r["train_size"], r["epochs"]) ==
                    (config, str(seed), dataset, str(train_size), str(epochs))]
            if done:
                continue
            out = Path(args.runs) / f"{dataset}-{config.replace(' + ', '-').replace(' ', '-')}-seed{seed}"
            run_argv = command(config, seed, "cpu", out, dataset, train_size, epochs)
            start = time.process_time()
            summary = train_minimal.train(train_minimal.build_parser().parse_args(run_argv))
            rows.append({"config": config, "seed": seed, "dataset": dataset, "train_size": train_size,
                         "epochs": epochs, "test_acc1": summary["test_acc1"],
                         "process_cpu_seconds": round(time.process_time() - start, 1),
                         "cpu_seconds": round(summary["cpu_seconds"], 1), "seconds": round(summary["seconds"], 1),
                         "params": summary["params"], "device": summary["device"], "cores": os.cpu_count(),
                         "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                         "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python train_minimal.py "
                                    f"{shlex.join(run_argv)}"})
            write_rows(path, rows)
            print(f"{config}, seed {seed}: {summary['test_acc1']:.2f}% in {rows[-1]['process_cpu_seconds']} "
                  f"CPU-seconds", flush=True)


if __name__ == "__main__":
    main()

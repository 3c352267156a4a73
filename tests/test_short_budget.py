"""experiments/short_budget.py: every model through the same harness, a row per run with its cost and command, and a
stopped sweep continued without training anything twice."""

import csv
from pathlib import Path

import pytest

import short_budget
import train_minimal

real_train = train_minimal.train


def test_a_tiny_sweep_records_accuracy_against_cpu_time_and_a_rerun_trains_nothing(tmp_path, monkeypatch):
    argv = ["--tiny", "--runs", str(tmp_path)]
    short_budget.main(argv)
    results = tmp_path / "tiny"  # a smoke run never writes into the committed results/
    with open(results / "short_budget.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == list(short_budget.MODELS)
    assert all(0 <= float(r["test_acc1"]) <= 100 and float(r["cpu_seconds"]) > 0 for r in rows)
    assert "--model cnn" in rows[2]["command"] and rows[2]["command"].startswith("OMP_NUM_THREADS=1 python")
    assert (results / "short_budget.png").stat().st_size > 0
    assert (results / "short_budget.md").read_text().count("\n") == 2 + len(rows)

    # A run stopped after its checkpoint but before its summary is continued with its own options, not redone
    cnn_run = next(results.glob("synthetic-CNN-*"))
    (cnn_run / "summary.json").unlink()
    calls = []
    monkeypatch.setattr(train_minimal, "train", lambda args: calls.append(args) or real_train(args))
    short_budget.main(argv)
    assert [(Path(a.resume), a.model, a.epochs) for a in calls] == [(cnn_run, "cnn", 1)]
    with open(results / "short_budget.csv") as f:
        assert list(csv.DictReader(f)) == rows

    def never(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_minimal, "train", never)
    short_budget.main(argv)
    with open(results / "short_budget.csv") as f:
        assert list(csv.DictReader(f)) == rows
    short_budget.main([*argv, "--models", "linear"])  # one model again: the others' rows stay
    with open(results / "short_budget.csv") as f:
        assert list(csv.DictReader(f)) == rows
    with pytest.raises(SystemExit, match="holds a run with seed 0, not 1"):  # another seed needs its own folder
        short_budget.main([*argv, "--seed", "1"])

"""short_budget.py: every model through the same harness, a row per run with its cost and command, and a
stopped sweep continued without training anything twice."""

import csv

import short_budget
import train_minimal


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
    short_budget.main(argv)
    with open(results / "short_budget.csv") as f:
        assert [r["test_acc1"] for r in csv.DictReader(f)] == [r["test_acc1"] for r in rows]

    def never(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_minimal, "train", never)
    short_budget.main(argv)
    with open(results / "short_budget.csv") as f:
        assert list(csv.DictReader(f))[:2] == rows[:2]

"""compare_mixers.py: the sweep runs, records a row per run, resumes without redoing, and answers the
paper's three claims from the numbers."""

import argparse
import csv

import compare_mixers


def test_a_tiny_sweep_writes_rows_plot_and_summary_and_a_rerun_redoes_nothing(tmp_path, capsys):
    argv = ["--tiny", "--mixers", "pool", "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    compare_mixers.main(argv)
    results = tmp_path / "results"
    with open(results / "mixer_comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mixer"], r["arch"], r["seed"]) for r in rows] == [("pool", "uninext", "0"), ("pool", "vanilla", "0")]
    assert all(0 <= float(r["test_acc1"]) <= 100 and int(r["params"]) > 0 for r in rows)
    assert (results / "mixer_comparison.png").stat().st_size > 0
    assert "UniNeXt lifts every mixer" in (results / "mixer_comparison.md").read_text()

    capsys.readouterr()
    compare_mixers.main(argv)
    assert "2 of 2 runs done before, 0 to go" in capsys.readouterr().out
    with open(results / "mixer_comparison.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def rows_from(table):
    return [{"dataset": "d", "train_size": 6000, "mixer": m, "arch": a, "seed": s, "epochs": 4, "test_acc1": acc}
            for (m, a), accs in table.items() for s, acc in enumerate(accs)]


ARGS = argparse.Namespace(dataset="d", train_size=6000, size="N32", epochs=4, seeds=[0, 1])


def test_the_three_claims_are_answered_yes_when_the_numbers_say_so():
    text = compare_mixers.summarise(rows_from({
        ("pool", "vanilla"): [80, 82], ("pool", "uninext"): [88, 88],
        ("window", "vanilla"): [85, 85], ("window", "uninext"): [87, 87],
    }), ARGS)
    assert "lifts every mixer: yes (2 of 2" in text
    assert "narrows the gap between mixers: yes (best - worst mixer: 4.00 vanilla, 1.00 UniNeXt" in text
    assert "changes the ranking: yes (vanilla: window > pool; UniNeXt: pool > window)" in text


def test_the_three_claims_are_answered_no_when_the_numbers_say_so():
    text = compare_mixers.summarise(rows_from({
        ("pool", "vanilla"): [80, 80], ("pool", "uninext"): [79, 79],
        ("window", "vanilla"): [85, 85], ("window", "uninext"): [90, 90],
    }), ARGS)
    assert "lifts every mixer: no (1 of 2 mixers higher; pool not)" in text
    assert "narrows the gap between mixers: no" in text
    assert "changes the ranking: no" in text

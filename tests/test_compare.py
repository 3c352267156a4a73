"""experiments/compare_mixers.py: the sweep runs, keys every run by all that changes its result, records a row per run,
resumes without redoing, records a diverged run and moves on, and answers the paper's three claims with
verdicts that respect the seed noise."""

import csv
import math

import pytest

import compare_mixers as cm
import train_minimal


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_tiny_sweep_trains_both_views_and_the_baselines_and_a_rerun_redoes_nothing(tmp_path, capsys):
    argv = ["--tiny", "--mixers", "pool", "--runs", str(tmp_path / "runs")]
    cm.main(argv)
    results = tmp_path / "runs" / "results"  # --tiny never writes into the committed results/
    rows = read(results / "mixer_comparison.csv")
    by = {(r["mixer"] or r["model"], r["arch"], r["view"]): r for r in rows}
    assert {k[:2] for k in by} == {("pool", "uninext"), ("pool", "vanilla"), ("cnn", "cnn"), ("linear", "linear")}
    assert all(r["status"] == "ok" and 0 <= float(r["test_acc1"]) <= 100 and int(r["macs"]) > 0 for r in rows)
    uni, van = by["pool", "uninext", "epochs"], by["pool", "vanilla", "epochs"]
    cpu_epochs = max(1, round(float(uni["cpu_seconds"]) / float(van["cpu_seconds"])))
    assert ("pool", "vanilla", "cpu") in by or cpu_epochs == 1  # at 1 epoch, the equal-epoch run serves both
    if cpu_epochs > 1:
        assert int(by["pool", "vanilla", "cpu"]["epochs"]) == cpu_epochs
    assert all(r["command"].startswith("python train_minimal.py --dataset synthetic") for r in rows)
    assert (results / "mixer_comparison.png").stat().st_size > 0
    text = (results / "mixer_comparison.md").read_text()
    assert "UniNeXt lifts every mixer: cannot tell at this scale" in text  # one seed: no interval
    assert "at equal CPU time" in text and "| cnn |" in text

    capsys.readouterr()
    cm.main(argv)
    assert f"{len(rows)} of {len(rows)} planned runs done before, 0 to go" in capsys.readouterr().out
    assert len(read(results / "mixer_comparison.csv")) == len(rows)

    (results / "mixer_comparison.md").unlink()
    cm.main([*argv, "--report-only"])  # from the CSV alone: nothing trained, nothing logged
    assert (results / "mixer_comparison.md").read_text() == text
    assert "| cnn |" in capsys.readouterr().out


def key(*options):
    return cm.run_key(["--dataset", "synthetic", "--device", "cpu", "--size", "N32", "--mixer", "pool", *options])


def test_every_setting_that_changes_a_result_is_part_of_the_run_key():
    base = key()
    changed = [key("--size", "T32"), key("--epochs", "3"), key("--train-size", "256"), key("--seed", "1"),
               key("--lr", "1e-3"), key("--crop", "2"), key("--arch", "vanilla"), key("--no-zero-init-residual"),
               key("--clip-grad", "1")]
    assert len({base, *changed}) == 1 + len(changed)
    assert key("--lr", "2e-3", "--batch-size", "64") == base  # the CPU defaults, given or not, are the same run
    assert key("--data-dir", "elsewhere", "--eval-every", "3") == base  # where and how often to test: no change


def test_a_sweep_with_other_epochs_plans_none_of_the_first_sweeps_runs(tmp_path):
    args = lambda epochs: cm.parse(["--tiny", "--runs", str(tmp_path), "--epochs", str(epochs)])
    first, recipe = cm.parse(["--tiny", "--runs", str(tmp_path)])
    second, _ = cm.parse(["--tiny", "--runs", str(tmp_path), "--epochs", "2", "--lr", "1e-3"])
    second.epochs = 2  # --tiny sets 1 epoch; a real sweep would give --epochs
    keys = lambda a, r: {run["key"] for run in cm.planned_runs(a, r, [])}
    assert not keys(first, recipe) & keys(second, ["--lr", "1e-3"])
    assert args(1)[0].epochs == 1


def test_every_seed_of_the_equal_epoch_view_is_planned_before_any_equal_cpu_run(tmp_path):
    args, recipe = cm.parse(["--tiny", "--runs", str(tmp_path), "--mixers", "pool", "conv"])
    args.seeds = [0, 1]
    first = cm.planned_runs(args, recipe, [])
    rows = [{"key": r["key"], "status": "ok", "cpu_seconds": "20" if r["arch"] == "uninext" else "10"}
            for r in first if r["seed"] == 0 and r["model"] == "uninext"]
    views = [(r["view"], r["seed"]) for r in cm.planned_runs(args, recipe, rows)]
    assert views == [("epochs", 0)] * 6 + [("epochs", 1)] * 6 + [("cpu", 0)] * 2 + [("cpu", 1)] * 2
    assert {r["epochs"] for r in cm.planned_runs(args, recipe, rows) if r["view"] == "cpu"} == {2}


def test_a_diverged_run_is_recorded_reported_and_not_retried(tmp_path, monkeypatch, capsys):
    real = train_minimal.train

    def train(options, checkpoint=None):
        if options.model == "uninext" and options.arch == "uninext":
            raise train_minimal.Diverged("the training loss is nan at step 3")
        return real(options, checkpoint)

    monkeypatch.setattr(train_minimal, "train", train)
    argv = ["--tiny", "--mixers", "pool", "window", "--runs", str(tmp_path)]
    cm.main(argv)
    rows = read(tmp_path / "results" / "mixer_comparison.csv")
    assert sorted((r["mixer"], r["status"]) for r in rows if r["arch"] == "uninext") == [
        ("pool", "diverged"), ("window", "diverged")]
    assert not any(r["view"] == "cpu" for r in rows)  # its epochs come from the UniNeXt run's cost
    text = (tmp_path / "results" / "mixer_comparison.md").read_text()
    assert "Diverged, left out: pool uninext (epochs) seed 0; window uninext (epochs) seed 0" in text
    capsys.readouterr()
    cm.main(argv)
    assert "0 to go" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--size", "N32", "--mixers", "swin"], "same network as window"),
    (["--seed", "3"], "--seed: set by the sweep"),
    (["--seeds", "1", "1"], "each seed once"),
    (["--lr", "-1"], "--lr must be a positive number"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cm.main([*argv, "--runs", str(tmp_path), "--results", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_results_of_the_earlier_layout_are_refused_not_mixed_in(tmp_path, capsys):
    (tmp_path / "mixer_comparison.csv").write_text("dataset,train_size,mixer,arch,seed,epochs,params,test_acc1,"
                                                   "seconds,device\nfashion-mnist,6000,pool,vanilla,0,4,1,70,1,cpu\n")
    with pytest.raises(SystemExit):
        cm.main(["--tiny", "--runs", str(tmp_path), "--results", str(tmp_path)])
    assert "earlier version" in capsys.readouterr().err


def test_swin_is_a_distinct_network_only_where_it_shifts_a_window():
    assert not cm.swin_shifts("N32") and cm.swin_shifts("T32") and cm.swin_shifts("T")
    assert "swin" not in cm.parse(["--size", "N32"])[0].mixers
    assert "swin" in cm.parse(["--size", "T32"])[0].mixers


# ----------------------------------------------------------------------------------------------------------
# The statistics and the verdicts, on small synthetic sweeps


def test_t_quantiles_and_kendall_tau_b_are_the_textbook_values():
    for df, value in [(1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)]:
        assert cm.t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)
    assert cm.kendall_tau([1, 2, 3], [1, 2, 3]) == 1 and cm.kendall_tau([1, 2, 3], [3, 2, 1]) == -1
    assert cm.kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))  # tau-b: ties count as neither
    assert math.isnan(cm.kendall_tau([1, 1], [1, 2]))


def test_a_difference_gets_a_welch_interval_and_one_seed_gets_none():
    d, low, high = cm.difference_interval([90, 91, 92], [88, 88.5, 89])
    va, vb = 1 / 3, 0.25 / 3  # each sample's variance over its size
    half = cm.t_quantile(0.975, (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)) * math.sqrt(va + vb)  # Welch
    assert d == 2.5 and low == pytest.approx(2.5 - half, abs=1e-3) and high == pytest.approx(2.5 + half, abs=1e-3)
    assert cm.difference_interval([90], [88, 89])[1:] == (None, None)
    assert [cm.verdict(*i) for i in [(0.1, 2), (-2, -0.1), (-1, 1), (None, None)]] == list(cm.VERDICTS) + [
        cm.VERDICTS[2]]


def rows_from(table, view="epochs"):
    return [{"mixer": m, "model": "uninext", "arch": a, "view": view if a == "vanilla" else "epochs",
             "status": "ok", "test_acc1": acc, "cpu_seconds": 60}
            for (m, a), accs in table.items() for acc in accs]


def claims(table):
    return "\n".join(cm.claims(cm.accuracies(rows_from(table)), ["pool", "conv", "window"], "epochs"))


def test_the_claims_hold_when_the_numbers_say_so_beyond_the_noise():
    text = claims({
        ("pool", "vanilla"): [80.0, 80.1, 79.9], ("pool", "uninext"): [90.0, 90.1, 89.9],
        ("conv", "vanilla"): [85.0, 85.1, 84.9], ("conv", "uninext"): [89.0, 89.1, 88.9],
        ("window", "vanilla"): [83.0, 83.1, 82.9], ("window", "uninext"): [88.0, 88.1, 87.9],
    })
    assert "lifts every mixer: holds.** Lifted beyond the seed noise: 3 of 3" in text
    assert "narrows the gap between mixers: holds." in text
    assert "changes the ranking: holds.** Pairs of mixers ordered beyond the seed noise in both architectures: " \
           "3 of 3, of which flipped: pool/conv, pool/window" in text


def test_the_claims_do_not_hold_when_the_numbers_say_the_opposite_beyond_the_noise():
    text = claims({
        ("pool", "vanilla"): [80.0, 80.1, 79.9], ("pool", "uninext"): [78.0, 78.1, 77.9],
        ("conv", "vanilla"): [85.0, 85.1, 84.9], ("conv", "uninext"): [89.0, 89.1, 88.9],
        ("window", "vanilla"): [83.0, 83.1, 82.9], ("window", "uninext"): [88.0, 88.1, 87.9],
    })
    assert "lifts every mixer: does not hold.** Lifted beyond the seed noise: 2 of 3 (conv, window); " \
           "lowered beyond it: pool" in text
    assert "narrows the gap between mixers: does not hold." in text
    assert "changes the ranking: does not hold." in text and "Kendall tau-b of the two rankings 1.00" in text


def test_differences_inside_the_seed_noise_cannot_be_told():
    text = claims({
        ("pool", "vanilla"): [80, 84, 82], ("pool", "uninext"): [81, 85, 80],
        ("conv", "vanilla"): [83, 79, 84], ("conv", "uninext"): [80, 85, 82],
        ("window", "vanilla"): [81, 82, 85], ("window", "uninext"): [84, 80, 83],
    })
    assert text.count("cannot tell at this scale") == 3


def test_a_sweep_with_one_seed_in_most_cells_gets_no_interval_from_the_few_with_two():
    text = claims({  # a sweep cut short: pool vanilla has its second seed, every other cell one
        ("pool", "vanilla"): [80.0, 80.1], ("pool", "uninext"): [90.0],
        ("conv", "vanilla"): [85.0], ("conv", "uninext"): [89.0],
        ("window", "vanilla"): [83.0], ("window", "uninext"): [88.0],
    })
    assert "narrows the gap between mixers: cannot tell at this scale.** " in text
    assert "narrowing +1.22 (no interval (one seed))" in text
    assert "Kendall tau-b of the two rankings -0.33. Vanilla" in text  # a value, no interval
    assert cm.bootstrap({"a": [1.0, 2.0], "b": [3.0]}, lambda ms: ms["a"] - ms["b"]) is None


def test_the_ablation_says_what_each_ingredient_alone_does_and_whether_the_stem_is_most_of_the_lift():
    table = {("window", label): [base + d for d in (-0.1, 0, 0.1)] for label, base in [
        ("vanilla", 80), ("+conv stem", 86), ("+EC", 80.05), ("+HdC", 81), ("+PC", 79), ("uninext", 88)]}
    args = cm.parse(["--ablation", "--tiny"])[0]
    cnn = {"mixer": "", "model": "cnn", "arch": "cnn", "view": "epochs", "status": "ok", "test_acc1": 85,
           "cpu_seconds": 60, "macs": 28608000}
    text = cm.summarise_ablation(rows_from(table) + [cnn], args)
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| +")}
    assert lines["+conv stem"].endswith("| holds |") and lines["+HdC"].endswith("| holds |")
    assert lines["+PC"].endswith("| does not hold |") and lines["+EC"].endswith("| cannot tell at this scale |")
    assert next(line for line in text.splitlines() if line.startswith("| vanilla")).endswith("| | |")  # no self-test
    assert "| cnn | 85.00 | 1.0 | 28.608 |" in text and "| linear | - | - | - |" in text  # the baselines beside them
    assert "The conv stem alone gives most of UniNeXt's lift: holds.** Its share of the lift: 75%" in text


def test_an_option_added_later_and_left_unset_keeps_every_key(monkeypatch):
    before, build = key(), train_minimal.build_parser

    def with_a_new_option():
        parser = build()
        parser.add_argument("--label-noise", type=float)
        return parser

    monkeypatch.setattr(train_minimal, "build_parser", with_a_new_option)
    assert key() == before and key("--label-noise", "0.1") != before


def test_the_names_in_the_cost_panel_neither_cover_each_other_nor_leave_the_axes():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=110)
    FigureCanvasAgg(fig)
    axis = fig.subplots()
    points = [(10 + 0.05 * i, 91 + 0.03 * (i % 3), name, "black")  # seven points within a name's width
              for i, name in enumerate(["identity", "pool", "conv", "window", "cswin", "pvt", "global"])]
    points += [(5.0, 88.0, "identity", "black"), (15.0, 86.0, "global", "black")]  # at the left and right edges
    for x, y, _, _ in points:
        axis.plot(x, y, "o")
    axis.margins(x=0.12)
    fig.tight_layout()
    cm.label_points(axis, points)
    renderer = fig.canvas.get_renderer()
    frame = axis.get_window_extent(renderer)
    boxes = [text.get_window_extent(renderer) for text in axis.texts]
    assert len(boxes) == len(points)
    for i, box in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        assert not any(box.overlaps(other) for other in boxes[i + 1:])

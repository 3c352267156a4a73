"""The notebooks, as a specification: each one runs top to bottom in a fresh kernel in fast mode
(UNINEXT_FAST=1: tiny data and epochs, the same code paths) without an error, and each committed notebook
carries the outputs of a full run, a Colab badge and a first cell that works on Colab, locally, and says
what to do outside a clone. One command sets the repository of all four (notebooks/set_repo.py). Notebook
02 passes its device to every training run, so that a Mac's MPS and a Colab GPU train the same experiment
as a CPU; its live experiment's seeds are a committed file (experiments/live_experiment.py). Notebook 01's
build-it-yourself check fails a wrong ingredient and passes the folded answers; so does notebook 03's
check of a home-made window_partition.

The executed copies are thrown away: the committed .ipynb files keep their full-run outputs. Together the
four fast runs take a few minutes at most on two CPU cores."""

import csv
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import matplotlib
import pytest
import torch
import torch.nn as nn

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

import live_experiment
import train_minimal

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
MAX_BYTES = 2_000_000
BADGE = r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/notebooks/{}"


def read(path):
    return nbformat.read(path, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_four_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_tour.ipynb", "02_train.ipynb", "03_attention.ipynb",
                                           "04_mixer_comparison.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_in_fast_mode(path, monkeypatch):
    monkeypatch.setenv("UNINEXT_FAST", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures inline, whatever CI sets
    nb = read(path)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, with the cell and the traceback, at the first error
    outputs = [o for c in code_cells(nb) for o in c.outputs]
    assert any(o.get("name") == "stdout" and "fast mode: True" in o.get("text", "") for o in outputs), \
        "the first cell must read UNINEXT_FAST"
    assert any("image/png" in o.get("data", {}) for o in outputs), "a notebook without a figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_carries_the_outputs_of_a_full_run(path):
    nb = read(path)
    cells = code_cells(nb)
    assert all(c.execution_count is not None for c in cells), "some cells were not run"
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), "not run top to bottom once"
    outputs = [o for c in cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert any(o.get("name") == "stdout" and "fast mode: False" in o.get("text", "") for o in outputs), \
        "committed with the outputs of a fast run"
    assert path.stat().st_size < MAX_BYTES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_with_a_colab_badge_and_a_setup_cell_for_colab_and_local_runs(path):
    nb = read(path)
    badge = re.search(BADGE.format(re.escape(path.name)), nb.cells[0].source)
    assert badge, "no Colab badge for this notebook in the first cell"
    setup = code_cells(nb)[0].source
    assert f'REPO = "{badge.group(1)}"' in setup, "the badge and the REPO that the first cell clones differ"
    for needle in ('"google.colab" in sys.modules', "git", "clone", "sys.path.insert", "UNINEXT_FAST"):
        assert needle in setup


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_on_colab_the_placeholder_repository_stops_the_first_cell_with_what_to_set(path, monkeypatch):
    setup = code_cells(read(path))[0].source
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a[0]} with the placeholder"))
    with pytest.raises(SystemExit, match="REPO is still the placeholder"):
        exec(setup, {"__name__": "setup"})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outside_a_clone_the_first_cell_says_to_clone_the_repository(path, monkeypatch, tmp_path):
    setup = code_cells(read(path))[0].source
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.chdir(tmp_path)  # no uninext.py here or in any folder above
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit, match="runs from a clone of the repository. Clone"):
        exec(setup, {"__name__": "setup"})


def test_set_repo_sets_the_badge_and_repo_of_every_notebook_and_says_what_it_changed(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for path in [*NOTEBOOKS, NOTEBOOK_DIR / "set_repo.py"]:
        shutil.copy(path, folder)

    def set_repo(*argv):
        return subprocess.run([sys.executable, str(folder / "set_repo.py"), *argv], capture_output=True, text=True)

    before = {p.name: read(p) for p in folder.glob("*.ipynb")}
    old = {name: (re.search(BADGE.format(re.escape(name)), nb.cells[0].source).group(1),
                  re.search(r'REPO = "([^"]*)"', code_cells(nb)[0].source).group(1)) for name, nb in before.items()}
    done = set_repo("ada/uninext-course")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{p.name}: badge {old[p.name][0]} -> ada/uninext-course, "
                                        f"REPO {old[p.name][1]} -> ada/uninext-course, placeholder note removed"
                                        for p in NOTEBOOKS]
    for path in sorted(folder.glob("*.ipynb")):
        nb, old = read(path), before[path.name]
        assert re.search(BADGE.format(re.escape(path.name)), nb.cells[0].source).group(1) == "ada/uninext-course"
        assert 'REPO = "ada/uninext-course"' in code_cells(nb)[0].source
        assert "placeholder" in old.cells[0].source and "placeholder" not in nb.cells[0].source
        changed = [i for i, (a, b) in enumerate(zip(nb.cells, old.cells)) if a != b]
        assert changed == [0, old.cells.index(code_cells(old)[0])], "it changed more than the badge and REPO"
    assert set_repo("ada/uninext-course").stdout.count("already ada/uninext-course") == len(NOTEBOOKS)
    refused = set_repo("not a repository")
    assert refused.returncode == 2 and "is not OWNER/REPO" in refused.stderr
    assert all('REPO = "ada/uninext-course"' in code_cells(read(p))[0].source for p in folder.glob("*.ipynb"))


def cells_before_training(path):
    """The code cells of a notebook up to its first training run, and the cell that checks the checkpoints."""
    cells = code_cells(read(path))
    first_run = next(i for i, c in enumerate(cells) if "tm.train(" in c.source)
    return cells[:first_run], next(c for c in cells if "was trained with other" in c.source)


def run_02_until_training(monkeypatch, cuda=False, mps=False):
    """Notebook 02 in full mode, in this process, with the devices faked: every cell before its first training
    run, then the checkpoint check; the namespace they leave."""
    monkeypatch.delenv("UNINEXT_FAST", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a faked GPU")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.chdir(NOTEBOOK_DIR)
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace = {"__name__": "notebook"}
    before, check = cells_before_training(NOTEBOOK_DIR / "02_train.ipynb")
    with matplotlib.rc_context():  # the notebook sets rcParams; other tests draw figures
        for cell in [*before, check]:
            exec(cell.source, namespace)
    return namespace


def test_notebook_02_on_apple_silicon_trains_on_the_cpu_and_its_checkpoints_pass_their_check(monkeypatch, capsys):
    ns = run_02_until_training(monkeypatch, mps=True)
    assert ns["DEVICE"] == "cpu"
    for argv in ns["plan"].values():
        assert argv[argv.index("--device") + 1] == "cpu"
        args = train_minimal.resolve(train_minimal.build_parser().parse_args(argv))
        size, epochs, _ = live_experiment.BUDGETS[ns["EXPERIMENT"]]
        assert (args.size, args.epochs, args.train_size, args.batch_size) == ("N32", epochs, size, 64)
    printed = capsys.readouterr().out
    assert "What it will cost:" in printed and "CPU-minutes" in printed  # before anything trains
    assert printed.count("--device cpu") >= 2 + len(ns["plan"])  # the live runs and the two checkpoint commands


def test_notebook_02_on_a_gpu_trains_the_same_experiment_and_says_its_cost_is_not_measured_there(monkeypatch, capsys):
    def resolved(plan):  # every option of every run, its device apart
        options = {config: vars(train_minimal.resolve(train_minimal.build_parser().parse_args(argv)))
                   for config, argv in plan.items()}
        return {config: {k: v for k, v in o.items() if k != "device"} for config, o in options.items()}

    on_gpu = run_02_until_training(monkeypatch, cuda=True)
    assert on_gpu["DEVICE"] == "cuda" and "a faked GPU, where it has not been measured" in capsys.readouterr().out
    gpu = resolved(on_gpu["plan"])
    on_cpu = run_02_until_training(monkeypatch)
    assert on_cpu["DEVICE"] == "cpu" and gpu == resolved(on_cpu["plan"])


def test_the_live_experiment_records_each_run_with_its_command_and_a_rerun_trains_nothing(tmp_path, monkeypatch):
    argv = ["--tiny", "--experiment", "window", "--results", str(tmp_path), "--runs", str(tmp_path / "runs")]
    live_experiment.main(argv)
    rows = live_experiment.read_rows(tmp_path / "live_experiment.csv")
    assert [r["config"] for r in rows] == list(live_experiment.EXPERIMENTS["window"])
    assert all(0 <= float(r["test_acc1"]) <= 100 and float(r["process_cpu_seconds"]) >= float(r["cpu_seconds"]) > 0
               for r in rows)
    assert "--conv-stem" in rows[1]["command"] and "--device cpu" in rows[1]["command"]

    def never(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(train_minimal, "train", never)
    live_experiment.main(argv)
    assert live_experiment.read_rows(tmp_path / "live_experiment.csv") == rows


def test_the_committed_live_experiments_have_every_seed_of_every_configuration_at_the_notebooks_budget():
    path = Path(live_experiment.__file__).parent / "results" / "live_experiment.csv"
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] == "fashion-mnist"]
    for experiment, configs in live_experiment.EXPERIMENTS.items():
        size, epochs, seeds = live_experiment.BUDGETS[experiment]
        found = [(r["config"], int(r["seed"])) for r in rows
                 if (r["experiment"], int(r["train_size"]), int(r["epochs"])) == (experiment, size, epochs)]
        assert sorted(found) == sorted((c, s) for c in configs for s in seeds), experiment
    assert all(r["command"].startswith("OMP_NUM_THREADS=1 python train_minimal.py") for r in rows)


def test_the_build_it_yourself_check_fails_wrong_ingredients_and_passes_the_folded_answers(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(NOTEBOOK_DIR))
    import nbhelpers

    cells = read(NOTEBOOK_DIR / "01_tour.ipynb").cells
    namespace = {"nn": nn, "F": torch.nn.functional, "nbhelpers": nbhelpers}
    for answer in ("class AnswerPostConv", "class AnswerHdC"):  # each answer folded in a cell of its own
        folded = next(c.source for c in cells if c.cell_type == "markdown" and answer in c.source)
        assert folded.startswith("<details>"), "the answers are not folded: a student would see them before trying"
        exec("\n".join(re.findall(r"```python\n(.*?)```", folded, re.S)), namespace)  # the folded code, as shown
    nbhelpers.check_ingredient(namespace["AnswerHdC"], "hdc")  # an AssertionError fails the test

    class NormFirstHdC(nn.Module):  # a right HdC whose layers are declared in the other order
        def __init__(self, hidden):
            super().__init__()
            self.norm = nn.LayerNorm(hidden)
            self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)

        def forward(self, h):
            return torch.nn.functional.gelu(self.norm(self.conv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)))

    nbhelpers.check_ingredient(NormFirstHdC, "hdc")

    class NormOnTheInput(NormFirstHdC):  # the same layers in the wrong order of computation
        def forward(self, h):
            return torch.nn.functional.gelu(self.conv(self.norm(h).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

    with pytest.raises(AssertionError, match="output"):
        nbhelpers.check_ingredient(NormOnTheInput, "hdc")

    class Conv(nn.Module):  # the answer's shape, with the conv's options open
        def __init__(self, dim, **options):
            super().__init__()
            self.conv = nn.Conv2d(dim, dim, 3, **{"padding": 1, "groups": dim, **options})

        def forward(self, x):
            return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    wrong = {"not depthwise": dict(groups=1), "no bias": dict(bias=False), "no padding": dict(padding=0),
             "dilated": dict(padding=2, dilation=2)}
    for name, options in wrong.items():
        with pytest.raises(AssertionError):
            nbhelpers.check_ingredient(lambda dim: Conv(dim, **options), "pc")
    with pytest.raises(AssertionError, match="parameters"):  # PC where HdC belongs: no LayerNorm
        nbhelpers.check_ingredient(Conv, "hdc")
    nbhelpers.check_ingredient(namespace["AnswerPostConv"], "pc")

    class NoPermute(Conv):  # the mistake part 7 warns about: nn.Conv2d on a (B, H, W, C) map
        def forward(self, x):
            return self.conv(x)

    with pytest.raises(AssertionError, match="permute"):
        nbhelpers.check_ingredient(NoPermute, "pc")
    check = next(c.source for c in cells if c.cell_type == "code" and 'check_ingredient(MyPostConv, "pc")' in c.source)
    capsys.readouterr()
    exec(check, {**namespace, "MyPostConv": NoPermute})  # the notebook's check cell: a hint, not a traceback
    assert "Not quite: your module failed" in capsys.readouterr().out


def test_the_window_partition_check_fails_wrong_partitions_and_passes_the_folded_answer(monkeypatch):
    monkeypatch.syspath_prepend(str(NOTEBOOK_DIR))
    import nbhelpers

    folded = next(c.source for c in read(NOTEBOOK_DIR / "03_attention.ipynb").cells
                  if c.cell_type == "markdown" and "def my_window_partition" in c.source)
    assert folded.startswith("<details>"), "the answer is not folded: a student would see it before trying"
    namespace = {}
    exec("\n".join(re.findall(r"```python\n(.*?)```", folded, re.S)), namespace)  # the folded code, as shown
    nbhelpers.check_window_partition(namespace["my_window_partition"])  # an AssertionError fails the test

    def split(x, wh, ww):  # (B, H, W, C) -> (B, H/wh, wh, W/ww, ww, C)
        B, H, W, C = x.shape
        return x.reshape(B, H // wh, wh, W // ww, ww, C)

    wrong = {"runs along the rows, not windows": lambda x, wh, ww: x.reshape(x.shape[0], -1, wh * ww, x.shape[3]),
             "windows down the columns first": lambda x, wh, ww: split(x, wh, ww).permute(0, 3, 1, 2, 4, 5)
             .reshape(x.shape[0], -1, wh * ww, x.shape[3]),
             "tokens column by column": lambda x, wh, ww: split(x, wh, ww).permute(0, 1, 3, 4, 2, 5)
             .reshape(x.shape[0], -1, wh * ww, x.shape[3]),
             "channels split across tokens": lambda x, wh, ww: split(x, wh, ww).permute(0, 1, 3, 2, 4, 5)
             .reshape(x.shape[0], -1, x.shape[3], wh * ww).transpose(2, 3)}
    for name, partition in wrong.items():
        with pytest.raises(AssertionError):
            nbhelpers.check_window_partition(partition)

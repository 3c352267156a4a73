"""The trained checkpoints the notebooks load: checkpoints/export.py keeps the tested weights (in fp16) and
what uninext.load needs, and every committed checkpoint is the file its checksum names and scores on the
test set what its run recorded."""

import contextlib
import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import train_helpers
import train_minimal as tm
import uninext

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "checkpoints"))
import export  # noqa: E402

LISTED = dict(re.findall(r"`([0-9a-f]{64})`\s*\|\s*`checkpoints/([^/]+)/model.pt`",
                         (ROOT / "checkpoints" / "README.md").read_text()))
COMMITTED = sorted(p.parent.name for p in (ROOT / "checkpoints").glob("*/model.pt"))


@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_an_exported_run_rebuilds_the_tested_model_in_fp16(ema, tmp_path):
    run = tmp_path / "run"
    tm.main(["--size", "N32", "--device", "cpu", "--dataset", "synthetic", "--train-size", "128", "--batch-size",
             "32", "--epochs", "1", "--mixer", "window", "--ema", ema, "--out", str(run)])
    digest = export.export(run, "small", into=tmp_path)
    assert digest == hashlib.sha256((tmp_path / "small" / "model.pt").read_bytes()).hexdigest()
    assert sorted(f.name for f in (tmp_path / "small").iterdir()) == ["metrics.csv", "model.pt", "steps.csv",
                                                                        "summary.json"]
    full, small = uninext.load(run), uninext.load(tmp_path / "small" / "model.pt")
    assert (tmp_path / "small" / "model.pt").stat().st_size < 0.6 * (run / "best.pt").stat().st_size
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(small(x), full(x), atol=2e-2)
    assert small.pretrained_cfg == full.pretrained_cfg


def test_load_takes_the_folder_that_readme_names_and_says_what_a_folder_lacks(tmp_path):
    name = COMMITTED[0]
    folder, file = uninext.load(ROOT / "checkpoints" / name), uninext.load(ROOT / "checkpoints" / name / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(folder.state_dict().values(), file.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="holds neither model.pt .* nor last.pt"):
        uninext.load(tmp_path)
    torch.save({"model_config": None}, tmp_path / "last.pt")  # an exported model.pt wins over a last.pt
    (tmp_path / "model.pt").write_bytes((ROOT / "checkpoints" / name / "model.pt").read_bytes())
    assert all(torch.equal(a, b) for a, b in zip(uninext.load(tmp_path).state_dict().values(),
                                                 file.state_dict().values()))


def test_readme_lists_every_committed_checkpoint_with_its_checksum():
    assert sorted(LISTED.values()) == COMMITTED
    for digest, name in LISTED.items():
        assert hashlib.sha256((ROOT / "checkpoints" / name / "model.pt").read_bytes()).hexdigest() == digest


@pytest.mark.skipif(not train_helpers.DEBIAN_FASHION_MNIST.is_dir(), reason="needs dataset-fashion-mnist")
@pytest.mark.parametrize("name", [n for n in COMMITTED if n.startswith("fashion-mnist")])
def test_a_committed_checkpoint_scores_what_its_run_recorded(name):
    folder = ROOT / "checkpoints" / name
    model = uninext.load(folder)  # its model.pt
    args = tm.resolve(tm.build_parser().parse_args(["--dataset", "fashion-mnist", "--device", "cpu"]))
    data = tm.load_data(args, torch.device("cpu"))
    _, acc1 = tm.evaluate(model, data, contextlib.nullcontext)
    recorded = json.loads((folder / "summary.json").read_text())["test_acc1"]
    assert acc1 == pytest.approx(recorded, abs=0.1)  # fp16 weights may flip a few of the 10,000 images

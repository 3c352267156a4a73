"""
Turn a finished train_minimal.py run into the small checkpoint the notebooks load: the tested weights (the
EMA's when the run kept one) in fp16, the model's configuration, the input normalisation and the training
options, plus the run's metrics.csv, steps.csv and summary.json, so that its curves can be drawn without
training again. `uninext.load(folder)` rebuilds the model.

    python checkpoints/export.py runs/compare/fashion-mnist-window-uninext-4ep-seed0-<key> fashion-mnist-window-uninext

prints the SHA-256 of model.pt, which checkpoints/README.md lists beside the command that trained the run.
"""

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FILES = ["metrics.csv", "steps.csv", "summary.json"]
sys.path.insert(0, str(HERE.parent))  # uninext.py, however this script is started
import uninext  # noqa: E402


def export(run, name, into=HERE):
    """Write into/name/ from the run folder `run`; return the SHA-256 of its model.pt."""
    run, target = Path(run), Path(into) / name
    try:
        model = uninext.load(run)  # the weights that were tested: the EMA's when the run kept one
    except ValueError as e:
        raise SystemExit(f"{e}: only UniNeXt runs are exported") from None
    missing = [f for f in FILES if not (run / f).is_file()]
    if missing:
        raise SystemExit(f"{run} lacks {', '.join(missing)}: export a finished run")
    checkpoint = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    weights = model.state_dict()
    small = {"model": {k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
             "model_config": checkpoint["model_config"], "normalisation": checkpoint["normalisation"],
             "config": checkpoint["config"]}
    target.mkdir(parents=True, exist_ok=True)
    torch.save(small, target / "model.pt")
    for f in FILES:
        shutil.copyfile(run / f, target / f)
    return hashlib.sha256((target / "model.pt").read_bytes()).hexdigest()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("run", help="a finished run folder (holds last.pt)")
    p.add_argument("name", help="the folder to write under checkpoints/")
    a = p.parse_args()
    print(f"{export(a.run, a.name)}  checkpoints/{a.name}/model.pt")

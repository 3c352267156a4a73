"""
Turn a finished train_minimal.py run into the small checkpoint the notebooks load: the tested weights (the
EMA's when the run kept one) in fp16, the model's configuration, the input normalisation and the training
options, plus the run's metrics.csv, steps.csv and summary.json, so that its curves can be drawn without
training again. `uninext.load(folder / "model.pt")` rebuilds the model.

    python checkpoints/export.py runs/compare/fashion-mnist-window-uninext-4ep-seed0-<key> fashion-mnist-window-uninext

prints the SHA-256 of model.pt, which checkpoints/README.md lists beside the command that trained the run.
"""

import argparse
import hashlib
import shutil
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FILES = ["metrics.csv", "steps.csv", "summary.json"]


def export(run, name, into=HERE):
    """Write into/name/ from the run folder `run`; return the SHA-256 of its model.pt."""
    run, target = Path(run), Path(into) / name
    checkpoint = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    if not checkpoint.get("model_config"):
        raise SystemExit(f"{run / 'last.pt'} holds no UniNeXt configuration: only UniNeXt runs are exported")
    missing = [f for f in FILES if not (run / f).is_file()]
    if missing:
        raise SystemExit(f"{run} lacks {', '.join(missing)}: export a finished run")
    ema = checkpoint.get("ema")
    weights = {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")} if ema else \
        checkpoint["model"]
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

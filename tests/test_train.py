"""train_minimal.py, as a specification: it learns real data, reads the real CIFAR files through torchvision,
augments on the device as torchvision would, leaves a complete run folder, resumes exactly after Ctrl-C,
trains the same with DistributedDataParallel, and answers bad input with a message and an exit code, never
a traceback. All on the CPU with the N32 preset and a few hundred images; runs go through `main(argv)` in
this process, and through a subprocess only where the process itself is the point (torchrun, exit codes)."""

import contextlib
import csv
import errno
import json
import math
import os
import pickle
import shutil
import shlex
import signal
import subprocess
import sys
import types
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from torchvision import datasets
from torchvision.transforms.v2 import functional as TF

import train_helpers
import train_minimal as tm
import uninext

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--size", "N32", "--device", "cpu", "--dataset", "synthetic", "--train-size", "128", "--batch-size", "32"]
TIMING = {"img_per_s", "seconds", "cpu_seconds"}  # the only metrics that may differ between two runs of the same thing


def train(*argv):
    """Run the command line in this process; return the summary."""
    return tm.main([str(a) for a in argv])


def cli(argv, capsys):
    """Run a command line that must stop, in this process: (exit code, everything it printed)."""
    with pytest.raises(SystemExit) as exit_info:
        train(*argv)
    printed = capsys.readouterr()
    return exit_info.value.code, printed.out + printed.err


def metrics(run, name="metrics.csv"):
    with open(run / name, newline="") as f:
        return list(csv.DictReader(f))


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on two shared cores, OpenMP threads that wait for each other at every barrier make these
    small models up to ten times slower (measured here); a single thread never waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete tiny run: 3 epochs of 4 steps, tested after epochs 2 and 3."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(*TINY, "--epochs", "3", "--eval-every", "2", "--out", out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Learning real data


@pytest.mark.skipif(not train_helpers.DEBIAN_FASHION_MNIST.is_dir(),
                    reason=f"needs Debian's dataset-fashion-mnist ({train_helpers.DEBIAN_FASHION_MNIST}): "
                           "apt-get install dataset-fashion-mnist")
def test_n32_learns_fashion_mnist_far_above_chance_in_a_minute(tmp_path):
    summary = train("--dataset", "fashion-mnist", "--size", "N32", "--device", "cpu", "--train-size", "2000",
                    "--batch-size", "32", "--epochs", "2", "--eval-every", "0", "--out", tmp_path / "run")
    # Chance is 10% (ten balanced classes), and so is a network that learned nothing or only the commonest
    # class. These 124 steps on 2,000 images reach 75.6% on the full 10,000-image test set with the CPU
    # defaults (seed 0, PyTorch 2.14.1, x86 CPU; 64.4% with the earlier recipe's random crop, drop path and
    # default initialisation); 60% leaves room for other platforms' rounding, and is six times chance.
    assert summary["test_images"] == 10_000
    assert summary["test_acc1"] > 60


# ----------------------------------------------------------------------------------------------------------
# Data


def write_cifar(root, name, n_train, n_test):
    """Random images in the python-pickle layout of the real CIFAR archives, under root/<base_folder>.
    Returns the (N, 32, 32, 3) training images and their labels as written."""
    cls, classes = (datasets.CIFAR10, 10) if name == "cifar10" else (datasets.CIFAR100, 100)
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def write(file, n):
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # rows of R, G, B planes, as CIFAR's
        labels = rng.integers(0, classes, n).tolist()
        with open(folder / file, "wb") as f:
            pickle.dump({"data": data, label_key: labels, "filenames": [f"{i}.png" for i in range(n)]}, f)
        return data, labels

    train_files = [file for file, _ in cls.train_list]
    written = [write(file, n_train // len(train_files)) for file in train_files]
    write(cls.test_list[0][0], n_test)
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class {c}" for c in range(classes)]}, f)
    images = np.concatenate([data for data, _ in written]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return torch.from_numpy(images.copy()), torch.tensor(sum((labels for _, labels in written), []))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_files_in_the_real_layout_are_read_through_torchvision_and_trained_on(name, tmp_path, monkeypatch):
    images, labels = write_cifar(tmp_path / "data", name, n_train=100, n_test=40)
    # torchvision checks every file against the md5 of the real one; with md5 None, check_integrity only
    # asks that the file exists (torchvision.datasets.utils.check_integrity), so the small files pass.
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    for attribute in ["train_list", "test_list"]:
        monkeypatch.setattr(cls, attribute, [[file, None] for file, _ in getattr(cls, attribute)])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})

    args = tm.resolve(tm.build_parser().parse_args(["--dataset", name, "--data-dir", str(tmp_path / "data")]))
    data = tm.load_data(args, torch.device("cpu"))
    assert torch.equal(data.train_images, images)  # (N, 32, 32, 3): CIFAR's planes became channels_last
    assert torch.equal(data.train_labels, labels)
    assert (data.num_train, data.num_test, data.num_classes) == (100, 40, tm.SMALL_DATASETS[name])

    summary = train("--dataset", name, "--data-dir", tmp_path / "data", "--size", "N32", "--device", "cpu",
                    "--batch-size", "50", "--epochs", "1", "--out", tmp_path / "run")
    assert summary["test_images"] == 40 and 0 <= summary["test_acc1"] <= 100


def test_an_image_folder_is_read_by_dataloader_workers_and_trained_on(tmp_path):
    image_folder(tmp_path / "images", {("train", "cat"): 8, ("train", "dog"): 8, ("val", "cat"): 4,
                                       ("val", "dog"): 4})  # 40x48 images: any size is cropped and resized
    summary = train("--dataset", "imagefolder", "--data-dir", tmp_path / "images", "--size", "N32", "--device",
                    "cpu", "--batch-size", "4", "--epochs", "1", "--workers", "1", "--out", tmp_path / "run")
    assert (summary["train_images"], summary["test_images"]) == (16, 8)
    assert len(metrics(tmp_path / "run")) == 1


def image_folder(root, counts, size=(40, 48)):
    """Random images in root/<split>/<class>/<i>.png, counts = {(split, class): number}."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for (split, c), n in counts.items():
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_test_images_are_labelled_by_the_training_classes_even_when_val_lacks_one(tmp_path):
    root = image_folder(tmp_path / "images", {("train", "ant"): 4, ("train", "bee"): 4, ("train", "cat"): 4,
                                              ("val", "bee"): 2, ("val", "cat"): 2})
    args = tm.resolve(tm.build_parser().parse_args(["--dataset", "imagefolder", "--data-dir", str(root),
                                                    "--size", "N32", "--device", "cpu", "--batch-size", "4"]))
    data = tm.FolderData(args, torch.device("cpu"), 0, 1)
    assert data.test_set.targets == [1, 1, 2, 2]  # bee and cat, as the model was trained to name them
    image_folder(root, {("val", "dog"): 1})
    with pytest.raises(tm.UsageError, match="has classes that .* lacks \\(dog\\)"):
        tm.FolderData(args, torch.device("cpu"), 0, 1)


def test_an_unreadable_image_is_named_in_one_line(tmp_path, capsys):
    root = image_folder(tmp_path / "images", {("train", "ant"): 4, ("train", "bee"): 4, ("val", "ant"): 2})
    (root / "train" / "bee" / "3.png").write_bytes(b"\x89PNG not really")
    code, printed = cli(["--dataset", "imagefolder", "--data-dir", root, "--size", "N32", "--device", "cpu",
                         "--batch-size", "8", "--epochs", "1", "--workers", "1", "--out", tmp_path / "run"], capsys)
    error = printed.splitlines()[-1]  # after the line that the run prints when it starts
    assert code == 2 and error.startswith("train_minimal.py: error: ")
    assert f"{root / 'train' / 'bee' / '3.png'} cannot be read as an image" in error


def folder_args(root, *extra):
    argv = ["--dataset", "imagefolder", "--data-dir", str(root), "--size", "N32", "--device", "cpu", "--batch-size",
            "4", "--workers", "0", *extra]
    return tm.resolve(tm.build_parser().parse_args(argv))


@pytest.mark.parametrize("link, target", [("train/cat/loop", ".."), ("train/cat/more", "../dog"),
                                          ("val/dog/seen", "../../train/dog")])
def test_a_link_that_reaches_a_folder_twice_is_refused_and_named(link, target, tmp_path):
    # torchvision follows links: a loop back up the tree read 16 images as 656, the dogs among them as cats
    root = image_folder(tmp_path / "images", {("train", "cat"): 8, ("train", "dog"): 8, ("val", "cat"): 2,
                                              ("val", "dog"): 2})
    (root / link).symlink_to(target, target_is_directory=True)
    with pytest.raises(tm.UsageError, match="reached through a link") as refused:
        tm.FolderData(folder_args(root), torch.device("cpu"), 0, 1)
    assert str(root / link) in str(refused.value)
    (root / link).unlink()
    (tmp_path / "elsewhere").symlink_to(root / "train" / "dog", target_is_directory=True)
    (root / link).symlink_to(tmp_path / "elsewhere" / "..", target_is_directory=True)  # a loop through outside
    with pytest.raises(tm.UsageError, match="reached through a link"):
        tm.FolderData(folder_args(root), torch.device("cpu"), 0, 1)
    (root / link).unlink()
    extra = image_folder(tmp_path / "extra", {("more", "cat"): 3})
    (root / "train" / "cat" / "extra").symlink_to(extra / "more" / "cat", target_is_directory=True)
    assert tm.FolderData(folder_args(root), torch.device("cpu"), 0, 1).num_train == 19  # a link out of the tree


@pytest.mark.parametrize("val", ["empty", "damaged"])
def test_a_test_split_without_readable_images_is_refused_before_training(val, tmp_path, capsys, monkeypatch):
    root = image_folder(tmp_path / "images", {("train", "ant"): 4, ("train", "bee"): 4, ("val", "ant"): 2})
    if val == "empty":
        shutil.rmtree(root / "val" / "ant")
        (root / "val" / "ant").mkdir()
    else:
        (root / "val" / "ant" / "1.png").write_bytes(b"\x89PNG cut short")
    monkeypatch.setattr(tm, "build_model", lambda *a: pytest.fail("training started"))
    code, printed = cli(["--dataset", "imagefolder", "--data-dir", root, "--size", "N32", "--device", "cpu",
                         "--batch-size", "4", "--epochs", "1", "--workers", "1", "--out", tmp_path / "run"], capsys)
    assert code == 2 and printed.count("\n") == 1
    assert ("holds no images" if val == "empty" else f"{root / 'val' / 'ant' / '1.png'} cannot be read") in printed
    assert not (tmp_path / "run").exists()  # the folder made for the run goes with it


def test_16_bit_images_are_scaled_by_their_depth_and_float_images_refused(tmp_path):
    from PIL import Image

    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))  # (4, 256), black to white
    Image.fromarray(gradient).save(tmp_path / "16.png")
    Image.fromarray(gradient).save(tmp_path / "16.tif")
    for name in ["16.png", "16.tif"]:
        assert Image.open(tmp_path / name).mode == "I;16"
        rgb = np.asarray(train_helpers.read_image(tmp_path / name))  # (4, 256, 3) uint8
        assert rgb.dtype == np.uint8 and (rgb[0, :, 0] == np.arange(256)).all()  # a conversion clipped it to 255
    Image.fromarray(gradient.astype(np.float32) / 65535).save(tmp_path / "float.tif")
    with pytest.raises(tm.UsageError, match="float.tif holds floating-point pixels, whose range"):
        train_helpers.read_image(tmp_path / "float.tif")


def test_a_damaged_fashion_mnist_file_is_named_with_the_fix(tmp_path, monkeypatch, capsys):
    for name in ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"]:
        (tmp_path / name).write_bytes(b"\x1f\x8b\x08\x00 cut short")
    monkeypatch.setattr(train_helpers, "DEBIAN_FASHION_MNIST", tmp_path)
    code, printed = cli(["--dataset", "fashion-mnist", "--device", "cpu", "--out", tmp_path / "run"], capsys)
    assert code == 2 and "train-images-idx3-ubyte.gz is damaged" in printed
    assert "apt-get install --reinstall dataset-fashion-mnist" in printed


@pytest.mark.parametrize("edit", [("config", "epochs", [3]), ("config", "lr", "fast"), ("progress", "epoch", "2"),
                                  ("progress", "history", {})])
def test_a_checkpoint_edited_by_hand_into_the_wrong_types_is_refused(edit, finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    part, key, value = edit
    checkpoint[part][key] = value
    torch.save(checkpoint, run / "last.pt")
    code, printed = cli(["--resume", run], capsys)
    assert code == 2 and "of the wrong type: was it edited by hand?" in printed and key in printed


def test_crop_flip_gives_each_image_its_own_crop_and_flip_exactly_as_torchvision():
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    shifts = torch.tensor([[0, 0], [8, 8], [3, 5], [8, 0], [1, 7], [4, 4]])
    flips = torch.tensor([False, True, True, False, True, False])
    batch = tm.crop_flip(images, shifts, flips, pad=4)
    for image, (dy, dx), flip, result in zip(images, shifts.tolist(), flips, batch):
        expected = TF.crop(TF.pad(image.permute(2, 0, 1), [4]), dy, dx, 32, 32)  # (C, H, W)
        expected = TF.horizontal_flip(expected) if flip else expected
        assert torch.equal(result.permute(2, 0, 1), expected)


def test_train_size_takes_a_class_balanced_subset_that_no_seed_changes():
    subsets = []
    for seed in ["0", "1"]:
        argv = ["--dataset", "synthetic", "--train-size", "95", "--seed", seed]
        args = tm.resolve(tm.build_parser().parse_args(argv))
        data = tm.load_data(args, torch.device("cpu"))
        assert torch.bincount(data.train_labels, minlength=10).tolist() == [10] * 5 + [9] * 5  # 9 each, +1 for 5
        subsets.append(data.train_images)
    assert torch.equal(*subsets)


def test_ingredient_switches_override_the_architecture_one_at_a_time():
    args = tm.resolve(tm.build_parser().parse_args(["--size", "N32", "--arch", "vanilla", "--ec"]))
    cfg = tm.build_model(args, num_classes=10, in_chans=1).cfg
    assert (cfg.conv_stem, cfg.ec, cfg.hdc, cfg.pc, cfg.in_chans) == (False, True, False, False, 1)


@pytest.mark.parametrize("arch", ["uninext", "vanilla"])
def test_zero_init_residual_starts_every_block_as_the_identity_and_changes_no_parameter_count(arch):
    argv = ["--size", "N32", "--mixer", "window", "--arch", arch, "--device", "cpu"]
    zeroed = tm.build_model(tm.resolve(tm.build_parser().parse_args(argv)), num_classes=10, in_chans=1)
    default = tm.build_model(tm.resolve(tm.build_parser().parse_args([*argv, "--no-zero-init-residual"])),
                             num_classes=10, in_chans=1)
    assert [p.shape for p in zeroed.parameters()] == [p.shape for p in default.parameters()]
    x = torch.randn(2, 8, 8, 64)
    block = zeroed.stages[1].blocks[0]
    assert torch.equal(block(x), x)  # mixer, MLP and PC branches all add exactly zero
    assert not torch.equal(default.stages[1].blocks[0](x), x)


@pytest.mark.parametrize("mixer, spared", [("window", "rel_pos.table"), ("pvt", "pos_embed")])
def test_weight_decay_spares_position_encodings_biases_and_norms_only(mixer, spared):
    args = tm.resolve(tm.build_parser().parse_args(["--size", "N32", "--mixer", mixer, "--arch", "vanilla"]))
    model = tm.build_model(args, num_classes=10, in_chans=1)
    decay = {id(p): group["weight_decay"] for group in tm.build_optimizer(model, args, torch.device("cpu")).param_groups
             for p in group["params"]}
    names = {name: decay[id(p)] for name, p in model.named_parameters()}
    assert len(names) == len(decay)  # every parameter in exactly one group
    assert {n for n, d in names.items() if d == 0} == {n for n, p in model.named_parameters()
                                                        if p.ndim < 2 or n.endswith(spared)}
    assert any(n.endswith(spared) for n in names) and args.weight_decay == 0.05
    fc1 = [d for n, d in names.items() if n.endswith("fc1.weight")]
    assert fc1 and all(d == 0.05 for d in fc1)


def test_the_defaults_give_a_short_run_on_a_cpu_and_the_long_one_on_a_gpu(monkeypatch):
    cpu = tm.resolve(tm.build_parser().parse_args(["--device", "cpu"]))
    assert (cpu.size, cpu.epochs, cpu.batch_size, cpu.lr, cpu.crop, cpu.drop_path) == ("N32", 2, 64, 2e-3, 0, 0)
    given = tm.resolve(tm.build_parser().parse_args(["--device", "cpu", "--size", "T32", "--epochs", "7"]))
    assert (given.size, given.epochs) == ("T32", 7)
    monkeypatch.setattr(tm, "pick_device", lambda name, local_rank: torch.device("cuda", local_rank))
    gpu = tm.resolve(tm.build_parser().parse_args([]))
    assert (gpu.size, gpu.epochs, gpu.batch_size, gpu.lr, gpu.crop, gpu.drop_path) == ("T32", 100, 128, 1e-3, 4, 0.1)


@pytest.mark.parametrize("cuda, mps, budget", [(False, True, "laptop"), (True, True, "gpu"), (False, False, "laptop")])
def test_a_macs_gpu_gets_the_laptop_defaults_and_only_cuda_the_long_run(cuda, mps, budget, monkeypatch):
    # --device auto on a Mac picks MPS: a laptop GPU, for which T32 and 100 epochs would take a day
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert tm.pick_device("auto", 0).type == ("cuda" if cuda else "mps" if mps else "cpu")
    args = tm.resolve(tm.build_parser().parse_args(["--dataset", "fashion-mnist"]))
    expected = tm.GPU_DEFAULTS if budget == "gpu" else tm.CPU_DEFAULTS
    assert {name: getattr(args, name) for name in expected} == expected


# ----------------------------------------------------------------------------------------------------------
# Baselines, trained by the same harness


def test_the_baselines_are_the_standard_models():
    args = lambda model: tm.resolve(tm.build_parser().parse_args(["--model", model, "--device", "cpu"]))
    count = lambda model: sum(p.numel() for p in model.parameters())
    linear = tm.build_model(args("linear"), num_classes=10, in_chans=1, img_size=32)
    assert count(linear) == 32 * 32 * 10 + 10
    cnn = tm.build_model(args("cnn"), num_classes=10, in_chans=1, img_size=32)
    assert count(cnn) == 140_458  # 5 conv-BN-ReLU layers of 32, 32, 64, 64, 128 channels and a linear head
    resnet = tm.build_model(args("resnet18"), num_classes=10, in_chans=3, img_size=32)
    assert count(resnet) == 11_173_962  # the usual CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool
    assert (resnet.conv1.kernel_size, resnet.conv1.stride) == ((3, 3), (1, 1))
    x = torch.randn(2, 3, 32, 32)
    assert resnet(x).shape == (2, 10)
    assert resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(resnet.conv1(x))))).shape[2:] == (4, 4)


@pytest.mark.parametrize("model", ["linear", "cnn", "resnet18"])
def test_a_baseline_run_leaves_the_same_files_and_accounting_as_a_uninext_run(model, tmp_path):
    argv = ["--model", model, "--device", "cpu", "--dataset", "synthetic", "--train-size", "64", "--batch-size",
            "32", "--epochs", "1", "--out", tmp_path / "run"]
    summary = train(*argv)
    assert summary["model"] == model and "mixer" not in summary and summary["cpu_seconds"] > 0
    assert {"metrics.csv", "steps.csv", "curves.png", "last.pt", "best.pt", "summary.json"} <= {
        f.name for f in (tmp_path / "run").iterdir()}
    assert train("--resume", tmp_path / "run", "--eval-only")["test_acc1"] == summary["test_acc1"]


def test_uninext_options_given_to_a_baseline_are_refused(capsys):
    code, printed = cli(["--model", "cnn", "--size", "N32", "--ec", "--device", "cpu"], capsys)
    assert code == 2
    assert "--size, --ec: for --model uninext only; --model cnn is a fixed baseline, so drop them" in printed


# ----------------------------------------------------------------------------------------------------------
# What a run leaves, and resuming it


def test_a_run_leaves_metrics_per_epoch_curves_checkpoints_and_a_summary(finished_run):
    rows = metrics(finished_run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == train_helpers.METRICS
    assert rows[0]["test_acc1"] == "" and rows[1]["test_acc1"] and rows[2]["test_acc1"]  # --eval-every 2
    assert all(float(r["img_per_s"]) > 0 and float(r["train_loss"]) > 0 for r in rows)
    assert (finished_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ["last.pt", "best.pt"]:
        checkpoint = torch.load(finished_run / name, weights_only=True)  # data only, no code
        assert {"model", "optimizer", "scheduler", "scaler", "ema", "rng", "config", "progress"} <= set(checkpoint)
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["test_acc1"] == float(rows[2]["test_acc1"])
    assert summary["params"] > 1e6 and summary["seconds"] > 0 and summary["device"].startswith("cpu (1 thread of ")
    assert summary["device"].endswith(f"{train_helpers.cpu_model()})")  # CPU time compares runs on one processor
    assert summary["cpu_seconds"] == pytest.approx(sum(float(r["cpu_seconds"]) for r in rows))
    assert summary["cpu_seconds"] > 0
    assert not list(finished_run.glob("*.tmp"))


def test_training_is_logged_every_few_steps_with_its_cpu_time_so_that_one_epoch_draws_a_curve(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tm, "LOG_EVERY", 2)
    train(*TINY, "--epochs", "2", "--eval-every", "0", "--out", tmp_path / "run")  # 2 epochs of 4 steps
    steps, (epoch, _) = metrics(tmp_path / "run", "steps.csv"), metrics(tmp_path / "run")
    assert list(steps[0]) == train_helpers.STEP_METRICS
    assert [(r["step"], r["epoch"]) for r in steps] == [("2", "0.5"), ("4", "1.0"), ("6", "1.5"), ("8", "2.0")]
    # each row is the mean of its two steps, so the epoch's two rows average to the epoch's mean
    assert (float(steps[0]["train_loss"]) + float(steps[1]["train_loss"])) / 2 == pytest.approx(
        float(epoch["train_loss"]))
    assert 0 < float(steps[0]["cpu_seconds"]) < float(steps[1]["cpu_seconds"]) < float(steps[3]["cpu_seconds"])
    assert float(steps[1]["cpu_seconds"]) == pytest.approx(float(epoch["cpu_seconds"]), abs=0.5)
    # Each epoch has its own progress bar, which a finished epoch leaves full: a bar that stopped short (red
    # in a notebook) means a stopped run.
    err = capsys.readouterr().err
    assert "epoch 1/2: 100%" in err and "epoch 2/2: 100%" in err and "| 4/4 [" in err and "/8 [" not in err


def test_eval_only_reproduces_the_final_test_accuracy_of_the_run(finished_run):
    summary = train("--resume", finished_run, "--eval-only")
    assert summary["test_acc1"] == float(metrics(finished_run)[-1]["test_acc1"])


RESUMABLE = [*TINY, "--epochs", "2", "--mixup", "0.8", "--cutmix", "1.0", "--ema", "0.9"]  # every random state


RESUME_LOG_EVERY = 3  # progress windows of 3 steps in epochs of 4: a stop inside a window must not change it


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory):
    out = tmp_path_factory.mktemp("never_stopped") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tm, "LOG_EVERY", RESUME_LOG_EVERY)
        train(*RESUMABLE, "--out", out)
    return out


def interrupt_at(monkeypatch, epoch, step, signum=signal.SIGINT, data=tm.TensorData):
    """Press Ctrl-C (a real SIGINT to this process), or send another signal, as step `step` (counted from 0)
    of `epoch` starts."""
    batches = data.train_batches

    def batches_with_ctrl_c(self, e, start=0):
        for i, batch in enumerate(batches(self, e, start), start):
            if (e, i) == (epoch, step):
                signal.raise_signal(signum)
            yield batch

    monkeypatch.setattr(data, "train_batches", batches_with_ctrl_c)


@pytest.mark.parametrize("epoch, step, signum", [(2, 1, signal.SIGINT), (1, 3, signal.SIGINT), (2, 2, signal.SIGTERM)],
                         ids=["mid-epoch", "end-of-epoch", "SIGTERM"])
def test_ctrl_c_saves_and_the_resumed_run_ends_exactly_like_one_never_stopped(
        epoch, step, signum, never_stopped, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(tm, "LOG_EVERY", RESUME_LOG_EVERY)
    interrupt_at(monkeypatch, epoch, step, signum)
    code, printed = cli([*RESUMABLE, "--out", out], capsys)
    assert code == 130 and f"stopped by {'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'} at" in printed
    assert f"python train_minimal.py --resume {out}" in printed
    monkeypatch.undo()

    monkeypatch.setattr(tm, "LOG_EVERY", RESUME_LOG_EVERY)
    train("--resume", out)  # the stored options are the defaults
    for name in ["metrics.csv", "steps.csv"]:
        assert untimed(metrics(out, name)) == untimed(metrics(never_stopped, name))
    resumed, uninterrupted = (torch.load(run / "last.pt", weights_only=True) for run in (out, never_stopped))
    for part in ["model", "ema"]:
        assert all(torch.equal(resumed[part][k], uninterrupted[part][k]) for k in uninterrupted[part])


def test_an_image_folder_run_resumes_exactly_with_any_number_of_workers(tmp_path, monkeypatch, capsys):
    # Each image's augmentation depends on (seed, epoch, index) alone, not on the worker process that reads
    # it: after a resume the batches land in other workers, and --workers may change.
    root = image_folder(tmp_path / "images", {("train", "cat"): 8, ("train", "dog"): 8, ("val", "cat"): 4,
                                              ("val", "dog"): 4})
    argv = ["--dataset", "imagefolder", "--data-dir", root, "--size", "N32", "--device", "cpu", "--batch-size",
            "4", "--epochs", "2", "--eval-every", "0", "--mixup", "0.8", "--drop-path", "0.1"]
    monkeypatch.setattr(tm, "LOG_EVERY", RESUME_LOG_EVERY)
    train(*argv, "--workers", "0", "--out", tmp_path / "never_stopped")
    interrupt_at(monkeypatch, 2, 1, data=tm.FolderData)
    assert cli([*argv, "--workers", "2", "--out", tmp_path / "stopped"], capsys)[0] == 130
    monkeypatch.setattr(tm.FolderData, "train_batches", train_helpers.FolderData.train_batches)
    train("--resume", tmp_path / "stopped", "--workers", "1")
    for name in ["metrics.csv", "steps.csv"]:
        assert untimed(metrics(tmp_path / "stopped", name)) == untimed(metrics(tmp_path / "never_stopped", name))
    resumed, uninterrupted = (torch.load(tmp_path / run / "last.pt", weights_only=True)["model"]
                              for run in ["stopped", "never_stopped"])
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_ddp_with_two_processes_trains_like_one_process_with_the_same_global_batch(tmp_path):
    same = [*TINY, "--epochs", "1", "--drop-path", "0"]  # drop path draws its masks per process
    one = train(*same, "--out", tmp_path / "one")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train_minimal.py", *same, "--out", str(tmp_path / "two")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["device"].startswith("2 x cpu")
    assert run.stdout.count("done: test top-1") == 1  # only rank 0 reports
    # Each process trains on its half of every batch and DDP averages the gradients: the same steps as one
    # process, up to the order of floating-point sums; the metrics are reduced over both halves.
    row_one, row_two = metrics(tmp_path / "one")[0], metrics(tmp_path / "two")[0]
    for key in ["train_loss", "test_loss"]:
        assert float(row_two[key]) == pytest.approx(float(row_one[key]), rel=1e-4)
    assert abs(float(row_two["test_acc1"]) - float(row_one["test_acc1"])) <= 0.2  # one image in 1,000 may flip
    assert two["test_images"] == one["test_images"] == 1000
    # One seed for the initial weights, then a random stream per process (drop-path masks, Mixup), each
    # saved in last.pt so that every process continues its own stream on --resume.
    rng = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


# ----------------------------------------------------------------------------------------------------------
# Bad input: a message and an exit code, never a traceback, and nothing written before is lost


@pytest.mark.parametrize("option, value, choices", [
    ("--mixer", "convolution", list(tm.uninext.MIXERS)),
    ("--dataset", "imagenet", tm.DATASETS),
])
def test_an_unknown_mixer_or_dataset_is_refused_with_the_choices(option, value, choices, capsys):
    code, printed = cli([option, value], capsys)
    assert code == 2
    assert f"invalid choice: '{value}'" in printed and all(c in printed for c in choices)


@pytest.mark.parametrize("name, folder", [("cifar100", "cifar-100-python"), ("fashion-mnist", "FashionMNIST")])
def test_a_missing_dataset_that_cannot_be_downloaded_says_where_it_looked_and_what_to_do(
        name, folder, tmp_path, monkeypatch, capsys):
    def no_internet(*args, **kwargs):
        raise URLError("no internet (this test)")

    monkeypatch.setattr(datasets.cifar, "download_and_extract_archive", no_internet)
    monkeypatch.setattr(datasets.mnist, "download_and_extract_archive", no_internet)
    monkeypatch.setattr(train_helpers, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    code, printed = cli(["--dataset", name, "--data-dir", tmp_path / "data", "--size", "N32", "--device", "cpu",
                         "--out", tmp_path / "run"], capsys)
    assert code == 2
    assert str(tmp_path / "data" / folder) in printed and "--data-dir" in printed and "internet" in printed
    if name == "fashion-mnist":
        assert "apt-get install dataset-fashion-mnist" in printed


def test_resuming_with_another_configuration_is_refused_and_changes_nothing(finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    code, printed = cli(["--resume", run, "--mixer", "window"], capsys)
    assert code == 2
    assert "another configuration" in printed and "mixer 'window' (stored: 'conv')" in printed
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before


def test_a_nan_loss_stops_the_run_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    batches = tm.TensorData.train_batches

    def poisoned(self, epoch, start=0):  # corrupt data in the second batch of epoch 2
        for i, (images, labels) in enumerate(batches(self, epoch, start), start):
            yield (images * float("nan") if (epoch, i) == (2, 1) else images), labels

    monkeypatch.setattr(tm.TensorData, "train_batches", poisoned)
    code, printed = cli([*TINY, "--epochs", "3", "--out", tmp_path / "run"], capsys)
    assert code == 3
    assert "loss was nan at epoch 2, step 2 of 4" in printed and "end of epoch 1" in printed
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["progress"]["epoch"] == 2  # epoch 1 done
    assert [r["epoch"] for r in metrics(tmp_path / "run")] == ["1"]


def damage(finished_run, tmp_path, how):
    """A copy of the finished run whose last.pt is cut short, or is some other file."""
    run = shutil.copytree(finished_run, tmp_path / "run")
    last = run / "last.pt"
    if how == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif how == "other tensors":
        torch.save({"weights": torch.zeros(3)}, last)
    else:
        last.write_bytes(b"print('not a checkpoint')\n")
    return run


@pytest.mark.parametrize("how", ["truncated", "other tensors", "not even a torch file"])
def test_a_corrupt_checkpoint_is_refused_and_best_pt_is_kept(how, finished_run, tmp_path, capsys):
    run = damage(finished_run, tmp_path, how)
    code, printed = cli(["--resume", run], capsys)
    assert code == 2
    assert f"{run / 'last.pt'} is corrupt or not a checkpoint" in printed and "best.pt" in printed
    assert (run / "best.pt").read_bytes() == (finished_run / "best.pt").read_bytes()


@pytest.mark.parametrize("edit", ["a step past the epoch's end", "a missing field", "a NaN in the history"])
def test_progress_edited_by_hand_into_nonsense_is_refused_in_one_line(edit, finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    progress = checkpoint["progress"]
    if edit == "a step past the epoch's end":
        progress["step"] = 99
    elif edit == "a missing field":
        del progress["partial"]
    else:
        progress["history"][1]["test_loss"] = float("nan")
    torch.save(checkpoint, run / "last.pt")
    code, printed = cli(["--resume", run], capsys)
    assert code == 2 and printed.count("\n") == 1 and ("edited" in printed), printed


def test_resuming_a_finished_run_copies_no_checkpoint(finished_run, tmp_path, monkeypatch):
    # on a full disk, a finished run's --resume failed while copying best.pt again
    run = shutil.copytree(finished_run, tmp_path / "run")
    monkeypatch.setattr(train_helpers, "copy_atomically", lambda *a: pytest.fail("best.pt copied again"))
    assert train("--resume", run)["test_acc1"] == float(metrics(finished_run)[-1]["test_acc1"])


def test_resuming_with_another_model_names_the_model_not_the_stored_size(finished_run, capsys):
    code, printed = cli(["--resume", finished_run, "--model", "cnn"], capsys)
    assert code == 2 and "model 'cnn' (stored: 'uninext')" in printed and "--size" not in printed


def test_a_checkpoint_of_an_earlier_version_is_refused_with_what_it_lacks(finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    del checkpoint["config"]["model"], checkpoint["config"]["crop"]
    torch.save(checkpoint, run / "last.pt")
    code, printed = cli(["--resume", run], capsys)
    assert code == 2
    assert "earlier version of train_minimal.py (it has no crop, model)" in printed


def test_the_command_line_reports_bad_input_in_one_line_with_exit_code_2_and_no_traceback(finished_run, tmp_path):
    run = damage(finished_run, tmp_path, "truncated")
    result = subprocess.run([sys.executable, "train_minimal.py", "--resume", str(run)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("train_minimal.py: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("option, message", [
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--weight-decay", "nan"], "--weight-decay must be a number"),
    (["--label-smoothing", "1.5"], "--label-smoothing is in [0, 1)"),
    (["--drop-path", "1.0"], "--drop-path is a probability in [0, 1)"),
    (["--mixup", "-1"], "--mixup is a Beta parameter"),
    (["--seed", str(10 ** 20)], "--seed is in [0, 2**32)"),
    (["--workers", "-1"], "--workers must be 0 or more"),
    (["--clip-grad", "0"], "--clip-grad is a norm, more than 0"),
    (["--crop", "2000"], "--crop pads a 32x32 image: 0 to 16 pixels"),
    (["--mixup", "1e-300"], "--mixup is a Beta parameter: 0 = off, or 0.01 up"),
    (["--cutmix", "1e-300"], "--cutmix is a Beta parameter: 0 = off, or 0.01 up"),
])
def test_bad_values_are_refused_before_any_work_and_leave_no_folder(option, message, tmp_path, capsys):
    code, printed = cli([*TINY, *option, "--out", tmp_path / "run"], capsys)
    assert code == 2 and message in printed and printed.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_an_out_that_cannot_hold_a_run_is_refused_before_the_data_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tm, "load_data", lambda *a, **k: pytest.fail("the data was loaded"))
    (tmp_path / "file").write_text("")
    assert cli([*TINY, "--out", tmp_path / "file"], capsys) == (2, f"train_minimal.py: error: --out "
                                                                 f"{tmp_path / 'file'} is a file, not a folder: "
                                                                 f"choose another --out\n")
    code, printed = cli([*TINY, "--out", tmp_path / "file" / "run"], capsys)
    assert code == 2 and f"cannot write into {tmp_path / 'file'}" in printed


def refuse_open(name, error):
    """An `open` for train_helpers that fails with `error` on files called `name`."""
    def failing(path, *args, **kwargs):
        if Path(path).name == name:
            raise error
        return open(path, *args, **kwargs)
    return failing


@pytest.mark.parametrize("case", ["dangling link", "link loop", "name too long", "inside /proc", "no inodes left",
                                  "another user's lock", "empty", "root"])
def test_an_out_that_the_file_system_refuses_is_one_line_before_the_data_is_loaded(case, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.setattr(tm, "load_data", lambda *a, **k: pytest.fail("the data was loaded"))
    out = {"dangling link": tmp_path / "dangling", "link loop": tmp_path / "loop", "inside /proc": "/proc/x",
           "name too long": tmp_path / ("x" * 300), "empty": "", "root": "/"}.get(case, tmp_path / "run")
    if case == "dangling link":
        out.symlink_to(tmp_path / "nowhere")
    elif case == "link loop":
        out.symlink_to(out)
    elif case == "no inodes left":
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(Path, "mkdir", full)
    elif case == "another user's lock":
        (tmp_path / "run").mkdir()
        monkeypatch.setattr(train_helpers, "open", refuse_open(".lock", PermissionError(13, "Permission denied")),
                            raising=False)
    code, printed = cli([*TINY, "--out", out], capsys)
    assert code == 2 and printed.startswith("train_minimal.py: error: ") and printed.count("\n") == 1, printed
    assert f"--out {out}" in printed or f"--out {str(out)!r}" in printed


@pytest.mark.parametrize("folder", ["", "/"])
def test_resume_refuses_an_empty_folder_name_or_the_root(folder, capsys):
    code, printed = cli(["--resume", folder], capsys)
    assert code == 2 and f"--resume {folder!r}: give a folder of its own" in printed


def test_a_new_run_never_replaces_a_run_unless_told_to(finished_run, tmp_path, capsys, monkeypatch):
    run = shutil.copytree(finished_run, tmp_path / "run")
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    code, printed = cli([*TINY, "--epochs", "1", "--out", run], capsys)
    assert code == 2 and f"holds a run already: continue it with --resume {run}" in printed
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before

    (run / "best.pt").write_bytes(b"stale")  # a file of the old run that the new one rewrites only at its end
    seen = []  # the folder's files whenever a checkpoint is about to be written
    original = train_helpers.Tracker.save
    monkeypatch.setattr(train_helpers.Tracker, "save", lambda self: seen.append(sorted(f.name for f in run.iterdir()))
                        or original(self))
    train(*TINY, "--epochs", "1", "--eval-every", "0", "--out", run, "--overwrite")
    assert not {"best.pt", "summary.json", "metrics.csv"} & set(seen[0])  # gone before the first checkpoint
    assert len(metrics(run)) == 1


def test_weights_broken_by_the_last_step_of_an_epoch_never_reach_a_checkpoint(tmp_path, monkeypatch, capsys):
    build = tm.build_optimizer

    def poisoning(model, args, device):  # the 8th update (epoch 2, step 4 of 4) leaves a NaN weight
        optimizer, count = build(model, args, device), [0]

        def poisoned_step(self, *a, **k):
            result = type(self).step(self, *a, **k)
            count[0] += 1
            if count[0] == 8:
                next(model.parameters()).data.fill_(float("nan"))
            return result

        optimizer.step = types.MethodType(poisoned_step, optimizer)  # a bound method, as the scheduler expects
        return optimizer

    monkeypatch.setattr(tm, "build_optimizer", poisoning)
    code, printed = cli([*TINY, "--epochs", "3", "--out", tmp_path / "run"], capsys)
    assert code == 3 and "weights became NaN or infinite by epoch 2, step 4 of 4" in printed
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["progress"]["epoch"] == 2  # the end of epoch 1, the last good state
    assert all(torch.isfinite(w).all() for w in checkpoint["model"].values() if w.is_floating_point())


def test_batchnorm_statistics_broken_by_a_huge_rate_stop_the_run_and_never_reach_a_checkpoint(tmp_path, capsys):
    # At lr 300 the CNN's BatchNorm running variances overflow to inf in epoch 2 while its loss and weights
    # stay finite; a model tested with them says nothing.
    argv = ["--model", "cnn", "--lr", "300", "--device", "cpu", "--dataset", "synthetic", "--train-size", "256",
            "--batch-size", "32", "--epochs", "2", "--out", tmp_path / "run"]
    code, printed = cli(argv, capsys)
    assert code == 3 and "BatchNorm's running statistics became NaN or infinite by epoch 2" in printed
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["progress"]["epoch"] == 2  # the end of epoch 1, the last good state

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (dict, list, tuple)):
            for item in value.values() if isinstance(value, dict) else value:
                yield from tensors(item)

    assert all(torch.isfinite(t).all() for t in tensors(checkpoint) if t.is_floating_point())


def test_a_nan_test_loss_stops_the_run_and_no_summary_claims_a_result(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tm, "evaluate", lambda *a: (float("nan"), 10.0))
    code, printed = cli([*TINY, "--epochs", "1", "--out", tmp_path / "run"], capsys)
    assert code == 3 and "the test loss after epoch 1 was nan" in printed
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_run_killed_between_last_pt_and_the_files_after_it_is_completed_when_resumed(tmp_path, monkeypatch):
    run, copy = tmp_path / "run", train_helpers.copy_atomically

    def killed(source, target):  # the process dies after last.pt, before best.pt and metrics.csv
        raise SystemExit("killed")

    monkeypatch.setattr(train_helpers, "copy_atomically", killed)
    with pytest.raises(SystemExit):
        train(*TINY, "--epochs", "2", "--out", run)
    assert (run / "last.pt").exists() and not (run / "best.pt").exists() and not (run / "metrics.csv").exists()
    monkeypatch.setattr(train_helpers, "copy_atomically", copy)
    summary = train("--resume", run)
    assert torch.load(run / "best.pt", weights_only=True)["progress"]["epoch"] == summary["best_epoch"] + 1
    assert [r["epoch"] for r in metrics(run)] == ["1", "2"]


def test_a_full_disk_during_a_checkpoint_leaves_the_last_one_intact_and_no_temporary_file(
        tmp_path, monkeypatch, capsys):
    run, save, calls = tmp_path / "run", torch.save, [0]

    def filling(state, path):  # the disk fills up while the second checkpoint is written
        calls[0] += 1
        if calls[0] == 2:
            Path(path).write_bytes(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")
        return save(state, path)

    monkeypatch.setattr(torch, "save", filling)
    code, printed = cli([*TINY, "--epochs", "2", "--out", run], capsys)
    assert code == 2 and f"could not write {run / 'last.pt'}" in printed and "previous last.pt is intact" in printed
    assert not list(run.glob("*.tmp"))
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["epoch"] == 2  # the end of epoch 1
    monkeypatch.setattr(torch, "save", save)
    assert train("--resume", run)["epochs"] == 2


@pytest.mark.skipif(train_helpers.fcntl is None, reason="run-folder locks need POSIX")
def test_two_runs_never_write_into_one_folder_at_the_same_time(tmp_path, capsys, monkeypatch):
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; lock = open(sys.argv[1], 'w'); "
                               "fcntl.lockf(lock, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "run" / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"  # as another run working there holds it
    load_data = tm.load_data
    monkeypatch.setattr(tm, "load_data", lambda *a, **k: pytest.fail("the data was loaded"))
    code, printed = cli([*TINY, "--epochs", "1", "--out", tmp_path / "run"], capsys)
    assert code == 2 and f"another process is writing into {tmp_path / 'run'}" in printed
    assert not (tmp_path / "run" / "last.pt").exists()
    holder.kill()  # kill -9: the lock is gone with its holder
    holder.wait()
    monkeypatch.setattr(tm, "load_data", load_data)
    train(*TINY, "--epochs", "1", "--out", tmp_path / "run")


@pytest.mark.skipif(train_helpers.fcntl is None, reason="run-folder locks need POSIX")
def test_a_run_killed_with_its_dataloader_workers_alive_can_be_resumed_at_once(tmp_path):
    # Forked workers outlive a kill -9 of their parent by seconds; they must not hold the run folder's lock.
    root = image_folder(tmp_path / "images", {("train", "cat"): 8, ("train", "dog"): 8, ("val", "cat"): 2})
    die = ("import os, signal, sys, train_helpers, train_minimal\n"
           "update = train_helpers.Tracker.update\n"
           "def update_then_die(self, step, *rest):\n"
           "    update(self, step, *rest)\n"
           "    if (self.epoch, step) == (2, 1):\n"
           "        os.kill(os.getpid(), signal.SIGKILL)\n"
           "train_helpers.Tracker.update = update_then_die\n"
           "train_minimal.main(sys.argv[1:])\n")
    argv = ["--dataset", "imagefolder", "--data-dir", root, "--size", "N32", "--device", "cpu", "--batch-size",
            "4", "--epochs", "2", "--workers", "2", "--out", tmp_path / "run"]
    with open(tmp_path / "stderr", "w") as stderr:  # not a pipe, which would wait for the workers to end too
        killed = subprocess.run([sys.executable, "-c", die, *map(str, argv)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=stderr, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-2000:]
    assert train("--resume", tmp_path / "run")["epochs"] == 2


def test_fp16_with_its_grad_scaler_trains_resumes_and_warns_on_a_cpu(tmp_path, capsys):
    summary = train(*TINY, "--epochs", "1", "--amp", "fp16", "--out", tmp_path / "run")
    assert summary["amp"] == "fp16" and math.isfinite(summary["test_loss"])
    assert "warning: --amp fp16 on a CPU is emulated" in capsys.readouterr().out
    scaler = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0  # a live GradScaler was saved, to be restored on --resume
    assert train("--resume", tmp_path / "run", "--eval-only")["test_acc1"] == summary["test_acc1"]


@pytest.mark.parametrize("clip", [None, "0.5"])
def test_gradients_are_clipped_unscaled_and_only_when_asked(clip, tmp_path, monkeypatch):
    before, after, clip_grad_norm = [], [], torch.nn.utils.clip_grad_norm_

    def recorded(parameters, max_norm, **kwargs):
        parameters = list(parameters)
        before.append(clip_grad_norm(parameters, max_norm, **kwargs).item())
        after.append(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]).norm().item())

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recorded)
    amp = "fp16" if clip else "off"  # fp16 is where clipping must unscale first; emulated on a CPU, it is slow
    train(*TINY, "--epochs", "1", "--amp", amp, *(["--clip-grad", clip] if clip else []), "--out", tmp_path / "run")
    if clip is None:
        assert before == []
        return
    assert len(before) == 4  # every step
    # fp16's GradScaler multiplies the loss by 65,536 before backward (and skips a step whose gradients
    # overflow): the finite norms were measured unscaled, and clipped
    finite = [(b, a) for b, a in zip(before, after) if math.isfinite(b)]
    assert finite and all(0 < b < 100 for b, _ in finite), before
    assert all(a <= 0.5 * 1.001 for _, a in finite) and any(b > 0.5 for b, _ in finite)


@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_uninext_load_rebuilds_the_tested_model_from_the_run_folder_alone(ema, tmp_path):
    summary = train(*TINY, "--epochs", "1", "--mixer", "window", "--ema", ema, "--out", tmp_path / "run")
    model = uninext.load(tmp_path / "run")
    assert not model.training and model.cfg.mixer == "window" and model.cfg.num_classes == 10
    args = tm.resolve(tm.build_parser().parse_args([*TINY, "--out", str(tmp_path / "other")]))
    data = tm.load_data(args, torch.device("cpu"))
    assert model.pretrained_cfg["mean"] == tuple(v / 255 for v in data.mean.tolist())  # on timm's 0-1 scale
    assert tm.evaluate(model, data, contextlib.nullcontext)[1] == summary["test_acc1"]
    train("--model", "cnn", "--device", "cpu", "--dataset", "synthetic", "--train-size", "64", "--batch-size", "32",
          "--epochs", "1", "--out", tmp_path / "cnn")
    with pytest.raises(ValueError, match="is not a UniNeXt checkpoint"):
        uninext.load(tmp_path / "cnn" / "last.pt")


def test_a_one_class_training_set_is_warned_about():
    args = folder_args("images")
    line = train_helpers.describe_run(args, types.SimpleNamespace(num_classes=1, num_train=8, num_test=2), 100, "off",
                                      torch.device("cpu"), 1)
    assert line.startswith("warning: the training images are all of one class")


def test_a_file_is_synced_to_the_disk_before_its_rename_and_the_rename_after_it(tmp_path, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or replace(a, b))
    train_helpers.replace_atomically(tmp_path / "last.pt", lambda tmp: tmp.write_text("state"))
    target = str(tmp_path / "last.pt")
    assert events == [("fsync", target + ".tmp"), ("replace", target + ".tmp", target), ("fsync", str(tmp_path))]


def test_the_printed_resume_command_survives_a_shell():
    message = train_helpers.stopped_message(Path("runs/my run's"), "epoch 1, step 2 of 4", "Ctrl-C")
    command = message.splitlines()[-1].strip()
    assert shlex.split(command) == ["python", "train_minimal.py", "--resume", "runs/my run's"]


def test_the_loop_that_readme_shows_is_the_loop_that_runs():
    readme, source = (ROOT / "README.md").read_text(), (ROOT / "train_minimal.py").read_text()
    shown = readme.split("```python\nfor epoch in range(", 1)[1].split("```", 1)[0]
    indented = "".join(" " * 8 + line if line.strip() else line for line in shown.splitlines(keepends=True))
    assert len(shown.splitlines()) > 20 and " " * 8 + "for epoch in range(" + indented.lstrip() in source


@pytest.mark.parametrize("capability, amp", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_amp_auto_takes_bf16_only_where_the_card_computes_it_natively(capability, amp, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert train_helpers.mixed_precision("auto", torch.device("cuda:0")) == amp  # a T4 is (7, 5)
    assert train_helpers.mixed_precision("auto", torch.device("cpu")) == "off"
    assert train_helpers.mixed_precision("fp16", torch.device("cpu")) == "fp16"  # an explicit choice stands

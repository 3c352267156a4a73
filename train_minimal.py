"""
Train UniNeXt from scratch, on small images or on an ImageNet-style folder, on a CPU, one GPU or several.

    python train_minimal.py --mixer conv --dataset cifar100          # on a GPU: T32, 100 epochs (the intended use)
    python train_minimal.py --mixer window --dataset fashion-mnist   # on a CPU: N32, 2 epochs, 10-13 CPU-minutes
    python train_minimal.py --mixer window --arch vanilla --dataset cifar10
    python train_minimal.py --model cnn --dataset fashion-mnist      # a baseline, through the same harness
    python train_minimal.py --dataset synthetic --epochs 1 --train-size 512    # offline smoke run
    python train_minimal.py --resume runs/cifar100-conv-uninext      # continue a stopped run where it stopped
    python train_minimal.py --resume runs/cifar100-conv-uninext --eval-only
    torchrun --nproc_per_node=4 train_minimal.py --dataset cifar100  # DistributedDataParallel, same steps
    python train_minimal.py --dataset imagefolder --data-dir ~/imagenet --epochs 300 --batch-size 1024

Two budgets, picked by the device. On a GPU the defaults train the intended model for as long as it deserves
(T32, 100 epochs, batch 128, lr 1e-3, random crop, drop path 0.1). On a CPU they give a run a person waits
for: the small N32 preset, 2 epochs at batch 64 and lr 2e-3, flip only, no drop path; on Fashion-MNIST that
is 10-13 CPU-minutes (README lists what each budget reaches). Any option given overrides its default.
The recipe around that, for 5k-60k images of 32x32 (the ImageNet one is made for 1.3M images and 300
epochs):
    AdamW, weight decay 0.05 on weight matrices and kernels only (not on position encodings); --batch-size
        is the global batch, so any number of GPUs takes the same steps. (1e-3 at batch 1024 is the
        authors' ImageNet rate, 5e-4 per 512 images, for imagefolder.)
    every residual branch's last layer starts at zero (--zero-init-residual): each block starts as the
        identity and grows in, which trains faster in short runs; an initialisation, not an architecture
        change (the parameters are the authors')
    linear warm-up over the first 5% of the steps, then cosine decay to zero (LinearLR + CosineAnnealingLR):
        LayerNorm and attention networks stall or diverge when they start at full rate
    label smoothing 0.1; drop path and the random crop (4 pixels of zero padding) only for long runs: in
        runs of a few epochs the model underfits, and augmentation only slows it down
    horizontal flip, the standard for CIFAR and Fashion-MNIST
The evidence for each of these (what was predicted, what was measured) is in results/recipe_notes.md. The
weight EMA (--ema) and Mixup/CutMix (--mixup, --cutmix) are off: in short runs they cost accuracy; DeiT-style
recipes use them over hundreds of epochs.

Cost. Every run reports its training time twice: wall seconds, and the CPU-seconds its processes spent
training (`cpu_seconds`; DataLoader workers not included), which other jobs on a shared machine inflate far
less than wall time (by up to a quarter, measured, through contended caches). With one process of one
thread (OMP_NUM_THREADS=1) that is about what one idle core would take; compare runs by it. After the first
steps the run says what the whole of it will cost.

Speed. CIFAR and Fashion-MNIST live on the device as uint8 tensors and are cropped and flipped there, a
whole batch at once (`crop_flip`), so a GPU never waits on Colab's two CPU cores. On a CUDA GPU the model
runs in bf16 autocast (fp16 with a GradScaler where bf16 is missing), `--compile` adds torch.compile.
imagefolder reads JPEGs through a DataLoader with --workers processes and torchvision.transforms.v2.

A run leaves in --out (default runs/<dataset>-<mixer>-<arch>, or runs/<dataset>-<model> for a baseline):
metrics.csv (a row per epoch), steps.csv (the training loss and accuracy every few steps), curves.png,
last.pt and best.pt (everything needed to continue exactly: model, optimiser, schedule, grad scaler, EMA,
all random states, the configuration; plain tensors and dicts, loaded with weights_only=True) and
summary.json. best.pt is chosen on the test set, so its accuracy is optimistic: report the last epoch's.

Ctrl-C or SIGTERM stops after the current step (under torchrun: at the next progress update), saves last.pt
there and prints the command that resumes; a run stopped anywhere and resumed ends with the same metrics and
weights as a run never stopped (tested on the CPU). One run folder takes one run at a time (a lock file).
Exit codes: 0 done, 2 bad input (the message says what to do), 3 the loss, the weights or the test loss
became NaN or infinite, 130 stopped by Ctrl-C or SIGTERM.

Other scripts import this file: `train(build_parser().parse_args([...]))` returns the summary dict.
"""

import argparse
import csv
import dataclasses
import gzip
import json
import math
import os
import random
import shlex
import signal
import struct
import time
import zlib
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

try:
    import fcntl  # run-folder locks, POSIX only
except ImportError:
    fcntl = None

from PIL import Image
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
import torchvision
from torchvision import datasets
from torchvision.transforms import v2
from tqdm.auto import tqdm

import uninext

SMALL_DATASETS = {"cifar10": 10, "cifar100": 100, "fashion-mnist": 10, "synthetic": 10}  # name: classes
DATASETS = [*SMALL_DATASETS, "imagefolder"]
MODELS = ["uninext", "linear", "cnn", "resnet18"]
# Defaults that depend on the device. A GPU trains the intended model for as long as it deserves; a CPU gets a
# run a person waits for: the small preset and 10-13 CPU-minutes on Fashion-MNIST (see README).
GPU_DEFAULTS = {"size": "T32", "epochs": 100, "batch_size": 128, "lr": 1e-3, "crop": 4, "drop_path": 0.1}
CPU_DEFAULTS = {"size": "N32", "epochs": 2, "batch_size": 64, "lr": 2e-3, "crop": 0, "drop_path": 0.0}
INGREDIENTS = {  # the switches of uninext.create_model, each on or off as --arch says unless given
    "conv_stem": "UniNeXt's conv stem (off: a patch embedding)",
    "ec": "EC, the Embedded Convolution beside the mixer",
    "hdc": "HdC, the depthwise conv in the MLP's hidden layer",
    "pc": "PC, the Post Convolution after each block",
    "mixer_pos": "the position encoding of the mixer's own paper",
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
LOG_EVERY = 20  # steps between progress updates and NaN checks (each syncs with the GPU and other processes)
# Options that may differ when a run is resumed: where and how it runs, not what it computes.
RUNTIME_OPTIONS = {"resume", "out", "overwrite", "data_dir", "eval_only", "eval_every", "device", "amp", "compile",
                   "workers"}
RUN_FILES = ["last.pt", "best.pt", "metrics.csv", "steps.csv", "summary.json"]  # what a run leaves in --out


class UsageError(Exception):
    """Bad input: a message for the user, exit code 2."""


class Diverged(Exception):
    """The loss became NaN or infinite: exit code 3."""


# ----------------------------------------------------------------------------------------------------------
# Arguments


def build_parser():
    p = argparse.ArgumentParser(prog="train_minimal.py",
                                description="Train UniNeXt from scratch (see the docstring of train_minimal.py).")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="uninext", choices=MODELS,
                       help="UniNeXt, or a baseline to read its numbers against: logistic regression on the "
                            "pixels, a 0.14M-parameter CNN, ResNet-18 (default: %(default)s)")
    model.add_argument("--mixer", default="conv", choices=list(uninext.MIXERS),
                       help="spatial token mixer (default: %(default)s)")
    model.add_argument("--arch", default="uninext", choices=list(uninext.ARCHS),
                       help="the general architecture around the mixer (default: %(default)s)")
    model.add_argument("--size", choices=list(uninext.PRESETS),
                       help="preset (default: T32 on a GPU, N32 on a CPU, T for imagefolder)")
    for name, what in INGREDIENTS.items():
        model.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                           help=f"{what} (default: as --arch says)")
    model.add_argument("--drop-path", type=float,
                       help=f"stochastic depth rate (default: {GPU_DEFAULTS['drop_path']} on a GPU, "
                            f"{CPU_DEFAULTS['drop_path']} on a CPU)")

    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="cifar100", choices=DATASETS, help="(default: %(default)s)")
    data.add_argument("--data-dir", default="./data",
                      help="where datasets are downloaded to and read from; for imagefolder, the folder that "
                           "holds train/ and val/ (default: %(default)s)")
    data.add_argument("--train-size", type=int, metavar="N",
                      help="train on N class-balanced images, the same N for every --seed (default: all)")
    data.add_argument("--workers", type=int, default=min(8, os.cpu_count()),
                      help="DataLoader processes, imagefolder only (default: %(default)s)")

    recipe = p.add_argument_group("recipe")
    recipe.add_argument("--epochs", type=int,
                        help=f"(default: {GPU_DEFAULTS['epochs']} on a GPU, {CPU_DEFAULTS['epochs']} on a CPU)")
    recipe.add_argument("--batch-size", type=int,
                        help=f"images per step over all processes (default: {GPU_DEFAULTS['batch_size']} on a "
                             f"GPU, {CPU_DEFAULTS['batch_size']} on a CPU)")
    recipe.add_argument("--lr", type=float, help=f"AdamW's peak learning rate (default: {GPU_DEFAULTS['lr']} on a "
                                                 f"GPU, {CPU_DEFAULTS['lr']} on a CPU)")
    recipe.add_argument("--weight-decay", type=float, default=0.05, help="(default: %(default)s)")
    recipe.add_argument("--warmup", type=float, default=0.05,
                        help="fraction of the steps spent warming up linearly (default: %(default)s)")
    recipe.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=True,
                        help="start every UniNeXt block as the identity: zero the last layer of each residual "
                             "branch (default: %(default)s)")
    recipe.add_argument("--crop", type=int, metavar="PIXELS",
                        help=f"random crop of the image zero-padded by PIXELS on every side, 0 = none (flip only; "
                             f"32x32 datasets) (default: {GPU_DEFAULTS['crop']} on a GPU, {CPU_DEFAULTS['crop']} on "
                             f"a CPU)")
    recipe.add_argument("--label-smoothing", type=float, default=0.1, help="(default: %(default)s)")
    recipe.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                        help="Mixup with Beta(ALPHA, ALPHA), 0 = off; with --cutmix too, each batch gets one "
                             "of the two (default: %(default)s)")
    recipe.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                        help="CutMix with Beta(ALPHA, ALPHA), 0 = off (default: %(default)s)")
    recipe.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                        help="test an exponential moving average of the weights with this decay, 0 = off "
                             "(default: %(default)s)")

    run = p.add_argument_group("run")
    run.add_argument("--out", metavar="DIR",
                     help="output folder (default: runs/<dataset>-<mixer>-<arch>, runs/<dataset>-<model> for a "
                          "baseline)")
    run.add_argument("--resume", metavar="DIR", help="continue the run stored in DIR, in DIR")
    run.add_argument("--overwrite", action="store_true", help="replace the run that --out holds, if any")
    run.add_argument("--eval-only", action="store_true", help="evaluate the run in --resume DIR on the test set")
    run.add_argument("--eval-every", type=int, default=1, metavar="K",
                     help="test every K epochs, 0 = only after the last one, which is always tested "
                          "(default: %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                     help="(default: %(default)s: cuda, else mps, else cpu)")
    run.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                     help="mixed precision; auto = bf16 on CUDA (fp16 where bf16 is missing), off elsewhere")
    run.add_argument("--compile", action="store_true", help="torch.compile the training model")
    return p


def resolve(args):
    """A copy of `args` with the defaults that depend on other options filled in, checked."""
    args = argparse.Namespace(**vars(args))
    uninext_only = [f"--{k.replace('_', '-')}" for k in ["size", *INGREDIENTS] if getattr(args, k) is not None]
    if args.model != "uninext" and uninext_only:
        raise UsageError(f"{', '.join(uninext_only)}: for --model uninext only; --model {args.model} is a fixed "
                         f"baseline, so drop {'it' if len(uninext_only) == 1 else 'them'}")
    defaults = CPU_DEFAULTS if pick_device(args.device, 0).type == "cpu" else GPU_DEFAULTS
    if args.dataset == "imagefolder":
        defaults = {**defaults, "size": "T"}
    for name, value in defaults.items():
        if getattr(args, name) is None and (name != "size" or args.model == "uninext"):
            setattr(args, name, value)
    if args.out is None:
        name = f"{args.mixer}-{args.arch}" if args.model == "uninext" else args.model
        args.out = args.resume or f"runs/{args.dataset}-{name}"
    problems = [message for bad, message in [
        (args.epochs < 1, "--epochs must be at least 1"),
        (args.batch_size < 1, "--batch-size must be at least 1"),
        (not 0 < args.lr < math.inf, "--lr must be a positive number"),
        (not 0 <= args.weight_decay < math.inf, "--weight-decay must be a number, 0 or more"),
        (args.crop < 0, "--crop is a padding in pixels, 0 or more"),
        (not 0 <= args.warmup < 1, "--warmup is a fraction of the steps, in [0, 1)"),
        (not 0 <= args.label_smoothing < 1, "--label-smoothing is in [0, 1), 0 = off"),
        (not 0 <= args.drop_path < 1, "--drop-path is a probability in [0, 1), 0 = off"),
        (not 0 <= args.mixup < math.inf, "--mixup is a Beta parameter, 0 = off"),
        (not 0 <= args.cutmix < math.inf, "--cutmix is a Beta parameter, 0 = off"),
        (not 0 <= args.ema < 1, "--ema is a decay in [0, 1), 0 = off"),
        (not 0 <= args.seed < 2 ** 32, "--seed is in [0, 2**32)"),
        (args.workers < 0, "--workers must be 0 or more (0 = load in the training process)"),
        (args.eval_every < 0, "--eval-every must be 0 or more"),
        (args.train_size is not None and args.train_size < 1, "--train-size must be at least 1"),
        (args.eval_only and not args.resume, "--eval-only evaluates a stored run: give it --resume DIR"),
        (args.resume and Path(args.out).resolve() != Path(args.resume).resolve(),
         "--resume continues the run in its own folder: drop --out"),
    ] if bad]
    if problems:
        raise UsageError("; ".join(problems))
    return args


def check_out(args):
    """Refuse, before any expensive work, an --out that cannot hold this run or that holds another one."""
    out, place = Path(args.out), Path(args.out).absolute()
    while not place.exists():
        place = place.parent
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: choose another --out")
    if not (place.is_dir() and os.access(place, os.W_OK | os.X_OK)):
        raise UsageError(f"--out {out}: cannot write into {place} (no permission, or a read-only file system)")
    if not args.resume and not args.overwrite and any((out / name).exists() for name in RUN_FILES):
        raise UsageError(f"{out} holds a run already: continue it with --resume {shlex.quote(str(out))}, "
                         f"choose another --out, or replace it with --overwrite")


# ----------------------------------------------------------------------------------------------------------
# Processes and devices


def start_processes(args):
    """(rank, world_size, device). Under torchrun (RANK in the environment) this process joins the others:
    NCCL between GPUs, gloo between CPU processes; each process drives the GPU of its LOCAL_RANK."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(args.device, 0)
    device = pick_device(args.device, int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def pick_device(name, local_rank):
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = "cuda" if available["cuda"] else "mps" if available["mps"] else "cpu"
    if not available[name]:
        raise UsageError(f"--device {name}: no such device here; use --device auto or cpu")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def mixed_precision(choice, device):
    """What --amp means on this device: "bf16", "fp16" or "off"."""
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"  # fp16: T4, V100


def all_sum(tensor):
    """The sum of `tensor` over all processes (the tensor itself in a single process)."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def anyone(flag, device):
    """True on every process if `flag` is True on any of them."""
    return all_sum(torch.tensor(float(flag), device=device)).item() > 0


# ----------------------------------------------------------------------------------------------------------
# Data: every loader gives (uint8 images, labels); TensorData and FolderData turn them into batches


def load_data(args, device, rank=0, world=1):
    """The training and test sets of args.dataset, as TensorData (32x32 datasets, kept on `device`) or
    FolderData (imagefolder, read by DataLoader workers). Both give normalised float batches on `device`."""
    if args.dataset == "imagefolder":
        return FolderData(args, device, rank, world)
    read = {"cifar10": read_cifar, "cifar100": read_cifar, "fashion-mnist": read_fashion_mnist,
            "synthetic": make_synthetic}[args.dataset]
    (train_images, train_labels), test = read(args, train=True), read(args, train=False)
    if args.train_size is not None:
        keep = balanced_subset(train_labels, args.train_size, SMALL_DATASETS[args.dataset])
        train_images, train_labels = train_images[keep], train_labels[keep]
    return TensorData((train_images, train_labels), test, SMALL_DATASETS[args.dataset], args, device, rank, world)


def read_cifar(args, train):
    """CIFAR-10/100 through torchvision, downloaded into --data-dir the first time: (N, 32, 32, 3) uint8."""
    cls = datasets.CIFAR10 if args.dataset == "cifar10" else datasets.CIFAR100
    ds = torchvision_split(cls, cls.base_folder, args, train, fix="connect to the internet")
    return torch.from_numpy(ds.data), torch.tensor(ds.targets)


def read_fashion_mnist(args, train):
    """Fashion-MNIST from Debian's dataset-fashion-mnist package if it is installed, else through torchvision
    (downloaded into --data-dir), zero-padded from 28x28 to 32x32: (N, 32, 32, 1) uint8."""
    if DEBIAN_FASHION_MNIST.is_dir():
        split = "train" if train else "t10k"
        images = read_idx(DEBIAN_FASHION_MNIST / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx(DEBIAN_FASHION_MNIST / f"{split}-labels-idx1-ubyte.gz").long()
    else:
        fix = (f"install Debian's package (apt-get install dataset-fashion-mnist, read from "
               f"{DEBIAN_FASHION_MNIST}) or connect to the internet")
        ds = torchvision_split(datasets.FashionMNIST, "FashionMNIST", args, train, fix)
        images, labels = ds.data, ds.targets
    return F.pad(images, (2, 2, 2, 2))[..., None], labels  # (N, 32, 32, 1)


def read_idx(path):
    """A gzipped IDX file (the MNIST format) as a uint8 tensor: two zero bytes, a type byte, the number of
    dimensions, each size as a big-endian int32, then the data."""
    try:
        raw = gzip.decompress(path.read_bytes())
        shape = struct.unpack(f">{raw[3]}I", raw[4:4 + 4 * raw[3]])
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=4 + 4 * raw[3]).reshape(shape)
    except (OSError, EOFError, IndexError, RuntimeError, ValueError, struct.error, zlib.error) as e:
        raise UsageError(f"{path} is damaged ({first_line(e)}): reinstall it with apt-get install --reinstall "
                         f"dataset-fashion-mnist") from None


def torchvision_split(cls, folder, args, train, fix):
    """One split of a torchvision dataset in --data-dir, downloaded if its folder is missing there."""
    root = Path(args.data_dir)
    present = any(path.is_file() for path in (root / folder).rglob("*"))  # a failed download leaves folders
    try:
        return cls(root, train=train, download=not present)
    except (OSError, RuntimeError) as e:
        if present:
            raise UsageError(f"{root / folder} holds an incomplete or corrupt copy of {args.dataset} ({e}): "
                             f"delete that folder to download it again") from None
        raise UsageError(f"{args.dataset} is not in {root / folder} and could not be downloaded ({e}): "
                         f"{fix}, or point --data-dir at the folder that holds {folder}/") from None


def make_synthetic(args, train):
    """An offline stand-in for smoke runs: 10 classes, each a 4x4 colour pattern blown up to 32x32, plus
    noise. Learnable in a few steps. 5,000 training and 1,000 test images, the same on every call."""
    templates = torch.randint(0, 256, (10, 4, 4, 3), generator=torch.Generator().manual_seed(0)).float()
    g = torch.Generator().manual_seed(1 if train else 2)
    labels = torch.randint(0, 10, (5000 if train else 1000,), generator=g)
    images = templates[labels].repeat_interleave(8, 1).repeat_interleave(8, 2)  # (N, 32, 32, 3)
    return (images + 48 * torch.randn(images.shape, generator=g)).clamp(0, 255).to(torch.uint8), labels


def balanced_subset(labels, n, num_classes):
    """Indices of n training images, n // num_classes from each class (one more from the first n % num_classes
    classes), drawn with a fixed seed: the low-data regime is the same data set whatever --seed says."""
    if n > len(labels):
        raise UsageError(f"--train-size {n}: the training set has {len(labels):,} images")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    picks = []
    for c in range(num_classes):
        want = n // num_classes + (c < n % num_classes)
        mine = order[labels[order] == c][:want]
        if len(mine) < want:
            raise UsageError(f"--train-size {n} asks for {want} images of class {c}, which has {len(mine)}")
        picks.append(mine)
    return torch.cat(picks).sort().values


def epoch_order(n, batch_size, generator):
    """A fresh shuffle of n images, cut into the epoch's global batches (steps, batch_size); the last,
    incomplete batch is dropped. Each process trains on its own slice of every batch."""
    return torch.randperm(n, generator=generator)[: n // batch_size * batch_size].view(-1, batch_size)


def epoch_generator(args, epoch):
    """The epoch's random order and augmentation depend on (seed, epoch) only, so that a run resumed in the
    middle of an epoch sees the same batches as one never stopped."""
    return torch.Generator().manual_seed(args.seed * 10_000 + epoch)


def crop_flip(images, shifts, flips, pad):
    """Random crop with zero padding and horizontal flip, for a whole batch in one gather, each image with its
    own offsets: images (B, H, W, C) uint8, shifts (B, 2) in [0, 2 * pad], flips (B,) bool. The same as
    padding each image, cropping H x W at (shifts) and mirroring where flipped (tested against torchvision)."""
    B, H, W, C = images.shape
    padded = F.pad(images, (0, 0, pad, pad, pad, pad))  # (B, H + 2 pad, W + 2 pad, C)
    rows = shifts[:, :1] + torch.arange(H, device=images.device)  # (B, H)
    cols = torch.arange(W, device=images.device).expand(B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols) + shifts[:, 1:]  # (B, W), reversed where flipped
    batch = torch.arange(B, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)


def to_model_input(images, mean, std):
    """uint8 (B, H, W, C) -> float (B, C, H, W), standardised per channel. The result is a channels_last view,
    which the model turns back into (B, H, W, C) without a copy."""
    return ((images.float() - mean) / std).permute(0, 3, 1, 2)


class TensorData:
    """A 32x32 dataset kept whole on the device as uint8 (N, H, W, C) tensors (CIFAR-100: 150 MB) and
    augmented there a batch at a time, so that the GPU is never kept waiting for a CPU DataLoader."""

    def __init__(self, train, test, num_classes, args, device, rank, world):
        (self.train_images, self.train_labels), (self.test_images, self.test_labels) = (
            (images.to(device), labels.to(device)) for images, labels in (train, test))
        self.num_classes, (self.img_size, self.in_chans) = num_classes, self.train_images.shape[2:]
        self.num_train, self.num_test = len(self.train_labels), len(self.test_labels)
        pixels = self.train_images.flatten(0, 2).float()  # (N*H*W, C)
        self.mean, self.std = pixels.mean(0), pixels.std(0)
        self.args, self.device, self.rank, self.world = args, device, rank, world
        self.local_batch = args.batch_size // world
        self.steps_per_epoch = self.num_train // args.batch_size

    def train_batches(self, epoch, start=0):
        """The epoch's batches from step `start` on: this process's slice of each global batch, cropped and
        flipped, as (float images (B, C, H, W), labels (B,))."""
        g = epoch_generator(self.args, epoch)
        order = epoch_order(self.num_train, self.args.batch_size, g)  # (steps, batch_size)
        shifts = torch.randint(0, 2 * self.args.crop + 1, (self.num_train, 2), generator=g).to(self.device)
        flips = (torch.rand(self.num_train, generator=g) < 0.5).to(self.device)
        mine = order[start:, self.rank * self.local_batch:(self.rank + 1) * self.local_batch].to(self.device)
        for ids in mine:
            images = crop_flip(self.train_images[ids], shifts[ids], flips[ids], self.args.crop)
            yield to_model_input(images, self.mean, self.std), self.train_labels[ids]

    def test_batches(self):
        """This process's share of the test set, in batches, without augmentation."""
        mine = torch.arange(self.rank, self.num_test, self.world, device=self.device)
        for ids in mine.split(2 * self.local_batch):
            yield to_model_input(self.test_images[ids], self.mean, self.std), self.test_labels[ids]


class FolderData:
    """An ImageNet-style folder (--data-dir with train/<class>/*.jpg and val/<class>/*.jpg), decoded and
    augmented by DataLoader worker processes with torchvision.transforms.v2 (RandomResizedCrop, flip,
    RandAugment, as DeiT and Swin), then standardised on the device."""

    def __init__(self, args, device, rank, world):
        root = Path(args.data_dir)
        if not ((root / "train").is_dir() and (root / "val").is_dir()):
            raise UsageError(f"imagefolder reads {root}/train/<class>/<image> and {root}/val/<class>/<image>, "
                             f"and {root} has no train/ and val/: point --data-dir at such a folder")
        size = uninext.PRESETS[args.size or "T"].get("img_size", uninext.Config.img_size)
        train_tf = v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), v2.RandAugment(),
                               v2.PILToTensor()])
        test_tf = v2.Compose([v2.Resize(size * 8 // 7), v2.CenterCrop(size), v2.PILToTensor()])
        try:
            self.train_set = datasets.ImageFolder(root / "train", transform=train_tf, loader=read_image)
            classes = self.train_set.class_to_idx
            unknown = sorted({e.name for e in os.scandir(root / "val") if e.is_dir()} - classes.keys())
            if unknown:
                raise UsageError(f"{root / 'val'} has classes that {root / 'train'} lacks ({', '.join(unknown)}): "
                                 f"the model cannot learn them; remove them or add training images")
            self.test_set = datasets.ImageFolder(root / "val", transform=test_tf, loader=read_image,
                                                 allow_empty=True)
        except (FileNotFoundError, OSError) as e:
            raise UsageError(f"cannot read the image folders in {root}: {e}") from None
        # Label the test images with the training set's class indices, also when val/ lacks some classes.
        self.test_set.samples = [(path, classes[self.test_set.classes[t]]) for path, t in self.test_set.samples]
        self.test_set.targets = [t for _, t in self.test_set.samples]
        self.num_classes, self.in_chans, self.img_size = len(self.train_set.classes), 3, size
        self.num_train, self.num_test = len(self.train_set), len(self.test_set)
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=device) * 255  # ImageNet's statistics
        self.std = torch.tensor([0.229, 0.224, 0.225], device=device) * 255
        self.args, self.device, self.rank, self.world = args, device, rank, world
        self.local_batch = args.batch_size // world
        self.steps_per_epoch = self.num_train // args.batch_size

    def loader(self, dataset, batches, seed):
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.args.workers,
                          pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(seed))

    def batches(self, loader):
        try:
            for images, labels in loader:  # (B, C, H, W) uint8
                images = images.to(self.device, non_blocking=True).permute(0, 2, 3, 1)  # (B, H, W, C)
                yield to_model_input(images, self.mean, self.std), labels.to(self.device, non_blocking=True)
        except UsageError as e:  # from a worker, the message comes after the worker's traceback
            raise UsageError(str(e).strip().splitlines()[-1].split("UsageError: ", 1)[-1]) from None

    def train_batches(self, epoch, start=0):
        g = epoch_generator(self.args, epoch)
        order = epoch_order(self.num_train, self.args.batch_size, g)
        mine = order[start:, self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
        return self.batches(self.loader(self.train_set, mine.tolist(), seed=g.initial_seed()))

    def test_batches(self):
        mine = torch.arange(self.rank, self.num_test, self.world).split(2 * self.local_batch)
        return self.batches(self.loader(self.test_set, [ids.tolist() for ids in mine], seed=0))


def read_image(path):
    """An image file as an RGB PIL image (torchvision's default loader), or an error that names the file."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{path} cannot be read as an image ({first_line(e)}): remove or replace it, then run "
                         f"again (--resume continues from the last checkpoint, if there is one)") from None


# ----------------------------------------------------------------------------------------------------------
# Model


def build_model(args, num_classes, in_chans, img_size=32):
    """The network that args describe, for `num_classes` classes and (in_chans, img_size, img_size) images:
    UniNeXt (or vanilla), or one of the three baselines that every UniNeXt number should be read against."""
    if args.model == "linear":  # logistic regression on the standardised pixels
        return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img_size ** 2, num_classes))
    if args.model == "cnn":  # five conv-BN-ReLU layers, 0.14M parameters: what a CPU trains in minutes
        def conv_bn_relu(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        return nn.Sequential(*conv_bn_relu(in_chans, 32), *conv_bn_relu(32, 32), nn.MaxPool2d(2),
                             *conv_bn_relu(32, 64), *conv_bn_relu(64, 64), nn.MaxPool2d(2),
                             *conv_bn_relu(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))
    if args.model == "resnet18":  # torchvision's, with the usual 32x32 stem: a 3x3 stride-1 conv, no max-pool
        net = torchvision.models.resnet18(num_classes=num_classes)
        net.conv1, net.maxpool = nn.Conv2d(in_chans, 64, 3, padding=1, bias=False), nn.Identity()
        return net
    switches = {name: getattr(args, name) for name in INGREDIENTS if getattr(args, name) is not None}
    model = uninext.create_model(args.size, args.mixer, num_classes=num_classes, arch=args.arch,
                                 in_chans=in_chans, drop_path=args.drop_path, **switches)
    if args.zero_init_residual:
        zero_init_residual(model)
    return model


def zero_init_residual(model):
    """Zero the last layer of every residual branch (the mixer's Proj, the MLP's fc2, the PC conv), so that
    each block starts as the identity and the network as its stem and head; the branches grow in as they
    learn. An initialisation, as torchvision's `zero_init_residual` for ResNets: the architecture and its
    parameters are unchanged."""
    for block in model.modules():
        if isinstance(block, uninext.Block):
            for layer in (block.proj, block.mlp.fc2, block.pc):
                if layer is not None:
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)


# ----------------------------------------------------------------------------------------------------------
# Optimiser and schedule


def build_optimizer(model, args, device):
    """AdamW with weight decay on the weight matrices and conv kernels only: decaying biases and LayerNorm
    gains towards zero only takes capacity away (as in nanoGPT, timm), and position encodings are spared as
    Swin, PVT and DeiT spare them (the model's `no_weight_decay()`)."""
    spared = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decayed = {name: p.ndim >= 2 and name not in spared for name, p in model.named_parameters()}
    groups = [{"params": [p for n, p in model.named_parameters() if decayed[n]], "weight_decay": args.weight_decay},
              {"params": [p for n, p in model.named_parameters() if not decayed[n]], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")


def build_scheduler(optimizer, args, steps_per_epoch):
    """Per step: linear warm-up from lr / warmup_steps to lr, then cosine decay to zero at the last step."""
    total = args.epochs * steps_per_epoch
    warmup = max(1, round(args.warmup * total))
    return SequentialLR(optimizer, [LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup),
                                    CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))],
                        milestones=[warmup])


def build_mixing(args, num_classes):
    """Mixup and/or CutMix from torchvision.transforms.v2, applied to whole batches on the device (one of the
    two per batch when both are on), or None. They return soft (B, num_classes) targets."""
    mixers = []
    if args.mixup:
        mixers.append(v2.MixUp(alpha=args.mixup, num_classes=num_classes))
    if args.cutmix:
        mixers.append(v2.CutMix(alpha=args.cutmix, num_classes=num_classes))
    return v2.RandomChoice(mixers) if mixers else None


# ----------------------------------------------------------------------------------------------------------
# The loop


def train(args, checkpoint=None):
    """Train (or, with --eval-only, evaluate) as `args` say and return the summary, also saved as
    summary.json. `checkpoint`: the contents of --resume DIR/last.pt, if the caller has read them already."""
    args = resolve(args)
    check_out(args)
    rank, world, device = start_processes(args)
    try:
        if args.batch_size % world:
            raise UsageError(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
        with ExitStack() as cleanup:
            return run(args, checkpoint, rank, world, device, cleanup)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(args, checkpoint, rank, world, device, cleanup):
    out = Path(args.out)
    if args.resume:
        checkpoint = checkpoint or read_checkpoint(out / "last.pt")
        check_config(checkpoint["config"], args, out / "last.pt")
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same on every process, so that all start from the same weights
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the shapes never change: let cuDNN pick its fastest kernels
        torch.set_float32_matmul_precision("high")  # TF32 where autocast is off

    data = load_data(args, device, rank, world)
    if data.steps_per_epoch == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {data.num_train} training images")
    model = build_model(args, data.num_classes, data.in_chans, data.img_size).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, args, device)
    scheduler = build_scheduler(optimizer, args, data.steps_per_epoch)
    amp = mixed_precision(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # bf16 has fp32's range: no scaling
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema)) if args.ema else None
    mixing = build_mixing(args, data.num_classes)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = (lambda: torch.autocast(device.type, dtype)) if dtype else nullcontext

    # Where the run stands: the next epoch and step, the metrics so far, the best test accuracy, and the
    # accumulators of an epoch that was stopped half way.
    progress = {"epoch": 1, "step": 0, "history": [], "log": [], "best": None, "partial": None}
    if checkpoint is not None:
        restore(checkpoint, model, optimizer, scheduler, scaler, ema, progress)
    judged = ema.module if ema else model  # the weights that are tested and reported
    if args.eval_only:
        test_loss, test_acc1 = evaluate(judged, data, autocast)
        if rank == 0:
            print(f"{out / 'last.pt'}: test loss {test_loss:.4f}, top-1 {test_acc1:.2f}% "
                  f"on {data.num_test:,} images")
        return {"test_loss": test_loss, "test_acc1": test_acc1, "test_images": data.num_test,
                "checkpoint": str(out / "last.pt"), "params": n_params, "device": device_name(device, world)}

    step_model = torch.compile(model) if args.compile else model
    if world > 1:
        step_model = DistributedDataParallel(step_model, device_ids=[device] if device.type == "cuda" else None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cleanup.enter_context(folder_lock(out))  # released when train() returns or fails
        if args.overwrite and not args.resume:  # no file of the replaced run may outlive it
            for name in [*RUN_FILES, "curves.png"]:
                (out / name).unlink(missing_ok=True)
        if checkpoint is not None and progress["history"]:  # finish what a stop after last.pt left unwritten
            best = progress["best"]
            if best and progress["step"] == 0 and best["epoch"] == progress["epoch"] - 1:
                copy_atomically(out / "last.pt", out / "best.pt")  # last.pt is the best state
            write_records(out, progress)
        name = f"{args.size} {args.mixer} {args.arch}" if args.model == "uninext" else args.model
        if amp == "fp16" and device.type == "cpu":
            print("warning: --amp fp16 on a CPU is emulated and can be 30x slower than --amp off")
        print(f"{args.dataset}: {data.num_train:,} training and {data.num_test:,} test images | {name}, "
              f"{n_params / 1e6:.2f}M parameters | {device_name(device, world)}, "
              f"amp {amp}{', compiled' if args.compile else ''} | {out}")

    def save():
        if rank == 0:
            save_checkpoint(out / "last.pt", args, model, optimizer, scheduler, scaler, ema, progress, data)

    steps = data.steps_per_epoch
    estimated = False  # the cost of the whole run is estimated once, after the first steps
    with stop_on_signal() as interrupt:
        for epoch in range(progress["epoch"], args.epochs + 1):
            # Accumulators on the device, so that a step never waits for the GPU: the loss and the correct
            # guesses of every step. Time is counted twice: wall seconds, and the CPU-seconds the processes
            # spent, which other jobs on a shared machine inflate far less. A run resumed inside this epoch
            # gets them back.
            losses, hits = torch.zeros(steps, device=device), torch.zeros(steps, device=device)
            train_seconds = train_cpu = 0.0
            start = progress["step"] if epoch == progress["epoch"] else 0
            if start:
                losses[:start] = progress["partial"]["losses"].to(device)
                hits[:start] = progress["partial"]["hits"].to(device)
                train_seconds, train_cpu = progress["partial"]["seconds"], progress["partial"]["cpu_seconds"]
            cpu_before = sum(r["cpu_seconds"] for r in progress["history"])  # earlier epochs
            bar = tqdm(data.train_batches(epoch, start), total=steps, initial=start, unit="step",
                       desc=f"epoch {epoch}/{args.epochs}", disable=rank != 0, leave=False, dynamic_ncols=True)
            tick, cpu_tick = time.perf_counter(), time.process_time()
            for step, (images, labels) in enumerate(bar, start):  # the bar closes itself on an error
                targets = labels
                if mixing is not None:
                    images, targets = mixing(images, labels)  # soft targets (B, num_classes)
                with autocast():
                    logits = step_model(images)
                    loss = criterion(logits, targets)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                losses[step] = loss.detach()
                hits[step] = (logits.argmax(1) == labels).sum()
                log_now = (step + 1) % LOG_EVERY == 0 or step + 1 == steps
                alone_and_stopped = world == 1 and bool(interrupt["requested"])  # several processes agree first
                if not log_now and not alone_and_stopped:
                    continue

                # Every LOG_EVERY steps and at the end of the epoch, on every process at the same step: one
                # sync with the GPU to check the loss, show progress and agree on stopping.
                seen = all_sum(losses[:step + 1]) / world
                bad = (~torch.isfinite(seen)).nonzero()
                if len(bad):
                    bar.close()
                    s = bad[0].item()
                    raise Diverged(f"the training loss was {seen[s].item()} at epoch {epoch}, step {s + 1} of "
                                   f"{steps} (step {(epoch - 1) * steps + s + 1} of the run), so the run stopped; "
                                   f"{describe_last(progress, out)} Try a lower --lr, or --amp bf16 or off.")
                if anyone(not finite(model), device):  # the last update can break the weights after a good loss
                    bar.close()
                    raise Diverged(f"the weights became NaN or infinite by epoch {epoch}, step {step + 1} of "
                                   f"{steps}, so the run stopped; {describe_last(progress, out)} Try a lower --lr.")
                now, cpu_now = time.perf_counter(), time.process_time()
                cpu_run = cpu_before + all_sum(torch.tensor(train_cpu + cpu_now - cpu_tick, device=device)).item()
                if log_now:  # the mean loss and accuracy of the last LOG_EVERY steps, for curves within an epoch
                    first = step - step % LOG_EVERY
                    progress["log"].append({
                        "step": (epoch - 1) * steps + step + 1, "epoch": round(epoch - 1 + (step + 1) / steps, 4),
                        "lr": lr, "train_loss": seen[first:].mean().item(),
                        "train_acc1": 100 * all_sum(hits[first:step + 1]).sum().item() / (
                            (step + 1 - first) * args.batch_size),
                        "cpu_seconds": round(cpu_run, 2)})
                bar.set_postfix(loss=f"{seen.mean().item():.3f}",
                                acc=f"{100 * all_sum(hits).sum().item() / ((step + 1) * args.batch_size):.1f}%",
                                img_s=f"{(step + 1 - start) * args.batch_size / (now - tick):,.0f}",
                                cpu=f"{cpu_run / 60:.1f} min")
                if rank == 0 and not estimated and step + 1 - start >= 2 * LOG_EVERY:
                    estimated = True
                    tqdm.write(estimate(args, device, steps, (epoch - 1) * steps + step + 1, (now - tick) /
                                        (step + 1 - start), world * (cpu_now - cpu_tick) / (step + 1 - start)))
                if anyone(bool(interrupt["requested"]), device) and step + 1 < steps:
                    bar.close()
                    partial = {"losses": losses[:step + 1].cpu(), "hits": hits[:step + 1].cpu(),
                               "seconds": train_seconds + now - tick, "cpu_seconds": train_cpu + cpu_now - cpu_tick}
                    progress.update(epoch=epoch, step=step + 1, partial=partial)
                    save()
                    raise KeyboardInterrupt(stopped_message(out, f"epoch {epoch}, step {step + 1} of {steps}",
                                                            interrupt["requested"]))
            bar.close()
            train_seconds += time.perf_counter() - tick
            train_cpu += time.process_time() - cpu_tick

            tick = time.perf_counter()
            test_loss = test_acc1 = None
            if epoch == args.epochs or (args.eval_every and epoch % args.eval_every == 0):
                test_loss, test_acc1 = evaluate(judged, data, autocast)
                if not math.isfinite(test_loss):
                    raise Diverged(f"the test loss after epoch {epoch} was {test_loss}, so the run stopped; "
                                   f"{describe_last(progress, out)} Try a lower --lr, or --amp bf16 or off.")
            row = {"epoch": epoch, "lr": lr, "train_loss": (all_sum(losses) / world).mean().item(),
                   "train_acc1": 100 * all_sum(hits).sum().item() / (steps * args.batch_size),
                   "test_loss": test_loss, "test_acc1": test_acc1,
                   "img_per_s": steps * args.batch_size / train_seconds,
                   "seconds": train_seconds + time.perf_counter() - tick,
                   "cpu_seconds": all_sum(torch.tensor(train_cpu, device=device)).item()}
            progress["history"].append(row)
            progress.update(epoch=epoch + 1, step=0, partial=None)
            best = progress["best"]
            improved = test_acc1 is not None and (best is None or test_acc1 > best["test_acc1"])
            if improved:
                progress["best"] = {"epoch": epoch, "test_acc1": test_acc1}
            save()
            if rank == 0:
                if improved:
                    copy_atomically(out / "last.pt", out / "best.pt")
                write_records(out, progress)
                print(describe_epoch(row, args.epochs, progress["history"]))
            if anyone(bool(interrupt["requested"]), device) and epoch < args.epochs:
                raise KeyboardInterrupt(stopped_message(out, f"the end of epoch {epoch}", interrupt["requested"]))

    summary = summarise(args, progress, data, n_params, amp, device, world)
    if rank == 0:
        text = json.dumps(summary, indent=2, allow_nan=False)  # strict JSON: a NaN would be an error here
        replace_atomically(out / "summary.json", lambda tmp: tmp.write_text(text))
        print(f"done: test top-1 {summary['test_acc1']:.2f}% after {args.epochs} epochs, "
              f"{summary['seconds'] / 60:.1f} min, {summary['img_per_s']:,.0f} img/s | {out}")
    return summary


@torch.no_grad()
def finite(model):
    """Whether every weight is a finite number (one sync: a tensor with a NaN or an infinity sums to one)."""
    return torch.stack([p.sum() for p in model.parameters()]).isfinite().all().item()


@torch.no_grad()
def evaluate(model, data, autocast):
    """Mean cross-entropy (without label smoothing) and top-1 accuracy in % over the whole test set, each
    process testing its share."""
    model.eval()
    loss, hits, count = (torch.zeros((), device=data.device) for _ in range(3))
    for images, labels in data.test_batches():
        with autocast():
            logits = model(images)
        loss += F.cross_entropy(logits.float(), labels, reduction="sum")
        hits += (logits.argmax(1) == labels).sum()
        count += len(labels)
    model.train()
    loss, hits, count = (all_sum(t).item() for t in (loss, hits, count))
    return loss / count, 100 * hits / count


@contextmanager
def stop_on_signal():
    """Turn the first Ctrl-C (SIGINT) or SIGTERM (what schedulers and `kill` send) into a request
    (`interrupt["requested"]`: what was received) that the loop honours between steps, so that no step is
    left half done; a second one interrupts at once."""
    interrupt = {"requested": None}
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def request(signum, frame):
        interrupt["requested"] = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        for s, handler in previous.items():
            signal.signal(s, handler)

    for s in previous:
        signal.signal(s, request)
    try:
        yield interrupt
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def device_name(device, world):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"{device.type} ({threads} thread{'s' if threads > 1 else ''})"
    return f"{world} x {name}" if world > 1 else name


def describe_epoch(row, epochs, history):
    test = "" if row["test_acc1"] is None else f" | test loss {row['test_loss']:.3f} top-1 {row['test_acc1']:.2f}%"
    left = (epochs - row["epoch"]) * sum(r["seconds"] for r in history) / len(history)
    cpu = sum(r["cpu_seconds"] for r in history)
    return (f"epoch {row['epoch']}/{epochs} | lr {row['lr']:.2e} | train loss {row['train_loss']:.3f} "
            f"top-1 {row['train_acc1']:.2f}%{test} | {row['img_per_s']:,.0f} img/s | {row['seconds']:.1f} s"
            f" | {cpu / 60:.1f} CPU-min of training so far | {left / 60:.1f} min left")


def estimate(args, device, steps_per_epoch, done, seconds_per_step, cpu_per_step):
    """What the whole run will cost at the speed of its first steps (CPU time: of all processes), said once
    near the start, with a shorter run to try when a CPU would take hours."""
    left = args.epochs * steps_per_epoch - done
    text = (f"the whole run, {args.epochs} x {steps_per_epoch:,} steps: about {left * seconds_per_step / 60:,.1f} "
            f"min more ({left * cpu_per_step / 60:,.1f} CPU-min) at the speed of the first steps")
    if device.type == "cpu" and left * cpu_per_step > 3600:
        epoch_cost = steps_per_epoch * cpu_per_step
        fit = max(1, int(15 * 60 / epoch_cost))  # epochs in about a quarter of an hour
        smaller = " (--size N32 costs several times less than T32)" if args.model == "uninext" and \
            args.size != "N32" else ""
        text += (f". That is long for a CPU: --epochs {fit} would take about {fit * epoch_cost / 60:.0f} "
                 f"CPU-min{smaller}. Ctrl-C stops this run and --resume continues it")
    return text


def describe_last(progress, out):
    """What last.pt holds: `progress` changes only when a checkpoint is written (or read)."""
    epoch, step = progress["epoch"], progress["step"]
    if (epoch, step) == (1, 0):
        return "no checkpoint had been written yet."
    where = f"epoch {epoch}, step {step}" if step else f"the end of epoch {epoch - 1}"
    return f"{out / 'last.pt'} still holds {where}, the last good state."


def stopped_message(out, where, why):
    return (f"stopped by {why or 'another process'} at {where}, saved in {out / 'last.pt'}; continue with:\n"
            f"    python train_minimal.py --resume {shlex.quote(str(out))}")


def summarise(args, progress, data, n_params, amp, device, world):
    history, last = progress["history"], progress["history"][-1]
    rates = sorted(r["img_per_s"] for r in history)
    return {
        "dataset": args.dataset, "model": args.model,
        **({"mixer": args.mixer, "arch": args.arch, "size": args.size} if args.model == "uninext" else {}),
        "epochs": last["epoch"], "test_acc1": last["test_acc1"], "test_loss": last["test_loss"],
        "best_test_acc1": progress["best"]["test_acc1"], "best_epoch": progress["best"]["epoch"],
        "train_images": data.num_train, "test_images": data.num_test, "params": n_params,
        "seconds": sum(r["seconds"] for r in history), "cpu_seconds": sum(r["cpu_seconds"] for r in history),
        "img_per_s": rates[len(rates) // 2],
        "device": device_name(device, world), "amp": amp, "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "config": vars(args),
    }


# ----------------------------------------------------------------------------------------------------------
# Saving and resuming


@contextmanager
def folder_lock(out):
    """An exclusive lock on out/.lock while the block runs (the operating system also drops it when the
    process ends, however it ends), so that two runs never write into one folder."""
    with open(out / ".lock", "w") as handle:
        if fcntl is not None:  # POSIX; on Windows the folder is not locked
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"another process is writing into {out}: wait for it to end, or choose "
                                 f"another --out") from None
        yield


def replace_atomically(path, write):
    """Write `path` through write(temporary path), then move it into place in one step: a crash or Ctrl-C
    never leaves a half-written file where a complete one was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # nothing half-written stays behind, whatever stopped the writing
        tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):  # a full disk: RuntimeError from torch.save, else OSError
            raise
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise UsageError(f"could not write {path} ({first_line(e)}): is the disk full?{kept}") from None


def copy_atomically(source, target):
    replace_atomically(target, lambda tmp: tmp.write_bytes(source.read_bytes()))


def save_checkpoint(path, args, model, optimizer, scheduler, scaler, ema, progress, data):
    """Everything that the next step depends on, as tensors and plain Python values (weights_only loads it)."""
    state = {
        "config": vars(args), "progress": progress,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "normalisation": {"mean": data.mean.cpu(), "std": data.std.cpu()},  # to use the model elsewhere
        "model_config": dataclasses.asdict(model.cfg) if isinstance(model, uninext.UniNeXt) else None,
    }
    replace_atomically(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path):
    """A checkpoint, read as data: weights_only=True unpickles tensors and plain Python values, never code."""
    if not path.is_file():
        raise UsageError(f"there is no checkpoint {path}: --resume takes the --out folder of an earlier run")
    problem = f"{path} is corrupt or not a checkpoint of train_minimal.py"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file makes torch.load fail in many different ways
        raise UsageError(f"{problem} ({first_line(e)}); best.pt beside it may still be good") from None
    if not (isinstance(checkpoint, dict) and {"config", "model", "progress"} <= checkpoint.keys()):
        raise UsageError(f"{problem} (it holds other data); best.pt beside it may still be good")
    wrong = malformed(checkpoint)
    if wrong:
        raise UsageError(f"{problem} ({wrong} of the wrong type: was it edited by hand?); best.pt beside it may "
                         f"still be good")
    return checkpoint


def malformed(checkpoint):
    """The first field of a checkpoint's configuration or progress record whose type is not what a run
    writes, or None."""
    config, progress = checkpoint["config"], checkpoint["progress"]
    if not (isinstance(config, dict) and isinstance(progress, dict)):
        return "the configuration or the progress record"
    typical = vars(resolve(build_parser().parse_args(["--device", "cpu"])))
    for key, value in config.items():
        want = type(typical.get(key))
        if want is not type(None) and value is not None and not (
                type(value) is want or (want is float and type(value) is int)):
            return f"option {key}"
    shapes = {"epoch": int, "step": int, "history": list, "log": list, "best": (dict, type(None)),
              "partial": (dict, type(None))}
    for key, kind in shapes.items():
        if key in progress and (not isinstance(progress[key], kind) or isinstance(progress[key], bool)):
            return f"progress field {key}"
    if not all(isinstance(r, dict) and set(METRICS) <= r.keys() for r in progress.get("history", [])):
        return "a row of the history"
    return None


def first_line(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def check_config(stored, args, path):
    """Refuse to continue a run with options that change what it computes (RUNTIME_OPTIONS may change)."""
    missing = sorted(set(vars(args)) - set(stored) - RUNTIME_OPTIONS)
    if missing:
        raise UsageError(f"{path} was written by an earlier version of train_minimal.py (it has no "
                         f"{', '.join(missing)}): it cannot be continued; start a new run with another --out")
    differ = sorted(k for k in (set(stored) | set(vars(args))) - RUNTIME_OPTIONS
                    if stored.get(k) != getattr(args, k, None))
    if differ:
        asked = ", ".join(f"{k} {getattr(args, k, None)!r} (stored: {stored.get(k)!r})" for k in differ)
        why = " (its learning-rate schedule ends at the stored epochs)" if "epochs" in differ else ""
        raise UsageError(f"{path} is from another configuration: {asked}{why}. Continue it with its own "
                         f"options (python train_minimal.py --resume {shlex.quote(str(path.parent))}), or start a "
                         f"new run with another --out")


def restore(checkpoint, model, optimizer, scheduler, scaler, ema, progress):
    """Put every piece of a run back as it was when the checkpoint was written."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["scaler"]:  # empty when it was saved without fp16
            scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        progress.update(checkpoint["progress"])
        random.setstate(checkpoint["rng"]["python"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise UsageError(f"the checkpoint does not fit this model ({first_line(e)}): it is damaged or from "
                         f"another version of the code") from None


# metrics.csv, a row per epoch: `seconds` is wall time (training and testing), `cpu_seconds` the CPU time
# the training processes spent training. steps.csv, a row every LOG_EVERY steps: the means over those steps,
# and the CPU time of the whole run so far.
METRICS = ["epoch", "lr", "train_loss", "train_acc1", "test_loss", "test_acc1", "img_per_s", "seconds",
           "cpu_seconds"]
STEP_METRICS = ["step", "epoch", "lr", "train_loss", "train_acc1", "cpu_seconds"]


def write_records(out, progress):
    write_csv(out / "metrics.csv", METRICS, progress["history"])
    write_csv(out / "steps.csv", STEP_METRICS, progress["log"])
    plot_curves(out, progress["history"], progress["log"])


def write_csv(path, columns, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)  # None (epochs not tested) becomes an empty field

    replace_atomically(path, write)


def plot_curves(out, history, log):
    """Loss and top-1 accuracy: training every LOG_EVERY steps, test after the epochs that were tested. Drawn
    on matplotlib's Agg canvas: no display needed, and pyplot's backend stays as it was in a notebook that
    imports this file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    labels = {"loss": "cross-entropy (train: with label smoothing)", "acc1": "top-1 accuracy (%)"}
    for ax, (metric, label) in zip(fig.subplots(1, 2), labels.items()):
        ax.plot([r["epoch"] for r in log], [r[f"train_{metric}"] for r in log], lw=1,
                label=f"train (mean of {LOG_EVERY} steps)")
        tested = [(r["epoch"], r[f"test_{metric}"]) for r in history if r[f"test_{metric}"] is not None]
        if tested:
            ax.plot(*zip(*tested), marker="o", label="test")
        ax.set(xlabel="epoch", ylabel=label, xlim=(0, max(r["epoch"] for r in history)))
        ax.grid(alpha=0.3)
        ax.legend()
    replace_atomically(out / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def main(argv=None):
    """The command line. With --resume DIR, the options stored in DIR are the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    talk = int(os.environ.get("RANK", 0)) == 0  # under torchrun, only the first process prints errors
    try:
        checkpoint = None
        if args.resume:
            checkpoint = read_checkpoint(Path(args.resume) / "last.pt")
            stored = {k: v for k, v in checkpoint["config"].items() if k not in ("resume", "out")}
            args = parser.parse_args(argv, namespace=argparse.Namespace(**stored))  # argv overrides stored
        return train(args, checkpoint)
    except (UsageError, Diverged) as e:
        parser.exit(2 if isinstance(e, UsageError) else 3, f"{parser.prog}: error: {e}\n" if talk else None)
    except KeyboardInterrupt as e:
        parser.exit(130, f"\n{str(e) or 'stopped by Ctrl-C'}\n" if talk else None)


if __name__ == "__main__":
    main()

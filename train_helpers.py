"""The machinery train_minimal.py needs and its reader need not study, apart so that the script reads as the recipe.

The checks on options, devices and processes; the run folder's lock (`hold_out`); the dataset readers; and the
bookkeeping of a run (`Tracker`: exact resume, NaN checks, progress, Ctrl-C and SIGTERM, files written
atomically, metrics, curves, the summary). Nothing here imports train_minimal.py.
"""

import csv
import dataclasses
import errno
import filecmp
import gzip
import json
import math
import os
import platform
import random
import shlex
import signal
import struct
import time
import zlib
from contextlib import ExitStack, contextmanager
from pathlib import Path

try:
    import fcntl  # run-folder locks, POSIX only
except ImportError:
    fcntl = None

import numpy as np
from PIL import Image
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2
from tqdm import tqdm  # text bars: a saved notebook keeps the finished bar, where a widget keeps its first frame

import uninext

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
# Options that may differ when a run is resumed: where and how it runs, not what it computes.
RUNTIME_OPTIONS = {"resume", "out", "overwrite", "data_dir", "eval_only", "eval_every", "device", "amp", "compile",
                   "workers"}
RUN_FILES = ["last.pt", "best.pt", "metrics.csv", "steps.csv", "summary.json"]  # what a run leaves in --out
# metrics.csv, a row per epoch: `seconds` is wall time (training and testing), `cpu_seconds` the CPU time
# that the training processes spent training (DataLoader workers not included): other jobs on a shared
# machine inflate it far less than wall time, so runs are compared by it, on one processor (the summary
# names it). steps.csv, a row every few steps: the means over those steps, and the CPU time of the run so far.
METRICS = ["epoch", "lr", "train_loss", "train_acc1", "test_loss", "test_acc1", "img_per_s", "seconds",
           "cpu_seconds"]
STEP_METRICS = ["step", "epoch", "lr", "train_loss", "train_acc1", "cpu_seconds"]
PROGRESS = {"epoch": (int,), "step": (int,), "history": (list,), "log": (list,), "best": (dict, type(None)),
            "partial": (dict, type(None))}  # the types of a run's progress record (see Tracker)


class UsageError(Exception):
    """Bad input: a message for the user, exit code 2."""


class Diverged(Exception):
    """The loss, the weights or the test loss became NaN or infinite: exit code 3."""


# ----------------------------------------------------------------------------------------------------------
# Options, devices and processes


def check_options(args):
    """Raise a UsageError that lists every option with a value it cannot have."""
    problems = [message for bad, message in [
        (args.epochs < 1, "--epochs must be at least 1"),
        (args.batch_size < 1, "--batch-size must be at least 1"),
        (not 0 < args.lr < math.inf, "--lr must be a positive number"),
        (not 0 <= args.weight_decay < math.inf, "--weight-decay must be a number, 0 or more"),
        (not 0 <= args.crop <= 16, "--crop pads a 32x32 image: 0 to 16 pixels (more, and crops are mostly padding)"),
        (not 0 <= args.warmup < 1, "--warmup is a fraction of the steps, in [0, 1)"),
        (not 0 <= args.label_smoothing < 1, "--label-smoothing is in [0, 1), 0 = off"),
        (not 0 <= args.drop_path < 1, "--drop-path is a probability in [0, 1), 0 = off"),
        (not (args.mixup == 0 or 0.01 <= args.mixup < math.inf), "--mixup is a Beta parameter: 0 = off, or 0.01 up"),
        (not (args.cutmix == 0 or 0.01 <= args.cutmix < math.inf), "--cutmix is a Beta parameter: 0 = off, or 0.01 up"),
        (not 0 <= args.ema < 1, "--ema is a decay in [0, 1), 0 = off"),
        (args.clip_grad is not None and not 0 < args.clip_grad < math.inf, "--clip-grad is a norm, more than 0"),
        (not 0 <= args.seed < 2 ** 32, "--seed is in [0, 2**32)"),
        (args.workers < 0, "--workers must be 0 or more (0 = load in the training process)"),
        (args.eval_every < 0, "--eval-every must be 0 or more"),
        (args.train_size is not None and args.train_size < 1, "--train-size must be at least 1"),
        (args.eval_only and not args.resume, "--eval-only evaluates a stored run: give it --resume DIR"),
        (args.resume and os.path.realpath(args.out) != os.path.realpath(args.resume),
         "--resume continues the run in its own folder: drop --out"),
    ] if bad]
    if problems:
        raise UsageError("; ".join(problems))
    for option in ["--out", "--resume"]:
        if getattr(args, option[2:]) is not None:
            run_folder(option, getattr(args, option[2:]))


def run_folder(option, folder):
    """`folder` as a Path, or a UsageError if it is empty or the file system's root."""
    if folder == "" or os.path.realpath(folder) == os.path.dirname(os.path.realpath(folder)):
        raise UsageError(f"{option} {folder!r}: give a folder of its own for the run, not '' or the root")
    return Path(folder)


@contextmanager
def hold_out(out, resume, overwrite, first=True):
    """Hold the run folder `out` for this run, before any expensive work: refuse one that cannot hold it, lock
    it, and only then, so that no other run can start or end in between, refuse one that holds another run.
    The lock is fcntl's record lock: it belongs to this process alone, so DataLoader workers forked from it do
    not hold it, and it goes with the process, kill -9 included. Only the `first` of several processes holds
    it; a folder that this run created and left without a run file is removed."""
    out = Path(out)
    with ExitStack() as stack:
        try:
            place = out.absolute()
            while not (place.exists() or place.is_symlink()):
                place = place.parent
            if place == out.absolute() and not place.is_dir():
                raise UsageError(f"--out {out} is {'a link that leads nowhere' if place.is_symlink() else 'a file'}, "
                                 f"not a folder: choose another --out")
            if not (place.is_dir() and os.access(place, os.W_OK | os.X_OK)):
                raise UsageError(f"--out {out}: cannot write into {place} (not a folder, no permission, or a "
                                 f"read-only file system)")
            if first:
                created = not out.is_dir()
                out.mkdir(parents=True, exist_ok=True)
                lock = stack.enter_context(open(out / ".lock", "w"))
        except OSError as e:  # a loop of links, a name too long, a full inode table, another user's lock file...
            raise UsageError(f"--out {out}: cannot hold a run there ({first_line(e)}): choose another --out") from None
        if not first:
            yield
            return
        try:
            if fcntl is not None:  # POSIX; on Windows the folder is not locked
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise UsageError(f"another process is writing into {out}: wait for it to end, or choose another "
                             f"--out") from None
        if not resume and not overwrite and any((out / name).exists() for name in RUN_FILES):
            raise UsageError(f"{out} holds a run already: continue it with --resume {shlex.quote(str(out))}, "
                             f"choose another --out, or replace it with --overwrite")
        try:
            yield
        finally:
            if created and [f.name for f in out.iterdir()] == [".lock"]:
                (out / ".lock").unlink()
                out.rmdir()


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
    """The device that --device names; auto: CUDA, else Apple silicon's GPU (MPS), else the CPU."""
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
    native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere on; emulated below it
    return "bf16" if native_bf16 else "fp16"  # fp16: T4, V100


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
# Data: the readers, each giving (uint8 images (N, H, W, C), labels), and ImageNet-style folders


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
    dimensions, each size as a big-endian int32, then the data. (torchvision's reader takes only the
    uncompressed files that its own download leaves.)"""
    try:
        raw = gzip.decompress(path.read_bytes())
        shape = struct.unpack(f">{raw[3]}I", raw[4:4 + 4 * raw[3]])
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=4 + 4 * raw[3]).reshape(shape)
    except (OSError, EOFError, IndexError, RuntimeError, ValueError, struct.error, zlib.error) as e:
        raise UsageError(f"{path} is damaged ({first_line(e)}): reinstall it with apt-get install --reinstall "
                         f"dataset-fashion-mnist") from None


def torchvision_split(cls, folder, args, train, fix):
    """One split of a torchvision dataset in --data-dir/folder; torchvision checks the files there and
    downloads them where they are missing or damaged."""
    try:
        return cls(args.data_dir, train=train, download=True)
    except (OSError, RuntimeError) as e:
        raise UsageError(f"{args.dataset} is missing or damaged in {Path(args.data_dir) / folder} and could not be "
                         f"downloaded ({e}): {fix}, or point --data-dir at the folder that holds {folder}/") from None


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


def epoch_batches(args, epoch, start, n, rank, world):
    """This process's slice of each global batch of the epoch, from step `start` on: image indices (steps,
    batch_size // world), and the epoch's generator, which draws the rest of its randomness. A fresh shuffle
    of the n images that depends on (seed, epoch) only, so that a run resumed in the middle of an epoch sees
    the same batches as one never stopped; the last, incomplete batch is dropped."""
    g = torch.Generator().manual_seed(args.seed * 10_000 + epoch)
    order = torch.randperm(n, generator=g)[: n // args.batch_size * args.batch_size].view(-1, args.batch_size)
    local = args.batch_size // world
    return order[start:, rank * local:(rank + 1) * local], g


def to_model_input(images, mean, std):
    """uint8 (B, H, W, C) -> float (B, C, H, W), standardised per channel. The result is a channels_last view,
    which the model turns back into (B, H, W, C) without a copy."""
    return ((images.float() - mean) / std).permute(0, 3, 1, 2)


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
            refuse_repeated_folders([root / "train", root / "val"])
            self.train_set = SeededImageFolder(root / "train", args.seed, transform=train_tf, loader=read_image)
            classes = self.train_set.class_to_idx
            unknown = sorted({e.name for e in os.scandir(root / "val") if e.is_dir()} - classes.keys())
            if unknown:
                raise UsageError(f"{root / 'val'} has classes that {root / 'train'} lacks ({', '.join(unknown)}): "
                                 f"the model cannot learn them; remove them or add training images")
            self.test_set = datasets.ImageFolder(root / "val", transform=test_tf, loader=read_image,
                                                 allow_empty=True)
        except (FileNotFoundError, OSError) as e:
            raise UsageError(f"cannot read the image folders in {root}: {e}") from None
        if not self.test_set.samples:
            raise UsageError(f"{root / 'val'} holds no images: the run would train, then have nothing to test "
                             f"on; put test images in {root / 'val'}/<class>/")
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
        for _ in tqdm(self.test_batches(), desc=f"reading {root / 'val'}", unit="batch", leave=False,
                      disable=rank != 0):
            pass  # every test image read once now: a damaged one stops the run before training, not after it

    def train_batches(self, epoch, start=0):
        mine, _ = epoch_batches(self.args, epoch, start, self.num_train, self.rank, self.world)
        return self.batches(self.train_set, [[(i, epoch) for i in ids] for ids in mine.tolist()])

    def test_batches(self):
        mine = torch.arange(self.rank, self.num_test, self.world).split(2 * self.local_batch)
        return self.batches(self.test_set, [ids.tolist() for ids in mine])

    def batches(self, dataset, batches):
        # The loader's own generator seeds its workers, so that starting them draws nothing from the training's
        # random stream; what they draw does not matter, as SeededImageFolder seeds each image itself.
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=self.args.workers,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator())
        try:
            for images, labels in loader:  # (B, C, H, W) uint8
                images = images.to(self.device, non_blocking=True).permute(0, 2, 3, 1)  # (B, H, W, C)
                yield to_model_input(images, self.mean, self.std), labels.to(self.device, non_blocking=True)
        except UsageError as e:  # from a worker, the message comes after the worker's traceback
            raise UsageError(str(e).strip().splitlines()[-1].split("UsageError: ", 1)[-1]) from None


class SeededImageFolder(datasets.ImageFolder):
    """An ImageFolder read by (index, epoch) keys, which draws an image's random augmentation from torch's
    generator seeded by (seed, epoch, index) alone: the same whichever worker process reads the image, so that
    a run resumed half-way through an epoch, with any number of --workers, augments as one never stopped."""

    def __init__(self, root, seed, **kwargs):
        super().__init__(root, **kwargs)
        self.seed = seed

    def __getitem__(self, key):
        index, epoch = key
        with torch.random.fork_rng(devices=[]):  # the reader's own stream is left as it was (--workers 0)
            torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
            return super().__getitem__(index)


def refuse_repeated_folders(roots):
    """Refuse data that reaches a folder twice through a link (torchvision follows links): a link back up the
    tree reads the images again and again, and one into another class's folder trains them under this class."""
    seen = {}
    for root in roots:
        for folder, _, _ in os.walk(root, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:
                raise UsageError(f"{folder} and {seen[real]} are one folder, {real}, reached through a link: its "
                                 f"images would be read twice (and labelled by the wrong class); remove the link")
            seen[real] = folder


def read_image(path):
    """An image file as an RGB PIL image, or an error that names the file. 8-bit images as torchvision reads
    them; 16-bit grey ones (PNG, TIFF) scaled by their depth to 0-255, where a plain conversion would clip
    them; images of 32-bit or floating-point values, which have no agreed range, refused."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):  # PNG: 16 bits at most
                grey = (np.asarray(image, dtype=np.uint32) + 128) // 257  # 0-65535 -> 0-255, rounded
                return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
            if image.mode in ("I", "F"):
                raise UsageError(f"{path} holds {'32-bit integer' if image.mode == 'I' else 'floating-point'} "
                                 f"pixels, whose range the file does not say: save it with 8 or 16 bits per "
                                 f"channel")
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{path} cannot be read as an image ({first_line(e)}): remove or replace it, then run "
                         f"again (--resume continues from the last checkpoint, if there is one)") from None


# ----------------------------------------------------------------------------------------------------------
# The bookkeeping of a run


class Tracker:
    """Everything around the training loop that its reader need not follow. It keeps `progress` (train_minimal's
    `run` says what it holds), so that a run stopped anywhere continues exactly; the loss and correct guesses
    of every step, on the device, so that a step never waits for the GPU; and two clocks, wall seconds and
    the CPU-seconds that the processes spend training. Every `log_every` steps, at the same step on every
    process, one sync checks for NaN, logs, shows progress and agrees on stopping; every epoch ends with its
    metrics row, last.pt (and best.pt), the CSVs and the plot. As a context manager, inside `hold_out`, it
    clears a replaced run's files, completes a resumed run's, and turns Ctrl-C and SIGTERM into a clean stop."""

    def __init__(self, args, out, data, device, rank, world, progress, log_every, state):
        self.args, self.out, self.data, self.device, self.rank, self.world = args, out, data, device, rank, world
        self.progress, self.log_every, self.steps = progress, log_every, data.steps_per_epoch
        self.state = state  # model, optimizer, scheduler, scaler, ema: what a checkpoint holds

    def __enter__(self):
        with ExitStack() as stack:  # the signal handlers are put back if anything below fails
            if self.rank == 0:  # the run folder is held (hold_out) by the time the Tracker starts
                progress, last, best = self.progress, self.out / "last.pt", self.out / "best.pt"
                if self.args.overwrite and not self.args.resume:  # no file of the replaced run may outlive it
                    for name in [*RUN_FILES, "curves.png"]:
                        (self.out / name).unlink(missing_ok=True)
                if progress["history"]:  # a resumed run: finish what a stop after last.pt left unwritten
                    stored = progress["best"]
                    if (stored and progress["step"] == 0 and stored["epoch"] == progress["epoch"] - 1
                            and not (best.exists() and filecmp.cmp(last, best, shallow=False))):
                        copy_atomically(last, best)  # last.pt is the best state, and best.pt is not yet a copy
                    write_records(self.out, progress, self.log_every)
            self.requested = None  # set by the first Ctrl-C or SIGTERM: "Ctrl-C" or "SIGTERM"
            self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            for s, handler in self.previous.items():
                signal.signal(s, self.request)
                stack.callback(signal.signal, s, handler)
            self.stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)

    def request(self, signum, frame):
        """The first Ctrl-C (SIGINT) or SIGTERM (what schedulers and `kill` send) asks the loop to stop
        between two steps, so that no step is left half done; a second one interrupts at once."""
        self.requested = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def start_epoch(self, epoch):
        """Fresh accumulators for `epoch`, or, in the epoch a stopped run continues, the ones it saved; the
        step to start from."""
        steps, device, partial = self.steps, self.device, self.progress["partial"]
        self.losses, self.hits = torch.zeros(steps, device=device), torch.zeros(steps, device=device)
        self.train_seconds = self.train_cpu = 0.0
        self.start = self.progress["step"] if epoch == self.progress["epoch"] else 0
        if self.start:
            self.losses[:self.start] = partial["losses"].to(device)
            self.hits[:self.start] = partial["hits"].to(device)
            self.train_seconds, self.train_cpu = partial["seconds"], partial["cpu_seconds"]
        self.cpu_before = sum(r["cpu_seconds"] for r in self.progress["history"])  # earlier epochs
        self.epoch = epoch
        return self.start

    def bar(self, batches):
        """(step, batch) for the epoch's batches; times the training pass. The progress bar is the epoch's, so
        that a finished epoch's bar ends full (green in a notebook) and only a stopped one ends short (red)."""
        self.progress_bar = tqdm(batches, total=self.steps, initial=self.start, unit="step",
                                 desc=f"epoch {self.epoch}/{self.args.epochs}", disable=self.rank != 0,
                                 dynamic_ncols=True)
        self.tick, self.cpu_tick = time.perf_counter(), time.process_time()
        yield from enumerate(self.progress_bar, self.start)  # the bar closes itself on an error
        self.progress_bar.close()
        self.train_seconds, self.train_cpu = self.clocks()
        self.tick = time.perf_counter()  # testing starts

    def clocks(self):
        """(wall seconds, CPU-seconds of this process) that the epoch has spent training so far."""
        return (self.train_seconds + time.perf_counter() - self.tick,
                self.train_cpu + time.process_time() - self.cpu_tick)

    def update(self, step, loss, logits, labels, lr):
        """Record a step; every log_every steps and at the end of the epoch, check, log and maybe stop."""
        epoch, steps, self.lr = self.epoch, self.steps, lr
        self.losses[step] = loss.detach()
        self.hits[step] = (logits.argmax(1) == labels).sum()
        log_now = (step + 1) % self.log_every == 0 or step + 1 == steps
        if not log_now and not (self.world == 1 and self.requested):  # several processes agree on stopping first
            return

        seen = all_sum(self.losses[:step + 1]) / self.world
        bad = (~torch.isfinite(seen)).nonzero()
        if len(bad):
            s = bad[0].item()
            self.diverged(f"the training loss was {seen[s].item()} at epoch {epoch}, step {s + 1} of {steps} "
                          f"(step {(epoch - 1) * steps + s + 1} of the run)", "a lower --lr, or --amp bf16 or off")
        # The last update can break the weights, or BatchNorm's running statistics, after a good loss; a tensor
        # with a NaN or an inf sums to one.
        params, buffers = list(self.state["model"].parameters()), list(self.state["model"].buffers())
        finite = torch.stack([t.detach().float().sum() for t in params + buffers]).isfinite()
        if anyone(not finite.all().item(), self.device):
            what = "the weights" if not finite[:len(params)].all() else "BatchNorm's running statistics"
            self.diverged(f"{what} became NaN or infinite by epoch {epoch}, step {step + 1} of {steps}", "a lower --lr")
        seconds, cpu = self.clocks()
        cpu_run = self.cpu_before + all_sum(torch.tensor(cpu, device=self.device)).item()
        if log_now:  # the mean loss and accuracy of the last log_every steps, for curves within an epoch
            first = step - step % self.log_every
            self.progress["log"].append({
                "step": (epoch - 1) * steps + step + 1, "epoch": round(epoch - 1 + (step + 1) / steps, 4),
                "lr": lr, "train_loss": seen[first:].mean().item(), "train_acc1": self.top1(first, step + 1),
                "cpu_seconds": round(cpu_run, 2)})
        self.progress_bar.set_postfix(loss=f"{seen.mean().item():.3f}", acc=f"{self.top1(0, step + 1):.1f}%",
                                      cpu=f"{cpu_run / 60:.1f} min")
        if anyone(bool(self.requested), self.device) and step + 1 < steps:
            self.progress_bar.close()
            partial = {"losses": self.losses[:step + 1].cpu(), "hits": self.hits[:step + 1].cpu(),
                       "seconds": seconds, "cpu_seconds": cpu}
            self.progress.update(epoch=epoch, step=step + 1, partial=partial)
            self.save()
            raise KeyboardInterrupt(stopped_message(self.out, f"epoch {epoch}, step {step + 1} of {steps}",
                                                    self.requested))

    def top1(self, first, last):
        """Training top-1 in % over steps first..last-1 of the epoch, all processes together."""
        return 100 * all_sum(self.hits[first:last]).sum().item() / ((last - first) * self.args.batch_size)

    def diverged(self, what, fix):
        """Stop the run with exit code 3, saying what last.pt holds (`progress` changes only when a checkpoint
        is written or read)."""
        self.progress_bar.close()
        epoch, step = self.progress["epoch"], self.progress["step"]
        if (epoch, step) == (1, 0):
            last = "no checkpoint had been written yet."
        else:
            where = f"epoch {epoch}, step {step}" if step else f"the end of epoch {epoch - 1}"
            last = f"{self.out / 'last.pt'} still holds {where}, the last good state."
        raise Diverged(f"{what}, so the run stopped; {last} Try {fix}.")

    def end_epoch(self, epoch, test_loss, test_acc1):
        """The epoch's metrics row, last.pt (and best.pt when the test accuracy is the best so far), the
        records; then stop here if Ctrl-C or SIGTERM came during the epoch."""
        out, world, progress = self.out, self.world, self.progress
        if test_loss is not None and not math.isfinite(test_loss):
            self.diverged(f"the test loss after epoch {epoch} was {test_loss}", "a lower --lr, or --amp bf16 or off")
        row = {"epoch": epoch, "lr": self.lr, "train_loss": (all_sum(self.losses) / world).mean().item(),
               "train_acc1": self.top1(0, self.steps),
               "test_loss": test_loss, "test_acc1": test_acc1,
               "img_per_s": self.steps * self.args.batch_size / self.train_seconds,
               "seconds": self.train_seconds + time.perf_counter() - self.tick,
               "cpu_seconds": all_sum(torch.tensor(self.train_cpu, device=self.device)).item()}
        progress["history"].append(row)
        progress.update(epoch=epoch + 1, step=0, partial=None)
        improved = test_acc1 is not None and (progress["best"] is None or test_acc1 > progress["best"]["test_acc1"])
        if improved:
            progress["best"] = {"epoch": epoch, "test_acc1": test_acc1}
        self.save()
        if self.rank == 0:
            if improved:
                copy_atomically(out / "last.pt", out / "best.pt")
            write_records(out, progress, self.log_every)
            test = "" if test_acc1 is None else f" | test loss {test_loss:.3f} top-1 {test_acc1:.2f}%"
            print(f"epoch {epoch}/{self.args.epochs} | lr {self.lr:.2e} | train loss {row['train_loss']:.3f} top-1 "
                  f"{row['train_acc1']:.2f}%{test} | {row['img_per_s']:,.0f} img/s | {row['seconds']:.1f} s | "
                  f"{sum(r['cpu_seconds'] for r in progress['history']) / 60:.1f} CPU-min of training so far")
        if anyone(bool(self.requested), self.device) and epoch < self.args.epochs:
            raise KeyboardInterrupt(stopped_message(out, f"the end of epoch {epoch}", self.requested))

    def save(self):
        """last.pt, written by the first process: everything that the next step depends on, as tensors and
        plain Python values (weights_only loads it), with the random state of every process."""
        mine = {"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        rng = [mine]
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, mine)
        if self.rank == 0:
            model, data = self.state["model"], self.data
            state = {"config": vars(self.args), "progress": self.progress, "rng": rng,
                     **{name: part.state_dict() if part is not None else None for name, part in self.state.items()},
                     "normalisation": {"mean": data.mean.cpu(), "std": data.std.cpu()},  # to use the model elsewhere
                     "model_config": dataclasses.asdict(model.cfg) if isinstance(model, uninext.UniNeXt) else None}
            replace_atomically(self.out / "last.pt", lambda tmp: torch.save(state, tmp))

    def finish(self, n_params, amp):
        """The summary of the run, also written to summary.json."""
        args, history, best = self.args, self.progress["history"], self.progress["best"]
        summary = {
            "dataset": args.dataset, "model": args.model,
            **({"mixer": args.mixer, "arch": args.arch, "size": args.size} if args.model == "uninext" else {}),
            "epochs": history[-1]["epoch"], "test_acc1": history[-1]["test_acc1"],
            "test_loss": history[-1]["test_loss"], "best_test_acc1": best["test_acc1"], "best_epoch": best["epoch"],
            "train_images": self.data.num_train, "test_images": self.data.num_test, "params": n_params,
            "seconds": sum(r["seconds"] for r in history), "cpu_seconds": sum(r["cpu_seconds"] for r in history),
            "img_per_s": sorted(r["img_per_s"] for r in history)[len(history) // 2],  # the median epoch's
            "device": device_name(self.device, self.world), "amp": amp, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "config": vars(args)}
        if self.rank == 0:
            text = json.dumps(summary, indent=2, allow_nan=False)  # strict JSON: a NaN would be an error here
            replace_atomically(self.out / "summary.json", lambda tmp: tmp.write_text(text))
            epochs = f"{self.args.epochs} epoch{'s' * (self.args.epochs != 1)}"
            print(f"done: test top-1 {summary['test_acc1']:.2f}% after {epochs}, "
                  f"{summary['seconds'] / 60:.1f} min, {summary['img_per_s']:,.0f} img/s | {self.out}")
        return summary


def describe_run(args, data, n_params, amp, device, world):
    """The line that opens a run (after a warning where the options would make it needlessly slow)."""
    name = f"{args.size} {args.mixer} {args.arch}" if args.model == "uninext" else args.model
    warning = ("warning: --amp fp16 on a CPU is emulated and can be 30x slower than --amp off\n"
               if amp == "fp16" and device.type == "cpu" else "")
    if data.num_classes == 1:
        warning += ("warning: the training images are all of one class, so the model learns nothing: a loss of 0 "
                    "and 100% top-1 say only that\n")
    return (f"{warning}{args.dataset}: {data.num_train:,} training and {data.num_test:,} test images | {name}, "
            f"{n_params / 1e6:.2f}M parameters | {device_name(device, world)}, "
            f"amp {amp}{', compiled' if args.compile else ''} | {args.out}")


def device_name(device, world):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        processor = f" of {cpu_model()}" if device.type == "cpu" else ""
        name = f"{device.type} ({threads} thread{'s' if threads > 1 else ''}{processor})"
    return f"{world} x {name}" if world > 1 else name


def cpu_model():
    """The processor's name as Linux reports it, else platform's guess: CPU-seconds compare runs only on
    the same processor, so every summary names it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "an unknown processor"


def stopped_message(out, where, why):
    return (f"stopped by {why or 'another process'} at {where}, saved in {out / 'last.pt'}; continue with:\n"
            f"    python train_minimal.py --resume {shlex.quote(str(out))}")


# ----------------------------------------------------------------------------------------------------------
# Saving and resuming


def replace_atomically(path, write):
    """Write `path` through write(temporary path), then move it into place in one step: a crash or Ctrl-C
    never leaves a half-written file where a complete one was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on the disk before the rename, and the rename on the disk after it, so that
            os.fsync(f.fileno())  # not even a power cut leaves an empty file under the name
        os.replace(tmp, path)
        sync_folder(path.parent)
    except BaseException as e:  # nothing half-written stays behind, whatever stopped the writing
        tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):  # a full disk: RuntimeError from torch.save, else OSError
            raise
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise UsageError(f"could not write {path} ({first_line(e)}): is the disk full?{kept}") from None


def sync_folder(folder):
    """Flush a folder's entries (a rename) to the disk; where folders cannot be opened (Windows), nothing."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_atomically(source, target):
    replace_atomically(target, lambda tmp: tmp.write_bytes(source.read_bytes()))


def read_checkpoint(path, typical):
    """A checkpoint, read as data: weights_only=True unpickles tensors and plain Python values, never code.
    `typical`: the options of a run, whose types the stored ones must have."""
    if not path.is_file():
        raise UsageError(f"there is no checkpoint {path}: --resume takes the --out folder of an earlier run")
    problem = f"{path} is corrupt or not a checkpoint of train_minimal.py"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file makes torch.load fail in many different ways
        raise UsageError(f"{problem} ({first_line(e)}); best.pt beside it may still be good") from None
    if not (isinstance(checkpoint, dict) and {"config", "model", "progress"} <= checkpoint.keys()):
        raise UsageError(f"{problem} (it holds other data); best.pt beside it may still be good")
    config, progress = checkpoint["config"], checkpoint["progress"]
    if not (isinstance(config, dict) and isinstance(progress, dict)):
        raise UsageError(f"{problem} (it holds other data); best.pt beside it may still be good")
    # Each stored value has the type that a run writes (a float may be stored as an int), or is None if unset.
    wrong = [f"option {k} of the wrong type" for k, v in config.items() if v is not None and typical.get(k) is not None
             and type(v) not in ((float, int) if type(typical[k]) is float else (type(typical[k]),))]
    wrong += [f"progress field {k} missing or of the wrong type" for k, kinds in PROGRESS.items()
              if type(progress.get(k, ...)) not in kinds]
    if not wrong and not all(isinstance(r, dict) and set(METRICS) <= r.keys() and all(
            r[k] is None or type(r[k]) in (int, float) and math.isfinite(r[k]) for k in METRICS)
            for r in progress["history"]):
        wrong = ["a missing, non-numeric or non-finite value in the history"]  # a NaN would reach summary.json
    if wrong:
        raise UsageError(f"{problem} ({wrong[0]}: was it edited by hand?); best.pt beside it may still be good")
    return checkpoint


def first_line(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def check_config(stored, args, path):
    """Refuse to continue a run with options that change what it computes (RUNTIME_OPTIONS may change). An
    option newer than the checkpoint is fine while it is unset (None): the run never used it."""
    missing = sorted(k for k in set(vars(args)) - set(stored) - RUNTIME_OPTIONS if getattr(args, k) is not None)
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


def restore(checkpoint, state, progress, steps, rank=0):
    """Put every piece of a run (`state`: model, optimizer, scheduler, scaler, EMA; `progress`) back as it was
    when the checkpoint was written; process `rank` gets its own random state back. `steps`: per epoch."""
    try:
        stored = checkpoint["progress"]
        if not (len(stored["history"]) == stored["epoch"] - 1 and 0 <= stored["step"] < steps
                and (stored["step"] == 0 or len(stored["partial"]["losses"]) == stored["step"])):
            raise ValueError(f"it stopped at epoch {stored['epoch']}, step {stored['step']} of {steps}, after "
                             f"{len(stored['history'])} finished epochs")
        for name, part in state.items():
            if part is not None and checkpoint[name]:  # the scaler's is empty when it was saved without fp16
                part.load_state_dict(checkpoint[name])
        progress.update(checkpoint["progress"])
        states = checkpoint["rng"]
        if rank < len(states):  # a process added since the checkpoint keeps the stream it was seeded with
            random.setstate(states[rank]["python"])
            torch.set_rng_state(states[rank]["torch"])
            if states[rank]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states[rank]["cuda"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise UsageError(f"the checkpoint does not fit this run ({first_line(e)}): it is damaged, edited or from "
                         f"another version of the code") from None


def write_records(out, progress, log_every):
    """metrics.csv, steps.csv and curves.png, from the run's progress."""
    write_csv(out / "metrics.csv", METRICS, progress["history"])
    write_csv(out / "steps.csv", STEP_METRICS, progress["log"])
    plot_curves(out, progress["history"], progress["log"], log_every)


def write_csv(path, columns, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)  # None (epochs not tested) becomes an empty field

    replace_atomically(path, write)


def plot_curves(out, history, log, log_every):
    """Loss and top-1 accuracy: training every log_every steps, test after the epochs that were tested. Drawn
    on matplotlib's Agg canvas: no display needed, and pyplot's backend stays as it was in a notebook that
    imports this file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    labels = {"loss": "cross-entropy (train: with label smoothing)", "acc1": "top-1 accuracy (%)"}
    for ax, (metric, label) in zip(fig.subplots(1, 2), labels.items()):
        ax.plot([r["epoch"] for r in log], [r[f"train_{metric}"] for r in log], lw=1,
                label=f"train (mean of {log_every} steps)")
        tested = [(r["epoch"], r[f"test_{metric}"]) for r in history if r[f"test_{metric}"] is not None]
        if tested:
            ax.plot(*zip(*tested), marker="o", label="test")
        ax.set(xlabel="epoch", ylabel=label, xlim=(0, max(r["epoch"] for r in history)))
        ax.grid(alpha=0.3)
        ax.legend()
    replace_atomically(out / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))

"""
The machinery around train_minimal.py that a reader of its loop need not study: the checks on the options,
processes and devices, the dataset readers (CIFAR through torchvision, Fashion-MNIST's IDX files, the
synthetic stand-in, ImageNet-style folders), and the bookkeeping of a run (`Tracker`: exact mid-epoch
resume, NaN checks, progress, cost estimates, Ctrl-C and SIGTERM, agreement between processes, checkpoints
written atomically in a locked folder, metrics, curves, the summary). train_minimal.py imports what it uses
from here; nothing here imports it.

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

Cost. Every run reports its training time twice: wall seconds, and the CPU-seconds its processes spent
training (`cpu_seconds`; DataLoader workers not included), which other jobs on a shared machine inflate far
less than wall time (by up to a quarter, measured, through contended caches). With one process of one
thread (OMP_NUM_THREADS=1) that is about what one idle core would take; compare runs by it. After the first
steps the run says what the whole of it will cost.
"""

import csv
import dataclasses
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

from PIL import Image
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2
from tqdm.auto import tqdm

import uninext

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
# Options that may differ when a run is resumed: where and how it runs, not what it computes.
RUNTIME_OPTIONS = {"resume", "out", "overwrite", "data_dir", "eval_only", "eval_every", "device", "amp", "compile",
                   "workers"}
RUN_FILES = ["last.pt", "best.pt", "metrics.csv", "steps.csv", "summary.json"]  # what a run leaves in --out
# metrics.csv, a row per epoch: `seconds` is wall time (training and testing), `cpu_seconds` the CPU time
# the training processes spent training. steps.csv, a row every few steps: the means over those steps,
# and the CPU time of the whole run so far.
METRICS = ["epoch", "lr", "train_loss", "train_acc1", "test_loss", "test_acc1", "img_per_s", "seconds",
           "cpu_seconds"]
STEP_METRICS = ["step", "epoch", "lr", "train_loss", "train_acc1", "cpu_seconds"]


class UsageError(Exception):
    """Bad input: a message for the user, exit code 2."""


class Diverged(Exception):
    """The loss became NaN or infinite: exit code 3."""

# ----------------------------------------------------------------------------------------------------------
# Options


def check_options(args):
    """Raise a UsageError that lists every option with a value it cannot have."""
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
        (args.clip_grad is not None and not 0 < args.clip_grad < math.inf, "--clip-grad is a norm, more than 0"),
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
# The bookkeeping of a run


class Tracker:
    """Everything around the training loop that its reader need not follow. Where the run stands (the next
    epoch and step, the metrics so far, the best test accuracy, and the accumulators of an epoch stopped half
    way), so that a run stopped anywhere continues exactly; the loss and correct guesses of every step, kept
    on the device so that a step never waits for the GPU; every `log_every` steps, on every process at the
    same step, one sync to check for NaN, log, show progress and agree on stopping; time counted twice, wall
    seconds and the CPU-seconds the processes spent (which other jobs on a shared machine inflate far less);
    and at the end of every epoch the metrics row, last.pt and best.pt, the CSVs and the plot.

    As a context manager it holds the run folder's lock and turns Ctrl-C and SIGTERM into a clean stop."""

    def __init__(self, args, out, data, device, rank, world, progress, log_every, state):
        self.args, self.out, self.data, self.device, self.rank, self.world = args, out, data, device, rank, world
        self.progress, self.log_every, self.steps = progress, log_every, data.steps_per_epoch
        self.state = state  # model, optimizer, scheduler, scaler, ema: what a checkpoint holds
        self.estimated = False  # the cost of the whole run is estimated once, after the first steps

    def __enter__(self):
        self.stack = ExitStack()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.stack.enter_context(folder_lock(self.out))
            progress = self.progress
            if self.args.overwrite and not self.args.resume:  # no file of the replaced run may outlive it
                for name in [*RUN_FILES, "curves.png"]:
                    (self.out / name).unlink(missing_ok=True)
            if progress["history"]:  # a resumed run: finish what a stop after last.pt left unwritten
                best = progress["best"]
                if best and progress["step"] == 0 and best["epoch"] == progress["epoch"] - 1:
                    copy_atomically(self.out / "last.pt", self.out / "best.pt")  # last.pt is the best state
                write_records(self.out, progress, self.log_every)
        self.interrupt = self.stack.enter_context(stop_on_signal())
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)

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
        """(step, batch) for the epoch's batches, under a progress bar; times the training pass."""
        self.progress_bar = tqdm(batches, total=self.steps, initial=self.start, unit="step",
                                 desc=f"epoch {self.epoch}/{self.args.epochs}", disable=self.rank != 0, leave=False,
                                 dynamic_ncols=True)
        self.tick, self.cpu_tick = time.perf_counter(), time.process_time()
        yield from enumerate(self.progress_bar, self.start)  # the bar closes itself on an error
        self.progress_bar.close()
        self.train_seconds += time.perf_counter() - self.tick
        self.train_cpu += time.process_time() - self.cpu_tick
        self.tick = time.perf_counter()  # testing starts

    def update(self, step, loss, logits, labels, lr):
        """Record a step; every log_every steps and at the end of the epoch, check, log and maybe stop."""
        args, device, world, steps, epoch = self.args, self.device, self.world, self.steps, self.epoch
        losses, hits, progress, self.lr = self.losses, self.hits, self.progress, lr
        losses[step] = loss.detach()
        hits[step] = (logits.argmax(1) == labels).sum()
        log_now = (step + 1) % self.log_every == 0 or step + 1 == steps
        alone_and_stopped = world == 1 and bool(self.interrupt["requested"])  # several processes agree first
        if not log_now and not alone_and_stopped:
            return

        seen = all_sum(losses[:step + 1]) / world
        bad = (~torch.isfinite(seen)).nonzero()
        if len(bad):
            self.progress_bar.close()
            s = bad[0].item()
            raise Diverged(f"the training loss was {seen[s].item()} at epoch {epoch}, step {s + 1} of "
                           f"{steps} (step {(epoch - 1) * steps + s + 1} of the run), so the run stopped; "
                           f"{describe_last(progress, self.out)} Try a lower --lr, or --amp bf16 or off.")
        if anyone(not finite(self.state["model"]), device):  # the last update can break the weights after a good loss
            self.progress_bar.close()
            raise Diverged(f"the weights became NaN or infinite by epoch {epoch}, step {step + 1} of "
                           f"{steps}, so the run stopped; {describe_last(progress, self.out)} Try a lower --lr.")
        now, cpu_now = time.perf_counter(), time.process_time()
        cpu_run = self.cpu_before + all_sum(
            torch.tensor(self.train_cpu + cpu_now - self.cpu_tick, device=device)).item()
        if log_now:  # the mean loss and accuracy of the last log_every steps, for curves within an epoch
            first = step - step % self.log_every
            progress["log"].append({
                "step": (epoch - 1) * steps + step + 1, "epoch": round(epoch - 1 + (step + 1) / steps, 4),
                "lr": lr, "train_loss": seen[first:].mean().item(),
                "train_acc1": self.top1(first, step + 1),
                "cpu_seconds": round(cpu_run, 2)})
        self.progress_bar.set_postfix(
            loss=f"{seen.mean().item():.3f}",
            acc=f"{self.top1(0, step + 1):.1f}%",
            img_s=f"{(step + 1 - self.start) * args.batch_size / (now - self.tick):,.0f}",
            cpu=f"{cpu_run / 60:.1f} min")
        done = step + 1 - self.start
        if self.rank == 0 and not self.estimated and done >= 2 * self.log_every:
            self.estimated = True
            tqdm.write(estimate(args, device, steps, (epoch - 1) * steps + step + 1, (now - self.tick) / done,
                                world * (cpu_now - self.cpu_tick) / done))
        if anyone(bool(self.interrupt["requested"]), device) and step + 1 < steps:
            self.progress_bar.close()
            partial = {"losses": losses[:step + 1].cpu(), "hits": hits[:step + 1].cpu(),
                       "seconds": self.train_seconds + now - self.tick,
                       "cpu_seconds": self.train_cpu + cpu_now - self.cpu_tick}
            progress.update(epoch=epoch, step=step + 1, partial=partial)
            self.save()
            raise KeyboardInterrupt(stopped_message(self.out, f"epoch {epoch}, step {step + 1} of {steps}",
                                                    self.interrupt["requested"]))

    def top1(self, first, last):
        """Training top-1 in % over steps first..last-1 of the epoch, all processes together."""
        return 100 * all_sum(self.hits[first:last]).sum().item() / ((last - first) * self.args.batch_size)

    def end_epoch(self, epoch, test_loss, test_acc1):
        """The epoch's metrics row, last.pt (and best.pt when the test accuracy is the best so far), the
        records; then stop here if Ctrl-C or SIGTERM came during the epoch."""
        args, out, device, world, progress = self.args, self.out, self.device, self.world, self.progress
        if test_loss is not None and not math.isfinite(test_loss):
            raise Diverged(f"the test loss after epoch {epoch} was {test_loss}, so the run stopped; "
                           f"{describe_last(progress, out)} Try a lower --lr, or --amp bf16 or off.")
        row = {"epoch": epoch, "lr": self.lr, "train_loss": (all_sum(self.losses) / world).mean().item(),
               "train_acc1": self.top1(0, self.steps),
               "test_loss": test_loss, "test_acc1": test_acc1,
               "img_per_s": self.steps * args.batch_size / self.train_seconds,
               "seconds": self.train_seconds + time.perf_counter() - self.tick,
               "cpu_seconds": all_sum(torch.tensor(self.train_cpu, device=device)).item()}
        progress["history"].append(row)
        progress.update(epoch=epoch + 1, step=0, partial=None)
        best = progress["best"]
        improved = test_acc1 is not None and (best is None or test_acc1 > best["test_acc1"])
        if improved:
            progress["best"] = {"epoch": epoch, "test_acc1": test_acc1}
        self.save()
        if self.rank == 0:
            if improved:
                copy_atomically(out / "last.pt", out / "best.pt")
            write_records(out, progress, self.log_every)
            print(describe_epoch(row, args.epochs, progress["history"]))
        if anyone(bool(self.interrupt["requested"]), device) and epoch < args.epochs:
            raise KeyboardInterrupt(stopped_message(out, f"the end of epoch {epoch}", self.interrupt["requested"]))

    def save(self):
        """last.pt, written by the first process, with the random state of every process."""
        rng = [rng_state()]
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, rng_state())
        if self.rank == 0:
            s = self.state
            save_checkpoint(self.out / "last.pt", self.args, s["model"], s["optimizer"], s["scheduler"], s["scaler"],
                            s["ema"], self.progress, self.data, rng)

    def finish(self, n_params, amp):
        """The summary of the run, also written to summary.json."""
        summary = summarise(self.args, self.progress, self.data, n_params, amp, self.device, self.world)
        if self.rank == 0:
            text = json.dumps(summary, indent=2, allow_nan=False)  # strict JSON: a NaN would be an error here
            replace_atomically(self.out / "summary.json", lambda tmp: tmp.write_text(text))
            print(f"done: test top-1 {summary['test_acc1']:.2f}% after {self.args.epochs} epochs, "
                  f"{summary['seconds'] / 60:.1f} min, {summary['img_per_s']:,.0f} img/s | {self.out}")
        return summary


@torch.no_grad()
def finite(model):
    """Whether every weight is a finite number (one sync: a tensor with a NaN or an infinity sums to one)."""
    return torch.stack([p.sum() for p in model.parameters()]).isfinite().all().item()


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


def describe_run(args, data, n_params, amp, device, world):
    """The line that opens a run (after a warning where the options would make it needlessly slow)."""
    name = f"{args.size} {args.mixer} {args.arch}" if args.model == "uninext" else args.model
    warning = ("warning: --amp fp16 on a CPU is emulated and can be 30x slower than --amp off\n"
               if amp == "fp16" and device.type == "cpu" else "")
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


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_checkpoint(path, args, model, optimizer, scheduler, scaler, ema, progress, data, rng):
    """Everything that the next step depends on, as tensors and plain Python values (weights_only loads it);
    `rng`: the random state of each process."""
    state = {
        "config": vars(args), "progress": progress,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
        "rng": rng,
        "normalisation": {"mean": data.mean.cpu(), "std": data.std.cpu()},  # to use the model elsewhere
        "model_config": dataclasses.asdict(model.cfg) if isinstance(model, uninext.UniNeXt) else None,
    }
    replace_atomically(path, lambda tmp: torch.save(state, tmp))


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
    wrong = malformed(checkpoint, typical)
    if wrong:
        raise UsageError(f"{problem} ({wrong} of the wrong type: was it edited by hand?); best.pt beside it may "
                         f"still be good")
    return checkpoint


def malformed(checkpoint, typical):
    """The first field of a checkpoint's configuration or progress record whose type is not what a run
    writes, or None."""
    config, progress = checkpoint["config"], checkpoint["progress"]
    if not (isinstance(config, dict) and isinstance(progress, dict)):
        return "the configuration or the progress record"
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


def restore(checkpoint, model, optimizer, scheduler, scaler, ema, progress, rank=0):
    """Put every piece of a run back as it was when the checkpoint was written; process `rank` gets its own
    random state back."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["scaler"]:  # empty when it was saved without fp16
            scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        progress.update(checkpoint["progress"])
        states = checkpoint["rng"]
        states = [states] if isinstance(states, dict) else states  # earlier versions kept the first process's
        if rank < len(states):  # a process added since the checkpoint keeps the stream it was seeded with
            random.setstate(states[rank]["python"])
            torch.set_rng_state(states[rank]["torch"])
            if states[rank]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states[rank]["cuda"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise UsageError(f"the checkpoint does not fit this model ({first_line(e)}): it is damaged or from "
                         f"another version of the code") from None


def write_records(out, progress, log_every):
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

"""
Train UniNeXt from scratch, on small images or on an ImageNet-style folder, on a CPU, one GPU or several.

    python train_minimal.py --mixer conv --dataset cifar100          # on CUDA: T32, 100 epochs (the intended use)
    python train_minimal.py --dataset fashion-mnist                  # on a CPU: N32, 2 epochs (cost and result below)
    python train_minimal.py --mixer window --arch vanilla --dataset cifar10
    python train_minimal.py --model cnn --dataset fashion-mnist      # a baseline, through the same harness
    python train_minimal.py --dataset synthetic --epochs 1 --train-size 512    # offline smoke run
    python train_minimal.py --resume runs/cifar100-conv-uninext      # continue a stopped run where it stopped
    python train_minimal.py --resume runs/cifar100-conv-uninext --eval-only
    torchrun --nproc_per_node=4 train_minimal.py --dataset cifar100  # DistributedDataParallel, same steps
    python train_minimal.py --dataset imagefolder --data-dir ~/imagenet --epochs 300 --batch-size 1024

Two budgets, picked by the device. On a CUDA GPU the defaults train the intended model for as long as it
deserves (T32, 100 epochs, batch 128, lr 1e-3, random crop, drop path 0.1). On a CPU, and on a Mac's GPU
(MPS), they give a run a person waits for (N32, 2 epochs at batch 64 and lr 2e-3, flip only, no drop path):
on Fashion-MNIST, 90.85% top-1 in 9.4 CPU-minutes, and `--model cnn` 91.37% in 4.5 (one thread of a 2-core
AMD EPYC, PyTorch 2.14.1: experiments/results/quick_start/). Any option given overrides its default. Around
them, a recipe for 5k-60k images of 32x32: AdamW (`build_optimizer`), residual branches that start at zero
(`zero_init_residual`), warm-up then cosine decay (`build_scheduler`), label smoothing 0.1, the horizontal
flip; drop path and the random crop only for long runs, since in a few epochs the model underfits and
augmentation only slows it down; the weight EMA and Mixup/CutMix off, as they cost accuracy in short runs.
What was predicted and measured for each: experiments/results/recipe_notes.md. (The authors' ImageNet rate,
for imagefolder: lr 1e-3 at batch 1024.)

Speed. CIFAR and Fashion-MNIST live on the device as uint8 tensors and are cropped and flipped there, a
whole batch at once (`crop_flip`), so a GPU never waits on Colab's two CPU cores. On a CUDA GPU the model
runs in bf16 autocast (fp16 with a GradScaler where bf16 is missing), `--compile` adds torch.compile.
imagefolder reads JPEGs through a DataLoader with --workers processes and torchvision.transforms.v2.

A run leaves in --out: metrics.csv, steps.csv, curves.png, last.pt, best.pt (chosen on the test set, so
optimistic: report the last epoch) and summary.json. Ctrl-C or SIGTERM saves last.pt and prints the command
that resumes; a resumed run ends exactly as one never stopped (bit for bit on a CPU; on a GPU, up to the
order of floating-point sums). Exit codes: 0 done, 2 bad input, 3 NaN or infinite, 130 stopped. The
machinery behind all this is in train_helpers.py. Other scripts import this file:
`train(build_parser().parse_args([...]))` returns the summary dict.
"""

import argparse
import os
import random
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
import torchvision
from torchvision.transforms import v2

import uninext
import train_helpers
from train_helpers import (Diverged, FolderData, Tracker, UsageError, all_sum, balanced_subset, check_config,
                           check_options, describe_run, device_name, epoch_batches, hold_out, make_synthetic,
                           mixed_precision, pick_device, read_cifar, read_fashion_mnist, restore, run_folder,
                           start_processes, to_model_input)

SMALL_DATASETS = {"cifar10": 10, "cifar100": 100, "fashion-mnist": 10, "synthetic": 10}  # name: classes
DATASETS = [*SMALL_DATASETS, "imagefolder"]
MODELS = ["uninext", "linear", "cnn", "resnet18"]
# Defaults that depend on the device: a CUDA GPU trains the intended model for as long as it deserves; a CPU or
# a Mac's GPU gets a run a person waits for.
GPU_DEFAULTS = {"size": "T32", "epochs": 100, "batch_size": 128, "lr": 1e-3, "crop": 4, "drop_path": 0.1}
CPU_DEFAULTS = {"size": "N32", "epochs": 2, "batch_size": 64, "lr": 2e-3, "crop": 0, "drop_path": 0.0}
INGREDIENTS = {  # the switches of uninext.create_model, each on or off as --arch says unless given
    "conv_stem": "UniNeXt's conv stem (off: a patch embedding)",
    "ec": "EC, the Embedded Convolution beside the mixer",
    "hdc": "HdC, the depthwise conv in the MLP's hidden layer",
    "pc": "PC, the Post Convolution after each block",
    "mixer_pos": "the position encoding of the mixer's own paper",
}
LOG_EVERY = 20  # steps between progress updates and NaN checks (each syncs with the GPU and other processes)


# ----------------------------------------------------------------------------------------------------------
# Arguments


def by_device(name, what=""):
    """Help text for an option whose default depends on the device."""
    return f"{what} (default: {GPU_DEFAULTS[name]} on CUDA, {CPU_DEFAULTS[name]} on a CPU or MPS)".lstrip()


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
    model.add_argument("--size", choices=list(uninext.PRESETS), help=f"preset {by_device('size')}; T for imagefolder")
    for name, what in INGREDIENTS.items():
        model.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                           help=f"{what} (default: as --arch says)")
    model.add_argument("--drop-path", type=float, help=by_device("drop_path", "stochastic depth rate"))

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
    recipe.add_argument("--epochs", type=int, help=by_device("epochs"))
    recipe.add_argument("--batch-size", type=int, help=by_device("batch_size", "images per step over all processes"))
    recipe.add_argument("--lr", type=float, help=by_device("lr", "AdamW's peak learning rate"))
    recipe.add_argument("--weight-decay", type=float, default=0.05, help="(default: %(default)s)")
    recipe.add_argument("--clip-grad", type=float, metavar="NORM",
                        help="clip the global norm of the gradients to NORM (default: off; Swin clips at 5.0, "
                             "DeiT does not clip)")
    recipe.add_argument("--warmup", type=float, default=0.05,
                        help="fraction of the steps spent warming up linearly (default: %(default)s)")
    recipe.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=True,
                        help="start every UniNeXt block as the identity: zero the last layer of each residual "
                             "branch (default: %(default)s)")
    recipe.add_argument("--crop", type=int, metavar="PIXELS",
                        help=by_device("crop", "random crop of the image zero-padded by PIXELS on every side, 0 = "
                                               "none (flip only; 32x32 datasets)"))
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
    if args.model != "uninext" and uninext_only and not args.resume:  # resumed: check_config names the change
        raise UsageError(f"{', '.join(uninext_only)}: for --model uninext only; --model {args.model} is a fixed "
                         f"baseline, so drop {'it' if len(uninext_only) == 1 else 'them'}")
    defaults = GPU_DEFAULTS if pick_device(args.device, 0).type == "cuda" else CPU_DEFAULTS  # MPS: a laptop's
    if args.dataset == "imagefolder":
        defaults = {**defaults, "size": "T"}
    for name, value in defaults.items():
        if getattr(args, name) is None and (name != "size" or args.model == "uninext"):
            setattr(args, name, value)
    if args.out is None:
        name = f"{args.mixer}-{args.arch}" if args.model == "uninext" else args.model
        args.out = args.resume or f"runs/{args.dataset}-{name}"
    check_options(args)
    return args


# ----------------------------------------------------------------------------------------------------------
# Data: every dataset gives (uint8 images, labels); 32x32 ones are kept and augmented on the device


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
        mine, g = epoch_batches(self.args, epoch, start, self.num_train, self.rank, self.world)  # (steps, B)
        shifts = torch.randint(0, 2 * self.args.crop + 1, (self.num_train, 2), generator=g).to(self.device)
        flips = (torch.rand(self.num_train, generator=g) < 0.5).to(self.device)
        for ids in mine.to(self.device):
            images = crop_flip(self.train_images[ids], shifts[ids], flips[ids], self.args.crop)
            yield to_model_input(images, self.mean, self.std), self.train_labels[ids]

    def test_batches(self):
        """This process's share of the test set, in batches, without augmentation."""
        mine = torch.arange(self.rank, self.num_test, self.world, device=self.device)
        for ids in mine.split(2 * self.local_batch):
            yield to_model_input(self.test_images[ids], self.mean, self.std), self.test_labels[ids]


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
    """Per step: linear warm-up from lr / warmup_steps to lr (LayerNorm and attention networks stall or
    diverge when they start at full rate), then cosine decay to zero at the last step."""
    total = args.epochs * steps_per_epoch
    warmup = max(1, round(args.warmup * total))
    return SequentialLR(optimizer, [LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup),
                                    CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))],
                        milestones=[warmup])


def build_mixing(args, num_classes):
    """Mixup and/or CutMix from torchvision.transforms.v2, applied to whole batches on the device (one of the
    two per batch when both are on), or None. They return soft (B, num_classes) targets."""
    mixers = [mix(alpha=alpha, num_classes=num_classes)
              for mix, alpha in [(v2.MixUp, args.mixup), (v2.CutMix, args.cutmix)] if alpha]
    return v2.RandomChoice(mixers) if mixers else None


# ----------------------------------------------------------------------------------------------------------
# The loop


def train(args, checkpoint=None):
    """Train (or, with --eval-only, evaluate) as `args` say and return the summary, also saved as
    summary.json. `checkpoint`: the contents of --resume DIR/last.pt, if the caller has read them already."""
    args = resolve(args)
    first = int(os.environ.get("RANK", 0)) == 0  # under torchrun, the first process holds the run folder
    with nullcontext() if args.eval_only else hold_out(args.out, args.resume, args.overwrite, first):
        rank, world, device = start_processes(args)
        try:
            if args.batch_size % world:
                raise UsageError(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
            return run(args, checkpoint, rank, world, device)
        finally:
            if world > 1:
                dist.destroy_process_group()


def run(args, checkpoint, rank, world, device):
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
    if rank:  # the same initial weights everywhere, then each process its own drop-path masks and Mixup draws
        torch.manual_seed(args.seed * 1000 + rank)
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

    # What a checkpoint holds, and where the run stands: the next epoch and step, the metrics so far, the best
    # test accuracy, and the accumulators of an epoch that was stopped half way.
    state = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema)
    progress = {"epoch": 1, "step": 0, "history": [], "log": [], "best": None, "partial": None}
    if checkpoint is not None:
        restore(checkpoint, state, progress, data.steps_per_epoch, rank)
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
    with Tracker(args, out, data, device, rank, world, progress, LOG_EVERY, state) as tracker:
        if rank == 0:
            print(describe_run(args, data, n_params, amp, device, world))
        for epoch in range(progress["epoch"], args.epochs + 1):
            start = tracker.start_epoch(epoch)  # 0, or the step at which a stopped run continues
            for step, (images, labels) in tracker.bar(data.train_batches(epoch, start)):
                targets = labels
                if mixing is not None:
                    images, targets = mixing(images, labels)  # soft targets (B, num_classes)
                with autocast():
                    logits = step_model(images)
                    loss = criterion(logits, targets)
                scaler.scale(loss).backward()
                if args.clip_grad:
                    scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                tracker.update(step, loss, logits, labels, lr)  # every few steps: NaN checks, progress, Ctrl-C

            test_loss = test_acc1 = None
            if epoch == args.epochs or (args.eval_every and epoch % args.eval_every == 0):
                test_loss, test_acc1 = evaluate(judged, data, autocast)
            tracker.end_epoch(epoch, test_loss, test_acc1)  # metrics, last.pt (and best.pt), curves
        return tracker.finish(n_params, amp)


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


def read_checkpoint(path):
    """A run's last.pt or best.pt, checked against this script's options."""
    return train_helpers.read_checkpoint(path, vars(resolve(build_parser().parse_args(["--device", "cpu"]))))


def main(argv=None):
    """The command line. With --resume DIR, the options stored in DIR are the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    talk = int(os.environ.get("RANK", 0)) == 0  # under torchrun, only the first process prints errors
    try:
        checkpoint = None
        if args.resume is not None:
            checkpoint = read_checkpoint(run_folder("--resume", args.resume) / "last.pt")
            stored = {k: v for k, v in checkpoint["config"].items() if k not in ("resume", "out")}
            args = parser.parse_args(argv, namespace=argparse.Namespace(**stored))  # argv overrides stored
        return train(args, checkpoint)
    except (UsageError, Diverged) as e:
        parser.exit(2 if isinstance(e, UsageError) else 3, f"{parser.prog}: error: {e}\n" if talk else None)
    except KeyboardInterrupt as e:
        parser.exit(130, f"\n{str(e) or 'stopped by Ctrl-C'}\n" if talk else None)


if __name__ == "__main__":
    main()

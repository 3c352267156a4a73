"""Where the time of one UniNeXt block (or the whole network) goes, and whether its convolutions copy.

    python experiments/benchmarks/profile_block.py            # UniNeXt-T window, first block of stage 1 at 224,
                                                              # batch 2, CPU, fp32: a few seconds on 2 cores
    python experiments/benchmarks/profile_block.py --device cuda --batch 128 --out window_block.txt  # bf16 autocast
    python experiments/benchmarks/profile_block.py --scope model --device cuda --batch 128

What runs: `--steps` training passes of the first block of stage `--stage`, on the (B, H, W, C) map that the
stem and the earlier stages really produce from random images, after `--warmup` untimed passes: forward, then
backward from a random gradient laid out like the output, as the next block would send it (the gradient of a
`.sum()` would be a stride-0 tensor, which convolutions copy). With `--scope model`, the same for the whole
network on channels_last images. torch.profiler records every op; the table is sorted by self time (self
device time on a GPU).

The layout check tests what uninext.py promises, that convolutions run on channels_last views with no copies:
  - a forward hook on every `uninext.Conv` records whether its NCHW input is a channels_last view and whether
    its output is channels_last (so that the permute back to (B, H, W, C) is a view too);
  - every aten::copy_, aten::contiguous and aten::clone the profiler saw is listed with the ops it ran inside
    (its parents in the profiler's op tree, innermost first), with its count and self time (device time on a
    GPU), so that a copy made by or for a convolution, forward or backward, shows up as such; so do autocast's
    casts (`copy_` inside `_to_copy <- to`).
"""

import argparse
import collections
import os
import sys
from datetime import datetime, timezone
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import uninext  # noqa: E402

COPY_OPS = ("aten::copy_", "aten::contiguous", "aten::clone")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixer", default="window", choices=list(uninext.MIXERS))
    parser.add_argument("--arch", default="uninext", choices=list(uninext.ARCHS))
    parser.add_argument("--size", default="T", choices=list(uninext.PRESETS))
    parser.add_argument("--img-size", type=int, help="default: the preset's own")
    parser.add_argument("--scope", default="block", choices=["block", "model"])
    parser.add_argument("--stage", type=int, default=0, choices=range(4), help="the block's stage, 0-based")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: its own choice)")
    parser.add_argument("--rows", type=int, default=25, help="ops shown in the table")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.img_size is None:
        args.img_size = uninext.PRESETS[args.size].get("img_size", uninext.Config.img_size)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def conv_layout_hooks(module, seen):
    """Record, for every uninext.Conv under `module`, (channels_last input view?, channels_last output?)."""
    def hook(conv, inputs, output):
        nchw = inputs[0].permute(0, 3, 1, 2)  # what Conv.forward hands to nn.Conv2d
        seen[conv.name] = (nchw.is_contiguous(memory_format=torch.channels_last),
                           output.permute(0, 3, 1, 2).is_contiguous(memory_format=torch.channels_last))
    handles = []
    for name, sub in module.named_modules():
        if isinstance(sub, uninext.Conv):
            sub.name = name
            handles.append(sub.register_forward_hook(hook))
    return handles


def copy_report(events, time_attr):
    """Group the copy-like events by the chain of ops they ran inside; `time_attr` is the event's self time
    to add up (CPU, or on a GPU the device time of the kernels it launched)."""
    groups = collections.defaultdict(lambda: [0, 0.0])
    for event in events:
        if event.name not in COPY_OPS:
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None and len(chain) < 3:
            chain.append(parent.name)
            parent = parent.cpu_parent
        key = (event.name, " <- ".join(chain) or "(top level)")
        groups[key][0] += 1
        groups[key][1] += getattr(event, time_attr)
    return sorted(groups.items(), key=lambda item: -item[1][1])


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    num_classes = 100 if args.img_size == 32 else 1000  # CIFAR-100 or ImageNet, as bench.py
    model = uninext.create_model(args.size, args.mixer, arch=args.arch, num_classes=num_classes).to(device)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)

    if args.scope == "block":
        with torch.no_grad(), autocast:
            x = model.stem(images.permute(0, 2, 3, 1))  # (B, H/4, W/4, C)
            for stage in model.stages[:args.stage]:
                x = stage(x)
            x = model.stages[args.stage].downsample(x)  # (B, H_i, W_i, C_i), the block's real input
        x = x.float().requires_grad_()
        target = model.stages[args.stage].blocks[0]
        where = f"stages.{args.stage}.blocks.0 on {tuple(x.shape)} (B, H, W, C)"
    else:
        x, target, where = images, model, f"the whole network on {tuple(images.shape)} images"

    with autocast:
        grad = torch.randn_like(target(x))  # an upstream gradient in the output's own (contiguous) layout

    def step():
        with autocast:
            out = target(x)
        out.backward(grad)

    layouts = {}
    handles = conv_layout_hooks(target, layouts)
    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    for handle in handles:
        handle.remove()

    averages = prof.key_averages()
    lines = [
        f"{args.arch} {args.mixer} {args.size} at {args.img_size}x{args.img_size}: {where}, batch {args.batch}, "
        f"{device.type}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; {args.steps} profiled forward+backward passes after {args.warmup} warm-up; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()[0]:.2f}",
        "command: " + " ".join(["python"] + sys.argv),
        averages.table(sort_by="self_device_time_total" if device.type == "cuda" else "self_cpu_time_total",
                       row_limit=args.rows),
        "Convolutions (channels_last input view, channels_last output):",
    ]
    lines += [f"  {name or '(root)'}: input {'view' if i else 'NOT channels_last'}, "
              f"output {'channels_last' if o else 'NOT channels_last'}" for name, (i, o) in layouts.items()]
    time_attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    copies = copy_report(prof.events(), time_attr)
    total = sum(getattr(e, time_attr) for e in averages)
    copied = sum(t for _, (_, t) in copies)
    lines.append(f"Copy-like ops ({', '.join(COPY_OPS)}): {sum(n for _, (n, _) in copies)} calls, {copied / 1e3:.2f} "
                 f"ms of {total / 1e3:.2f} ms {time_attr.replace('_', ' ')} ({copied / max(total, 1e-9):.1%})")
    lines += [f"  {n:4d} x {name:<17} {t / 1e3:8.2f} ms  inside {chain}" for (name, chain), (n, t) in copies]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()

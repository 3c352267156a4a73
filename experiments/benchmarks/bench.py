"""Training and inference speed of UniNeXt for every mixer, eager and compiled, at the setting of the anchors
in anchors.json (the authors' code and timm on one NVIDIA H200) or at any other.

    python experiments/benchmarks/bench.py --quick                                 # CPU smoke run, under a minute
    python experiments/benchmarks/bench.py --size T --mixers window cswin conv pool pvt  # the anchors' eager rows
    python experiments/benchmarks/bench.py --size T --mixers window --compile off block --json t_window.json
    python experiments/benchmarks/bench.py --size T32 --arch uninext vanilla --batch 32 --device cpu

One row per (architecture, mixer, compile mode), on random 3 x S x S images in channels_last memory (so
that the model's first permute to (B, H, W, C) is free) and random labels (1000 classes at 224x224 presets,
100 at 32x32):

    train img/s   batch / median time of one training step: forward, cross-entropy, backward, AdamW step,
                  zero_grad. `train_wall` is the same over the wall-clock time of all timed steps together.
    infer img/s   infer batch / median time of one forward pass, model.eval() under torch.no_grad().
    peak GiB      torch.cuda.max_memory_allocated over the training run, warm-up included (the inference
                  peak is kept in the JSON too). None on the CPU, where PyTorch's allocator keeps no peak
                  and the process's max RSS mixes every row that ran before.
    compile s     (sum of the warm-up step times) - warm-up x (median timed step): what the first steps cost
                  beyond steady state. In a compiled row that is the compilation (train and infer are
                  compiled separately, since eval mode compiles its own graphs); in an eager row it is the
                  small first-call overhead. Warm-up must cover every first call (default 5 steps).
    GFLOP/img     FlopCounterMode's total for forward + backward of a batch of 2, divided by 2, with the
                  backward of a grouped conv counted right (`conv_backward_flops`). On a GPU it is
                  counted on the GPU under autocast, where the counter knows SDPA's kernels (its backward
                  formula includes the recomputation of the scores, one more matmul than autograd's); on the
                  CPU, where it gives SDPA 0 FLOPs, it is counted on the manual path (`record_attention`).
    MFU           GFLOP/img x train img/s / peak matmul rate: 790 TFLOP/s, the bf16 dense matmul rate
                  measured on H100 and H200 cards (anchors.json; --peak-tflops for another card). GPU only.
    img/CPU-s     CPU only, in the JSON: batch / median process CPU time of a step (all threads together).
                  With --threads 1 it is what one idle core would do, whatever else the machine runs; where
                  it is well above img/s, other jobs took the core away during the measurement.

Timing: every step of the warm-up is synchronised and wall-clocked. The timed steps on a GPU are bracketed by
CUDA events read after one synchronisation at the end (so timing does not drain the launch queue between
steps); on the CPU each step is wall-clocked. Precision: bf16 autocast on a GPU (with TF32 for what stays in
fp32, and cudnn.benchmark, since the shapes never change), fp32 on the CPU. AdamW is the fused kernel. On a
CPU that other jobs share, pass --threads 1: OpenMP threads that wait for a core another process holds can
make a step many times slower (NOTES.md, hazard 3); the JSON keeps the load average before and after.

Compile modes: `off` is eager; `block` is regional compilation, each `uninext.Block` compiled on its own with
`Module.compile(fullgraph=True, dynamic=False)`: one graph per distinct block (stage shape, shift, train or
eval), which the raised recompile limit allows and the fail-on-limit switch turns from a silent eager
fallback into an error; `model` compiles the whole network. Dynamo is reset between rows and Inductor's
caches are off, so every compile time is a cold one, as a user's first run on a fresh machine. These three
settings have other names in older torch releases; `configure_compiler` sets the ones this torch has and
the JSON says which (`compiler_settings`).

Prints a table; --json writes it with everything needed to say what produced it (command, date, commit,
torch, device, threads, load average), rewritten after every row, so that a run stopped half way (a time
limit, a crash) leaves the rows that finished (`rows_planned` says how many were meant). A row that fails
(for example out of memory) is kept with its error, the others still run, and the exit status is 1.
"""

import argparse
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import uninext  # noqa: E402

COMPILE_MODES = ("off", "block", "model")
RECOMPILE_LIMIT = 64  # T's blocks: 4 stage shapes x (train, eval), x2 for swin's shifts; 24 blocks x 2 where
# each block instance compiles its own graphs (older torch releases, which did not inline nn.Modules)
QUICK = dict(size="N32", img_size=32, batch=8, infer_batch=16, steps=3, warmup=1, threads=1)  # what --quick sets


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", nargs="+", default=list(uninext.MIXERS), choices=list(uninext.MIXERS))
    parser.add_argument("--arch", nargs="+", default=["uninext"], choices=list(uninext.ARCHS))
    parser.add_argument("--size", choices=list(uninext.PRESETS), help="preset (default T; N32 with --quick)")
    parser.add_argument("--img-size", type=int, help="image height and width (default: the preset's own)")
    parser.add_argument("--num-classes", type=int, help="default: 1000 at 224x224 presets, 100 (CIFAR-100) at 32x32")
    parser.add_argument("--batch", type=int, help="training batch (default 128)")
    parser.add_argument("--infer-batch", type=int, help="inference batch (default 2 x --batch)")
    parser.add_argument("--steps", type=int, help="timed steps, of which the median counts (default 15)")
    parser.add_argument("--warmup", type=int, help="untimed first steps, compilation included (default 5)")
    parser.add_argument("--compile", nargs="+", choices=COMPILE_MODES, dest="compile_modes",
                        help="compile modes to run, one row each (default: off block on a GPU, off on the CPU)")
    parser.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                        help="torch.compile backend; aot_eager traces forward and backward as inductor does but "
                             "generates no code, eager runs dynamo's graphs as they are: fast checks of the "
                             "compiled path on the CPU (default inductor)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: its own choice)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (and so MFU)")
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="the card's bf16 matmul rate, for MFU (default: 790, measured on H100 and H200 cards)")
    parser.add_argument("--json", type=Path, help="write the rows and how they were produced here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()) + " unless given")
    args = parser.parse_args(argv)

    defaults = QUICK if args.quick else dict(size="T", batch=128, steps=15, warmup=5)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.img_size is None:
        args.img_size = uninext.PRESETS[args.size].get("img_size", uninext.Config.img_size)
    if args.num_classes is None:
        args.num_classes = 100 if uninext.PRESETS[args.size].get("img_size", uninext.Config.img_size) == 32 else 1000
    if args.infer_batch is None:
        args.infer_batch = 2 * args.batch
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compile_modes is None:
        args.compile_modes = ["off", "block"] if args.device == "cuda" else ["off"]
    counts = {"--batch": args.batch, "--infer-batch": args.infer_batch, "--steps": args.steps,
              "--img-size": args.img_size, "--num-classes": args.num_classes, "--threads": args.threads or 1}
    problems = [f"{flag} must be at least 1" for flag, value in counts.items() if value < 1]
    problems += ["--warmup must be 0 or more"] if args.warmup < 0 else []
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no GPU here; use --device cpu")
    if args.json:  # found out now, not after every row was measured
        place = args.json.absolute().parent
        while not place.exists():
            place = place.parent
        if args.json.is_dir() or not (place.is_dir() and os.access(place, os.W_OK | os.X_OK)):
            problems.append(f"--json {args.json}: cannot write there")
    if problems:
        parser.error("; ".join(problems))
    return args


def configure_compiler():
    """Raise the recompile limit to RECOMPILE_LIMIT, make hitting it an error instead of a silent fall-back
    to eager, and turn the compile caches off, under whichever name this torch has. torch 2.7 renamed
    `cache_size_limit` and `fail_on_cache_limit_hit` to `recompile_limit` and `fail_on_recompile_limit_hit`
    (pytorch/pytorch PR 143709, which kept the old names as aliases); `force_disable_caches` lives in
    `torch._inductor.config` since before 2.4 and also in `torch.compiler.config` in recent releases.
    Returns {setting: the name that was set, or None where this torch has neither}."""
    dynamo = importlib.import_module("torch._dynamo.config")
    inductor = importlib.import_module("torch._inductor.config")
    try:
        compiler = importlib.import_module("torch.compiler.config")
    except ImportError:
        compiler = None
    places = {  # setting: (value, where it may be, newest name first)
        "recompile_limit": (RECOMPILE_LIMIT, [(dynamo, "recompile_limit"), (dynamo, "cache_size_limit")]),
        "fail_on_recompile_limit_hit": (True, [(dynamo, "fail_on_recompile_limit_hit"),
                                               (dynamo, "fail_on_cache_limit_hit")]),
        "force_disable_caches": (True, [(compiler, "force_disable_caches"), (inductor, "force_disable_caches")]),
    }
    chosen = {}
    for setting, (value, candidates) in places.items():
        found = [(module, name) for module, name in candidates if module is not None and hasattr(module, name)]
        if found:
            setattr(*found[0], value)
        chosen[setting] = f"{found[0][0].__name__}.{found[0][1]}" if found else None
    return chosen


def compile_in_place(model, mode, backend):
    """Regional ("block") or whole-model compilation; both keep the module tree and its parameter names."""
    options = dict(backend=backend, fullgraph=True, dynamic=False)
    if mode == "block":
        for module in model.modules():
            if isinstance(module, uninext.Block):
                module.compile(**options)
    elif mode == "model":
        model.compile(**options)


def images(batch, img_size, device):
    return torch.randn(batch, 3, img_size, img_size, device=device).contiguous(memory_format=torch.channels_last)


def autocast(device):
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(row, kind, step_fn, batch, args, device):
    """Time step_fn and record, under `kind`_..., images/s (median step and wall clock), the step times, the
    compile time (warm-up minus as many median steps), images per CPU-second and peak GPU memory."""
    warm, timed, wall, cpu = time_steps(step_fn, args.warmup, args.steps, device)
    step = statistics.median(timed)
    row.update({f"{kind}_img_s": batch / step, f"{kind}_wall_img_s": batch * args.steps / wall,
                f"{kind}_step_ms": [1e3 * t for t in timed], f"{kind}_compile_s": sum(warm) - len(warm) * step})
    if cpu:
        row[f"{kind}_img_per_cpu_s"] = batch / statistics.median(cpu)
    row[f"{kind}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def time_steps(step, warmup, steps, device):
    """Run `step` warmup + steps times. Returns the seconds of each warm-up step, of each timed step, of all
    timed steps together (wall clock), and on the CPU the process CPU seconds of each timed step."""
    warm = []
    for _ in range(warmup):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        warm.append(time.perf_counter() - t0)
    sync(device)
    t0 = time.perf_counter()
    timed, cpu = [], []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        timed = [start.elapsed_time(end) / 1e3 for start, end in events]  # elapsed_time is in ms
    else:
        for _ in range(steps):
            t1, c1 = time.perf_counter(), time.process_time()
            step()
            timed.append(time.perf_counter() - t1)
            cpu.append(time.process_time() - c1)
    return warm, timed, time.perf_counter() - t0, cpu


def conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape=None):
    """FLOPs of aten.convolution_backward: each gradient asked for (input, weight) costs what the forward
    does. PyTorch's own formula (2.14) drops `groups` from both, which charges a depthwise conv's backward
    C/2 times too much (65x its forward for 64 channels instead of 2x; see pytorch/pytorch PR 183405)."""
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def flops_per_image(model, img_size, device):
    """(forward, forward + backward) FLOPs per image, counted as the module docstring says."""
    batch = 2
    x, labels = images(batch, img_size, device), torch.zeros(batch, dtype=torch.long, device=device)
    record = uninext.record_attention(model) if device.type == "cpu" else nullcontext()
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
    with record, FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        with autocast(device):
            loss = F.cross_entropy(model(x), labels)
        forward = counter.get_total_flops()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return forward / batch, counter.get_total_flops() / batch


def run_row(args, mixer, arch, mode, device):
    torch.manual_seed(0)
    model = uninext.create_model(args.size, mixer, arch=arch, num_classes=args.num_classes).to(device)
    row = dict(arch=arch, mixer=mixer, compile=mode, params=sum(p.numel() for p in model.parameters()))
    if not args.no_flops:
        row["flops_fwd"], row["flops_train"] = flops_per_image(model, args.img_size, device)
    compile_in_place(model, mode, args.backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    x = images(args.batch, args.img_size, device)
    labels = torch.randint(0, model.cfg.num_classes, (args.batch,), device=device)

    def train_step():
        with autocast(device):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    measure(row, "train", train_step, args.batch, args, device)

    del optimizer, x, labels
    xi = images(args.infer_batch, args.img_size, device)

    def infer_step():
        with torch.no_grad(), autocast(device):
            model(xi)

    model.eval()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    measure(row, "infer", infer_step, args.infer_batch, args, device)
    if device.type == "cuda" and "flops_train" in row:
        row["mfu"] = row["flops_train"] * row["train_img_s"] / (args.peak_tflops * 1e12)
    return row


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} logical CPUs"


def source_version():
    """The commit, and whether uninext.py differs from it: the numbers belong to the code that ran."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "uninext.py"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted changes to uninext.py" if dirty else "")


def fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def table(rows):
    columns = [("arch", "arch", "<8"), ("mixer", "mixer", "<8"), ("compile", "compile", "<7"),
               ("params M", "params", ",.2f"), ("train img/s", "train_img_s", ",.1f"),
               ("infer img/s", "infer_img_s", ",.1f"), ("peak GiB", "train_peak_gib", ".2f"),
               ("compile s", "train_compile_s", ".1f"), ("GFLOP/img", "flops_train", ".3f"), ("MFU", "mfu", ".1%")]
    scale = {"params": 1e-6, "flops_train": 1e-9}
    lines = []
    for row in rows:
        cells = []
        for _, key, spec in columns:
            value = row.get(key)
            cells.append(fmt(value * scale[key] if key in scale and value is not None else value, spec))
        if "error" in row:
            cells[3:] = [f"ERROR {row['error']}"]
        lines.append(cells)
    header = [name for name, _, _ in columns]
    widths = [max(len(c) for c in col) for col in zip(header, *lines)]
    out = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
           for cells in [header] + lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def write_json(path, meta, rows):
    """Through a temporary file, so that a process killed while writing never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    os.replace(part, path)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    settings = configure_compiler()  # every compile from scratch, as on a fresh machine; no silent fall-back

    meta = dict(
        command=" ".join([Path(sys.executable).name] + sys.argv) if argv is None else "bench.main(" + repr(argv) + ")",
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), code=source_version(), torch=torch.__version__,
        python=platform.python_version(), device=device_name(device), threads=torch.get_num_threads(),
        precision="bf16 autocast" if device.type == "cuda" else "fp32", size=args.size, img_size=args.img_size,
        num_classes=args.num_classes,
        batch=args.batch, infer_batch=args.infer_batch, steps=args.steps, warmup=args.warmup,
        backend=args.backend, compiler_settings=settings,
        peak_tflops=args.peak_tflops if device.type == "cuda" else None, loadavg_before=os.getloadavg(),
        rows_planned=len(args.arch) * len(args.mixers) * len(args.compile_modes),
    )
    print(f"{meta['device']} | torch {meta['torch']} | {meta['precision']} | {args.size} at {args.img_size}x"
          f"{args.img_size}, batch {args.batch} train / {args.infer_batch} infer | median of {args.steps} steps "
          f"after {args.warmup} | load average {' '.join(f'{v:.2f}' for v in meta['loadavg_before'])}",
          flush=True)
    if any(mode != "off" for mode in args.compile_modes):
        print("compiler settings: " + ", ".join(f"{setting} as {name}" if name else f"{setting}: not in this torch"
                                                for setting, name in settings.items()), flush=True)

    rows = []
    for arch in args.arch:
        for mixer in args.mixers:
            for mode in args.compile_modes:
                torch._dynamo.reset()
                try:
                    row = run_row(args, mixer, arch, mode, device)
                except Exception as error:  # keep going: one failed row must not lose the others
                    traceback.print_exc()
                    row = dict(arch=arch, mixer=mixer, compile=mode, error=f"{type(error).__name__}: {error}"[:200])
                rows.append(row)
                if args.json:
                    meta["loadavg_after"] = os.getloadavg()
                    write_json(args.json, meta, rows)
                print(f"  {arch} {mixer} {mode}: " + (row.get("error") or
                      f"train {row['train_img_s']:,.1f} img/s, infer {row['infer_img_s']:,.1f} img/s"), flush=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    print(table(rows))
    if args.json:
        print(f"wrote {args.json}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

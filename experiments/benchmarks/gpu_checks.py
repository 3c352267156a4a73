"""The checks that gpu_check.sh runs before it measures anything, a few seconds each.

    python3 experiments/benchmarks/gpu_checks.py preflight    # is this machine fit for the run?
    python3 experiments/benchmarks/gpu_checks.py kernels      # UniNeXt-T at 224x224 on the GPU
    python3 experiments/benchmarks/gpu_checks.py kernels --device cpu --size N32 --batch 2   # the same code on a CPU

preflight   Prints one line (card, compute capability, memory, torch, CUDA) and exits 0. It stops, with one
            line and exit status 1, when torch is missing, when torch sees no CUDA device, or when the card
            has no native bf16 (compute capability below 8.0: T4, V100), since every row of bench.py is bf16
            autocast, which such a card only emulates. On another card with native bf16 (A100, L4, ...) it
            warns and exits 0: the rows are sound, but the anchors (anchors.json) are H200 figures, so
            compare ratios only.

kernels     Two checks of what the compiled bf16 rows rely on, each printing what it found; exit status 1 if
            either fails.
  fused attention  A forward and backward pass of UniNeXt-window under autocast with SDPA restricted to its
            flash kernel (`torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)`), which raises if
            any attention call cannot take it: UniNeXt's window path passes no mask, so every call should.
            bf16 on a card that has it; on one without (compute capability below 8.0, where the flash kernel
            does not run) the memory-efficient kernel in fp16, which is what train_minimal.py gets there; on
            a CPU fp32. Then the same pass with SDPA free to choose, under torch.profiler: which SDPA
            implementations ran and how often (the unfused math fallback counts as a failure).
  recompile count  Every block compiled on its own, as bench.py's `--compile block` does and with its
            compiler settings (`bench.configure_compiler`), through a backend that only counts the graphs
            that dynamo hands it; then one training step and one inference pass. It prints how many graphs
            the blocks needed across the stage shapes x train/eval x shifted or not (window: never shifted;
            swin: every second block) against the recompile limit in force. Past that limit regional
            compilation falls back to eager; bench.py makes that an error where this torch can.
"""

import argparse
import collections
import contextlib
import sys
from datetime import datetime, timezone
from pathlib import Path

try:
    import torch
except ImportError as error:  # the preflight's first question, answered in one line
    sys.exit(f"gpu_check: stopped before any step: {sys.executable} cannot import torch ({error})")
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (bench puts uninext.py's folder on the path)
import uninext  # noqa: E402

ANCHOR_CARDS = ("H100", "H200")  # the anchors' card, and the one with the same compute


def preflight():
    python = f"{sys.executable}, torch {torch.__version__}"
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        sys.exit(f"gpu_check: stopped before any step: {python} ({build}) sees no CUDA device; on a machine "
                 f"without a GPU, --tiny runs every step")
    name, (major, minor) = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    card = f"{name}, compute capability {major}.{minor}, {memory:.0f} GiB"
    if major < 8:
        sys.exit(f"gpu_check: stopped before any step: the card is {card}, without native bf16, and every row "
                 f"is bf16 autocast; the run is made for an H100 or H200")
    print(f"preflight: {card}; {python}, CUDA {torch.version.cuda}")
    if not any(anchor in name for anchor in ANCHOR_CARDS):
        print(f"gpu_check: warning: the card is {name}, not an H100 or H200 (the anchors were measured on an "
              f"H200): the rows stand, but set them beside the anchors as ratios only")


def amp(device):
    """(autocast dtype or None, the SDPA kernel a whole forward and backward must get)."""
    if device.type == "cpu":
        return None, SDPBackend.FLASH_ATTENTION  # PyTorch has a flash kernel for the CPU too, in fp32
    if torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16, SDPBackend.FLASH_ATTENTION
    return torch.float16, SDPBackend.EFFICIENT_ATTENTION  # T4, V100: no flash kernel below compute capability 8.0


def train_and_infer(model, x, dtype):
    """One forward and backward pass in training mode, then one forward pass in eval mode without gradients."""
    autocast = torch.autocast(x.device.type, dtype) if dtype else contextlib.nullcontext()
    model.train()
    with autocast:
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    model.eval()
    with torch.no_grad(), autocast:
        model(x)


def fused_attention(args, device):
    dtype, kernel = amp(device)
    torch.manual_seed(0)
    model = uninext.create_model(args.size, "window").to(device)
    x = bench.images(args.batch, args.img_size, device)
    what = (f"fused attention: UniNeXt-{args.size} window at {args.img_size}x{args.img_size}, batch {args.batch}, "
            f"{str(dtype).replace('torch.', '') if dtype else 'fp32'}")
    try:
        with sdpa_kernel(kernel):
            train_and_infer(model, x, dtype)
    except RuntimeError as error:
        print(f"{what}: FAILED, SDPA restricted to {kernel.name} raised: {str(error).splitlines()[0]}")
        return False
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_and_infer(model, x, dtype)
    ran = collections.Counter({event.key: event.count for event in prof.key_averages()
                               if event.key.startswith("aten::_") and "attention" in event.key})
    fused = bool(ran) and not any("math" in key for key in ran)
    print(f"{what}: forward + backward + eval forward ran with SDPA restricted to {kernel.name}; left to choose, "
          f"SDPA ran " + (", ".join(f"{key} x {n}" for key, n in sorted(ran.items())) or "nothing")
          + ("" if fused else ": FAILED, not fused"))
    return fused


def recompile_count(args, device, mixer, limit):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = uninext.create_model(args.size, mixer).to(device)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward  # run the traced graph as it is: only the count matters here

    bench.compile_in_place(model, "block", counting_backend)
    blocks = [(i, getattr(block.mixer, "shift", 0)) for i, stage in enumerate(model.stages) for block in stage.blocks]
    variants = len(set(blocks))  # (stage, shift) pairs: the blocks that can share a graph
    what = f"recompile count: UniNeXt-{args.size} {mixer}, {len(blocks)} blocks compiled one by one"
    try:
        train_and_infer(model, bench.images(args.batch, args.img_size, device), amp(device)[0])
    except Exception as error:  # the limit hit (where torch can make it an error), or a graph break
        print(f"{what}: FAILED, {type(error).__name__}: {str(error).splitlines()[0]}")
        return False
    ok = 0 < len(graphs) and (limit is None or len(graphs) < limit)
    print(f"{what}: {len(graphs)} graphs, for {variants} distinct (stage, shift) settings x train/eval (at most "
          f"{2 * variants} where the blocks of one setting share their graphs); recompile limit "
          f"{limit or 'unknown (this torch has no name for it)'}"
          + ("" if ok else ": FAILED, the limit was reached (or nothing compiled)"))
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["preflight", "kernels"])
    parser.add_argument("--size", default="T", choices=list(uninext.PRESETS))
    parser.add_argument("--img-size", type=int, help="default: the preset's own")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mixers", nargs="+", default=["window", "swin"], choices=list(uninext.MIXERS),
                        help="mixers for the recompile count (default: window, and swin for the shifts)")
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: its own choice)")
    args = parser.parse_args(argv)
    if args.check == "preflight":
        return preflight()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here; use --device cpu")
    if args.img_size is None:
        args.img_size = uninext.PRESETS[args.size].get("img_size", uninext.Config.img_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = bench.configure_compiler()
    limit = bench.RECOMPILE_LIMIT if settings["recompile_limit"] else None
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; code {bench.source_version()}; `"
          + " ".join([Path(sys.executable).name] + sys.argv) + "`", flush=True)
    print(f"torch {torch.__version__}, {bench.device_name(device)}, {torch.get_num_threads()} threads; compiler "
          "settings: " + ", ".join(f"{setting} as {name}" if name else f"{setting}: not in this torch"
                      for setting, name in settings.items()), flush=True)
    passed = [fused_attention(args, device)]
    passed += [recompile_count(args, device, mixer, limit) for mixer in args.mixers]
    return 0 if all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())

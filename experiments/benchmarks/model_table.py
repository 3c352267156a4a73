"""Parameters and GMACs of every mixer x size x architecture, as a Markdown table (the model table of
experiments/README.md).

    python experiments/benchmarks/model_table.py                # all presets: 86 CPU-seconds on one thread
    python experiments/benchmarks/model_table.py --sizes T T32     # (2-core AMD EPYC, PyTorch 2.14.1, 2026-12-02)

GMACs are FlopCounterMode's total / 2 for one image at the preset's own size (224x224 for T/S/B, 32x32 for
T32/N32), 1000 classes at 224 and 100 at 32, counted on the manual attention path so that the two attention
matmuls are included (on the CPU the counter gives scaled_dot_product_attention 0 FLOPs).
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import uninext  # noqa: E402


def params_and_gmacs(size, mixer, arch):
    img = uninext.PRESETS[size].get("img_size", 224)
    model = uninext.create_model(size, mixer, arch=arch, num_classes=1000 if img == 224 else 100).eval()
    with torch.no_grad(), uninext.record_attention(model), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, img, img))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 2e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(uninext.PRESETS), choices=list(uninext.PRESETS))
    parser.add_argument("--mixers", nargs="+", default=list(uninext.MIXERS), choices=list(uninext.MIXERS))
    args = parser.parse_args(argv)

    rows = [(m, a) for m in args.mixers for a in uninext.ARCHS]
    cells = {}
    for (mixer, arch), size in tqdm([(r, s) for r in rows for s in args.sizes], desc="counting", leave=False):
        cells[mixer, arch, size] = params_and_gmacs(size, mixer, arch)

    header = "| mixer | arch | " + " | ".join(f"{s} params | {s} GMACs" for s in args.sizes) + " |"
    print(header)
    print("|" + "---|" * (2 + 2 * len(args.sizes)))
    for mixer, arch in rows:
        values = " | ".join(f"{cells[mixer, arch, s][0] / 1e6:.2f}M | {cells[mixer, arch, s][1]:.3f}" for s in args.sizes)
        print(f"| {mixer} | {arch} | {values} |")


if __name__ == "__main__":
    main()

"""The Markdown speed tables, from the JSON files that bench.py writes.

    cd experiments/benchmarks && python speed_table.py results/T_eager.json results/T_window_block.json

Rows measured at the anchors' setting (UniNeXt-T at 224x224, training batch 128, inference batch 256, bf16
autocast) are set beside the anchors of `anchors.json`: the authors' code (github.com/jianlong-yuan/UniNeXt,
commit 413ff717f322) on one NVIDIA H200 with PyTorch 2.11, figures quoted from one run whose log is not in
this repository (the file says so). Compare only when the device line above the table says H200 too. Rows
at 32x32 get the time of one 50,000-image epoch (CIFAR's training set) at the measured training rate. A file
that bench.py left half way (stopped by a time limit) says how many of its rows it holds; a file that is not
there gets a line that says so (exit status 1 when none is there).
"""

import argparse
import json
import sys
from pathlib import Path

ANCHORS = json.loads(Path(__file__).with_name("anchors.json").read_text())
# The authors' rows by (mixer, "eager" or "compiled"): the ones this repository's rows are set beside.
AUTHORS = {(row["mixer"], row["mode"]): row for row in ANCHORS["rows"] if row["code"] == "authors"}
MODE_NAMES = {"off": "eager", "block": "compiled per block", "model": "compiled whole"}


def at_anchor_setting(meta):
    return (meta["size"], meta["img_size"], meta["batch"], meta["infer_batch"]) == ("T", 224, 128, 256) \
        and meta["precision"] == "bf16 autocast"


def num(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(result):
    meta, rows = result["meta"], result["rows"]
    anchors = at_anchor_setting(meta)
    small = meta["img_size"] == 32
    compiled = any(row["compile"] != "off" for row in rows)
    lines = [f"{meta['device']}, torch {meta['torch']}, {meta['precision']}, {meta['threads']} threads"
             f"{', ' + meta['backend'] + ' backend' if compiled else ''}; "
             f"{meta['size']} at {meta['img_size']}x{meta['img_size']}, batch {meta['batch']} train / "
             f"{meta['infer_batch']} infer, median of {meta['steps']} steps after {meta['warmup']}; {meta['date']}; "
             f"code {meta.get('code', 'unknown')}; "
             f"`{meta['command']}`", ""]
    if len(rows) < meta.get("rows_planned", len(rows)):
        lines[0] += f"; stopped after {len(rows)} of its {meta['rows_planned']} rows"
    header = ["arch", "mixer", "mode", "train img/s", "infer img/s", "peak GiB", "compile s", "MFU"]
    header += ["authors' train / infer img/s", "train speed-up"] if anchors else []
    header += ["50k-image epoch s"] if small else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['arch']} | {row['mixer']} | {MODE_NAMES[row['compile']]} | "
                         f"error: {row['error']} |" + " |" * (len(header) - 4))
            continue
        cells = [row["arch"], row["mixer"], MODE_NAMES[row["compile"]], num(row["train_img_s"], ",.0f"),
                 num(row["infer_img_s"], ",.0f"), num(row.get("train_peak_gib"), ".1f"),
                 num(row["train_compile_s"], ".0f") if row["compile"] != "off" else "-", num(row.get("mfu"), ".1%")]
        if anchors:
            authors = AUTHORS.get((row["mixer"], "eager" if row["compile"] == "off" else "compiled"))
            cells += [f"{authors['train_img_s']:,} / {authors['infer_img_s']:,}",
                      f"{row['train_img_s'] / authors['train_img_s']:.2f}x"] if authors else ["-", "-"]
        if small:
            cells.append(f"{50_000 / row['train_img_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    found = [path for path in args.files if path.exists()]
    print("\n\n".join(markdown(json.loads(path.read_text())) if path in found
                       else f"`{path}`: not written (its run finished no row)" for path in args.files))
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())

"""Display and plotting functions that the notebooks import, so that their cells show the model and the
numbers rather than matplotlib plumbing. Each section belongs to one notebook; nothing here changes what
the model computes."""

import base64
import inspect
import io
import itertools
import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display
from matplotlib import patheffects
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm, TwoSlopeNorm
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, ConnectionPatch, FancyArrowPatch, FancyBboxPatch, Patch, Rectangle
from matplotlib.ticker import ScalarFormatter

import uninext

# 01_tour

# Okabe-Ito colours, and greys. Vanilla is always orange and UniNeXt always blue; the ingredients, the image
# sizes and the receptive-field outlines use colours that are neither.
ARCH_COLOUR = {"vanilla": "#E69F00", "uninext": "#0072B2"}
ARCH_NAME = {"vanilla": "vanilla", "uninext": "UniNeXt"}  # as the text writes them
INGREDIENT_COLOUR = {"conv_stem": "#009E73", "ec": "#CC79A7", "hdc": "#F0E442", "pc": "#999999"}
INGREDIENT_LABEL = {"conv_stem": "conv stem", "ec": "EC (Embedded Conv.)", "hdc": "HdC (High-dim. Conv.)",
                    "pc": "PC (Post Conv.)"}
SHARED = "#555555"  # what both architectures have


def show_source(obj, only=None, through=None):
    """Print the source of `obj` (a class or function of uninext.py) with its line numbers in the file, read
    by `inspect` from the file itself; with `only`, just the lines that contain that text; with `through`
    too, from the first line that contains `only` to the first line from there on that contains `through`
    (a statement that spans several lines, shown whole)."""
    lines, start = inspect.getsourcelines(obj)
    numbered = [(start + i, line.rstrip()) for i, line in enumerate(lines)]
    if through is not None:
        first = next(i for i, (_, line) in enumerate(numbered) if only in line)
        last = next(i for i, (_, line) in enumerate(numbered) if i >= first and through in line)
        numbered = numbered[first:last + 1]
    elif only is not None:
        numbered = [(number, line) for number, line in numbered if only in line]
    print(f"# {Path(inspect.getsourcefile(obj)).name}, {obj.__qualname__}")
    for number, line in numbered:
        print(f"{number:4d}  {line}")
    print()


def show_block(module, opening, notes, within=None):
    """Print the block of `module`'s source that opens with the first line containing `opening` (after the
    first line containing `within`, when given: a method of one class), through its last indented line,
    with its line numbers in the file, and under each line that contains a key of `notes` that note: a
    reading of the code beside the code. A note whose text is no longer in the block raises, so the
    reading cannot drift from the code it reads."""
    lines, _ = inspect.getsourcelines(module)
    start = 0 if within is None else next(i for i, line in enumerate(lines) if within in line)
    first = next(i for i, line in enumerate(lines) if i >= start and opening in line)
    indent = len(lines[first]) - len(lines[first].lstrip())
    last = first + 1
    while last < len(lines) and (not lines[last].strip() or len(lines[last]) - len(lines[last].lstrip()) > indent):
        last += 1
    block = [line.rstrip()[indent:] for line in lines[first:last]]
    while not block[-1]:
        block.pop()
    missing = [key for key in notes if not any(key in line for line in block)]
    if missing:
        raise ValueError(f"{module.__name__} no longer has {missing} in the block that opens with {opening!r}: "
                         f"the reading of it needs updating")
    print(f"# {Path(inspect.getsourcefile(module)).name}, lines {first + 1}-{first + len(block)}")
    unread = dict(notes)
    for number, line in enumerate(block, start=first + 1):
        print(f"{number:4d}  {line}")
        for key in [k for k in unread if k in line]:
            margin = " " * (6 + len(line) - len(line.lstrip()))
            for text in textwrap.wrap(unread.pop(key), width=108 - len(margin)):
                print(f"{margin}# {text}")
    print()


def markdown_table(header, rows, title=None):
    """A Markdown table as text: `header` a list of column names, `rows` lists of cells."""
    text = [f"**{title}**\n"] if title else []
    text += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(text + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def show_table(header, rows, title=None):
    """Display a Markdown table (see `markdown_table`)."""
    display(Markdown(markdown_table(header, rows, title)))


def show_folded(summary, parts):
    """Display `parts` folded under `summary`, opened by a click: each part a figure (shown as a PNG, then
    closed) or Markdown text (a table from `markdown_table`, say). A saved notebook keeps the result without
    showing it to a student who scrolls past before predicting it."""
    shown = []
    for part in parts:
        if isinstance(part, plt.Figure):
            buffer = io.BytesIO()
            part.savefig(buffer, format="png", bbox_inches="tight")
            plt.close(part)
            shown.append(f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">')
        else:
            shown.append(part)
    display(Markdown(f"<details><summary>{summary}</summary>\n\n" + "\n\n".join(shown) + "\n\n</details>"))


def check_prediction(guess, answer, hint, where=None, digits=None):
    """Say whether a student's prediction is right without printing the answer. `guess` None (or holding a
    None) is a prediction not yet written: it asks for one, in `where` ("the cell above" unless given).
    Otherwise the numbers of `guess` and `answer` (a number, True or False, or a list of them) must agree to
    within 1e-6, or, with `digits`, once both are rounded to that many significant figures. A wrong guess
    prints "Not quite" and `hint`, where to look again, with no traceback: a wrong guess is part of the
    exercise, not an error; so is a guess of the wrong type (text in quotes, say). Returns whether the guess
    is right (None while it is not written)."""
    if guess is None or (isinstance(guess, (list, tuple)) and any(g is None for g in guess)):
        print(f"Write your prediction in {where or 'the cell above'} (replace None), run it, then run this cell "
              "again.")
        return None
    size = np.size(answer)
    kind = ("True or False" if isinstance(answer, (bool, np.bool_)) else
            "one number" if size == 1 else f"a list of {size} numbers")
    try:
        numbers = np.asarray(guess, dtype=float)
    except (TypeError, ValueError):
        numbers = None
    if numbers is None or np.shape(guess) != np.shape(answer):
        quotes = " (without quotes)" if numbers is None and isinstance(answer, (bool, np.bool_)) else ""
        print(f"Not quite: the answer is {kind}{quotes}. Change your prediction and run both cells again.")
        return False
    expected = np.asarray(answer, dtype=float)
    if digits is not None:
        def rounded(values):
            return np.vectorize(lambda x: float(f"{x:.{digits - 1}e}"))(values)
        numbers, expected = rounded(numbers), rounded(expected)
    if not np.allclose(numbers, expected, rtol=0, atol=1e-6 if digits is None else 0):
        print(f"Not quite. {hint} Change your prediction and run both cells again.")
        return False
    print("Right.")
    return True


def _box(ax, x, y, text, colour=SHARED, w=0.5, h=0.06, size=8):
    """A rounded box centred on (x, y), its edge in `colour` and its face a light tint of it."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.008", lw=1.6,
                                ec=colour, fc=colour + "22"))
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def _arrow(ax, path, colour=SHARED):
    """A line through the (x, y) points of `path`, with an arrow head at the last one."""
    xs, ys = zip(*path)
    ax.plot(xs[:-1], ys[:-1], color=colour, lw=1.3)
    ax.annotate("", path[-1], path[-2], arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.3,
                                                         shrinkA=0, shrinkB=0))


def _plus(ax, x, y, r=0.016):
    """A + in a circle at (x, y): where a residual branch is added back."""
    ax.add_patch(Circle((x, y), r, fc="white", ec=SHARED, lw=1.3))
    ax.text(x, y, "+", ha="center", va="center", fontsize=10)


VANILLA_TEXT = "#A04E00"  # a darker orange for text about the vanilla architecture, readable on white


def block_diagram(size="T"):
    """Draw the network (left: stem, stages, head of preset `size`) and one block (right), UniNeXt's
    ingredients in blue and what only the vanilla architecture has in orange. The stage list is read from
    `uninext.config`, so it follows the presets."""
    cfg = uninext.config(size, "window")
    blue, orange = ARCH_COLOUR["uninext"], ARCH_COLOUR["vanilla"]
    fig, (net, blk) = plt.subplots(1, 2, figsize=(12, 7.6), gridspec_kw={"width_ratios": [1, 1.35]})
    for ax in (net, blk):
        ax.set(xlim=(0, 1), ylim=(0, 1))
        ax.axis("off")

    # The network, top to bottom: the image, the two stems side by side, four stages, the head.
    grid = cfg.img_size // cfg.stem_stride
    _box(net, 0.5, 0.95, f"image (B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size})", w=0.6, h=0.045)
    first = cfg.stem_stride // 2
    _box(net, 0.25, 0.82, f"UniNeXt: conv stem\n3 x [3x3 conv, LN, GELU], the\nfirst with stride {first}; then a\n"
                          "3x3 stride-2 conv, LN", blue, w=0.44, h=0.12)
    _box(net, 0.76, 0.82, f"vanilla: patch stem\n{cfg.stem_stride}x{cfg.stem_stride} conv, "
                          f"stride {cfg.stem_stride}, LN", orange, w=0.4, h=0.12)
    for x, colour in ((0.25, blue), (0.76, orange)):
        _arrow(net, [(x, 0.92), (x, 0.888)], colour)
        _arrow(net, [(x, 0.752), (x, 0.714)], colour)
    y = 0.67
    for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
        side = grid >> i
        down = "" if i == 0 else "3x3 stride-2 conv, LN; then "
        _box(net, 0.5, y, f"stage {i + 1}: {down}{depth} blocks\n(B, {side}, {side}, {dim})", w=0.72, h=0.07)
        if i:
            _arrow(net, [(0.5, y + 0.125 - 0.043), (0.5, y + 0.043)])
        y -= 0.125
    _box(net, 0.5, y, f"LN, mean over H x W, Linear\n(B, {cfg.num_classes})", w=0.6, h=0.07)
    _arrow(net, [(0.5, y + 0.125 - 0.043), (0.5, y + 0.043)])
    net.text(0.5, y - 0.06, "vanilla pvt and global: an absolute position\nembedding added at the start "
                            "of every stage", color=VANILLA_TEXT, ha="center", va="top", fontsize=9.5)
    # its leader line: a tick at the top of every stage box, joined down to the note
    tops = [0.67 - 0.125 * i + 0.035 for i in range(len(cfg.depths))]
    net.plot([0.05, 0.05, 0.14], [tops[0], y - 0.09, y - 0.09], color=orange, lw=1.2, ls=":")  # left: the
    for top in tops:                                                                  # zoom arrow leaves right
        net.plot([0.14, 0.05], [top - 0.008, top - 0.008], color=orange, lw=1.2, ls=":")
    net.legend(handles=[Patch(fc=blue + "22", ec=blue, label="UniNeXt ingredient"),
                        Patch(fc=orange + "22", ec=orange, label="vanilla only"),
                        Patch(fc=SHARED + "22", ec=SHARED, label="both architectures")],
               loc="lower center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.04))
    net.set_title(f"the network ({size} at {cfg.img_size}x{cfg.img_size})", fontsize=11)

    # One block: a main column, residual lines on the left, the ingredients on the right.
    xm, xr, xs, w, ws = 0.36, 0.05, 0.8, 0.42, 0.32
    ys = dict(x=0.97, norm1=0.885, mixer=0.785, ec_add=0.695, proj=0.625, res1=0.55, norm2=0.475, fc1=0.395,
              hdc_add=0.315, fc2=0.245, res2=0.17, pc_add=0.09, out=0.025)
    _box(blk, xm, ys["x"], "x   (B, H, W, C)", w=0.26, h=0.04)
    _box(blk, xm, ys["norm1"], "norm1: LayerNorm", w=w, h=0.05)
    _box(blk, xm, ys["mixer"], "mixer: pool, conv, window, cswin,\npvt, swin, global or identity", w=w, h=0.07)
    _box(blk, xm, ys["proj"], "proj: Linear C -> C, DropPath", w=w, h=0.05)
    _box(blk, xm, ys["norm2"], "norm2: LayerNorm", w=w, h=0.05)
    _box(blk, xm, ys["fc1"], "fc1: Linear C -> 4C, GELU", w=w, h=0.05)
    _box(blk, xm, ys["fc2"], "fc2: Linear 4C -> C, DropPath", w=w, h=0.05)
    _box(blk, xm, ys["out"], "x   (B, H, W, C)", w=0.26, h=0.04)
    adds = ("ec_add", "res1", "hdc_add", "res2", "pc_add")
    for name in adds:
        _plus(blk, xm, ys[name])
    half = {"x": 0.028, "out": 0.028, "mixer": 0.043, **{a: 0.016 for a in adds}}
    main = list(ys)
    for a, b in zip(main, main[1:]):
        _arrow(blk, [(xm, ys[a] - half.get(a, 0.033)), (xm, ys[b] + half.get(b, 0.033))])
    # Residual connections: each branch is added back to the x that entered it.
    _arrow(blk, [(xm, 0.935), (xr, 0.935), (xr, ys["res1"]), (xm - 0.016, ys["res1"])])
    _arrow(blk, [(xm, 0.515), (xr, 0.515), (xr, ys["res2"]), (xm - 0.016, ys["res2"])])
    # The three ingredients inside and after the block, each a residual branch of its own.
    _box(blk, xs, ys["mixer"], "EC: depthwise 3x3 conv on V\n(window, swin, cswin, global);\n"
                               "on the mixer's input (pool,\nconv, pvt, identity)", blue, w=ws, h=0.1, size=7.5)
    _arrow(blk, [(xm, 0.845), (xs, 0.845), (xs, 0.838)], blue)
    _arrow(blk, [(xs, 0.732), (xs, ys["ec_add"]), (xm + 0.016, ys["ec_add"])], blue)
    blk.text(xs, 0.67, "vanilla: the mixer's own\nposition encoding instead\n(Swin's relative bias; CSWin's\n"
                       "LePE, the same conv as EC;\nPVT's, ViT's absolute\nembedding)",
             color=VANILLA_TEXT, ha="center", va="top", fontsize=9.5)
    blk.plot([xs - 0.17, xm + w / 2 + 0.005], [0.64, ys["mixer"] - 0.02], color=orange, lw=1.2, ls=":")  # to the mixer
    _box(blk, xs, 0.37, "HdC: depthwise 3x3 conv,\nLN, GELU, in the 4C-wide\nhidden layer", blue, w=ws, h=0.09)
    _arrow(blk, [(xm, 0.355), (xs - ws / 2 - 0.008, 0.355)], blue)
    _arrow(blk, [(xs, 0.317), (xs, ys["hdc_add"]), (xm + 0.016, ys["hdc_add"])], blue)
    _box(blk, xs, 0.14, "PC: depthwise 3x3 conv\nafter the block", blue, w=ws, h=0.065)
    _arrow(blk, [(xm, 0.135), (xs - ws / 2 - 0.008, 0.135)], blue)
    _arrow(blk, [(xs, 0.1), (xs, ys["pc_add"]), (xm + 0.016, ys["pc_add"])], blue)
    blk.set_title("one block (Block.forward), the same whatever the mixer", fontsize=11)
    fig.tight_layout()
    # "Zoom in": a dashed arrow from stage 1's right edge, through the gap between the panels (clear of the
    # patch stem's box), to the block's input x. Drawn in figure coordinates, once the layout is fixed.
    to_fig = fig.transFigure.inverted().transform
    start = to_fig(net.transData.transform((0.87, 0.67)))
    end = to_fig(blk.transData.transform((xm - 0.14, ys["x"])))
    gap = (to_fig(net.transAxes.transform((1, 0)))[0] + to_fig(blk.transAxes.transform((0, 0)))[0]) / 2
    fig.add_artist(Line2D([start[0], gap, gap], [start[1], start[1], end[1]], transform=fig.transFigure,
                          ls="--", color=SHARED, lw=1.1))
    fig.add_artist(FancyArrowPatch((gap, end[1]), tuple(end), transform=fig.transFigure, arrowstyle="-|>",
                                   mutation_scale=12, ls="--", color=SHARED, lw=1.1))
    return fig


def plot_published(published):
    """The paper's comparison for the mixers with both numbers published: `published` {mixer: (the network
    it was first proposed in, that network's top-1, UniNeXt-T's top-1)}, one line per mixer from its own
    network (left) to UniNeXt-T (right)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    order = sorted(published, key=lambda m: published[m][2])  # close labels on the right are spread apart
    for k, (mixer, (network, own, ours)) in enumerate(published.items()):
        dy = 7 * (order.index(mixer) - (len(order) - 1) / 2)
        colour = ("#CC79A7", "#009E73", "#56B4E9", "#D55E00")[k % 4]
        ax.plot([0, 1], [own, ours], "o-", color=colour, lw=2, ms=8, label=mixer)
        ax.annotate(f"{network} {own}", (0, own), xytext=(-8, 0), textcoords="offset points", ha="right",
                    va="center", fontsize=9, color=colour)
        ax.annotate(f"UniNeXt-T {ours}", (1, ours), xytext=(8, dy), textcoords="offset points", ha="left",
                    va="center", fontsize=9, color=colour)
    ax.set_xticks([0, 1], ["in the network it was\nfirst proposed in", "in UniNeXt-T"])
    ax.set_xlim(-0.7, 1.7)
    ax.set(ylabel="ImageNet-1K top-1 (%)", title="Published accuracy of two mixers, before and in UniNeXt")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", title="spatial token mixer", title_fontsize=8)
    fig.tight_layout()
    return fig


def plot_stage_shapes(all_shapes, layouts):
    """Tokens and channels per stage, one bar per preset, from the (name, shape) lists of `all_shapes`."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    greys = ["#444444", "#AAAAAA"]
    for k, (size, img) in enumerate(layouts):
        stages = [shape for name, shape in all_shapes[size] if name.startswith("stages.") and "down" not in name]
        offset = (k - (len(layouts) - 1) / 2) * 0.38
        for ax, values in zip(axes, ([s[1] * s[2] for s in stages], [s[3] for s in stages])):
            bars = ax.bar(np.arange(4) + offset, values, width=0.36, color=greys[k],
                          label=f"{size} ({img}x{img} image)")
            ax.bar_label(bars, [f"{v:,}" for v in values], fontsize=7)
    for ax, title, ylabel in zip(axes, ("tokens per stage (H x W)", "channels per stage (C)"), ("tokens", "channels")):
        ax.set_xticks(range(4), [f"stage {i + 1}" for i in range(4)])
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set(title=title, xlabel="stage", ylabel=f"{ylabel} (log scale)")
        ax.legend(fontsize=8)
    fig.suptitle("Shapes through the stages: the grid shrinks 4x per stage, the width doubles")
    fig.tight_layout()
    return fig


def plot_mixer_costs(cost, mixers, layouts):
    """Parameters and MACs of every mixer, vanilla vs UniNeXt; one row of two panels per (size, image)."""
    fig, axes = plt.subplots(len(layouts), 2, figsize=(11, 3.4 * len(layouts)), squeeze=False)
    pos = np.arange(len(mixers))
    for (size, img), row in zip(layouts, axes):
        for ax, k, scale, ylabel in zip(row, (0, 1), (1e6, 1e9), ("parameters (millions)", "GMACs per image")):
            for j, arch in enumerate(("vanilla", "uninext")):
                ax.bar(pos + (j - 0.5) * 0.4, [cost[size, m, arch][k] / scale for m in mixers], width=0.38,
                       color=ARCH_COLOUR[arch], label=ARCH_NAME[arch])
            ax.set_xticks(pos, mixers, rotation=30)
            ax.set(xlabel="spatial token mixer", ylabel=ylabel)
            ax.set_ylim(top=1.25 * ax.get_ylim()[1])  # room for the legend above the bars
            ax.legend(fontsize=8, ncol=2, loc="upper left")
        row[0].set_title(f"Parameters, {size}")
        row[1].set_title(f"Multiply-accumulates, one {img}x{img} image, {size}")
    fig.suptitle("What each mixer costs in the vanilla architecture and in UniNeXt")
    fig.tight_layout()
    return fig


def plot_ingredient_costs(cost, mixers, ingredients, layouts):
    """What each ingredient adds alone to the vanilla model, stacked per mixer: parameters (thousands) and
    MACs (% of the vanilla model's), with the measured UniNeXt - vanilla difference as a black tick, its value
    beside it. The MACs panels share one y-axis, so that their bars compare across image sizes."""
    fig, axes = plt.subplots(len(layouts), 2, figsize=(11.5, 3.6 * len(layouts)), squeeze=False)
    pos = np.arange(len(mixers))
    for (size, img), row in zip(layouts, axes):
        for ax, k in zip(row, (0, 1)):
            base = np.array([cost[size, m, "vanilla"][k] for m in mixers])
            scale = 1e3 * np.ones_like(base) if k == 0 else base / 100
            up, down = np.zeros(len(mixers)), np.zeros(len(mixers))
            for ing in ingredients:
                delta = (np.array([cost[size, m, ing][k] for m in mixers]) - base) / scale
                ax.bar(pos, delta, bottom=np.where(delta >= 0, up, down), width=0.6, color=INGREDIENT_COLOUR[ing],
                       ec="black", lw=0.4, label=f"+ {INGREDIENT_LABEL[ing]}")
                up, down = up + delta.clip(0), down + delta.clip(None, 0)
            total = (np.array([cost[size, m, "uninext"][k] for m in mixers]) - base) / scale
            ax.scatter(pos, total, marker="_", s=500, lw=2, color="black", zorder=3,
                       label="UniNeXt - vanilla (measured)")
            for p, t in zip(pos, total):  # the net value, beside its black line
                ax.annotate(f"{t:+.0f}" if k == 0 else f"{t:+.1f}%", (p + 0.3, t), xytext=(2, 0),
                            textcoords="offset points", ha="left", va="center", fontsize=6.5, fontweight="bold")
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xticks(pos, mixers, rotation=30)
        row[0].set(title=f"Parameters added, {size}", ylabel="thousands")
        row[1].set(title=f"MACs added, {size}, one {img}x{img} image", ylabel="% of the vanilla model's MACs")
    limits = [ax.get_ylim() for ax in axes[:, 1]]  # one y-axis for the MACs panels: heights compare
    for ax in axes[:, 1]:
        ax.set_ylim(min(low for low, _ in limits), max(high for _, high in limits))
    handles, labels = axes[0, 1].get_legend_handles_labels()
    handles.append(Patch(fc="none", ec="none"))  # a line of text under the EC entry
    labels.append("EC below 0 (pvt, global): the\nposition embeddings it replaces")
    axes[0, 1].legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("The price of each UniNeXt ingredient, added alone to the vanilla architecture")
    fig.tight_layout()
    return fig


def window_labels(grid, wh, ww, shift=(0, 0)):
    """(grid, grid) array: which window each position falls in, found the way the window mixers find it
    (`uninext.window_partition` of a grid of indices, rolled by -shift first as Swin rolls its map)."""
    ids = torch.roll(uninext.grid_ids(grid, grid, "cpu"), (-shift[0], -shift[1]), (1, 2))
    windows = uninext.window_partition(ids, wh, ww)[0, :, :, 0]  # (nW, wh*ww) raster indices
    labels = np.empty(grid * grid, dtype=int)
    for w, members in enumerate(windows.tolist()):
        labels[members] = w
    return labels.reshape(grid, grid)


def draw_borders(ax, labels, colour="black"):
    """Draw a line between every two neighbouring cells of `labels` that hold different values."""
    H, W = labels.shape
    for i in range(H):
        for j in range(W):
            if j + 1 < W and labels[i, j] != labels[i, j + 1]:
                ax.plot([j + 0.5, j + 0.5], [i - 0.5, i + 0.5], color=colour, lw=1)
            if i + 1 < H and labels[i, j] != labels[i + 1, j]:
                ax.plot([j - 0.5, j + 0.5], [i + 0.5, i + 0.5], color=colour, lw=1)


def draw_outline(ax, mixer, extent, grid, query):
    """Outline what `mixer` with `extent` covers around the query: window borders (window; swin, whose
    block is taken to be a shifted one, index 1), the query's two stripes (cswin), the kernel's footprint
    (pool, conv). pvt, global and identity have nothing local to draw."""
    q0, q1 = query
    if mixer in ("window", "swin"):
        shift = extent // 2 if mixer == "swin" else 0
        draw_borders(ax, window_labels(grid, extent, extent, (shift, shift)))
    elif mixer == "cswin":
        top, left = q0 // extent * extent, q1 // extent * extent
        ax.add_patch(Rectangle((-0.5, top - 0.5), grid, extent, fill=False, ec="black", lw=1))
        ax.add_patch(Rectangle((left - 0.5, -0.5), extent, grid, fill=False, ec="black", lw=1))
    elif mixer in ("pool", "conv"):
        r = extent // 2
        ax.add_patch(Rectangle((q1 - r - 0.5, q0 - r - 0.5), extent, extent, fill=False, ec="black", lw=1))


def plot_receptive_fields(rf, mixers, variants, query, extents):
    """One row per mixer, one column per block variant: log10 |gradient| over the largest value of all the
    panels (one colour scale for the whole figure), white where the gradient is exactly zero, the query
    marked +, and the mixer's own windows, stripes or kernel outlined in black (see `draw_outline`)."""
    top = max(g.max() for g in rf.values())
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("white")
    fig, axes = plt.subplots(len(mixers), len(variants), figsize=(1.9 * len(variants) + 1.4, 1.95 * len(mixers)))
    for r, mixer in enumerate(mixers):
        for c, label in enumerate(variants):
            g, ax = rf[mixer, label], axes[r, c]
            im = ax.imshow(np.ma.log10(np.ma.masked_where(g == 0, g / top)), cmap=cmap, vmin=-7, vmax=0)
            draw_outline(ax, mixer, extents[mixer], g.shape[0], query)
            if mixer == "cswin":  # thin grey stripe outlines: black ones would hide a cross one token wide
                for patch in ax.patches:
                    patch.set(lw=0.5, ec="#777777", ls="--")
            ax.plot(query[1], query[0], marker="+", color="black", ms=9, mew=2)
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set(visible=True, color="#BBBBBB")
            n = int((g > 0).sum())
            ax.set_title(f"{n} position{'s' if n > 1 else ''}", fontsize=8)
            if r == 0:
                ax.text(0.5, 1.35, label, transform=ax.transAxes, ha="center", fontsize=10, weight="bold")
            if c == 0:
                ax.set_ylabel(f"{mixer}\n(extent {extents[mixer]})", fontsize=9, weight="bold")
    fig.colorbar(im, ax=axes, shrink=0.3, label="log10(|gradient| / largest)")
    return fig


def plot_rf_counts(rf, mixers, variants, grid):
    """Bars: how many input positions reach the query, per mixer and block variant. Vanilla orange, UniNeXt
    blue, each single ingredient in its own colour."""
    colours = [ARCH_COLOUR["vanilla"], INGREDIENT_COLOUR["ec"], INGREDIENT_COLOUR["hdc"], INGREDIENT_COLOUR["pc"],
               ARCH_COLOUR["uninext"]]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    width, pos = 0.8 / len(variants), np.arange(len(mixers))
    for c, label in enumerate(variants):
        counts = [int((rf[m, label] > 0).sum()) for m in mixers]
        bars = ax.bar(pos + (c - (len(variants) - 1) / 2) * width, counts, width=width * 0.95, color=colours[c],
                      ec="black", lw=0.4, label=label)
        ax.bar_label(bars, fontsize=9, rotation=90, padding=2)  # a count of 1 is a bar too thin to see
    ax.axhline(grid * grid, color="grey", ls="--", lw=1, label=f"whole grid ({grid * grid})")
    ax.set_ylim(0, 1.4 * grid * grid)  # room for the legend above the bars
    ax.set_xticks(pos, mixers)
    ax.set(xlabel="spatial token mixer", ylabel="input positions reaching the query",
           title="Receptive field of one block: how many input positions reach the query")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    return fig


def check_ingredient(candidate, slot, dim=32, grid=16, query=(7, 7)):
    """Check a home-made UniNeXt ingredient against uninext.py's, inside a `Block` with the identity mixer
    (so that nothing else mixes positions): `slot` "pc" puts `candidate(dim)` where `Block.pc` sits,
    "hdc" puts `candidate(4 * dim)` where `ICMLP.hdc` sits. Four checks, each printed, each an
    AssertionError when it fails: the candidate keeps the shape of its map; it has as many parameters, of
    the same shapes; the block's output is the same once the candidate holds the reference's weights; the
    same receptive field at `query`, found by autograd, against the block without it. The order in which
    the candidate declares its layers does not matter: each of its parameters gets a reference parameter
    of the same shape, and where several share a shape (HdC's conv bias and LayerNorm gain and bias are
    all 4C long), every pairing is tried."""
    def block(on):
        torch.manual_seed(0)
        mixer = uninext.Identity(dim, 2, 0, index=0, pos=False)
        made = uninext.Block(dim, mixer, ec=False, mlp_ratio=4, hdc=on and slot == "hdc", pc=on and slot == "pc",
                             drop_path=0.0)
        made.apply(uninext.UniNeXt._init_weights)
        return made.eval()

    def reach(module):
        x = torch.randn(2, grid, grid, dim, requires_grad=True)  # (B, H, W, C)
        module(x)[:, query[0], query[1]].sum().backward()
        return int((x.grad.abs().sum(dim=(0, 3)) > 0).sum())

    width = dim if slot == "pc" else 4 * dim  # HdC works in the MLP's hidden layer
    reference, mine = block(True), block(True)
    owner = mine if slot == "pc" else mine.mlp
    setattr(owner, slot, candidate(width))
    ours, theirs = getattr(reference if slot == "pc" else reference.mlp, slot), getattr(owner, slot)
    try:
        with torch.no_grad():
            shape = tuple(theirs(torch.randn(2, grid, grid, width)).shape)  # (B, H, W, width)
    except NotImplementedError:
        raise  # not written yet: the check cell says so
    except Exception as e:  # a mistake in the module is part of the exercise: a hint, not a traceback
        raise AssertionError(f"your module failed on a {(2, grid, grid, width)} map, (B, H, W, C): {e}. "
                             "nn.Conv2d wants (B, C, H, W): did you permute, and permute back?") from None
    assert shape == (2, grid, grid, width), f"it turns a {(2, grid, grid, width)} map into {shape}"
    print(f"runs: {(2, grid, grid, width)} -> {shape}")
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_theirs == n_ours, f"{n_theirs:,} parameters; uninext.py's {slot} has {n_ours:,}"
    shapes = [sorted(tuple(p.shape) for p in m.parameters()) for m in (theirs, ours)]
    assert shapes[0] == shapes[1], f"parameter shapes {shapes[0]}; uninext.py's are {shapes[1]}"
    print(f"parameters: {n_theirs:,}, of the same shapes as uninext.py's {slot} ({type(ours).__name__})")
    x = torch.randn(2, grid, grid, dim)  # (B, H, W, C)
    with torch.no_grad():
        for p in ours.parameters():  # random weights: a parameter paired with the wrong one shows
            p.add_(0.1 * torch.randn_like(p))
        groups = {}  # shape: ([reference parameters], [candidate parameters])
        for m, k in ((ours, 0), (theirs, 1)):
            for p in m.parameters():
                groups.setdefault(tuple(p.shape), ([], []))[k].append(p)
        gap = math.inf
        for pairing in itertools.product(*(itertools.permutations(g[0]) for g in groups.values())):
            for refs, (_, mine_ps) in zip(pairing, groups.values()):
                for mine_p, ref_p in zip(mine_ps, refs):
                    mine_p.copy_(ref_p)
            gap = min(gap, float((mine(x) - reference(x)).abs().max()))
            if gap < 1e-5:
                break
    assert gap < 1e-5, f"with uninext.py's weights the block's output differs by up to {gap:.3g}"
    print(f"output with the same weights: the same (largest difference {gap:.1g})")
    without, with_ours, with_theirs = reach(block(False)), reach(reference), reach(mine)
    assert with_theirs == with_ours, f"{with_theirs} positions reach the query; with uninext.py's {with_ours}"
    print(f"receptive field at {query}: {without} position(s) without it, {with_theirs} with it, as with "
          f"uninext.py's")
    print("Right: your module matches uninext.py's.")


# 02_train


LIVE_COLOUR = {"vanilla": ARCH_COLOUR["vanilla"], "vanilla + conv stem": INGREDIENT_COLOUR["conv_stem"],
               "UniNeXt": ARCH_COLOUR["uninext"], "vanilla, conv mixer": ARCH_COLOUR["vanilla"],
               "vanilla, no mixer + EC, HdC, PC": INGREDIENT_COLOUR["ec"]}


def plot_live_experiment(this_run, seeds, full, budgets):
    """The live experiment beside what is committed. `this_run` {config: (test top-1, CPU-minutes or None
    (not on a CPU), budget index)} for the run just made; `seeds` {config: [(top-1, CPU-minutes)]} of the
    committed seeds at the class budget and `full` {config: [top-1]} of those at the full budget; `budgets`
    the two budgets' names (the second None where nothing was run at the full budget).
    Left: accuracy, a dot per committed seed and a bar at their mean, this run a star. Right: what each run
    cost, in CPU-minutes."""
    fig, (ax, cost) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    configs = list(seeds)
    for i, config in enumerate(configs):
        colour = LIVE_COLOUR[config]
        for k, (values, marker) in enumerate(((([a for a, _ in seeds[config]]), "o"), (full[config], "s"))):
            x = i + (k - 0.5) * 0.36
            jitter = (np.arange(len(values)) - (len(values) - 1) / 2) * 0.045  # seeds side by side, none hidden
            ax.scatter(x + jitter, values, marker=marker, s=28, color=colour if k == 0 else "white",
                       edgecolors=colour, lw=1.4, zorder=3)
            if values:
                ax.plot([x - 0.12, x + 0.12], [np.mean(values)] * 2, color=colour, lw=2.5)
        if config in this_run:
            acc, _, budget = this_run[config]
            ax.scatter(i + (budget - 0.5) * 0.36 + 0.14, acc, marker="*", s=220, color=colour, edgecolors="black",
                       lw=0.8, zorder=4)
        runs = [m for _, m in seeds[config]]
        cost.bar(i - 0.2, np.mean(runs), width=0.38, color=colour, alpha=0.45, ec=colour)
        cost.scatter([i - 0.2] * len(runs), runs, s=14, color="black", zorder=3)
        if config in this_run and this_run[config][1] is not None and this_run[config][2] == 0:
            cost.bar(i + 0.2, this_run[config][1], width=0.38, color=colour, ec="black", hatch="//")
    ax.set_xticks(range(len(configs)), configs)
    ax.set(ylabel="test top-1 (%), all 10,000 test images", title="Accuracy: this run beside the committed seeds")
    ax.grid(axis="y", alpha=0.3)
    grey = "#555555"
    squares = [Line2D([], [], ls="", marker="s", mfc="white", color=grey, label=f"committed seed, {budgets[1]}")]
    ax.legend(handles=[Line2D([], [], ls="", marker="o", color=grey, label=f"committed seed, {budgets[0]}"),
                       *(squares if budgets[1] else []),
                       Line2D([], [], color=grey, lw=2.5, label="mean of the seeds"),
                       Line2D([], [], ls="", marker="*", ms=13, color=grey, mec="black", label="this run")],
              fontsize=8, loc="best")
    cost.set_xticks(range(len(configs)), [c.replace(" + ", "\n+ ") for c in configs], fontsize=8)
    cost.set(ylabel="CPU-minutes (process, one run)", title=f"Cost at {budgets[0]}")
    cost.set_ylim(top=1.35 * cost.get_ylim()[1])  # room for the legend above the bars
    cost.legend(handles=[Patch(fc=grey, alpha=0.45, label="committed seeds (mean, dots)"),
                         Patch(fc="white", ec="black", hatch="//", label="this run")], fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plot_training(steps, epochs, title):
    """Training loss and accuracy every few steps (test accuracy where tested), for each architecture in
    `steps` and `epochs` ({arch: rows of steps.csv / metrics.csv, numbers as floats}), and the learning rate
    of the first one, step by step."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for arch, rows in steps.items():
        x = [r["epoch"] for r in rows]
        name = ARCH_NAME.get(arch, arch)
        axes[0].plot(x, [r["train_loss"] for r in rows], color=ARCH_COLOUR[arch], lw=1, label=name)
        axes[1].plot(x, [r["train_acc1"] for r in rows], color=ARCH_COLOUR[arch], lw=1, label=f"{name}, train")
        tested = [(r["epoch"], r["test_acc1"]) for r in epochs[arch] if r["test_acc1"] is not None]
        axes[1].plot(*zip(*tested), "o", color=ARCH_COLOUR[arch], mec="black", ms=8, label=f"{name}, test")
    lr = next(iter(steps.values()))
    axes[2].plot([r["step"] for r in lr], [r["lr"] for r in lr], color="black", lw=1)
    names = ["Training loss (with label smoothing)", "Top-1 accuracy", "Learning rate, every 20 steps"]
    for ax, name, ylabel in zip(axes, names, ["cross-entropy", "top-1 (%)", "learning rate"]):
        ax.set(title=name, ylabel=ylabel, xlabel="epoch")
        ax.grid(alpha=0.3)
    tested = [r["test_acc1"] for rows in epochs.values() for r in rows if r["test_acc1"] is not None]
    axes[1].set_ylim(max(0, min(tested, default=0) - 15), 100)  # cut: the gap between the test dots stays visible
    axes[1].set_title("Top-1 accuracy (axis cut)")
    axes[2].set_xlabel("training step (not epochs)")
    axes[0].legend()
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_against_baselines(rows, checkpoints, mixer):
    """Test accuracy against CPU-minutes of training for runs measured side by side: `rows` (the sweep's rows
    of mixer_comparison.csv, numbers as floats) for the linear classifier, the CNN and `mixer` in both
    architectures, a dot per seed; the runs of `checkpoints` ({arch: summary.json}) ringed."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    groups = [("linear", dict(model="linear"), "0.5", "s"), ("CNN (0.14M)", dict(model="cnn"), "#009E73", "^"),
              *((f"N32 {mixer}, {name}", dict(model="uninext", mixer=mixer, arch=arch), ARCH_COLOUR[arch], "o")
                for arch, name in (("vanilla", "vanilla"), ("uninext", "UniNeXt")))]
    for label, match, colour, marker in groups:
        runs = [r for r in rows if all(r[k] == v for k, v in match.items())]
        ax.scatter([r["cpu_seconds"] / 60 for r in runs], [r["test_acc1"] for r in runs], s=45, marker=marker,
                   color=colour, edgecolors="black", lw=0.5, zorder=3, label=f"{label}, {len(runs)} seeds")
    for arch, s in checkpoints.items():
        ax.scatter(s["cpu_seconds"] / 60, s["test_acc1"], s=260, facecolors="none", edgecolors=ARCH_COLOUR[arch],
                   lw=2, zorder=2, label=f"the {'UniNeXt' if arch == 'uninext' else arch} checkpoint (seed {s['config']['seed']})")
    ax.set(xscale="log", xlabel="CPU-minutes of training per run (one thread, log scale)", ylabel="test top-1 (%)",
           title="Fashion-MNIST, all 60,000 training images, 4 epochs, the full test set")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_difference(per_seed, d, low, high, names):
    """A difference between two configurations, `names` = (a, b): a dot per seed (a - b, the same seed
    number), the difference of the means `d` with its 95% interval [`low`, `high`], and zero marked."""
    a, b = names
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    ax.axvline(0, color="black", lw=0.8)
    ax.scatter(per_seed, [1] * len(per_seed), s=30, color=SHARED, zorder=3,
               label=f"one seed: {a}\nminus {b}, the same seed number")
    ax.errorbar([d], [0], xerr=[[d - low], [high - d]], fmt="D", color=ARCH_COLOUR["uninext"], ecolor="0.3",
                capsize=5, label="difference of the means, 95% interval")
    ax.set_yticks([0, 1], ["means", "seeds"])
    ax.set_ylim(-0.6, 1.6)
    ax.set(xlabel=f"({a})\nminus ({b}), points", title="The difference itself, zero marked")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=8, loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, 0.22, 1, 1))
    return fig


def schedule_steps(images, batch_size, epochs, warmup):
    """Steps per epoch (the last incomplete batch dropped) and the step at which `build_scheduler`'s warm-up
    over the fraction `warmup` of all steps ends."""
    per_epoch = images // batch_size
    return per_epoch, max(1, round(warmup * epochs * per_epoch))


def plot_pooled_seeds(steps, names, title="The difference and its 95% interval as seeds are added"):
    """A difference between two configurations, `names` = (a, b), as seeds are added: `steps` a list of
    (number of seeds, a - b, low, high) with the 95% interval, zero marked; `title` says which seeds."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.axhline(0, color="black", lw=0.8)
    n, d, low, high = (np.array(column, dtype=float) for column in zip(*steps))
    ax.errorbar(n, d, yerr=[d - low, high - d], fmt="o", color=ARCH_COLOUR["uninext"], ecolor="0.4", capsize=5,
                ms=7)
    ax.set_xticks(n.astype(int))
    ax.set(xlabel="seeds pooled (each configuration)", ylabel=f"{names[0]} - {names[1]} (points)",
           title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_confusion(confusion, classes, colour):
    """Accuracy per class (sorted) and the row-normalised confusion matrix (true class x guess), labelled
    when there are at most 20 classes, on a log colour scale so that mistakes of a few percent show."""
    C = len(confusion)
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    order = per_class.argsort(descending=True)
    fig, axes = plt.subplots(1, 2, figsize=(15, 7), gridspec_kw={"width_ratios": [1, 1.25]})
    ax = axes[0]
    ax.barh(range(C), 100 * per_class[order].numpy(), color=colour)
    ax.axvline(100 * confusion.diag().sum() / confusion.sum(), color="black", ls="--", label="overall top-1")
    ax.set_yticks(range(C), [classes[i] for i in order] if C <= 20 else [""] * C, fontsize=11)
    ax.invert_yaxis()
    ax.set(xlim=(0, 100), xlabel="top-1 accuracy on the class's test images (%)", ylabel="class (best first)",
           title="Accuracy per class")
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[1]
    percent = 100 * confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    im = ax.imshow(np.ma.masked_less(percent.numpy(), 1), cmap="viridis", norm=LogNorm(vmin=1, vmax=100))
    if C <= 20:
        ax.set_xticks(range(C), classes, rotation=60, ha="right", fontsize=11)
        ax.set_yticks(range(C), classes, fontsize=11)
        for i in range(C):
            for j in range(C):
                if percent[i, j] >= 1:
                    ax.text(j, i, f"{percent[i, j]:.0f}", ha="center", va="center", fontsize=12,
                            color="black" if percent[i, j] > 50 else "white")
    ax.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix (% of each true class)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="% of the true class (log scale; under 1%: blank)")
    fig.tight_layout()
    return fig


def show_guesses(images, picks, probs, truth, classes, title):
    """A 3 x 8 grid of test images (`images` uint8 (N, H, W, C)) with the model's guess and its probability,
    and, in brackets under it, the true class."""
    fig, axes = plt.subplots(3, 8, figsize=(13, 6.6))
    for ax, i in zip(axes.flat, picks):
        image = images[i].cpu()
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
        guess = int(probs[i].argmax())
        ax.set_title(f"{classes[guess]} {100 * probs[i, guess]:.0f}%\n(truth: {classes[int(truth[i])]})", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    for ax in axes.flat[len(picks):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# 03_attention

QUERY_COLOUR = "#D55E00"  # vermillion: the query token on the photograph
HALO = [patheffects.withStroke(linewidth=4.5, foreground="white")]  # a white rim that keeps a marker visible


def cell_borders(ax, labels, cell, **line):
    """Draw a line between every two neighbouring cells of `labels` (an (h, w) array) that hold different
    values, in the pixel coordinates of an image whose cells are `cell` x `cell` pixels."""
    segments = []
    for i, j in zip(*np.nonzero(labels[:, 1:] != labels[:, :-1])):  # between columns j and j + 1
        x = (j + 1) * cell - 0.5
        segments.append([(x, i * cell - 0.5), (x, (i + 1) * cell - 0.5)])
    for i, j in zip(*np.nonzero(labels[1:] != labels[:-1])):  # between rows i and i + 1
        y = (i + 1) * cell - 0.5
        segments.append([(j * cell - 0.5, y), ((j + 1) * cell - 0.5, y)])
    ax.add_collection(LineCollection(segments, **line))


def plot_mixer_reach(photo, panels, px, title):
    """One panel per entry of `panels` on the photograph `photo` ((H, W, 3) floats in [0, 1], a grid of
    px x px-pixel tokens). Each entry is a dict: `title`; `support`, (g, g) bool, the tokens the query can
    reach: the rest is dimmed and the border drawn in yellow; `query`, the (row, column) of the query token,
    outlined in white on a black rim; `partitions`, a list of ((g, g) labels, line style[, colour]) whose
    borders are drawn in that colour, white if none is given; `keys`, None or the (g, g) labels of pvt's
    reduced keys: the photo is then drawn one colour per key cell (its mean), the resolution that the keys
    have."""
    fig, axes = plt.subplots(3, 3, figsize=(10, 11))
    for ax, p in zip(axes.flat, panels):
        image = photo
        if p.get("keys") is not None:
            cells = np.kron(p["keys"], np.ones((px, px), dtype=int))  # (H, W): the key of each pixel
            image = photo.copy()
            for k in np.unique(cells):
                image[cells == k] = photo[cells == k].mean(0)
        bright = np.kron(p["support"], np.ones((px, px)))  # (H, W): 1 inside what the query reaches
        ax.imshow(image * (0.3 + 0.7 * bright[..., None]))
        for labels, style, *colour in p["partitions"]:  # (labels, line style) or (labels, line style, colour)
            cell_borders(ax, labels, px, colors=colour[0] if colour else "white", linestyles=style, linewidths=0.8)
        if p.get("keys") is not None:
            cell_borders(ax, p["keys"], px, colors="white", linewidths=1.2)
        if not p["support"].all():
            cell_borders(ax, p["support"].astype(int), px, colors="#F0E442", linewidths=2)
        q0, q1 = p["query"]
        for colour, width in (("black", 5), ("white", 2.5)):  # white on a dark rim: apart from the yellow border
            ax.add_patch(Rectangle((q1 * px - 0.5, q0 * px - 0.5), px, px, fill=False, ec=colour, lw=width))
        ax.set_title(p["title"], fontsize=10)
        ax.set_xlabel("x (pixels)", fontsize=8)
        ax.set_ylabel("y (pixels)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    return fig


def ratio_label(t):
    """The tick label of 2**t on a ratio axis: 1/4x, 1x, 4x."""
    return f"1/{2 ** -t:g}x" if t < 0 else f"{2 ** t:g}x"


def frame(ax):
    """A thin grey frame around an image panel, whatever the rcParams say about spines."""
    ax.set_xticks([]), ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set(visible=True, color="#BBBBBB")


def block_label(name):
    """'stages.2.blocks.1.mixer' -> 'stage 3, block 2'."""
    _, stage, _, block, _ = name.split(".")
    return f"stage {int(stage) + 1}, block {int(block) + 1}"


def zoom_view(keys, size, zoom):
    """(top, left, side) in pixels of an attention panel's view of a size x size image: `zoom` pixels around
    the (k, k) bool map of a query's keys, or the whole image when they span half of it or more."""
    rows, cols = np.nonzero(keys)
    cell = size // keys.shape[0]
    top, bottom, left, right = rows.min() * cell, (rows.max() + 1) * cell, cols.min() * cell, (cols.max() + 1) * cell
    if 2 * max(bottom - top, right - left) >= size:
        return (0, 0, size)
    fit = lambda start: int(min(max(start, 0), size - zoom))
    return (fit((top + bottom - zoom) // 2), fit((left + right - zoom) // 2), zoom)


def plot_attention_maps(image, panels, rows, columns, title):
    """Where query tokens look, per head. `image` is the uint8 (H, W, C) test image; `rows` are (arch,
    label, (y, x) pixel of the query); `columns` the panels' titles; `panels[r, c]` a dict with `weights`,
    the (k, k) attention of the query over the keys' grid, `keys`, the (k, k) bool map of the keys it may
    see at all, and `query`, its (row, column) on its (n, n) grid, with `n`. Colour: log2 of (weight x
    number of keys), the ratio to uniform attention over the query's keys, on ONE symmetric scale for the
    whole figure, so that equal colours mean equal ratios in every panel; white is exactly the uniform
    share. The scale reaches the largest ratio in the figure (a head can put its whole weight on one key:
    at most the number of keys); smaller ratios than its inverse, down to weights that round to 0, take
    its darkest blue. Tokens that are not keys are hatched, thin light-grey lines separate the keys, the grey
    line outlines the object, + marks the query token's centre and the black line is the border of its keys.
    A panel with a `view`, (top, left, side) in pixels, shows only that square of the image, enlarged."""
    size = image.shape[0]
    grey = image.float().mean(-1).numpy()
    log_ratio = {}
    with np.errstate(divide="ignore"):
        for key, p in panels.items():
            log_ratio[key] = np.log2(p["weights"] * p["keys"].sum())
    limit = max(1.0, max(float(r[panels[key]["keys"]].max()) for key, r in log_ratio.items()))
    ratio = {key: np.ma.masked_where(~panels[key]["keys"], r.clip(-limit - 1, None)) for key, r in log_ratio.items()}
    below = any(float(r[panels[key]["keys"]].min()) < -limit for key, r in log_ratio.items())
    norm = TwoSlopeNorm(0.0, -limit, limit)  # 0 (the uniform share) is the centre of the map: white
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad((0, 0, 0, 0))  # not a key: transparent, over the hatching
    fig, axes = plt.subplots(len(rows), 1 + len(columns), squeeze=False, layout="constrained",
                             figsize=(2.5 * (1 + len(columns)) + 1.8, 2.5 * len(rows) + 0.8))
    extent = (-0.5, size - 0.5, size - 0.5, -0.5)
    for r, (arch, label, (y, x)) in enumerate(rows):
        ax = axes[r, 0]
        ax.imshow(grey, cmap="gray", extent=extent)
        ax.plot(x, y, "+", color=QUERY_COLOUR, ms=12, mew=2.5, path_effects=HALO)
        ax.set_ylabel(f"{arch}\n{label}", color=ARCH_COLOUR[arch], fontsize=14, weight="bold")
        if r == 0:
            ax.set_title("test image,\nquery pixel +", fontsize=13)
        for c, name in enumerate(columns):
            p, ax = panels[r, c], axes[r, c + 1]
            k, n = p["weights"].shape[0], p["n"]
            ax.add_patch(Rectangle((-0.5, -0.5), size, size, fc="white", ec="#BBBBBB", hatch="////", lw=0, zorder=-1))
            ax.imshow(ratio[r, c], cmap=cmap, norm=norm, extent=extent, interpolation="nearest")
            tokens = np.where(p["keys"], np.arange(k * k).reshape(k, k), -1)  # a line between every two keys
            cell_borders(ax, tokens, size / k, colors="#BBBBBB", linewidths=0.6)
            ax.contour(grey, levels=[0.3 * grey.max()], colors="#777777", linewidths=0.8)
            if not p["keys"].all():
                cell_borders(ax, p["keys"].astype(int), size / k, colors="black", linewidths=1.2)
            qr, qc = p["query"]
            ax.plot((qc + 0.5) * size / n - 0.5, (qr + 0.5) * size / n - 0.5, "+", color="black", ms=8, mew=1.8,
                    path_effects=HALO)
            top, left, side = p.get("view", (0, 0, size))  # a zoomed panel shows a side x side crop
            ax.set(xlim=(left - 0.5, left + side - 0.5), ylim=(top + side - 0.5, top - 0.5))
            if r == 0:
                ax.set_title(name, fontsize=13)
    for ax in axes.flat:
        frame(ax)
    step = max(1, int(limit) // 4)
    ticks = [t for t in range(-int(limit), int(limit) + 1) if t % step == 0]
    labels = [ratio_label(t) + (" = uniform" if t == 0 else "") for t in ticks]
    if limit - ticks[-1] > 0.3:  # label the top of the scale too: the largest ratio in the figure
        ticks, labels = ticks + [limit], labels + [f"{2 ** limit:.3g}x (largest)"]
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=axes, ticks=ticks, shrink=0.7,
                       extend="min" if below else "neither")
    bar.ax.set_yticklabels(labels, fontsize=12)
    bar.set_label("attention / uniform share of the query's keys\n(one scale for the whole figure)", fontsize=13)
    fig.legend(handles=[Patch(fc="white", ec="#BBBBBB", hatch="////", label="not a key of this query"),
                        Line2D([], [], color="black", lw=1.2, label="border of its keys"),
                        Line2D([], [], color="#BBBBBB", lw=0.6, label="between two keys"),
                        Line2D([], [], color="#777777", lw=0.8, label="outline of the object"),
                        Line2D([], [], ls="", marker="+", color="black", ms=9, mew=2, label="the query token")],
               loc="outside lower center", ncol=5, fontsize=12, frameon=False)
    fig.suptitle(title, fontsize=15)
    return fig


def plot_conv_reach(grid, window, query, titles):
    """Two drawings of a (grid, grid) token map cut into window x window windows, the `query` token marked:
    which tokens EC (left) and HdC or PC (right) add to the query's window. Both read the 3x3 tokens around
    the query (dashed). EC reads their values V, so it adds those tokens alone; HdC and PC read their
    attention outputs, so each adds its token's whole window. `titles`: the two panels' titles."""
    from matplotlib.colors import to_rgba
    fig, axes = plt.subplots(1, 2, figsize=(7.4, 4.3), layout="constrained")
    qr, qc = query
    own = (qr // window, qc // window)
    kernel = [(r, c) for r in range(qr - 1, qr + 2) for c in range(qc - 1, qc + 2)]
    for ax, title, whole in zip(axes, titles, (False, True)):
        added = np.zeros((grid, grid), bool)
        for r, c in kernel:
            if whole:
                top, left = r // window * window, c // window * window  # the window that holds (r, c)
                added[top:top + window, left:left + window] = True
            else:
                added[r, c] = True
        shade = np.zeros((grid, grid, 4))
        shade[added] = to_rgba("#009E73", 0.45)
        top, left = own[0] * window, own[1] * window
        shade[top:top + window, left:left + window] = to_rgba(ARCH_COLOUR["uninext"], 0.55)
        ax.imshow(shade, extent=(-0.5, grid - 0.5, grid - 0.5, -0.5), interpolation="nearest")
        for t in range(grid + 1):
            line = dict(color="#555555", lw=1.4) if t % window == 0 else dict(color="#CCCCCC", lw=0.5)
            ax.axhline(t - 0.5, **line)
            ax.axvline(t - 0.5, **line)
        ax.add_patch(Rectangle((qc - 1.5, qr - 1.5), 3, 3, fill=False, ec="black", lw=2, ls="--"))
        ax.plot(qc, qr, "+", color="black", ms=10, mew=2)
        ax.set(xlim=(-0.5, grid - 0.5), ylim=(grid - 0.5, -0.5), xticks=[], yticks=[])
        ax.set_title(title, fontsize=11)
    fig.legend(handles=[Patch(fc=to_rgba(ARCH_COLOUR["uninext"], 0.55), label="the query's window (attention)"),
                        Patch(fc=to_rgba("#009E73", 0.45), label="tokens the conv adds"),
                        Line2D([], [], color="black", ls="--", lw=2, label="3x3 tokens around the query"),
                        Line2D([], [], ls="", marker="+", color="black", ms=9, mew=2, label="the query token"),
                        Line2D([], [], color="#CCCCCC", lw=1, label="between two tokens (one square: one token)"),
                        Line2D([], [], color="#555555", lw=1.4, label=f"window borders ({window}x{window} tokens)")],
               loc="outside lower center", ncol=2, fontsize=10, frameon=False)
    return fig


def check_window_partition(candidate):
    """Check a home-made `window_partition(x, wh, ww)`, (B, H, W, C) -> (B, nW, wh*ww, C), against
    uninext.py's on maps and windows of several shapes: square windows, horizontal and vertical stripes (a
    stripe is a window as wide or as tall as the map), one window over the whole map. Every element of the
    test maps differs, so a token in the wrong place cannot pass. Each case that passes is printed, and
    "Right." after the last; the first that fails raises an AssertionError that says what differs, without
    the code that fixes it."""
    cases = [((2, 8, 8, 3), (4, 4), "square windows"), ((1, 6, 9, 2), (3, 3), "square windows, a map that is not"),
             ((2, 4, 8, 5), (1, 8), "horizontal stripes"), ((2, 4, 8, 5), (4, 2), "vertical stripes"),
             ((1, 4, 4, 1), (4, 4), "one window, the whole map")]
    for shape, (wh, ww), name in cases:
        B, H, W, C = shape
        x = torch.arange(B * H * W * C, dtype=torch.float32).reshape(shape)  # (B, H, W, C), all different
        ours, theirs = uninext.window_partition(x, wh, ww), candidate(x, wh, ww)
        where = f"{name} ({wh}x{ww} on a {tuple(shape)} map)"
        assert tuple(theirs.shape) == tuple(ours.shape), \
            f"{where}: your output has the shape {tuple(theirs.shape)}; (B, windows, wh*ww, C) is {tuple(ours.shape)}"
        if not torch.equal(theirs, ours):
            token = lambda t: (t[..., 0] // C).long()  # (B, nW, N): which token of the map sits there
            same_sets = torch.equal(token(theirs).sort(-1).values, token(ours).sort(-1).values)
            if same_sets:
                raise AssertionError(f"{where}: every window holds the right tokens, but in another order: inside "
                                     "a window, tokens go in raster order, along the window's row first")
            first = next(w for w in range(ours.shape[1]) if not torch.equal(theirs[:, w], ours[:, w]))
            right = {0: "", 1: "window 0 is right, "}.get(first, f"windows 0 to {first - 1} are right, ")
            raise AssertionError(
                f"{where}: {right}window {first} is the first one wrong. It must hold the tokens of window row "
                f"{first // (W // ww)}, window column {first % (W // ww)} (rows {first // (W // ww) * wh} to "
                f"{first // (W // ww) * wh + wh - 1}, columns {first % (W // ww) * ww} to "
                f"{first % (W // ww) * ww + ww - 1}); windows go in raster order over the map, left to right, "
                "then down; a window's tokens stay whole (all C channels)")
        count = theirs.shape[1]
        print(f"{where}: {count} window{'s' if count != 1 else ''} of {theirs.shape[2]} tokens, (B, nW, wh*ww, C) = "
              f"{tuple(theirs.shape)}, as uninext.window_partition")
    print("Right.")


def plot_attention_distance(distances, uniform, title):
    """Mean attention distance of every head (a dot), per attention block, vanilla orange and UniNeXt blue
    (`distances[arch][block]`, (heads,) pixels), beside uniform attention over the same keys (dashed,
    `uniform[block]`). A block's heads sit slightly apart, so that two equal values show as two dots."""
    names = list(uniform)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for k, (arch, per_block) in enumerate(distances.items()):
        for i, name in enumerate(names):
            d = np.asarray(per_block[name])
            jitter = np.linspace(-0.05, 0.05, len(d)) if len(d) > 1 else np.zeros(1)  # heads side by side
            ax.scatter(i + (k - 0.5) * 0.25 + jitter, d, color=ARCH_COLOUR[arch], s=22, alpha=0.85,
                       label=f"{arch} (one dot per head)" if i == 0 else None)
    for i, name in enumerate(names):
        ax.plot([i - 0.35, i + 0.35], [uniform[name]] * 2, color="black", lw=1.2, ls="--",
                label="uniform attention over the same keys" if i == 0 else None)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set(xlabel="attention block", ylabel="mean attention distance (pixels)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_erfs(fields, rows, columns, notes, title, tokens):
    """Effective receptive fields: `fields[row, column]` an (H, W) map of |gradient| over the input pixels,
    each drawn over its own largest value on ONE log colour scale for the whole figure (1e-4 to 1, viridis:
    the weakest gradients are dark blue-violet, smaller ones take the scale's bottom colour) and white where
    the gradient is exactly zero: outside the receptive field. A map whose low end is not black keeps a weak
    but non-zero pixel visibly apart from a zero one. Rows are architectures, labelled in their colours;
    `notes[row, column]` goes under the column's title. `tokens[column]` is (top, left, side) in pixels of
    the feature's token, outlined in black."""
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.75 * len(columns) + 1.4, 2.15 * len(rows)),
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("white")
    cmap.set_under(cmap(0.0))
    norm = LogNorm(1e-4, 1)
    for r, arch in enumerate(rows):
        for c, column in enumerate(columns):
            g, ax = fields[arch, column], axes[r, c]
            ax.imshow(np.ma.masked_equal(g / g.max(), 0), cmap=cmap, norm=norm, interpolation="nearest")
            top, left, side = tokens[column]
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), side, side, fill=False, ec="black", lw=1.2))
            ax.set_title(f"{column}\n{notes[arch, column]}", fontsize=8)
            frame(ax)
            if c == 0:
                ax.set_ylabel(arch, color=ARCH_COLOUR[arch], fontsize=11, weight="bold")
    fig.colorbar(ScalarMappable(norm, cmap), ax=axes, shrink=0.7, extend="min",
                 label="|gradient| / largest in its panel\n(log scale; white: exactly 0)")
    fig.legend(handles=[Patch(fc="white", ec="#BBBBBB", label="exactly 0: outside the receptive field"),
                        Patch(fc=cmap(0.0), label="below 1e-4 of the panel's largest, not 0"),
                        Patch(fill=False, ec="black", label="the feature's own token")],
               loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


# 04_mixer_comparison


def plot_lifts(before, after, mixers, before_label, after_label):
    """UniNeXt - vanilla per mixer in two comparisons ({mixer: points}), on one axis with zero marked."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.axhline(0, color="black", lw=0.8)
    ax.plot(mixers, [before.get(m, np.nan) for m in mixers], "s", color="0.5", ms=8, label=before_label)
    ax.plot(mixers, [after.get(m, np.nan) for m in mixers], "o", color=ARCH_COLOUR["uninext"], ms=8,
            label=after_label)
    ax.set(ylabel="UniNeXt - vanilla (points)", title="UniNeXt's lift per mixer, mean over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

"""Display and plotting functions that the notebooks import, so that their cells show the model and the
numbers rather than matplotlib plumbing. Each section belongs to one notebook; nothing here changes what
the model computes."""

import inspect
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display
from matplotlib.patches import Circle, ConnectionPatch, FancyBboxPatch, Patch, Rectangle
from matplotlib.ticker import ScalarFormatter

import uninext

# 01_tour

# Okabe-Ito colours, and greys. Vanilla is always orange and UniNeXt always blue; the ingredients, the image
# sizes and the receptive-field outlines use colours that are neither.
ARCH_COLOUR = {"vanilla": "#E69F00", "uninext": "#0072B2"}
INGREDIENT_COLOUR = {"conv_stem": "#009E73", "ec": "#CC79A7", "hdc": "#F0E442", "pc": "#999999"}
INGREDIENT_LABEL = {"conv_stem": "conv stem", "ec": "EC (Embedded Conv.)", "hdc": "HdC (High-dim. Conv.)",
                    "pc": "PC (Post Conv.)"}
SHARED = "#555555"  # what both architectures have


def show_source(obj, only=None):
    """Print the source of `obj` (a class or function of uninext.py) with its line numbers in the file, read
    by `inspect` from the file itself; with `only`, just the lines that contain that text."""
    lines, start = inspect.getsourcelines(obj)
    numbered = [(start + i, line.rstrip()) for i, line in enumerate(lines) if only is None or only in line]
    print(f"# {Path(inspect.getsourcefile(obj)).name}, {obj.__qualname__}")
    for number, line in numbered:
        print(f"{number:4d}  {line}")
    print()


def show_table(header, rows, title=None):
    """Display a Markdown table: `header` a list of column names, `rows` lists of cells."""
    text = [f"**{title}**\n"] if title else []
    text += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    display(Markdown("\n".join(text)))


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
                            "of every stage", color=orange, ha="center", va="top", fontsize=8)
    net.legend(handles=[Patch(fc=blue + "22", ec=blue, label="UniNeXt ingredient"),
                        Patch(fc=orange + "22", ec=orange, label="vanilla only"),
                        Patch(fc=SHARED + "22", ec=SHARED, label="both architectures")],
               loc="lower center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.add_artist(ConnectionPatch((0.87, 0.67), (0.03, 0.96), "data", "data", axesA=net, axesB=blk,
                                   arrowstyle="-|>", ls="--", color=SHARED, lw=1.1))
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
    _box(blk, xs, ys["mixer"], "EC: depthwise 3x3 conv\non v (attention mixers)\nor on the mixer's input",
         blue, w=ws, h=0.09)
    _arrow(blk, [(xm, 0.845), (xs, 0.845), (xs, 0.838)], blue)
    _arrow(blk, [(xs, 0.732), (xs, ys["ec_add"]), (xm + 0.016, ys["ec_add"])], blue)
    blk.text(xs, 0.67, "vanilla: the mixer's own position\nencoding instead (Swin's relative bias;\n"
                       "CSWin's LePE, the same conv as EC;\nPVT's, ViT's absolute embedding)",
             color=orange, ha="center", va="top", fontsize=7.5)
    _box(blk, xs, 0.37, "HdC: depthwise 3x3 conv,\nLN, GELU, in the 4C-wide\nhidden layer", blue, w=ws, h=0.09)
    _arrow(blk, [(xm, 0.355), (xs - ws / 2 - 0.008, 0.355)], blue)
    _arrow(blk, [(xs, 0.317), (xs, ys["hdc_add"]), (xm + 0.016, ys["hdc_add"])], blue)
    _box(blk, xs, 0.14, "PC: depthwise 3x3 conv\nafter the block", blue, w=ws, h=0.065)
    _arrow(blk, [(xm, 0.135), (xs - ws / 2 - 0.008, 0.135)], blue)
    _arrow(blk, [(xs, 0.1), (xs, ys["pc_add"]), (xm + 0.016, ys["pc_add"])], blue)
    blk.set_title("one block (Block.forward), the same whatever the mixer", fontsize=11)
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
                       color=ARCH_COLOUR[arch], label=f"{arch} architecture")
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
    MACs (% of the vanilla model's), with the measured UniNeXt - vanilla difference as a black tick."""
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
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xticks(pos, mixers, rotation=30)
        row[0].set(title=f"Parameters added, {size}", ylabel="thousands")
        row[1].set(title=f"MACs added, {size}, one {img}x{img} image", ylabel="% of the vanilla model's MACs")
    axes[0, 1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
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
    fig.colorbar(im, ax=axes, shrink=0.3, label="log10 |gradient| / largest in the figure")
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
        ax.bar(pos + (c - (len(variants) - 1) / 2) * width, counts, width=width * 0.95, color=colours[c],
               ec="black", lw=0.4, label=label)
    ax.axhline(grid * grid, color="grey", ls="--", lw=1, label=f"whole grid ({grid * grid})")
    ax.set_ylim(0, 1.4 * grid * grid)  # room for the legend above the bars
    ax.set_xticks(pos, mixers)
    ax.set(xlabel="spatial token mixer", ylabel="input positions reaching the query",
           title="Receptive field size of one block: each UniNeXt ingredient widens the local mixers")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    return fig

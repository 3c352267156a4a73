"""
UniNeXt in one file: an improved general architecture for vision backbones, and the token mixers it holds.

UniNeXt (Lin et al., "UniNeXt: Exploring A Unified Architecture for Vision Recognition", ACM MM 2023)
argues that a well-designed general architecture improves a vision backbone whatever spatial token mixer
it holds, from pooling to attention, and narrows the gaps between the mixers. It keeps the four-stage
hierarchical layout of Swin/MetaFormer and changes four things around the mixer:

    conv stem  three 3x3 convs with LayerNorm, then a strided 3x3 conv, instead of one 4x4 patch embedding
    EC         Embedded Convolution: a depthwise 3x3 conv added to the mixer's output, inside the branch
    HdC        High-dimensional Convolution: a depthwise 3x3 conv in the MLP's 4x wide hidden layer
               (the MLP with it is the ICMLP, Inner Convolution MLP)
    PC         Post Convolution: a residual depthwise 3x3 conv after every block

To see the claim, the same mixer also runs without them: `create_model(..., arch="vanilla")` is one shared
Swin-like skeleton (patch stem, ingredients off, each attention mixer's original position encoding back),
not each mixer's original network (CSWin and PoolFormer had overlapping conv stems); ingredients switch
one by one.

The file reads in the paper's order: small helpers, then the skeleton that is the paper's contribution
(stems, downsampling, HdC/ICMLP, the block with EC and PC, the stage), then the mixers it holds, from the
simplest to attention, with the window, mask and attention helpers beside the attention mixers that use
them, then the configuration and presets, the model, `create_model` and `load`.

Mixers (`MIXERS`), each a module (B, H, W, C) -> (B, H, W, C):
    identity  no spatial mixing: within a stage only EC, HdC and PC move information between positions
    pool      PoolFormer average pooling (Yu et al. 2022)            released by the UniNeXt authors
    conv      ConvNeXt 7x7 depthwise conv (Liu et al. 2022)          released
    window    attention in non-overlapping windows (Swin, no shift)  released
    swin      shifted-window attention (Swin, Liu et al. 2021)
    global    full self-attention (ViT, Dosovitskiy et al. 2021)
    cswin     cross-shaped stripe attention (CSWin, Dong et al. 2022) released
    pvt       spatial-reduction attention (PVT, Wang et al. 2021)    released

Layout: one (B, H, W, C) tensor ("NHWC") flows through the whole network. LayerNorm and Linear act on its
last dimension directly; convolutions see `x.permute(0, 3, 1, 2)`, a channels_last NCHW view of the same
memory (see `Conv` for when that costs a copy). All attention runs through `F.scaled_dot_product_attention`,
with windows and stripes folded into its head dimension; `record_attention` switches to a readable manual
path that also returns the attention probabilities.

Weights: the architecture is exact to the parameter against the authors' release, but no ImageNet weights
come with this file. What exists are small Fashion-MNIST models in checkpoints/ and whatever
train_minimal.py trains; `load` rebuilds either. Images have `in_chans` channels (3 by default: set
`in_chans=1` for grey images), and a loaded model's `pretrained_cfg` holds the mean and std it was trained
with, per channel on timm's 0-1 scale. The model meets timm's model contract (feature maps for a neck,
`pretrained_cfg`, gradient checkpointing) in the last section of its class.

    import torch, uninext
    model = uninext.create_model("T", "window")   # UniNeXt-T with local window attention
    model(torch.randn(1, 3, 224, 224)).shape       # (1, 1000)
    model = uninext.load("checkpoints/fashion-mnist-window-uninext")   # trained, ready to use
"""

import functools
import math
import pickle
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------------------
# Helpers: convolutions on (B, H, W, C) tensors, drop path


class Conv(nn.Conv2d):
    """`nn.Conv2d` for (B, H, W, C) tensors. On a contiguous map the permute is a channels_last view, which
    PyTorch's conv kernels take as is and answer in channels_last, so the permute back is a view too and
    nothing is copied. A map that is not dense, as the V slice of a `qkv` tensor that EC convolves, is
    first copied by the conv into a dense channels_last tensor; its answer is a view again."""

    def forward(self, x):
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H', W', C_out)


def DWConv(dim, kernel_size=3):
    """Depthwise conv, stride 1, 'same' padding, with bias: the one spatial operator of EC, HdC and PC."""
    return Conv(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a residual branch for a whole sample, rescale the rest."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, 1, 1)
        return x * mask / keep if keep > 0 else x * mask  # p = 1: always dropped (not 0 / 0)

    def extra_repr(self):
        return f"p={self.p}"


# ----------------------------------------------------------------------------------------------------------
# The UniNeXt ingredients around the mixer: conv stem, ICMLP with HdC, PC, and the block that gives the mixer
# its EC (what EC convolves, V or the input, each mixer says; see `Mixer`).


class ConvStem(nn.Module):
    """UniNeXt's stem: three 3x3 convs, each followed by LayerNorm (not BatchNorm) and GELU, the first with
    stride `stride // 2`, then the usual strided-conv downsampling to the first stage's width. It sees
    overlapping neighbourhoods before the first block. Each 3x3 conv costs 9 x C_in x C_out MACs per
    output token, and the first three run at 1 / (stride / 2) of the image's resolution: half of it at
    stride 4, all of it at the small-image stride 2, which is why the stem weighs more in a small-image
    model (README gives the shares). Total stride 4, or 2 at 32x32."""

    def __init__(self, in_chans, dim, stride):
        super().__init__()
        half = dim // 2
        self.conv1, self.norm1 = Conv(in_chans, half, 3, stride=stride // 2, padding=1), nn.LayerNorm(half)
        self.conv2, self.norm2 = Conv(half, half, 3, padding=1), nn.LayerNorm(half)
        self.conv3, self.norm3 = Conv(half, half, 3, padding=1), nn.LayerNorm(half)
        self.down = Downsample(half, dim)

    def forward(self, x):
        x = F.gelu(self.norm1(self.conv1(x)))
        x = F.gelu(self.norm2(self.conv2(x)))
        x = F.gelu(self.norm3(self.conv3(x)))
        return self.down(x)


class PatchEmbed(nn.Module):
    """The vanilla stem (Swin, ConvNeXt; PoolFormer's and CSWin's overlap): non-overlapping `stride` x
    `stride` patches, each projected to `dim` channels by one conv, then LayerNorm."""

    def __init__(self, in_chans, dim, stride):
        super().__init__()
        self.proj = Conv(in_chans, dim, stride, stride=stride)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x))


class Downsample(nn.Module):
    """Between stages: a 3x3 conv with stride 2 that doubles the channels, then LayerNorm."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.conv = Conv(dim_in, dim_out, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim_out)

    def forward(self, x):
        return self.norm(self.conv(x))


class HdC(nn.Module):
    """High-dimensional Convolution, GELU(LN(DWConv(h))) on the MLP's hidden layer (see ICMLP)."""

    def __init__(self, hidden):
        super().__init__()
        self.conv, self.norm = DWConv(hidden), nn.LayerNorm(hidden)

    def forward(self, h):
        return F.gelu(self.norm(self.conv(h)))


class ICMLP(nn.Module):
    """The channel MLP, fc1 (C -> 4C) -> GELU -> fc2 (4C -> C). With HdC (High-dimensional Convolution)
    it becomes UniNeXt's ICMLP (Inner Convolution MLP): a residual depthwise 3x3 conv, LayerNorm and GELU
    in the 4C-wide hidden layer, `h = h + GELU(LN(DWConv(h)))`. The conv mixes neighbours where the
    features are richest, for 9 MACs per hidden channel per token (fc1 and fc2 cost 2C per hidden
    channel, so HdC adds 9 / 2C to the MLP: 7% at C = 64, under 2% from C = 256)."""

    def __init__(self, dim, hidden, hdc):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.hdc = HdC(hidden) if hdc else None
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.act(self.fc1(x))  # (B, H, W, 4C)
        if self.hdc is not None:
            h = h + self.hdc(h)
        return self.fc2(h)


class Block(nn.Module):
    """One block, pre-norm, whatever the mixer:

        x = x + DropPath(Proj(Mixer(LN(x)) + EC(v)))    EC (Embedded Convolution), when on: a depthwise 3x3
                                                      conv of v, the V of LN(x) for window, swin, global
                                                      and cswin attention, LN(x) itself for the others
        x = x + DropPath(MLP(LN(x)))                  ICMLP when HdC is on
        x = x + PC(x)                                 Post Convolution, when on: a residual depthwise 3x3
                                                      conv outside DropPath, so it is never dropped

    Proj, a Linear, follows every mixer (pooling, conv and identity included), as in the authors' release.
    The block gives the mixer its EC, so that EC's weights sit in the mixer (`mixer.ec`); the mixer's own
    forward, shared by all mixers (see `Mixer`), adds EC(v) to its output, so `self.mixer(...)` below
    already holds `Mixer(LN(x)) + EC(v)`."""

    def __init__(self, dim, mixer, *, ec, mlp_ratio, hdc, pc, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = mixer
        if ec:
            mixer.ec = mixer.make_ec(dim)
        self.proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ICMLP(dim, mlp_ratio * dim, hdc)
        self.pc = DWConv(dim) if pc else None

    def forward(self, x):  # (B, H, W, C) -> (B, H, W, C)
        x = x + self.drop_path(self.proj(self.mixer(self.norm1(x))))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.pc is not None:
            x = x + self.pc(x)
        return x


class Stage(nn.Module):
    """Downsampling (except in the first stage, whose input comes from the stem at the right width), an
    absolute position embedding when the mixer's original architecture had one (vanilla PVT and ViT: one
    per stage, made for the preset's image size and resized bicubically to others), then the blocks. With
    `grad_checkpointing` each block keeps only its input for backward and recomputes the rest (the same
    outputs and gradients, DropPath's random draws included, for about a third more compute)."""

    def __init__(self, cfg, i, drop_paths):
        super().__init__()
        dim, mixer_cls = cfg.dims[i], MIXERS[cfg.mixer]
        self.downsample = Downsample(cfg.dims[i - 1], dim) if i > 0 else nn.Identity()
        self.pos_embed = None
        if cfg.mixer_pos and mixer_cls.position == "absolute":
            grid = math.ceil(cfg.img_size / (cfg.stem_stride * 2 ** i))
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        heads = dim // cfg.head_dim
        ec = cfg.ec or (cfg.mixer_pos and mixer_cls.position == "lepe")  # CSWin's LePE is EC itself
        self.blocks = nn.Sequential(*(
            Block(dim, mixer_cls(dim, heads, cfg.mixer_size[i], index=j, pos=cfg.mixer_pos), ec=ec,
                  mlp_ratio=cfg.mlp_ratio, hdc=cfg.hdc, pc=cfg.pc, drop_path=drop_paths[j])
            for j in range(cfg.depths[i])
        ))
        self.grad_checkpointing = False

    def forward(self, x):
        x = self.downsample(x)  # (B, H, W, C)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[1:3] != x.shape[1:3]:
                pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic",
                                    align_corners=False).permute(0, 2, 3, 1)
            x = x + pos
        recompute = self.grad_checkpointing and torch.is_grad_enabled()  # activations recomputed in backward
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return x


# ----------------------------------------------------------------------------------------------------------
# Spatial token mixers. Same constructor for all: (dim, num_heads, extent, *, index, pos), where `extent` is
# the mixer's spatial extent in this stage (pooling kernel, conv kernel, window, stripe width, reduction
# ratio; 0 means "the whole grid"), `index` the block's position in its stage and `pos` whether to use the
# position encoding of the mixer's original paper. Class attribute `position` names that encoding: the stage
# adds an absolute one, the mixer the others.


class Mixer(nn.Module):
    """What every token mixer shares: the contract (B, H, W, C) -> (B, H, W, C), and EC.

    A mixer implements `mix(x)`, which returns its output and the map that EC (Embedded Convolution)
    convolves: V for the attention mixers whose V lives on the token grid, the mixer's input for the others
    (pooling, conv, PVT, whose V lives on a reduced grid). The block gives the mixer its EC (`self.ec`, a
    depthwise 3x3 conv: 9 MACs per channel per token) when the architecture has one, and `forward` adds it
    here, in one place, so that no mixer can leave it out. `min_extent` and `odd_extent` say which extents
    the mixer takes; `Config` checks them. A new mixer subclasses this and is registered in `MIXERS`."""

    position = None
    min_extent, odd_extent = 0, False

    def __init__(self):
        super().__init__()
        self.ec = None

    def make_ec(self, dim):
        return DWConv(dim)

    def embedded_conv(self, ec_input):
        return self.ec(ec_input)

    def forward(self, x):
        mixed = self.mix(x)
        if not (isinstance(mixed, tuple) and len(mixed) == 2):
            raise TypeError(f"{type(self).__name__}.mix must return (output, the map EC convolves), got "
                            f"{type(mixed).__name__}")
        out, ec_input = mixed
        return out if self.ec is None else out + self.embedded_conv(ec_input)


class Identity(Mixer):
    """No spatial mixing: each token only sees itself. In the vanilla architecture nothing inside a stage
    relates positions (only the patch stem and the strided convs between stages see neighbours); in
    UniNeXt, EC, HdC and PC do in every block, which makes it the most telling ablation of the general
    architecture. With EC its output is x + EC(x)."""

    def __init__(self, dim, num_heads, extent, *, index, pos):
        super().__init__()

    def mix(self, x):
        return x, x


class Pooling(Mixer):
    """PoolFormer's token mixer: `AvgPool(x) - x` over `extent` x `extent` neighbourhoods (3 x 3), the mean
    including the token itself. In PoolFormer the subtraction cancels the residual's x, leaving "the
    neighbourhood's mean minus me"; here, as in the UniNeXt release, the mixer sees LN(x) and its output
    goes through Proj, so nothing cancels exactly and the subtraction is kept for parity with both. No
    parameters, no position encoding needed (pooling is local). Cost: extent^2 adds per channel per token.
    EC runs on the input x."""

    min_extent, odd_extent = 1, True

    def __init__(self, dim, num_heads, extent, *, index, pos):
        super().__init__()
        self.extent = extent

    def mix(self, x):
        pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), self.extent, 1, self.extent // 2, count_include_pad=False)
        return pooled.permute(0, 2, 3, 1) - x, x  # (B, H, W, C)


class DepthwiseConv(Mixer):
    """ConvNeXt's token mixer: one large (7x7) depthwise conv with bias. Local, and aware of where the image's
    borders are through its zero padding. Cost: extent^2 MACs per channel per token (49), extent^2 + 1
    parameters per channel. EC runs on the input x."""

    min_extent, odd_extent = 1, True

    def __init__(self, dim, num_heads, extent, *, index, pos):
        super().__init__()
        self.conv = DWConv(dim, extent)

    def mix(self, x):
        return self.conv(x), x


# ----------------------------------------------------------------------------------------------------------
# Attention mixers, and the window, mask and attention helpers that only they use. A window mixer's path:
# its mix() -> attention_mask (blocked_pairs: padding and shift; plus a relative bias) -> attention_in_windows
# (pad, roll, partition, undo) -> attend (SDPA, or the manual path that records the probabilities).


def window_partition(x, wh, ww):
    """(B, H, W, C) -> (B, nW, wh*ww, C): cut into wh x ww windows, in raster order. H, W must be multiples
    of wh, ww. A window of (wh, W) is a horizontal stripe, (H, ww) a vertical one."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // wh, wh, W // ww, ww, C)  # (B, nH, wh, nW_w, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, -1, wh * ww, C)  # (B, nH*nW_w, wh*ww, C)


def window_reverse(windows, wh, ww, H, W):
    """(B, nW, wh*ww, C) -> (B, H, W, C): the inverse of `window_partition`."""
    B, _, _, C = windows.shape
    x = windows.reshape(B, H // wh, W // ww, wh, ww, C)  # (B, nH, nW_w, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def round_up(n, m):
    """The smallest multiple of m that is >= n: the size a map of n rows (columns) is padded to."""
    return -(-n // m) * m


def pad_to_multiple(x, mh, mw):
    """Zero-pad (B, H, W, C) at the bottom and right so that H, W become multiples of mh, mw."""
    ph, pw = -x.shape[1] % mh, -x.shape[2] % mw
    return F.pad(x, (0, 0, 0, pw, 0, ph)) if ph or pw else x  # F.pad pads the last dims first


def crop(x, H, W):
    """The top-left H x W of a padded (B, Hp, Wp, C) map; no slice when nothing was padded, whose backward
    would write a zero-filled gradient of the whole map first."""
    return x if x.shape[1:3] == (H, W) else x[:, :H, :W]


def roll(x, shift):
    """Roll (B, H, W, C) by shift = (rows, columns), cyclically, as Swin shifts its windows."""
    return torch.roll(x, shift, dims=(1, 2)) if any(shift) else x


def grid_ids(Hp, Wp, device):
    """(1, Hp, Wp, 1) raster index of every position: partitioned like the tokens, it says which token
    sits where in each window (for padding masks, shift masks and attention maps)."""
    return torch.arange(Hp * Wp, device=device).reshape(1, Hp, Wp, 1)


def shift_slices(window, shift):
    """The three regions of one axis of a map rolled by -shift (Swin), as positions of the rolled map:
    every window but the last (where no token wrapped around), the last window's first window - shift
    positions (tokens from the far end of the map), and its last shift positions (tokens that wrapped
    around from the start)."""
    if not shift:
        return (slice(None),)
    return slice(0, -window), slice(-window, -shift), slice(-shift, None)


def cached(function):
    """`function` with a cache of its results in eager mode; under torch.compile the function itself, which
    the compiler traces and bakes into its graph (it does not look into caches). What it caches is built
    outside inference mode, so that a tensor made under `torch.inference_mode()` (as Lightning validates)
    never reaches a later training step, which could not save it for backward."""
    cache = functools.lru_cache(maxsize=256)(function)

    @functools.wraps(function)
    def call(*args):
        if torch.compiler.is_compiling():
            return function(*args)
        with torch.inference_mode(False):
            return cache(*args)

    call.cache_clear = cache.cache_clear
    return call


@cached
def blocked_pairs(H, W, wh, ww, sh, sw, device):
    """bool (nW, N, N), True where a query must not see a key, for an H x W map padded to multiples of the
    wh x ww window, rolled by -(sh, sw) and cut into windows; None when nothing is blocked. Blocked are
    padded keys (padded queries may see them, so that no row is empty), and keys that Swin's roll brought
    next to the query from the far edge of the map. Built once per shape and device."""
    Hp, Wp = round_up(H, wh), round_up(W, ww)
    blocked = None
    if (Hp, Wp) != (H, W):
        ids = grid_ids(Hp, Wp, device)
        padded = window_partition(roll((ids // Wp >= H) | (ids % Wp >= W), (-sh, -sw)), wh, ww)[0, ..., 0]
        blocked = padded[:, None, :] & ~padded[:, :, None]  # (nW, N, N)
    if sh or sw:
        region = torch.zeros(1, Hp, Wp, 1, device=device)  # which part of the rolled map a token is from
        for i, rows in enumerate(shift_slices(wh, sh)):
            for j, cols in enumerate(shift_slices(ww, sw)):
                region[:, rows, cols] = 3 * i + j
        region = window_partition(region, wh, ww)[0, ..., 0]  # (nW, N)
        apart = region[:, :, None] != region[:, None, :]
        blocked = apart if blocked is None else blocked | apart
    return blocked


def attention_mask(H, W, window, shift, bias, heads, dtype, device):
    """Additive (nW*heads, N, N) mask for `attention_in_windows`: -inf where `blocked_pairs` is True, plus
    a (heads, N, N) relative position `bias`; None when there is neither (the usual UniNeXt case), so that
    SDPA can take its fastest kernels. Its rows are stored 8-aligned: SDPA's memory-efficient kernel copies
    a mask on every call otherwise."""
    blocked = blocked_pairs(H, W, *window, *shift, device)
    if blocked is None and bias is None:
        return None
    nW, N = math.ceil(H / window[0]) * math.ceil(W / window[1]), window[0] * window[1]
    mask = torch.zeros(nW, heads, N, -(-N // 8) * 8, dtype=dtype, device=device)[..., :N]
    if blocked is not None:
        mask.masked_fill_(blocked[:, None], float("-inf"))
    if bias is not None:
        mask.add_(bias.to(dtype))  # in place, to keep the aligned rows
    return mask.reshape(nW * heads, N, N)


def attend(q, k, v, mask=None, record=None):
    """Scaled dot-product attention over (B, heads, N, d) queries and (B, heads, M, d) keys and values,
    the one place where every attention mixer attends. The fast path is `F.scaled_dot_product_attention`
    (flash / memory-efficient kernels on a GPU). While `record_attention` is on, `record` is a function and
    the manual path computes the same thing step by step, handing it the (B, heads, N, M) probabilities."""
    if record is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N, M)
    if mask is not None:
        logits = logits + mask
    probs = logits.softmax(dim=-1)
    record(probs)
    return probs @ v


def attention_in_windows(qkv, heads, window, shift=(0, 0), mask=None, record=None):
    """Self-attention inside each wh x ww window of a (B, H, W, 3*heads*d) map of queries, keys and values:
    zero-pad to whole windows, roll by -shift (Swin), attend in every window, and undo the three. Windows
    are folded into SDPA's head dimension, (B, nW*heads, N, d), so that a mask that depends on the window
    but not on the image, (nW*heads, N, N), broadcasts over the batch without a copy. Returns (B, H, W,
    heads*d); `record` receives dense (B, heads, H*W, H*W) maps, zero outside each query's window."""
    B, H, W, _ = qkv.shape
    wh, ww = window
    qkv = roll(pad_to_multiple(qkv, wh, ww), (-shift[0], -shift[1]))  # (B, Hp, Wp, 3*heads*d)
    Hp, Wp = qkv.shape[1], qkv.shape[2]
    windows = window_partition(qkv, wh, ww)  # (B, nW, N, 3*heads*d)
    nW, N = windows.shape[1], windows.shape[2]
    windows = windows.reshape(B, nW, N, 3, heads, -1).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, heads, N, d)
    q, k, v = windows.reshape(3, B, nW * heads, N, -1).unbind(0)
    if record is not None:
        record = functools.partial(dense_attention_maps, record=record, H=H, W=W, window=window, shift=shift)
    out = attend(q, k, v, mask, record)  # (B, nW*heads, N, d)
    out = out.reshape(B, nW, heads, N, -1).transpose(2, 3).reshape(B, nW, N, -1)  # (B, nW, N, heads*d)
    return crop(roll(window_reverse(out, wh, ww, Hp, Wp), shift), H, W)


def dense_attention_maps(probs, record, H, W, window, shift):
    """Hand `record` the window probabilities (B, nW*heads, N, N) as full maps (B, heads, H*W, H*W) over
    the tokens of the H x W map, zero outside each query's window. Which token sits in which window slot
    comes from partitioning a grid of indices exactly as the tokens were padded, rolled and partitioned."""
    Hp, Wp = round_up(H, window[0]), round_up(W, window[1])
    ids = window_partition(roll(grid_ids(Hp, Wp, probs.device), (-shift[0], -shift[1])), *window)[0, ..., 0]
    nW, N = ids.shape  # (nW, N): the grid index of every window slot
    B, heads = probs.shape[0], probs.shape[1] // nW
    dense = probs.new_zeros(B, heads, Hp * Wp, Hp * Wp)
    dense[:, :, ids[:, :, None], ids[:, None, :]] = probs.reshape(B, nW, heads, N, N).transpose(1, 2)
    real = grid_ids(Hp, Wp, probs.device)[0, :H, :W].flatten()  # the tokens that are not padding
    record(dense[:, :, real][..., real])


class RelativePositionBias(nn.Module):
    """Swin's learned relative position bias: one scalar per head for each of the (2w-1)^2 offsets between
    two tokens of a w x w window, added to the attention logits. Windows cut smaller than w (small grids)
    use the central part of the table."""

    def __init__(self, window, num_heads):
        super().__init__()
        self.window = window
        self.table = nn.Parameter(torch.empty((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        # The full window's index, built once and moved with the module (not saved): no host-to-device
        # copy on every forward.
        self.register_buffer("index", relative_index(window, window, window).clone(), persistent=False)

    def forward(self, wh, ww):
        full = (wh, ww) == (self.window, self.window)
        index = self.index if full else relative_index(self.window, wh, ww, self.table.device)
        return self.table[index].permute(2, 0, 1)  # (heads, N, N)


@cached
def relative_index(window, wh, ww, device=None):
    """(N, N) row of a w x w window's bias table for each (query, key) pair of a wh x ww window. A window
    shrunk to a small grid gets its index built once per shape and device, as the masks are."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                                        indexing="ij")).flatten(1)  # (2, N)
    offsets = coords[:, :, None] - coords[:, None, :] + window - 1  # (2, N, N), in [0, 2w-2]
    return offsets[0] * (2 * window - 1) + offsets[1]


class AttentionMixer(Mixer):
    """What every attention mixer shares: the head layout, and `record`: None, or the function that
    receives this mixer's attention maps, set by `record_attention` and handed to `attend`."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"{type(self).__name__}: {num_heads} heads do not divide {dim} channels")
        self.num_heads = num_heads
        self.record = None


class WindowAttention(AttentionMixer):
    """Local window attention (Swin without the shift): tokens attend only within non-overlapping
    `extent` x `extent` windows, so cost grows linearly with the image. As in the UniNeXt release, q and v
    have biases and k has none (a k bias adds the same logit to every key of a query and cancels in the
    softmax).

    In UniNeXt the windows need no position bias: EC, a depthwise conv over the whole map of V, gives
    position and lets information cross window borders. In the vanilla architecture (`pos`) the mixer gets
    Swin's relative position bias instead. A map that the window does not divide is zero-padded right and
    bottom and the result cropped back. The authors zero-pad too but do not mask, so their padded keys get
    logit 0 and dilute every softmax that sees them; here padded keys are masked so that they change
    nothing. This is a deliberate departure: it changes outputs only at sizes that the window does not
    divide, never at 224x224 (or 32x32), where the two compute the same function. A window larger than the
    grid shrinks to it. Cost per token: 4C^2 MACs for qkv and the output projection (the latter in the
    block) plus 2*N*C for the attention over the N = extent^2 tokens of its window."""

    position = "relative"

    def __init__(self, dim, num_heads, extent, *, index, pos):
        super().__init__(dim, num_heads)
        self.window = extent
        self.shift = 0
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.rel_pos = RelativePositionBias(extent, num_heads) if pos and self.position == "relative" else None

    def mix(self, x):
        B, H, W, C = x.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))  # no k bias
        qkv = F.linear(x, self.qkv.weight, qkv_bias)  # (B, H, W, 3C)
        window = (min(self.window, H), min(self.window, W)) if self.window else (H, W)
        shift = tuple(self.shift if w < n else 0 for w, n in zip(window, (H, W)))  # no shift in one window
        bias = self.rel_pos(*window) if self.rel_pos is not None else None  # (heads, N, N)
        mask = attention_mask(H, W, window, shift, bias, self.num_heads, qkv.dtype, x.device)  # autocast's dtype
        out = attention_in_windows(qkv, self.num_heads, window, shift, mask, self.record)  # (B, H, W, C)
        return out, qkv[..., 2 * C:]  # EC convolves V over the whole map


class ShiftedWindowAttention(WindowAttention):
    """Swin's shifted windows: every second block rolls the map by half a window before partitioning, so
    that information crosses window borders without a conv. The tokens that the roll wraps around from one
    edge to the other are not neighbours, so a mask keeps them apart. Same parameters as `window`."""

    def __init__(self, dim, num_heads, extent, *, index, pos):
        super().__init__(dim, num_heads, extent, index=index, pos=pos)
        self.shift = extent // 2 if index % 2 else 0


class GlobalAttention(WindowAttention):
    """Full self-attention over all tokens (ViT): a window that covers the whole grid. Cost grows with the
    square of the number of tokens, which is fine on the small grids of 32x32 images and of late stages.
    Its original position encoding is ViT's absolute embedding, which the stage adds (`pos`)."""

    position = "absolute"

    def __init__(self, dim, num_heads, extent, *, index, pos):
        super().__init__(dim, num_heads, 0, index=index, pos=pos)


class CrossShapedWindowAttention(AttentionMixer):
    """CSWin's cross-shaped window: the heads of the first half of the channels attend within vertical
    stripes of `extent` columns, those of the second half within horizontal stripes of `extent` rows, so a
    token sees a cross through itself at the cost of a window. The order is the authors' (their branch 0
    is the vertical one), so that a state dict trained with their code maps onto this one without a
    permutation. With extent 0 (the last stage, where one stripe is the whole grid) a single branch with
    all heads attends globally. qkv has full biases. Padding is masked, as in `WindowAttention`.

    EC is applied to V per stripe, each stripe convolved on its own with zero padding at its borders: this
    is CSWin's own LePE (locally-enhanced positional encoding), so the vanilla architecture (`pos`) keeps
    exactly the same conv. Each branch has its own depthwise conv over its half of the channels."""

    position = "lepe"

    def __init__(self, dim, num_heads, extent, *, index, pos):
        super().__init__(dim, num_heads)
        self.stripe = extent
        self.branches = 1 if extent == 0 else 2
        # CSWin splits the heads between the branches: S's 3 heads of 32 channels become 1 + 1 heads of 48
        self.branch_heads = max(num_heads // self.branches, 1)
        self.qkv = nn.Linear(dim, 3 * dim)

    def stripes(self, H, W):
        """The window shape of each branch: vertical stripes, horizontal stripes; or the whole grid."""
        if self.branches == 1:
            return [(H, W)]
        return [(H, min(self.stripe, W)), (min(self.stripe, H), W)]

    def mix(self, x):
        B, H, W, C = x.shape
        qkv = self.qkv(x).unflatten(-1, (3, self.branches, -1))  # (B, H, W, 3, branches, C/branches)
        outs = []
        for b, window in enumerate(self.stripes(H, W)):
            mask = attention_mask(H, W, window, (0, 0), None, self.branch_heads, qkv.dtype, x.device)
            branch_qkv = qkv[..., b, :].flatten(-2)  # (B, H, W, 3*C/branches): this branch's q, k and v
            outs.append(attention_in_windows(branch_qkv, self.branch_heads, window, mask=mask, record=self.record))
        return torch.cat(outs, dim=-1), qkv[..., 2, :, :].flatten(-2)  # (B, H, W, C), and V

    def make_ec(self, dim):
        return nn.ModuleList(DWConv(dim // self.branches) for _ in range(self.branches))

    def embedded_conv(self, v):
        """EC / LePE: each branch's part of V, each stripe convolved as its own little image."""
        B, H, W, C = v.shape
        outs = []
        for conv, (wh, ww), part in zip(self.ec, self.stripes(H, W), v.chunk(self.branches, dim=-1)):
            stripes = window_partition(pad_to_multiple(part, wh, ww), wh, ww)  # (B, nW, wh*ww, c)
            nW, c = stripes.shape[1], stripes.shape[-1]
            stripes = conv(stripes.reshape(B * nW, wh, ww, c)).reshape(B, nW, wh * ww, c)
            outs.append(crop(window_reverse(stripes, wh, ww, round_up(H, wh), round_up(W, ww)), H, W))
        return torch.cat(outs, dim=-1)


class SpatialReductionAttention(AttentionMixer):
    """PVT's spatial-reduction attention: queries at full resolution, keys and values from the map shrunk
    by a strided conv (kernel = stride = `extent`) and a LayerNorm, so every token sees the whole image
    while the attention itself costs 1/extent^2 of global attention's (the reduction conv adds C^2 MACs per
    token, as much as one more Linear). Ratio 1 is plain global attention. A map that the ratio does not
    divide is zero-padded before the reduction, without a mask (unlike the window mixers): the border
    cells of the reduced grid average in zeros, as in the authors' release. Its V lives on the reduced
    grid, so EC runs on the input x.
    Its original position encoding is PVT v1's absolute embedding, which the stage adds (`pos`)."""

    position = "absolute"
    min_extent = 1

    def __init__(self, dim, num_heads, extent, *, index, pos):
        super().__init__(dim, num_heads)
        self.ratio = extent
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        if extent > 1:
            self.sr = Conv(dim, dim, extent, stride=extent)
            self.norm = nn.LayerNorm(dim)

    def reduce(self, x):
        """(B, H, W, C) -> (B, ceil(H/r), ceil(W/r), C): the map that keys and values are computed from."""
        if self.ratio == 1:
            return x
        return self.norm(self.sr(pad_to_multiple(x, self.ratio, self.ratio)))

    def mix(self, x):
        B, H, W, C = x.shape
        q = self.q(x).reshape(B, H * W, self.num_heads, -1).transpose(1, 2)  # (B, heads, N, d)
        kv = self.kv(self.reduce(x)).reshape(B, -1, 2, self.num_heads, C // self.num_heads)  # (B, M, 2, heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, M, d) each; M: the cells of the reduced grid
        out = attend(q, k, v, record=self.record)  # (B, heads, N, d)
        return out.transpose(1, 2).reshape(B, H, W, C), x  # EC convolves the input


MIXERS = {
    "pool": Pooling,
    "conv": DepthwiseConv,
    "window": WindowAttention,
    "cswin": CrossShapedWindowAttention,
    "pvt": SpatialReductionAttention,
    "swin": ShiftedWindowAttention,
    "global": GlobalAttention,
    "identity": Identity,
}


@contextmanager
def record_attention(model):
    """Run every attention mixer of `model` through the manual path and collect its probabilities.

        with uninext.record_attention(model) as maps:
            logits = model(images)
        maps["stages.0.blocks.1.mixer"]  # (B, heads, H*W, H*W), rows = queries, columns = keys

    Queries and keys are the tokens of the stage's grid in raster order; a window mixer's row is zero
    outside the query's window, a cswin map holds the vertical-stripe heads first, and pvt's columns are
    the cells of its reduced grid. The outputs equal those of the SDPA path (tested). A mixer that attends
    more than once per forward (cswin's two branches) gives the heads of all its calls, in order; each
    forward replaces the maps of the one before."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"record_attention takes a model (an nn.Module), got {type(model).__name__}")
    maps, hooks = {}, []
    mixers = {name: m for name, m in model.named_modules() if isinstance(m, AttentionMixer)}
    for name, mixer in mixers.items():
        mixer.record = lambda probs, name=name: maps.__setitem__(
            name, torch.cat((maps[name], probs.detach()), dim=1) if name in maps else probs.detach())
        hooks.append(mixer.register_forward_pre_hook(lambda module, args, name=name: maps.pop(name, None)))
    try:
        yield maps
    finally:
        for mixer in mixers.values():
            mixer.record = None
        for hook in hooks:
            hook.remove()


# ----------------------------------------------------------------------------------------------------------
# Configuration and presets


@dataclass(frozen=True)
class Config:
    """Everything that defines a network. Per-stage values are 4-tuples."""

    mixer: str = "window"
    dims: tuple = (64, 128, 256, 512)
    depths: tuple = (2, 2, 18, 2)
    head_dim: int = 32
    mlp_ratio: int = 4
    mixer_size: tuple = (7, 7, 7, 7)  # the mixer's extent per stage, see MIXER_SIZES
    stem_stride: int = 4  # stride of the stem; the stages add 2, 2, 2: total 32 (ImageNet) or 16
    img_size: int = 224  # the image size the layout is made for (absolute position embeddings)
    in_chans: int = 3
    num_classes: int = 1000
    drop_path: float = 0.0  # stochastic depth, rising linearly from 0 to this over all blocks
    conv_stem: bool = True  # the four UniNeXt ingredients; all off is the vanilla architecture
    ec: bool = True
    hdc: bool = True
    pc: bool = True
    mixer_pos: bool = False  # the mixer's original position encoding (on in vanilla)
    global_pool: str = "avg"  # the head's pooling: "avg", or "" for a head applied at every position

    def __post_init__(self):
        """Refuse a configuration that would fail deep inside the model, or build something else silently."""
        problems = []
        for name in ("dims", "depths", "mixer_size"):  # tuples, so that a Config can be hashed and compared
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        mixer = MIXERS.get(self.mixer) if isinstance(self.mixer, str) else None
        if mixer is None:
            problems.append(f"mixer must be one of {', '.join(MIXERS)}, got {self.mixer!r}")
        elif not (isinstance(mixer, type) and issubclass(mixer, Mixer)):
            problems.append(f"MIXERS[{self.mixer!r}] must be a subclass of uninext.Mixer, got {mixer!r}")
        for name, low in [("dims", 1), ("depths", 0), ("mixer_size", 0)]:
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 4 and all(whole(v, low) for v in value)):
                problems.append(f"{name} must be 4 whole numbers >= {low}, one per stage, got {value!r}")
            elif name == "mixer_size" and isinstance(mixer, type) and issubclass(mixer, Mixer):
                odd = " and odd" if mixer.odd_extent else ""
                if any(v < mixer.min_extent or (mixer.odd_extent and v % 2 == 0) for v in value):
                    problems.append(f"the {self.mixer} mixer's extents (mixer_size) must be >= {mixer.min_extent}"
                                    f"{odd}, got {tuple(value)}")
        for name, low in [("head_dim", 1), ("mlp_ratio", 1), ("in_chans", 1), ("num_classes", 0)]:
            if not whole(getattr(self, name), low):
                problems.append(f"{name} must be a whole number >= {low}, got {getattr(self, name)!r}")
        if not problems and any(d % self.head_dim for d in self.dims):
            problems.append(f"head_dim {self.head_dim} must divide every stage width, dims {tuple(self.dims)}")
        if self.stem_stride not in (2, 4):
            problems.append(f"stem_stride must be 2 (small images) or 4 (ImageNet), got {self.stem_stride!r}")
        elif not whole(self.img_size, 8 * self.stem_stride):
            problems.append(f"img_size must be a whole number >= {8 * self.stem_stride} (one token in the last "
                            f"stage at stem_stride {self.stem_stride}), got {self.img_size!r}")
        for name in ("conv_stem", "ec", "hdc", "pc", "mixer_pos"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (isinstance(self.drop_path, (int, float)) and 0 <= self.drop_path < 1):
            problems.append(f"drop_path is a probability in [0, 1), got {self.drop_path!r}")
        if self.global_pool not in ("avg", ""):
            problems.append(f"global_pool must be 'avg' or '' (no pooling), got {self.global_pool!r}")
        if problems:
            raise ValueError("; ".join(problems))


def whole(value, low):
    """True for an int (not a bool) >= low."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


# The mixers' extent per stage. At 224x224 the stage grids are 56, 28, 14, 7: windows of 7 divide them all;
# CSWin's stripes widen 1, 2, 7 and the last stage (one 7x7 grid) is one global branch (0); PVT's reduction
# ratios 8, 4, 2, 1 bring every stage's keys to a 7x7 grid. These are the authors' settings.
IMAGENET_SIZES = {
    "pool": (3, 3, 3, 3), "conv": (7, 7, 7, 7), "window": (7, 7, 7, 7), "swin": (7, 7, 7, 7),
    "cswin": (1, 2, 7, 0), "pvt": (8, 4, 2, 1), "global": (0, 0, 0, 0), "identity": (0, 0, 0, 0),
}
# At 32x32 with a stride-2 stem the grids are 16, 8, 4, 2. Windows of 4 give 16, 4 and 1 windows in the
# first three stages (the last is global either way); swin shifts by 2. Stripes 1, 2, 2 keep CSWin's
# "thin first, wide later" pattern on grids a quarter the size, and the last stage is global as at 224.
# Reductions 4, 2, 1, 1 give keys on a 4x4, 4x4, 4x4 and 2x2 grid, PVT's "same small key grid everywhere".
# A 7x7 conv is kept: it is ConvNeXt's kernel and covers most of a 16x16 grid.
# Beware: N32's first two stages have one block each, and swin shifts only odd blocks, so in N32 its one
# shifted block sits in stage 3, whose 4x4 grid is a single window: N32 swin computes exactly what N32
# window does. T32, with two blocks in every stage, shifts in all of them.
SMALL_SIZES = {
    "pool": (3, 3, 3, 3), "conv": (7, 7, 7, 7), "window": (4, 4, 4, 4), "swin": (4, 4, 4, 4),
    "cswin": (1, 2, 2, 0), "pvt": (4, 2, 1, 1), "global": (0, 0, 0, 0), "identity": (0, 0, 0, 0),
}

# Named sizes: a plain dict of Config fields, plus the table of mixer extents for their layout.
# T, S, B are the paper's (224x224, 1000 classes, depths 2/2/18/2, head_dim 32).
# T32 and N32 are for 32x32 images (CIFAR; Fashion-MNIST padded from 28). At 32x32 the ImageNet layout
# leaves a 1x1 grid in its last stage and windows of 7 on an 8x8 grid, so these presets
#   - use a stem of stride 2 (first conv stride 1): grids 16, 8, 4, 2, as fine as ImageNet's 56..7 are
#     coarse relative to the object, and the same number of tokens per window as at 224 in stage 1;
#   - cut the third stage from 18 to 6 blocks (T32) or 3 (N32): the data is 50x smaller than ImageNet and
#     the 4x4 grid of stage 3 has little left to mix;
#   - T32 keeps T's widths (about ResNet-18's size, the usual CIFAR baseline: README gives the counts);
#     N32 halves them and uses 16-dimensional heads, to train on two CPU cores.
PRESETS = {
    "T": dict(dims=(64, 128, 256, 512), depths=(2, 2, 18, 2), sizes=IMAGENET_SIZES),
    "S": dict(dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), sizes=IMAGENET_SIZES),
    "B": dict(dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), sizes=IMAGENET_SIZES),
    "T32": dict(dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), sizes=SMALL_SIZES,
                stem_stride=2, img_size=32),
    "N32": dict(dims=(32, 64, 128, 256), depths=(1, 1, 3, 1), head_dim=16, sizes=SMALL_SIZES,
                stem_stride=2, img_size=32),
}

# What `arch` sets; any of it can be overridden one ingredient at a time.
ARCHS = {
    "uninext": dict(conv_stem=True, ec=True, hdc=True, pc=True, mixer_pos=False),
    "vanilla": dict(conv_stem=False, ec=False, hdc=False, pc=False, mixer_pos=True),
}


# ----------------------------------------------------------------------------------------------------------
# The model


class UniNeXt(nn.Module):
    """Stem -> four stages -> head (LayerNorm, global average pool, Linear). Takes (B, in_chans, H, W)
    images; inside, one (B, H, W, C) layout throughout. The methods that timm's tools and a detection or
    segmentation neck call come after the model, in their own section of this class."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        stem = ConvStem if cfg.conv_stem else PatchEmbed
        self.stem = stem(cfg.in_chans, cfg.dims[0], cfg.stem_stride)
        n = sum(cfg.depths)
        rates = [cfg.drop_path * i / max(n - 1, 1) for i in range(n)]  # linear from 0 to drop_path
        starts = [sum(cfg.depths[:i]) for i in range(4)]
        self.stages = nn.ModuleList(Stage(cfg, i, rates[starts[i]:starts[i] + cfg.depths[i]]) for i in range(4))
        self.num_features = cfg.dims[-1]  # the width of the pooled features (timm's name)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.apply(self._init_weights)
        self.pretrained_cfg = self.layout_cfg()

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def min_size(self):
        """The smallest height and width the layout takes: one token in the last stage."""
        return self.cfg.stem_stride * 8

    def forward_features(self, x):
        """(B, in_chans, H, W) -> the last stage's map after the final LayerNorm, (B, H/32, W/32, 8C), in the
        (B, H, W, C) layout that `output_fmt` declares, as timm's Swin."""
        x = check_images(x, self.cfg.in_chans, next(self.stem.parameters()).dtype, self.min_size)
        x = self.stem(x.permute(0, 2, 3, 1))  # (B, H/4, W/4, C)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x, pre_logits=False):
        """(B, H, W, C) from forward_features -> the pooled features (B, num_features) with pre_logits=True,
        else the logits (B, num_classes). With global_pool "" nothing is pooled: (B, H, W, ...)."""
        if self.cfg.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))  # (B, num_classes)

    # ------------------------------------------------------------------------------------------------------
    # timm's model contract: the attributes and methods that timm's tests check of every model and its
    # tools (feature wrappers, data configs, optimizers) call. Nothing above depends on them.

    output_fmt = "NHWC"  # the layout of forward_features

    @property
    def num_classes(self):
        return self.cfg.num_classes

    @property
    def global_pool(self):
        return self.cfg.global_pool

    @property
    def head_hidden_size(self):
        return self.num_features  # the head has no hidden layer: the pooled features go straight to it

    @property
    def feature_info(self):
        """One entry per stage: its width, its stride, and the module that outputs it."""
        return [dict(num_chs=self.cfg.dims[i], reduction=self.cfg.stem_stride * 2 ** i, module=f"stages.{i}")
                for i in range(len(self.stages))]

    @property
    def default_cfg(self):
        return self.pretrained_cfg  # timm's older name

    def layout_cfg(self):
        """What timm's `resolve_data_config` reads, for a model that has not been trained: its layout
        (input size, final grid, first conv, classifier) with ImageNet's mean and std on the 0-1 scale,
        as timm's untrained models give (one grey value each when in_chans is not 3). `load` replaces the
        mean and std by those the model was trained with."""
        cfg, grid = self.cfg, math.ceil(self.cfg.img_size / self.min_size)
        mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if cfg.in_chans == 3 else \
            ((0.449,) * cfg.in_chans, (0.226,) * cfg.in_chans)
        return dict(input_size=(cfg.in_chans, cfg.img_size, cfg.img_size), pool_size=(grid, grid),
                    crop_pct=0.9, interpolation="bicubic", mean=mean, std=std, num_classes=cfg.num_classes,
                    first_conv="stem.conv1" if cfg.conv_stem else "stem.proj", classifier="head",
                    fixed_input_size=False)

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        """A new, freshly initialised head for `num_classes` classes (0: none, the model gives the pooled
        features), for fine-tuning on another label set; on the device and in the dtype of the model.
        `global_pool` "avg" or "" (no pooling), when given, replaces the pooling."""
        self.cfg = replace(self.cfg, num_classes=num_classes, global_pool=self.cfg.global_pool
                           if global_pool is None else global_pool)
        like = next(self.stem.parameters())  # where and in what dtype the model lives
        self.head = (nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
                     if num_classes else nn.Identity())
        self.head.apply(self._init_weights)

    def no_weight_decay(self):
        """Names of the parameters that weight decay should spare: the position encodings of the vanilla
        mixers, the absolute embeddings and Swin's relative bias tables, which Swin, PVT and DeiT train
        without decay. Biases and norm gains are spared by their shape."""
        return {name for name, _ in self.named_parameters() if name.endswith(("pos_embed", "rel_pos.table"))}

    def set_grad_checkpointing(self, enable=True):
        """Recompute each block's activations in backward instead of keeping them: for inputs several times
        224 (detection, segmentation), at about a third more compute."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        """(B, in_chans, H, W) -> (final, maps): `final` is forward_features(x), `maps` the outputs of the
        stages that `indices` takes (None: all four; an int n: the last n; a list: those, negative ones
        counted from the end), at strides 4, 8, 16, 32 (2 to 16 for the small-image presets): the pyramid
        for a detection or segmentation neck. `norm` applies the final LayerNorm to the last stage's map
        (the others are the raw residual stream); `stop_early` skips the stages after the last one taken;
        `output_fmt` "NCHW" gives channels_last (B, C_i, H_i, W_i) views, "NHWC" the maps as they are.
        When it stops before the last stage, `final` is the last map computed, without the final norm."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take = stage_indices(indices, len(self.stages))
        x = check_images(x, self.cfg.in_chans, next(self.stem.parameters()).dtype, self.min_size)
        x = self.stem(x.permute(0, 2, 3, 1))  # (B, H/4, W/4, C)
        maps, last = [], len(self.stages) - 1
        for i, stage in enumerate(self.stages[:max(take) + 1] if stop_early else self.stages):
            x = stage(x)
            if i in take:
                out = self.norm(x) if norm and i == last else x
                maps.append(out.permute(0, 3, 1, 2) if output_fmt == "NCHW" else out)
        return maps if intermediates_only else (self.norm(x) if i == last else x, maps)

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the stages after the last that `indices` takes (and the final norm, the head) so that a
        feature extractor carries no unused weights; returns the stage indices taken. The final norm, made
        for the last stage's width, goes too when that stage does."""
        take = stage_indices(indices, len(self.stages))
        self.stages = self.stages[:max(take) + 1]
        if prune_norm or len(self.stages) < 4:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


def stage_indices(indices, n):
    """timm's reading of `indices` over n stages: None all, an int k the last k, a list those (negative
    ones counted from the end)."""
    if indices is None or (isinstance(indices, int) and 0 < indices <= n):
        return list(range(n - (indices or n), n))
    if isinstance(indices, (list, tuple)) and indices and all(isinstance(i, int) and -n <= i < n for i in indices):
        return [i % n for i in indices]
    raise ValueError(f"indices must be None, a count from 1 to {n}, or a list of stage indices in "
                     f"[-{n}, {n - 1}], got {indices!r}")


def check_images(x, in_chans, dtype, min_size):
    """x, or a ValueError that says what is wrong with it and the fix. `torch.fx.wrap` below makes it one
    opaque call in an fx-traced graph, so that torchvision's `create_feature_extractor` can trace the model;
    the model goes on with what it returns, so that the check stays in the traced graph and runs on its
    real inputs."""
    if x.dim() != 4 or x.shape[1] != in_chans or x.shape[0] == 0:
        raise ValueError(f"expected images of shape (B, {in_chans}, H, W) with B >= 1, got {tuple(x.shape)}")
    if x.dtype != dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
        fix = f"x.to({dtype})" if x.is_floating_point() else "standardise them into floats as in training"
        raise ValueError(f"expected {dtype} images (the model's dtype), got {x.dtype}: {fix}")
    if min(x.shape[2:]) < min_size:
        raise ValueError(f"a {x.shape[2]}x{x.shape[3]} image is too small for this layout (total stride "
                         f"{min_size}): height and width must be at least {min_size}")
    return x


torch.fx.wrap("check_images")


def create_model(size, mixer, *, num_classes=1000, arch="uninext", **overrides):
    """Build a network: `size` is one of PRESETS ("T", "S", "B" at 224x224; "T32", "N32" for 32x32 images),
    `mixer` one of MIXERS, `arch` "uninext" or "vanilla". `overrides` set any Config field: the ingredient
    switches `conv_stem`, `ec`, `hdc`, `pc`, `mixer_pos`, and `drop_path`, `in_chans`, `dims`, `depths`,
    `mixer_size`, `global_pool`, ... `mixer_pos` follows `ec` unless given: adding EC to the vanilla
    architecture replaces the mixer's original position encoding, as in UniNeXt. A mixer registered in
    MIXERS that the presets' extent tables do not know needs `mixer_size`."""
    return UniNeXt(config(size, mixer, num_classes=num_classes, arch=arch, **overrides))


def config(size, mixer, *, num_classes=1000, arch="uninext", **overrides):
    """The Config that create_model(...) with the same arguments builds, checked, without building it."""
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(PRESETS)}")
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; choose one of {', '.join(MIXERS)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    known = {f.name for f in fields(Config)} - {"mixer"}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(known))}")
    preset = dict(PRESETS[size])
    sizes = preset.pop("sizes")
    if mixer not in sizes and "mixer_size" not in overrides:
        raise ValueError(f"the {size} preset has no extents for mixer {mixer!r}: pass mixer_size, one per stage")
    settings = {**preset, **ARCHS[arch], "mixer_size": sizes.get(mixer), "num_classes": num_classes}
    if "ec" in overrides and "mixer_pos" not in overrides:
        settings["mixer_pos"] = not overrides["ec"]
    return Config(mixer=mixer, **{**settings, **overrides})


def load(path, map_location="cpu"):
    """A UniNeXt trained by train_minimal.py, rebuilt from its checkpoint, in eval mode: a file, or a folder
    (its model.pt, as in checkpoints/, else the last.pt of a run folder), with the weights that were tested (the
    EMA's when the run kept one). The checkpoint holds the model's Config, so nothing else (data, command line)
    is needed; `model.pretrained_cfg` gives the input normalisation it was trained with, on timm's 0-1 scale. It
    is read on the CPU, then moved to `map_location`. Only tensors and plain values are read (`weights_only`): a
    file that holds code is refused, never run. Anything that is not such a checkpoint raises one ValueError
    that says why."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("model.pt", "last.pt") if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds neither model.pt (an exported checkpoint) nor last.pt (a "
                                    f"train_minimal.py run): pass one of those files or such a folder")
        path = found[0]
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # torch's own message would advise loading with weights_only=False: not ours
        why = (f"torch cannot read it ({type(e).__name__}): a truncated or corrupted file, or not a torch file"
               if not isinstance(e, pickle.UnpicklingError) else "it holds objects other than tensors and "
               "plain values (code, which load() never runs)" + ("" if zipfile.is_zipfile(path) else ", or is "
               "not a torch file at all"))
        raise ValueError(f"{path} is not a UniNeXt checkpoint: {why}") from None
    keys = ("model_config", "model", "normalisation")
    if not isinstance(checkpoint, dict) or not all(checkpoint.get(k) for k in keys):
        raise ValueError(f"{path} is not a UniNeXt checkpoint: it lacks {' or '.join(keys)} (a baseline's "
                         f"checkpoint, one by an earlier train_minimal.py, or another model's weights)")
    try:
        model = UniNeXt(Config(**checkpoint["model_config"]))
        ema = checkpoint.get("ema")
        state = {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")} if ema else None
        model.load_state_dict(state or checkpoint["model"])
        norm = {k: tuple(v / 255 for v in checkpoint["normalisation"][k].tolist()) for k in ("mean", "std")}
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path} is not a UniNeXt checkpoint this code can rebuild: {e!r}") from e
    if not all(len(v) == model.cfg.in_chans for v in norm.values()) or min(norm["std"]) <= 0:
        raise ValueError(f"{path} is not a UniNeXt checkpoint this code can rebuild: its normalisation needs "
                         f"a mean and a positive std per channel ({model.cfg.in_chans}), got {norm}")
    model.pretrained_cfg = {**model.pretrained_cfg, **norm, "crop_pct": 1.0}
    return model.to(map_location).eval()

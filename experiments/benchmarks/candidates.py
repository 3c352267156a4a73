"""Candidate speed changes to uninext.py, each checked for the same function and timed against the code as it
is, on the block that the profiles (profile_block.py) point at. The evidence behind benchmarks/NOTES.md's
proposals: once a candidate is adopted in uninext.py, its entry here goes.

    python experiments/benchmarks/candidates.py                  # all candidates, UniNeXt-T blocks at 224, batch 4, CPU
    python experiments/benchmarks/candidates.py --only cswin_unbind --batch 8
    python experiments/benchmarks/candidates.py --device cuda --batch 128      # on a GPU, bf16 autocast

Each candidate swaps one mixer's `mix` (or one parameter layout) in a deep copy of a real block, checks on the CPU
that the output and every gradient equal the original's (float32, batch 2, tolerance 1e-4), then times forward
+ backward from a random upstream gradient, alternating original and candidate (ABBA) `--reps` times each so
that load from other jobs falls on both alike, and reports the median of each; `control` changes nothing and
so shows the noise of the measurement. On the CPU the time is process CPU time with one thread, what one idle
core would take (wall time would charge either side for other people's jobs); on a GPU it is CUDA event time
under bf16 autocast.

Candidates (the names say what they change):
  window_one_copy   window attention: one copy into window order for q, k, v together instead of two
                    (`window_partition` then a head permute), one copy back instead of two
  window_split_v    the above, and V from its own Linear on the same weight rows, so that EC convolves a
                    contiguous map instead of a strided slice of qkv (which the conv copies, forward and
                    backward)
  cswin_unbind      cross-shaped attention: the two branches taken by one `unbind` instead of two `select`s
                    (whose backward each writes a zero-filled qkv-sized gradient, then adds)
  pvt_weight_nhwc   PVT's reduction conv with its weight stored channels_last, as its input is: the conv
                    otherwise copies the weight to channels_last on every call and its gradient back
  dwconv_shifts     every depthwise conv of the block (EC, HdC, PC) as 9 shifted multiply-adds: for
                    --compile, where Inductor can fuse it with its neighbours (in eager it is 18 passes)
"""

import argparse
import contextlib
import copy
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import uninext  # noqa: E402


def window_one_copy(self, x, split_v=False):
    """WindowAttention.mix for the case UniNeXt runs: no shift, no bias, windows that divide the map."""
    B, H, W, C = x.shape
    wh, ww = min(self.window, H), min(self.window, W)
    assert not self.shift and self.rel_pos is None and H % wh == 0 and W % ww == 0 and self.record is None
    heads, d, nh, nw = self.num_heads, C // self.num_heads, H // wh, W // ww
    bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
    if split_v:
        qk = F.linear(x, self.qkv.weight[:2 * C], bias[:2 * C])  # (B, H, W, 2C)
        v_map = F.linear(x, self.qkv.weight[2 * C:], self.v_bias)  # (B, H, W, C), contiguous for EC
        qk = qk.reshape(B, nh, wh, nw, ww, 2, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)  # (2, B, nh, nw, h, wh, ww, d)
        q, k = qk.reshape(2, B, nh * nw * heads, wh * ww, d).unbind(0)  # one copy
        v = v_map.reshape(B, nh, wh, nw, ww, heads, d).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, -1, wh * ww, d)
    else:
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, H, W, 3C)
        v_map = qkv[..., 2 * C:]
        windows = qkv.reshape(B, nh, wh, nw, ww, 3, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = windows.reshape(3, B, nh * nw * heads, wh * ww, d).unbind(0)  # (B, nW*h, N, d), one copy
    out = F.scaled_dot_product_attention(q, k, v)  # (B, nW*h, N, d)
    out = out.reshape(B, nh, nw, heads, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, C)  # one copy
    return out, v_map  # Mixer.forward adds EC of v_map


def cswin_unbind(self, x):
    """CrossShapedWindowAttention.mix with the branches from one unbind instead of two selects."""
    B, H, W, C = x.shape
    assert self.record is None
    qkv = self.qkv(x).unflatten(-1, (3, self.branches, -1))  # (B, H, W, 3, branches, C/branches)
    outs = []
    for window, branch in zip(self.stripes(H, W), qkv.unbind(4)):
        mask = uninext.attention_mask(H, W, window, (0, 0), None, self.branch_heads, qkv.dtype, x.device)
        outs.append(uninext.attention_in_windows(branch.flatten(-2), self.branch_heads, window, mask=mask))
    return torch.cat(outs, dim=-1), qkv[..., 2, :, :].flatten(-2)


def dwconv_as_shifts(self, x):
    """uninext.Conv.forward for a depthwise k x k conv, stride 1, 'same' padding, as k*k shifted
    multiply-adds on the (B, H, W, C) map: slow in eager, but one fusable pointwise kernel for Inductor,
    which otherwise calls cuDNN for the conv and cannot fuse it with the LayerNorm, GELU or add around it."""
    B, H, W, C = x.shape
    k = self.kernel_size[0]
    padded = F.pad(x, (0, 0, k // 2, k // 2, k // 2, k // 2))  # (B, H + k - 1, W + k - 1, C)
    taps = self.weight.reshape(C, k * k)  # tap i * k + j multiplies the input at offset (i, j) of the window
    out = self.bias
    for i in range(k):
        for j in range(k):
            out = out + padded[:, i:i + H, j:j + W] * taps[:, i * k + j]
    return out  # (B, H, W, C)


def depthwise_as_shifts(block):
    for module in block.modules():
        if isinstance(module, uninext.Conv) and module.groups == module.in_channels and module.stride == (1, 1):
            module.forward = types.MethodType(dwconv_as_shifts, module)


def swap_mix(mix, **kwargs):
    def apply(block):
        block.mixer.mix = types.MethodType(lambda self, x: mix(self, x, **kwargs), block.mixer)
    return apply


def nhwc_weight(block):
    block.mixer.sr.weight.data = block.mixer.sr.weight.data.contiguous(memory_format=torch.channels_last)


CANDIDATES = {  # name: (mixer, stage, change applied to a copy of that stage's first block)
    "control": ("window", 0, lambda block: None),  # no change: the noise of the measurement
    "window_one_copy": ("window", 0, swap_mix(window_one_copy)),
    "window_split_v": ("window", 0, swap_mix(window_one_copy, split_v=True)),
    "cswin_unbind": ("cswin", 0, swap_mix(cswin_unbind)),
    "pvt_weight_nhwc": ("pvt", 0, nhwc_weight),
    "dwconv_shifts": ("window", 0, depthwise_as_shifts),
}


def block_and_input(mixer, stage, batch, img_size):
    torch.manual_seed(0)
    model = uninext.create_model("T", mixer)
    x = torch.randn(batch, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        x = model.stem(x.permute(0, 2, 3, 1))
        for s in model.stages[:stage]:
            x = s(x)
        x = model.stages[stage].downsample(x)  # (B, H, W, C), the block's real input
    return model.stages[stage].blocks[0], x


def forward_backward(block, x, grad, autocast=None):
    x = x.detach().requires_grad_()
    block.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        out = block(x)
    out.backward(grad)
    return out.detach(), x.grad, [p.grad for p in block.parameters()]


def check_same_function(block, candidate, x):
    """Output, input gradient and every parameter gradient equal, in float32 on the CPU."""
    grad = torch.randn_like(x)  # a block keeps the (B, H, W, C) shape
    expected, got = forward_backward(block, x, grad), forward_backward(candidate, x, grad)
    for g, e in zip([got[0], got[1], *got[2]], [expected[0], expected[1], *expected[2]]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)  # sums in another order


def seconds(module, x, grad, device):
    """One forward + backward: process CPU time on the CPU, CUDA event time (bf16 autocast) on a GPU."""
    if device.type == "cpu":
        t0 = time.process_time()
        forward_backward(module, x, grad)
        return time.process_time() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    forward_backward(module, x, grad, torch.autocast("cuda", torch.bfloat16))
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true",
                        help="time both blocks compiled (fullgraph; compile time not counted)")
    parser.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                        help="torch.compile backend for --compile; aot_eager and eager generate no code: fast "
                             "checks of the compiled path on the CPU (default inductor)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    how = ("process CPU time, 1 thread, fp32" if device.type == "cpu"
           else f"CUDA event time, bf16 autocast, {torch.cuda.get_device_name()}")
    how += f", compiled ({args.backend})" if args.compile else ", eager"
    print(f"T blocks at {args.img_size}x{args.img_size}, batch {args.batch}, forward + backward, median {how} of "
          f"{args.reps} alternating runs each; torch {torch.__version__}")

    for name in args.only:
        mixer, stage, change = CANDIDATES[name]
        block, x = block_and_input(mixer, stage, args.batch, args.img_size)
        candidate = copy.deepcopy(block)
        change(candidate)
        check_same_function(block, candidate, x[:2])
        block, candidate, x = block.to(device), candidate.to(device), x.to(device)
        if args.compile:
            torch._dynamo.reset()
            for module in (block, candidate):
                module.compile(backend=args.backend, fullgraph=True, dynamic=False)
        grad = torch.randn_like(x)  # a block keeps the (B, H, W, C) shape
        for module in (block, candidate, block, candidate):  # warm-up: first calls, cuDNN's choices
            seconds(module, x, grad, device)
        times = {block: [], candidate: []}
        for rep in range(args.reps):
            for module in (block, candidate) if rep % 2 else (candidate, block):  # ABBA: no order bias
                times[module].append(seconds(module, x, grad, device))
        before, after = statistics.median(times[block]), statistics.median(times[candidate])
        print(f"{name:16} {mixer:6} stage {stage + 1} {tuple(x.shape)}: same outputs and gradients; "
              f"{1e3 * before:7.2f} ms -> {1e3 * after:7.2f} ms ({after / before - 1:+.1%})", flush=True)


if __name__ == "__main__":
    main()

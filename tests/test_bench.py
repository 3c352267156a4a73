"""experiments/benchmarks/bench.py, as a specification: its quick CPU run measures every mixer it is asked for and writes
JSON that says what produced the numbers, and its FLOP count charges a convolution's backward twice its
forward, grouped or not. 34 s measured at load average 6 on 2 CPU cores (13 s at 1.8 with twice the rows)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import uninext

BENCH = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks" / "bench.py"
sys.path.insert(0, str(BENCH.parent))
import bench  # noqa: E402


def test_quick_run_writes_a_row_per_mixer_with_positive_finite_throughput(tmp_path):
    mixers = list(uninext.MIXERS)
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(BENCH), "--quick", "--device", "cpu", "--mixers", *mixers,
                    "--json", str(out)], check=True, timeout=120)
    result = json.loads(out.read_text())

    rows = result["rows"]
    assert [(r["arch"], r["mixer"], r["compile"]) for r in rows] == [("uninext", mixer, "off") for mixer in mixers]
    for row in rows:
        assert "error" not in row, row
        for key in ("train_img_s", "train_wall_img_s", "infer_img_s", "infer_wall_img_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["mixer"], key, row[key])
        assert row["flops_train"] > row["flops_fwd"] > 0
        assert row["train_peak_gib"] is None  # the CPU has no allocator peak to report
    meta = result["meta"]
    assert meta["precision"] == "fp32" and meta["size"] == "N32" and meta["img_size"] == 32 and meta["threads"] == 1
    assert "bench.py" in meta["command"] and meta["device"] and meta["date"] and meta["torch"] == torch.__version__


@pytest.mark.parametrize("groups", [1, 64])
def test_a_conv_backward_counts_twice_its_forward_flops_even_when_depthwise(groups):
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=groups)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    mapping = {torch.ops.aten.convolution_backward: bench.conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        y = conv(x)
        forward = counter.get_total_flops()
        y.sum().backward()
    assert forward == 2 * 2 * 16 * 16 * 64 * (64 // groups) * 9  # 2 FLOPs per MAC
    assert counter.get_total_flops() == 3 * forward  # forward, grad of the input, grad of the weight


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--json", "{file}/rows.json"], "cannot write there"),
])
def test_bad_options_are_refused_before_anything_is_measured(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--quick", *(a.format(file=tmp_path / "file") for a in argv)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err

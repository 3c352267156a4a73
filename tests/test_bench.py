"""experiments/benchmarks, as a specification. bench.py's quick CPU run measures every mixer it is asked for and
writes JSON that says what produced the numbers, after every row, so that a run stopped half way keeps what it
finished; its FLOP count charges a convolution's backward twice its forward, grouped or not; its compiler
settings fall back to the names of older torch releases. gpu_check.sh stops at once, with one line, where
there is no CUDA, and its --tiny dry run takes every step within its share of the budget and leaves every
file. The whole file: 94-109 s on 2 CPU cores at load average 1-2.3, 97 CPU-seconds (the dry run 73-81 s
of it: ten Python processes, each importing torch, and dynamo tracing three compiled runs)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import uninext

BENCH = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks" / "bench.py"
GPU_CHECK = BENCH.with_name("gpu_check.sh")
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


def test_a_run_stopped_after_its_first_row_leaves_that_row_in_its_json(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.Popen([sys.executable, str(BENCH), "--quick", "--device", "cpu", "--mixers", "pool", "conv",
                            "--json", str(out)], stdout=subprocess.PIPE, text=True)
    for line in run.stdout:  # the row's line is printed after its JSON was written
        if line.startswith("  uninext pool off:"):
            run.send_signal(signal.SIGTERM)  # as `timeout` stops a step
            break
    run.communicate(timeout=60)
    result = json.loads(out.read_text())
    assert run.returncode == -signal.SIGTERM
    assert result["meta"]["rows_planned"] == 2 and result["rows"][0]["mixer"] == "pool"
    assert result["rows"][0]["train_img_s"] > 0 and not (tmp_path / "bench.json.part").exists()


def test_compiler_settings_fall_back_to_the_names_of_older_torch_releases(monkeypatch):
    old = {"torch._dynamo.config": types.SimpleNamespace(__name__="torch._dynamo.config", cache_size_limit=8,
                                                         fail_on_cache_limit_hit=False),
           "torch._inductor.config": types.SimpleNamespace(__name__="torch._inductor.config",
                                                           force_disable_caches=False)}

    def import_module(name):  # torch 2.4: the old names, and no torch.compiler.config
        if name not in old:
            raise ModuleNotFoundError(name)
        return old[name]

    monkeypatch.setattr(bench.importlib, "import_module", import_module)
    assert bench.configure_compiler() == {"recompile_limit": "torch._dynamo.config.cache_size_limit",
                                          "fail_on_recompile_limit_hit": "torch._dynamo.config.fail_on_cache_limit_hit",
                                          "force_disable_caches": "torch._inductor.config.force_disable_caches"}
    dynamo = old["torch._dynamo.config"]
    assert dynamo.cache_size_limit == bench.RECOMPILE_LIMIT and dynamo.fail_on_cache_limit_hit
    assert old["torch._inductor.config"].force_disable_caches


def gpu_check(out, *args, budget=540):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, BUDGET=str(budget), OMP_NUM_THREADS="1")
    start = time.monotonic()
    run = subprocess.run(["bash", str(GPU_CHECK), *args], env=env, capture_output=True, text=True, timeout=300)
    return run, time.monotonic() - start


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without CUDA")
def test_gpu_check_without_cuda_stops_at_once_with_one_line_and_runs_no_step(tmp_path):
    run, seconds = gpu_check(tmp_path)
    assert run.returncode == 100 and seconds < 30, (run.returncode, seconds)
    assert run.stdout.splitlines() == [run.stdout.strip()] and "sees no CUDA device" in run.stdout, run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "preflight.log"]


def test_gpu_check_tiny_runs_every_step_within_its_share_of_the_budget_and_keeps_their_files(tmp_path):
    budget = 540
    run, _ = gpu_check(tmp_path, "--tiny", budget=budget)
    log = run.stdout
    assert run.returncode == 0, log[-3000:]

    plan = re.search(r"^== plan, BUDGET (\d+)s: (.*)$", log, re.MULTILINE)
    shares = {name: int(s) for name, s in re.findall(r"(\w+) (\d+)s", plan.group(2))}
    assert int(plan.group(1)) == budget and sum(shares.values()) <= budget
    started = re.findall(r"^== (\w+) \(limit (\d+)s\)", log, re.MULTILINE)
    took = [int(s) for s in re.findall(r"^== \w+: exit 0 after (\d+)s", log, re.MULTILINE)]
    names = list(shares)
    assert "== preflight skipped" in log and [name for name, _ in started] == names[1:]
    for i, (name, limit) in enumerate(started):  # its own share and what the earlier ones left, not the later ones'
        later = sum(shares[n] for n in names[names.index(name) + 1:])
        assert shares[name] <= int(limit) <= budget - sum(took[:i]) - later + i, (name, limit)  # + i: rounding

    checks = (tmp_path / "checks.log").read_text()
    assert "fused attention" in checks and checks.count("recompile count") == 2 and "FAILED" not in checks
    for name in ["T_eager", "T_window_block", "T_others_block", "T32_window"]:
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert len(result["rows"]) == result["meta"]["rows_planned"] and all("error" not in r for r in result["rows"])
        assert result["meta"]["command"] in (tmp_path / "speed_tables.md").read_text()
    for name in ["profile_model.txt", "profile_block.txt", "candidates.log", "candidates_compiled.log"]:
        assert (tmp_path / name).stat().st_size > 0, name

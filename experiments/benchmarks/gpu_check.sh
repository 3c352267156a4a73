#!/usr/bin/env bash
# The GPU speed checks in one call of at most BUDGET seconds (default 480): the rows that UniNeXt-T can be
# compared with at the anchors' setting (the authors' code and timm on one H200, anchors.json), profiles of
# its window block and of the whole network, the T32 epoch time, and the candidate changes of NOTES.md.
# Run from anywhere:
#
#   bash experiments/benchmarks/gpu_check.sh             # on a GPU; results in experiments/benchmarks/results
#   OUT=DIR bash experiments/benchmarks/gpu_check.sh     # the same, results in DIR
#   BUDGET=540 bash experiments/benchmarks/gpu_check.sh  # 9 minutes instead of 8: enough to reach the candidates
#   bash experiments/benchmarks/gpu_check.sh --tiny      # any machine: N32 at 32x32, 2 steps, compiled rows through
#                                                        # the aot_eager backend: proves the script runs (1.5-2
#                                                        # minutes on 2 CPU cores)
#
# Steps, in order of value, each under its own time limit, cut to what is left of BUDGET, so that a slow step
# costs only itself and every finished step's JSON and log are kept:
#   env            the card, the driver, torch
#   eager          T window/cswin/conv/pool/pvt at 224: batch 128 training, batch 256 inference, eager
#   profile_block  torch.profiler of one stage-1 window block, training, batch 128
#   profile_model  torch.profiler of the whole window network, training, batch 128
#   block          T window compiled per block: cold compile time, training and inference
#   t32            T32 window at 32x32, batch 512, eager and compiled per block: the 50,000-image epoch
#   candidates     candidates.py: the proposed uninext.py changes, timed eager on stage-1 blocks
#   candidates_compiled   the same for the ones meant for compiled runs
#   table          the Markdown speed tables (speed_table.py) of the JSON files above, always
# Exit status: the number of steps that failed or ran out of time.
set -u
cd "$(dirname "$0")/../.."
out=${OUT:-experiments/benchmarks/results}
budget=${BUDGET:-480}
mkdir -p "$out"

if [ "${1:-}" = "--tiny" ]; then
    # one thread: on a CPU that other jobs share, two OpenMP threads can stall each other for minutes
    big="--size N32 --img-size 32 --batch 4 --infer-batch 8 --steps 2 --warmup 1 --threads 1"
    small="$big"
    compiled="--backend aot_eager"  # Inductor's C++ code generation takes minutes on two CPU cores
    profile="--size N32 --batch 2 --steps 1 --warmup 1 --threads 1"
    candidates="--device cpu --batch 2 --img-size 112 --reps 2"  # 112: stage 1 is 28x28, windows of 7 fit
    compiled_candidates="control"
else
    big="--size T --img-size 224 --batch 128 --infer-batch 256 --steps 15 --warmup 5"
    small="--size T32 --img-size 32 --batch 512 --infer-batch 1024 --steps 15 --warmup 5"
    profile="--size T --batch 128 --steps 3 --warmup 2"
    compiled="--backend inductor"
    candidates="--device cuda --batch 128 --reps 20"
    compiled_candidates="control dwconv_shifts window_split_v"
fi

start=$SECONDS
failed=0
step() {  # step NAME LIMIT_SECONDS COMMAND...: run COMMAND, log it to $out/NAME.log, count a failure
    local name=$1 limit=$2 left=$((budget - (SECONDS - start)))
    shift 2
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "== $name skipped: ${left}s of the budget left"
        failed=$((failed + 1))
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    [ "$rc" -ne 0 ] && failed=$((failed + 1))
}

step env 20 bash -c 'nvidia-smi || echo "no nvidia-smi"; lscpu | grep "Model name"
    python -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"'
step eager 120 \
    python experiments/benchmarks/bench.py $big --mixers window cswin conv pool pvt --compile off --json "$out/T_eager.json"
step profile_block 40 python experiments/benchmarks/profile_block.py $profile --mixer window --out "$out/profile_block.txt"
step profile_model 40 \
    python experiments/benchmarks/profile_block.py $profile --mixer window --scope model --out "$out/profile_model.txt"
step block 200 \
    python experiments/benchmarks/bench.py $big --mixers window --compile block $compiled --json "$out/T_window_block.json"
step t32 150 \
    python experiments/benchmarks/bench.py $small --mixers window --compile off block $compiled --json "$out/T32_window.json"
step candidates 60 python experiments/benchmarks/candidates.py $candidates
step candidates_compiled 150 \
    python experiments/benchmarks/candidates.py $candidates --compile --only $compiled_candidates
python experiments/benchmarks/speed_table.py "$out"/*.json > "$out/speed_tables.md" || failed=$((failed + 1))
cat "$out/speed_tables.md"
echo "== done in $((SECONDS - start))s, $failed step(s) failed; results in $out"
exit "$failed"

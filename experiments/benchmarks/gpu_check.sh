#!/usr/bin/env bash
# The GPU speed checks in one run of at most BUDGET seconds (default 540: on a GPU machine, in a run limited to
# 10 minutes, this leaves a minute to spare). It measures UniNeXt-T at the anchors' setting (anchors.json: the
# authors' code and timm on one H200), eager and compiled, the T32 epoch time, profiles of the window network
# and of one of its blocks, and the candidate changes of NOTES.md. Run from anywhere:
#
#   bash experiments/benchmarks/gpu_check.sh             # on an H100 or H200; results in experiments/benchmarks/results
#   OUT=DIR bash experiments/benchmarks/gpu_check.sh     # the same, results in DIR
#   BUDGET=900 bash experiments/benchmarks/gpu_check.sh  # 15 minutes: the steps share 870 s instead of 510
#   PYTHON=python bash experiments/benchmarks/gpu_check.sh   # another interpreter (default python3)
#   bash experiments/benchmarks/gpu_check.sh --tiny      # any machine, no GPU needed: N32 at 32x32, 2 steps,
#                                                        # compiled rows through dynamo's eager backend (no code
#                                                        # generation): proves that every step runs
#
# First the preflight (gpu_checks.py preflight), in a few seconds: it stops the run, with one line and exit
# status 100, when there is no python with torch, when torch sees no CUDA device, or when the card lacks
# native bf16 (every row is bf16 autocast); on a bf16 card that is not an H100 or H200 it warns and goes on,
# since the rows stand but compare with the H200 anchors as ratios only. --tiny skips it.
# Then the steps, most valuable first. Each has a share of BUDGET: the seconds below at the default; the
# preflight keeps its 30 s under any BUDGET and the other steps share the rest in the same proportions. A
# step may use its own share and whatever the steps before it left unused, never the shares of the steps
# after it, so the limits add up to BUDGET at most and a slow step costs only itself. Every step writes its
# own files (bench.py rewrites its JSON after each row), so what finished is kept when a later step, or the
# rest of a step, is cut off. Share, step, what it measures:
#   30  preflight        the card, torch, the driver
#   45  checks           gpu_checks.py kernels: the fused SDPA kernel on the window path, the recompile count
#   75  eager            T window/cswin/conv/pool/pvt at 224: batch 128 training, batch 256 inference, eager
#  110  block            T window compiled per block: cold compile time, training and inference
#   90  t32              T32 window at 32x32, batch 512, eager and compiled per block: the 50,000-image epoch
#   25  profile_model    torch.profiler of the whole window network, training, batch 128
#   20  profile_block    torch.profiler of one stage-1 window block, training, batch 128
#   90  block_others     T cswin/conv/pool/pvt compiled per block (in --tiny, pool only)
#   20  candidates       candidates.py: the proposed uninext.py changes, timed eager on stage-1 blocks
#   20  candidates_compiled   the same for the ones meant for compiled runs
#   15  table            the Markdown speed tables (speed_table.py) of whatever JSON the steps left
# Output: one file per step in the results folder (NAME.log, and the JSON, profiles and tables named above),
# and this script's own transcript, gpu_check.log. Exit status: the number of steps that failed, ran out of
# time or had no time left; 100 when the preflight stopped the run.
set -u
case "${1:-}" in
    "" | --tiny) ;;
    *) sed -n '2,13p' "$0"; exit 2 ;;  # the usage above
esac
cd "$(dirname "$0")/../.."
here=experiments/benchmarks
py=${PYTHON:-python3}
out=${OUT:-$here/results}
budget=${BUDGET:-540}
if ! [ "$budget" -ge 120 ] 2> /dev/null; then
    echo "gpu_check: BUDGET must be a whole number of seconds, at least 120 (got '$budget')"
    exit 2
fi
tiny=$([ "${1:-}" = "--tiny" ] && echo 1 || echo 0)
export PYTHONUNBUFFERED=1  # a step cut off by its time limit keeps its printed lines
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
if ! command -v "$py" > /dev/null; then
    echo "gpu_check: stopped before any step: there is no '$py' here (PYTHON=... names the interpreter)"
    exit 100
fi

if [ "$tiny" = 1 ]; then
    # one thread: on a CPU that other jobs share, two OpenMP threads can stall each other for minutes
    big="--size N32 --img-size 32 --batch 4 --infer-batch 8 --steps 2 --warmup 1 --threads 1"
    small="$big"
    compiled="--backend eager"  # Inductor's C++ code generation takes minutes on two CPU cores
    others="pool"  # every mixer's blocks compile with fullgraph=True: tests/test_model.py checks that
    profile="--size N32 --batch 2 --steps 1 --warmup 1 --threads 1"
    checks="--device cpu --size N32 --batch 2 --threads 1"
    candidates="--device cpu --batch 2 --img-size 112 --reps 2"  # 112: stage 1 is 28x28, windows of 7 fit
    compiled_candidates="--only control --backend eager"
else
    big="--size T --img-size 224 --batch 128 --infer-batch 256 --steps 15 --warmup 5"
    small="--size T32 --img-size 32 --batch 512 --infer-batch 1024 --steps 15 --warmup 5"
    compiled="--backend inductor"
    others="cswin conv pool pvt"
    profile="--size T --batch 128 --steps 3 --warmup 2"
    checks="--size T --batch 8"
    candidates="--device cuda --batch 128 --reps 20"
    compiled_candidates="--only control dwconv_shifts window_split_v --backend inductor"
fi
p=$(printf %q "$py")
o=$(printf %q "$out")
smi="--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
tables="$o/T_eager.json $o/T_window_block.json $o/T_others_block.json $o/T32_window.json"  # the steps' order
declare -A command=(
    [preflight]="$p $here/gpu_checks.py preflight && { nvidia-smi --format=csv $smi; lscpu | grep 'Model name'; true; }"
    [checks]="$p $here/gpu_checks.py kernels $checks"
    [eager]="$p $here/bench.py $big --mixers window cswin conv pool pvt --compile off --json $o/T_eager.json"
    [block]="$p $here/bench.py $big --mixers window --compile block $compiled --json $o/T_window_block.json"
    [t32]="$p $here/bench.py $small --mixers window --compile off block $compiled --json $o/T32_window.json"
    [profile_model]="$p $here/profile_block.py $profile --mixer window --scope model --out $o/profile_model.txt"
    [profile_block]="$p $here/profile_block.py $profile --mixer window --out $o/profile_block.txt"
    [block_others]="$p $here/bench.py $big --mixers $others --compile block $compiled --json $o/T_others_block.json"
    [candidates]="$p $here/candidates.py $candidates"
    [candidates_compiled]="$p $here/candidates.py $candidates --compile $compiled_candidates"
    [table]="$p $here/speed_table.py $tables > $o/speed_tables.md; rc=\$?; cat $o/speed_tables.md; exit \$rc"
)
names=(preflight checks eager block t32 profile_model profile_block block_others candidates candidates_compiled table)
shares=(30 45 75 110 90 25 20 90 20 20 15)  # seconds at the default BUDGET of 540, as listed above
scaled=(30)  # the preflight's 30 s do not depend on the budget; the steps share the rest as at 540
for share in "${shares[@]:1}"; do scaled+=($((share * (budget - 30) / 510))); done

start=$SECONDS
failed=0
for i in "${!names[@]}"; do
    name=${names[$i]}
    later=0
    for share in "${scaled[@]:i+1}"; do later=$((later + share)); done
    limit=$((budget - (SECONDS - start) - later))  # its own share and what the earlier steps left
    if [ "$name" = preflight ]; then
        if [ "$tiny" = 1 ]; then
            echo "== preflight skipped: --tiny needs no GPU"
        else
            timeout -k 5 $((limit - 5)) bash -c "${command[preflight]}" > "$out/preflight.log" 2>&1
            rc=$?
            if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
                echo "gpu_check: stopped before any step: the preflight did not finish in ${limit}s"
                exit 100
            elif [ "$rc" != 0 ]; then
                tail -n 1 "$out/preflight.log"  # its one line, after whatever torch printed on import
                exit 100
            fi
            cat "$out/preflight.log"
        fi
        echo "== plan, BUDGET ${budget}s: $(for j in "${!names[@]}"; do printf '%s %ss, ' "${names[$j]}" \
            "${scaled[$j]}"; done | sed 's/, $//')"
        continue
    fi
    if [ "$limit" -lt 15 ]; then
        echo "== $name skipped: ${limit}s left for it"
        failed=$((failed + 1))
        continue
    fi
    echo "== $name (limit ${limit}s): ${command[$name]}"
    t0=$SECONDS
    timeout -k 5 $((limit - 5)) bash -c "${command[$name]}" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    late=$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo " (its time limit)")
    echo "== $name: exit $rc after $((SECONDS - t0))s$late"
    [ "$rc" -ne 0 ] && failed=$((failed + 1))
done
echo "== done in $((SECONDS - start))s, $failed step(s) failed; results in $out"
exit "$failed"

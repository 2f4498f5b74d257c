#!/usr/bin/env bash
# The GPU checks of the speed goals, in one run on a machine with one CUDA GPU (bundle docs, Performance):
#   - bench_dmoe.py in bf16 autocast: the default network (f=8, 64x64x32 and 96x96x48) and the clinical profile's
#     (f=32, 128x128x64); the goal is a dMoE train step <= 1.2x its backbone;
#   - bench_speed.py in bf16: the default configs (training step, sliding window, CT end to end; goal < 3 s end to
#     end for a 512x512x160 CT) and configs/profiles/gpu.json.
#
# Usage: bash bench/gpu_check.sh [RESULTS_DIR]       (default bench/results/gpu)
#        GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh DIR   the same steps on the CPU in quick mode (a plumbing check)
#
# It writes env.txt and one markdown table per step into RESULTS_DIR, the files named with the card. It needs python3
# with a CUDA build of torch and monai, nibabel, pytorch-ignite and scipy; on a machine without internet, carry them
# as wheels (bench/gpu_wheels.sh) and install them first. Each step has its own time limit; a failed step is
# reported and the next one runs. Exit status: the number of failed steps.
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu}
device=${GPU_CHECK_DEVICE:-cuda}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ "$device" = cuda ]; then
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
    quick=()
else
    card="cpu"
    quick=(--quick)
fi
tag=$(echo "$card" | tr -c 'A-Za-z0-9\n' '_')
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "card: $card"
    "$py" -c 'import torch, monai; print("torch", torch.__version__, "cuda", torch.version.cuda, "monai", monai.__version__)'
    [ "$device" = cuda ] && nvidia-smi
} > "$out/env.txt" 2>&1
failed=0
step() {  # step NAME LIMIT_S CMD...: run CMD with a time limit, its output into $out/NAME_$tag.md
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    if ! timeout "$limit" "$@" > "$out/${name}_${tag}.md" 2>&1; then
        echo "   FAILED, see $out/${name}_${tag}.md"
        failed=$((failed + 1))
    fi
    tail -n 12 "$out/${name}_${tag}.md"
}
dmoe_sizes=(--f32)
[ "$device" = cuda ] || dmoe_sizes=()
step dmoe_bf16 150 "$py" bench/bench_dmoe.py --device "$device" --amp "${quick[@]}" "${dmoe_sizes[@]}"
step speed_default_bf16 200 "$py" bench/bench_speed.py --device "$device" --amp --sections train,infer,e2e "${quick[@]}"
step speed_profile_gpu 200 "$py" bench/bench_speed.py --device "$device" --profile gpu --sections train,infer,e2e "${quick[@]}"
echo "results in $out ($failed failed)"
exit "$failed"

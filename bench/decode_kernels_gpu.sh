#!/usr/bin/env bash
# The batch-1 decode kernels of issue 14 on one GPU, in one device call (about 8 minutes on an H200): the GPU
# tests of the switched-off kernels, the dense GEMV sweep (TUNED entries to paste), the decode bench with each
# switch alone and all together against the path without them (bf16, then FP8), and a profile with all of them.
#
#     bash bench/decode_kernels_gpu.sh [OUT_DIR]        (OUT_DIR: $OUT on the device machine, else runs/decode_kernels)
#
# Each step's output goes to its own file under OUT_DIR (and a line to the terminal); a failing step does not stop
# the next. Switch a kernel on by default (dsv3/kernels/backend.py SWITCHED) only where its rows are faster.
set -u
out="${1:-${OUT:-runs/decode_kernels}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/card.txt" 2>&1

step() {  # name, command...
    local name=$1
    shift
    local t0=$SECONDS
    "$@" > "$out/$name.txt" 2>&1
    echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$out/steps.txt"
}

step tests python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_dense_gemv.py tests/test_gpu_head_gemv.py \
    tests/test_gpu_latent_store.py tests/test_gpu_expert_gemv.py
step sweep python bench/dense_gemv_sweep.py --quick --json "$out/sweep.json"
modes=graphs+compile,graphs+compile+densegemv,graphs+compile+headgemv,graphs+compile+latentstore
modes=$modes,graphs+compile+densegemv+headgemv+latentstore
step decode_bf16 python bench/decode_gpu.py --preset 16b --batches 1,4 --new 48 --modes "$modes"
step decode_fp8 python bench/decode_gpu.py --preset 16b --batches 1 --new 48 \
    --modes graphs+compile+fp8,graphs+compile+fp8+densegemv+headgemv+latentstore
step profile python bench/profile_gpu.py --decode 1 --preset 16b --all-decode-kernels
tail -n 3 "$out"/*.txt

#!/usr/bin/env bash
# Issue 15's training measurements on one GPU, in stages that fit the device tool's 10-minute calls:
#
#     bash bench/train_gpu.sh OUT_DIR tests,small          (OUT_DIR: $OUT on the device machine)
#     bash bench/train_gpu.sh OUT_DIR slice,slice4
#     bash bench/train_gpu.sh OUT_DIR experts,memory,slice32
#     bash bench/train_gpu.sh OUT_DIR profile
#
# On an H100 (2026-12-06, bench/RESULTS.md) the stages took: small 82 s, slice ~70 s, slice4 90 s, experts 15 s,
# memory ~60 s; with a cold start about 60-100 s more. small,slice,slice4,experts fit one 10-minute call.
#
# Stages (default: all, in this order):
#   tests    the GPU tests of the training kernels (fused AdamW with masters, router, FP8 GEMMs and experts,
#            deterministic runs)
#   small    `small`: bf16 compiled with and without bf16 working weights and bf16 moments, beside transformers
#            (MFU against the card's datasheet peak and against the bf16 matmul this run measures)
#   slice    the 671b-slice with bf16 working weights: bf16 (also with bf16 moments: AdamW took 22% of the step on
#            the H200, 2026-12-05), FP8, FP8 with the weights re-quantised in backward (rw), FP8 experts + rw, all
#            compiled, beside transformers: the FP8 / bf16 speed and peak memory of issue 15 item 3
#   slice4   the same at 4 x 2048 tokens a micro-batch (bf16, FP8 + rw, FP8 experts + rw): where FP8's peak falls
#            below bf16's (not at 2 x 2048: bench/RESULTS.md, 2026-12-06)
#   experts  bench/fp8_experts_speed.py --bf16w-only: the routed experts' forward + backward with fp32 masters
#            cast each step against bf16 working weights (issue 15 item 1's gain on the experts), and gate | up as
#            one GEMM, on the slice's, 16b's and small's shapes
#   slice32  bf16, FP8 and FP8 experts with fp32 weights (autocast's per-step casts): what bf16 weights give each
#   memory   bench/fp8_memory.py on the GPU (the 671b-slice, 2 x 2048 and 4 x 2048): what is alive at each variant's
#            peak (bf16, FP8 + rw, FP8 experts + rw, compiled) and where in the step it is reached
#   profile  bench/profile_gpu.py: where `small`'s and the slice's steps spend their time (what to fuse next)
# Each stage's output goes to its own file under OUT_DIR (and a line to steps.txt); a failing stage does not stop
# the next.
set -u
out="${1:-${OUT:-runs/train_gpu}}"
stages=",${2:-tests,small,slice,slice4,experts,slice32,memory,profile},"
source "$(dirname "$0")/stages.sh"

step tests python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_router.py \
    tests/test_gpu_fp8_experts.py tests/test_gpu_determinism.py
step small python bench/train_speed.py --only small --steps 6 --warmup 3 --hf --json "$out/small.json" \
    --variants bf16+compile,bf16+compile+bf16w,bf16+compile+bf16w+bf16opt
step slice python bench/train_speed.py --only 671b-slice --steps 6 --warmup 3 --hf --json "$out/slice.json" \
    --variants bf16+compile+bf16w,bf16+compile+bf16w+bf16opt,fp8+compile+bf16w,fp8+compile+bf16w+rw,\
fp8e+compile+bf16w+rw
step slice4 python bench/train_speed.py --only 671b-slice --micro-batch 4 --steps 4 --warmup 2 \
    --json "$out/slice4.json" --variants bf16+compile+bf16w,fp8+compile+bf16w+rw,fp8e+compile+bf16w+rw
step experts python bench/fp8_experts_speed.py --bf16w-only
step slice32 python bench/train_speed.py --only 671b-slice --steps 6 --warmup 3 --json "$out/slice32.json" \
    --variants bf16+compile,fp8+compile,fp8e+compile
memory() {
    local b
    for b in 2 4; do
        python bench/fp8_memory.py --device cuda --preset 671b-slice --vocab 0 --batch $b --seq-len 2048 --top 12 \
            --variants bf16+compile+bf16w,fp8+compile+bf16w+rw,fp8e+compile+bf16w+rw || return
    done
}
step memory memory
step profile python bench/profile_gpu.py --train small:bf16+compile+bf16w,671b-slice:bf16+compile+bf16w,\
671b-slice:fp8e+compile+bf16w
tail -n 6 "$out"/*.txt

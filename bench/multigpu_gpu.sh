#!/usr/bin/env bash
# Issues 18 and 19 (training and serving on several GPUs of one host) in stages that fit the device tool's
# 10-minute calls, so that a lent multi-GPU machine's 30 minutes go to measuring:
#
#     bash bench/multigpu_gpu.sh OUT_DIR ep_small,ep_16b                 (OUT_DIR: $OUT on the device machine)
#     bash bench/multigpu_gpu.sh OUT_DIR paper
#     bash bench/multigpu_gpu.sh OUT_DIR ckpt671,serve_ep,serve_load
#     SMOKE=1 bash bench/multigpu_gpu.sh /tmp/mg all                     (2 CPU processes, tiny models: the plumbing)
#
# Stages (default: all, in this order; N = the GPUs of the host, nvidia-smi's count, or $GPUS):
#   ep_small    18.1  bench/multigpu.py, `small`, EP = GPUs on 1, 2, 4 and N GPUs (tokens/s per GPU, the dispatch
#                     all-to-all's bandwidth beside all_to_all_single's on the same messages)
#   ep_16b      18.1  the same on a 16b-shaped cut (4 layers)
#   bubble      18.2  bench/pipeline_bubble.py, 1F1B and DualPipeV on 2, 4 and 8 stages (Table 2's formulas)
#   overlap     18.2  bench/pipeline_overlap.py, DualPipeV pp 2 x ep N/2, the F&B overlap on and off
#   paper       18.3  bench/paper_config.py: DualPipeV x EP x ZeRO-1 x FP8 x bf16 moments x selective recomputation,
#                     671B-shaped cut of 6 layers, pp 2 x ep N/2 (dsv3 plan: 89 GiB on the worst of 8 x 140); FP8
#                     weights re-quantised in backward, as the plan assumes (--fp8-recompute-weights)
#   paper_ckpt  18.4  the same at 2 layers: --save to $SCRATCH, then --resume on N/2 GPUs (times, next-step loss)
#   ckpt671     19.1  bench/random_checkpoint.py: a 671B-shaped FP8 checkpoint of $LAYERS layers (default 8:
#                     78 GB) into $SCRATCH (never $OUT_DIR: the device tool would carry it back)
#   serve_ep    19.1  bench/ep_serve_gpu.py --checkpoint: load time, weights and cache per GPU beside dsv3 plan
#                     --serve, prefill and decode tokens/s at batch 1, 32, 128, 512 (graphs, dp)
#   serve_load  19.1  `dsv3 serve --ep N` on that checkpoint + bench/serve_load.py, 64 streaming clients: TTFT,
#                     inter-token and end-to-end percentiles
#   scale       19.2  bench/ep_serve_gpu.py, random weights, the same per-GPU shapes (N/8 x 8 layers... : 2, 4 and
#                     8 GPUs with 2, 4 and 8 layers), decode and prefill tokens/s per GPU
#   eplb        19.3  bench/ep_serve_gpu.py --skew $LOADS --redundant-experts 32: rank imbalance and tokens/s,
#                     contiguous against the placement re-planned from the loads the engines recorded ($LOADS:
#                     `dsv3 eval CKPT --record-expert-loads FILE` of a trained model; default: the 16-expert loads
#                     of the tiny run recorded on the CPU, bench/results/tiny_pip_loads.pt)
#   spec        19.4  bench/ep_serve_gpu.py --speculative-k 0,1,2 at batch 1 and 32 (acceptance, step time)
# A failing stage does not stop the next; each writes OUT_DIR/<stage>.txt (and JSON where the script writes one).
set -u
out="${1:-${OUT:-runs/multigpu_gpu}}"
all_stages=(ep_small ep_16b bubble overlap paper paper_ckpt ckpt671 serve_ep serve_load scale eplb spec)
stages="${2:-all}"
[[ $stages == all ]] && stages=$(IFS=,; echo "${all_stages[*]}")
stages=",$stages,"
source "$(dirname "$0")/stages.sh"
SCRATCH="${SCRATCH:-/tmp/dsv3_scratch}"
LOADS="${LOADS:-bench/results/tiny_pip_loads.pt}"
mkdir -p "$SCRATCH"
if [[ "${SMOKE:-0}" == 1 ]]; then  # the same commands on 2 CPU processes and tiny shapes
    N=2; LAYERS=2; dev=(--device cpu); small=(--preset tiny --seq-len 32 --steps 2 --warmup 1)
    big=(--preset tiny --layers 2 --seq-len 32 --steps 2 --warmup 1); pipe=(--preset tiny --layers 4 --seq-len 32
    --micro-batch-size 1 --steps 2); paper=(--smoke --fp8-recompute-weights); cut=(--smoke); serve=(--preset tiny --prompt-len 16 --new 4)
    b671=(--preset tiny); batches=1,3; clients=(--clients 3 --requests 1 --max-tokens 4 --prompt-len 16)
    export OMP_NUM_THREADS=1
else
    N="${GPUS:-$(nvidia-smi -L | wc -l)}"; LAYERS="${LAYERS:-8}"; dev=(); small=(--preset small)
    big=(--preset 16b --layers 4); pipe=(); paper=(--layers 6 --seq-len 4096 --bf16-weights --n-microbatches 8 --fp8-recompute-weights)
    cut=(--layers 4 --seq-len 4096 --bf16-weights); serve=(--preset 671b --prompt-len 512 --new 32)
    b671=(--preset 671b --device cuda); batches=1,32,128,512
    clients=(--clients 64 --requests 4 --max-tokens 64 --prompt-len 256)
fi
run() { python -m torch.distributed.run --nproc-per-node "$1" --master-port "$((29500 + RANDOM % 1000))" "${@:2}"; }
half=$((N / 2 > 0 ? N / 2 : 1))

ep_sizes() { local s=(1 2 4 "$N"); printf '%s\n' "${s[@]}" | awk -v n="$N" '$1 <= n' | sort -un; }
ep_scaling() {  # name, the model's flags: bench/multigpu.py on 1, 2, 4 and N GPUs
    local name=$1 g
    shift
    for g in $(ep_sizes); do
        run "$g" bench/multigpu.py "${dev[@]}" "$@" --out "$out/${name}_$g.json" || return
    done
}
ep_small() { ep_scaling ep_small "${small[@]}"; }
ep_16b() { ep_scaling ep_16b "${big[@]}"; }
bubble() {
    for g in 2 4 8; do
        ((g <= N)) || continue
        run "$g" bench/pipeline_bubble.py "${dev[@]}" "${pipe[@]}" --out "$out/bubble_pp$g.json" || return
    done
}
overlap() {
    run $((2 * half)) bench/pipeline_overlap.py "${dev[@]}" "${pipe[@]}" --pp 2 --ep "$half" --out "$out/overlap.json"
}
paper() { run "$N" bench/paper_config.py "${paper[@]}" --pp 2 --ep "$half" --out "$out/paper_config.json"; }
paper_ckpt() {  # saved on N ranks (pp 2 x ep N/2), resumed on N/2 (pp 2 x ep N/4) with the same global batch
    rm -rf "$SCRATCH/paper_ckpt"
    local r2=$((half >= 2 ? half : N))
    local e2=$((r2 / 2)) n1=4
    run "$N" bench/paper_config.py "${cut[@]}" --pp 2 --ep "$half" --n-microbatches "$n1" \
        --save "$SCRATCH/paper_ckpt" --out "$out/paper_save.json" &&
        run "$r2" bench/paper_config.py "${cut[@]}" --pp 2 --ep "$e2" --n-microbatches $((n1 * half / e2)) \
            --resume "$SCRATCH/paper_ckpt" --out "$out/paper_resume.json"
}
ckpt671() {
    rm -rf "$SCRATCH/v3"
    python bench/random_checkpoint.py "${b671[@]}" --layers "$LAYERS" --out "$SCRATCH/v3" && du -sh "$SCRATCH/v3"
}
serve_ep() {
    run "$N" bench/ep_serve_gpu.py "${dev[@]}" "${serve[@]:2}" --checkpoint "$SCRATCH/v3" --batches "$batches" \
        --modes graphs,dp --out "$out/serve_ep"
}
serve_load() {
    local port=$((8000 + RANDOM % 1000)) graphs=(--cuda-graphs on)
    [[ "${SMOKE:-0}" == 1 ]] && graphs=()
    # (torchrun itself in the background, not the `run` function's subshell: a background job of a script ignores
    # SIGINT, so it is stopped with SIGTERM, which torchrun forwards and uvicorn takes as a graceful stop)
    python -m torch.distributed.run --nproc-per-node "$N" --master-port "$((29500 + RANDOM % 1000))" -m dsv3.cli \
        serve "$SCRATCH/v3" --ep "$N" "${dev[@]}" "${graphs[@]}" --port "$port" --log-level warning \
        > "$out/serve_server.txt" 2>&1 &
    local server=$!
    local ok=0
    for _ in $(seq 600); do
        python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
            "http://127.0.0.1:$port/health" 2> /dev/null && { ok=1; break; }
        kill -0 "$server" 2> /dev/null || break
        sleep 1
    done
    if ((ok)); then
        python bench/serve_load.py "$SCRATCH/v3" --url "http://127.0.0.1:$port" "${clients[@]}"
    else
        echo "the server did not come up (serve_server.txt)"
    fi
    kill -TERM "$server" 2> /dev/null
    wait "$server"
    return $((1 - ok))
}
scale() {
    for g in 2 4 8; do
        ((g <= N)) || continue
        local layers=$g
        [[ "${SMOKE:-0}" == 1 ]] && layers=2
        run "$g" bench/ep_serve_gpu.py "${dev[@]}" "${serve[@]}" --layers "$layers" --batches "$batches" \
            --modes graphs --out "$out/scale_$g" || return
    done
}
eplb() {
    run "$N" bench/ep_serve_gpu.py "${dev[@]}" "${serve[@]}" --layers "$LAYERS" --batches "$batches" --modes graphs,dp \
        --skew "$LOADS" --redundant-experts $((SMOKE == 1 ? N : 32)) --out "$out/eplb"
}
spec() {
    run "$N" bench/ep_serve_gpu.py "${dev[@]}" "${serve[@]}" --layers "$LAYERS" --batches "1,${batches##*,}" \
        --modes graphs --speculative-k 0,1,2 --out "$out/spec"
}
SMOKE="${SMOKE:-0}"
for s in "${all_stages[@]}"; do
    step "$s" "$s"
done

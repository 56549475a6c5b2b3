"""Which backend runs each kernel operation: the one place in dsv3 that looks at the tensors' device,
the GPU's compute capability and whether triton and `F.scaled_mm` exist. Every operation of
`dsv3.kernels` asks `select(op, tensors...)` and runs what it answers; callers hand over tensors and
never probe the GPU themselves.

    op                accelerated backend   chosen when (else "reference", reference.py, any device)
    fp8_quant         "triton"              SM 8.9+ (e4m3 conversions)
    fp8_gemm          "scaled_mm"           SM 9.x, `F.scaled_mm` with blockwise `ScalingType` (torch 2.10+)
    fp8_grouped_gemm  "triton"              SM 8.9+ (FP8 tensor cores)
    fp8_weight_gemm   "triton"              bf16/fp16 x, at most DENSE_DECODE_ROWS rows, no autograd
    fp8_expert_rows   "triton"              bf16/fp16 x, at most EXPERT_DECODE_ROWS rows, no autograd
    expert_gemv       "triton"              bf16/fp16 x, at most EXPERT_DECODE_ROWS rows, no autograd
    dense_gemv        "triton"              switched (SWITCHED, kernels.set_dense_gemv; on by default);
                                            bf16/fp16 x, at most DENSE_GEMV_ROWS rows, w (N, K) contiguous
                                            in x's dtype, no autograd through x or w, no CUDA autocast
    latent_store      "triton"              switched (SWITCHED, kernels.set_latent_store; on by default);
                                            bf16/fp16 kv_a (K contiguous) and its norm weight alike, no
                                            autograd through either (the query MLA hands it rides along)
    swiglu_gemv       "triton"              switched with dense_gemv (SWITCH_OF; on by default, e4m3 weights
                                            too); bf16/fp16 x, at most
                                            DENSE_GEMV_ROWS rows, gate and up (N, K) contiguous both in x's
                                            dtype or both e4m3 (+ scales), no autograd, no CUDA autocast
    moe_gemm          "triton"              switched (SWITCHED, kernels.set_moe_gemm; on by default, e4m3
                                            weights too);
                                            bf16/fp16 x, at most MOE_GEMM_ROWS rows, w in x's dtype or
                                            e4m3, no autograd through x or w
    head_gemv         "triton"              switched (SWITCHED, kernels.set_head_gemv; on by default);
                                            bf16/fp16 x (..., H, K) K-contiguous, at most DENSE_GEMV_ROWS
                                            rows, w (H, N, K) in x's dtype with K or N contiguous, no
                                            autograd through x or w, no CUDA autocast
    mla_decode        "triton"              -
    mla_uv            "triton"              switched (SWITCHED, kernels.set_mla_uv; on by default); at most
                                            MLA_UV_ROWS query rows, W_UV (H, v, C) C-contiguous in q's dtype, no
                                            autograd through either
    adamw             "triton"              -
    router_topk       "triton"              fp32 logits (24/24 GPU tests on an H200, 2026-12-04; 4.8-12x the reference)
    shared_gemv       "triton"              switched (SWITCHED, kernels.set_shared_gemv; on for e4m3 weights): the
                                            shared experts as more rows of the routed experts' GEMV launches
                                            (MoE.forward, where the routed experts take their GEMV); bf16/fp16 x, at
                                            most EXPERT_DECODE_ROWS rows, no autograd
    mla_prep          "triton"              switched (SWITCHED, kernels.set_mla_prep; on by default):
                                            the latent store and the W_UK head GEMV in one launch (MLA.
                                            forward_absorbed, where both are taken); (kv_a, its norm weight) meet
                                            latent_store's row, (q_nope, W_UKᵀ) head_gemv's with W_UKᵀ read along N
    hashed_race       "triton"              sampling's draw (w (B, V) float weights, the hashed exponential race)
                                            in one launch instead of ~20 (BatchSampler.draw: not under
                                            torch.compile, whose fusion of the reference is as fast or faster)

In the batch-invariant mode (BATCH_INVARIANT below; kernels/invariant.py) the ops of INVARIANT_ASIDE answer
"reference" and moe_gemm takes any row count.

The rule: the accelerated backend where triton imports and every tensor given to `select` is a plain
(not a subclass such as DTensor) CUDA tensor meeting its row; else "reference". The AdamW operation
hands over the local shards of DTensor parameters, so sharded parameters get the plain rule.
The decode rows are speed thresholds (measured: above them dequantise + cuBLAS wins, prefill) and
correctness conditions (the Triton GEMMs have no backward and take 16-bit activations).

Overrides, for tests and benchmarks:
  * an operation's `backend=` argument wins when given ("reference" or the op's accelerated backend;
    None or "auto": the rule above);
  * `with use_backend("reference"):` makes every automatic choice "reference";
    `use_backend(mla_decode="reference")` (or another op's accelerated backend) one op's. Process-wide;
    a torch.compile'd caller sees the setting it was traced under (its guards recompile on a change);
  * `switch(op, on)` turns the automatic rule of an op of SWITCHED (defaults there) on or off, process-wide
    (kernels.set_dense_gemv, set_head_gemv, set_latent_store, set_moe_gemm, set_mla_prep, ...); the two overrides
    above still win. The environment variable DSV3_KERNELS ("all=on", "dense_gemv=on,moe_gemm=off", ...) sets them
    at the first choice, for the command line (`DSV3_KERNELS=all=on dsv3 serve ...`).

Cost: the probes (triton import, F.scaled_mm, one capability query per device) are memoised, so a
choice is a few attribute reads on the host: no device work, no sync.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

FAST = {  # op -> its accelerated backend
    "fp8_quant": "triton",
    "fp8_gemm": "scaled_mm",
    "fp8_grouped_gemm": "triton",
    "fp8_weight_gemm": "triton",
    "fp8_expert_rows": "triton",
    "expert_gemv": "triton",
    "dense_gemv": "triton",
    "head_gemv": "triton",
    "moe_gemm": "triton",
    "swiglu_gemv": "triton",
    "latent_store": "triton",
    "mla_decode": "triton",
    "mla_uv": "triton",
    "adamw": "triton",
    "router_topk": "triton",
    "shared_gemv": "triton",
    "mla_prep": "triton",
    "hashed_race": "triton",
}
# Accelerated backends written and checked under the Triton interpreter but not yet run on a GPU: the
# automatic choice stays "reference" until their GPU tests (tests/test_gpu_race.py) have passed on real
# hardware; `backend=` or `use_backend(op=...)` runs them meanwhile.
# (hashed_race was, from the twenty-first session until its GPU tests passed on an H200 in the twenty-second,
# 2026-12-06, once the top uniform bin no longer rounded to 1.0)
PENDING: set[str] = set()
# Accelerated backends that the automatic choice takes only while switched on (`switch(op, on)`), process-wide like
# use_backend; the default is what the H200 measured (bench/decode_gpu.py, 16b random weights, graphs + compile,
# one run, 2026-12-05, bench/RESULTS.md): batch 1 295.4 tok/s without any, 339.0 with the dense GEMV, 310.9 with
# the latent store, 289.9 with the head GEMV, 356.9 with all three; batch 32 2,271 without the grouped decode GEMM,
# 3,134 with it. So on: dense_gemv (at one row: DENSE_GEMV_ROWS), latent_store, moe_gemm (up to MOE_GEMM_ROWS
# pairs); off: head_gemv (no gain measured). The FP8 forms (e4m3 weights: the SwiGLU GEMV, which follows dense_gemv,
# and moe_gemm) first lost at batch 1 (362.6 tok/s without them, 342.2 with them, H200, 2026-12-05: the shared
# experts' one-row SwiGLU launched 88 programs of 32 rows), so they were on for 16-bit weights only (WEIGHTS_16BIT,
# still a setting). With the e4m3 GEMV's program-count rule (expert_gemv_triton.default_config) an H100 (16b,
# graphs + compile, 2026-12-05) decoded FP8 batch 1 at 411.2 tok/s with them against 400.1 without (one run), and
# FP8 batch 32 at 3,464 with moe_gemm against 1,672 without (the per-row kernel re-reads each expert for every
# pair; bf16 batch 32: 2,536): on for every dtype. "pdl" is not an op but the decode kernels' launch
# option (`pdl` below): on, where the GPU has it. The H200 (16b, graphs + compile, 2026-12-05, bench/RESULTS.md):
# batch 1 360.4 tok/s without it, 365.8 with it, 369.2 with inductor's kernels launched so too (first run); 388.0
# with it on dsv3's kernels only, 417.8 on both (inductor's since off: graphs.INDUCTOR_PDL), 348.8 with neither and
# two tiles per MLA split (second run); batches 32 / 128:
# 3,211 / 10,562 with it, 3,261 / 10,589 without (third run); FP8 batch 1 338.8 -> 380.6. DSV3_KERNELS or
# kernels.set_* turn any of them on (every dtype) or off. "head_gemv" (absorbed MLA's W_UK / W_UV products as per-head
# GEMVs at one row) and "mla_uv" (the attention's merge and W_UV in one launch, one row: MLA_UV_ROWS) were off, not
# shown faster one at a time (H200, earlier paths; an H100 374.3 against 364.8 tok/s for mla_uv, inside the spread);
# together on the path of 2026-12-05 (the ninth session; an H100, 16b batch 1, graphs + compile, one machine, two
# runs each) they are: bf16 380.6 / 384.1 tok/s against 369.0 / 358.9, FP8 459.3 / 460.3 against 428.6 / 429.4
# (head_gemv alone: bf16 380.6, FP8 448.4). At batch 32 mla_uv was slower (bf16 2,503.8 against 2,597.7, FP8
# 3,420.8 against 3,653.5; head_gemv does not apply above one row), hence its row limit. Both on.
WEIGHTS_16BIT = "16-bit weights"
WEIGHTS_E4M3 = "e4m3 weights"  # the op on for e4m3 weights only (the caller passes the weight to select)
SPECULATION_ROUNDS = "speculation rounds"  # round_graph: on for speculation rounds (k >= 1) and log-probability steps
LOGPROB_STEPS = "log-probability steps"  # round_graph(0) under SPECULATION_ROUNDS: steps asking for log-probabilities
# "shared_gemv" (the shared experts inside the routed experts' two GEMV launches: two launches a MoE layer fewer at
# batch 1): on for e4m3 weights only. Measured slower on an H100 (2026-12-05, tenth session, 16b graphs + compile,
# one call): batch 1 bf16 374.1 against 385.7 tok/s, FP8 426.4 against 459.5 (the e4m3 GEMV's configs then: KU 2,
# no PSUM); batch 32 (where it does not apply) 2,600.9 / 2,591.7. With the PSUM configs (2026-12-06, an H100, one
# call, bench/RESULTS.md): FP8 batch 1 479.4 against 460.6. bf16's configs did not change: off there.
# "mla_prep" (the latent store and absorbed MLA's W_UK head GEMV in one launch, mla_prep_triton.py: one launch a layer
# fewer at batch 1, the same bits): on. Measured on an H200 (2026-12-06, one call, bench/RESULTS.md): 16b batch 1
# FP8 554.8 against 541.9 tok/s, bf16 442.6 against 442.2; its launch 3.0 us where the two took ~5.2. On an H100
# (2026-12-06, thirteenth session): FP8 514.8 against 501.6 with the 8-row configs. Its GPU tests
# (tests/test_gpu_mla_prep.py, tests/test_gpu_pdl.py, the latent store's and head GEMV's) all passed on that H100.
# "verify_rows" is not an op either: a speculative engine's decode steps (graphs.py DecodeGraphs.row_limit) take the
# one-row kernels (the dense and head GEMVs, with them the router logits', and mla_uv) up to k + 1 rows, the rows of
# one sequence's verification step, where cuBLAS, an fp32 router GEMM and the unmerged attention ran. Measured on an
# H100 (2026-12-06, the sixteenth session, `small` random weights, batch 1, graphs + compile, overlapped rounds,
# bench/profile_gpu.py --spec K --rows R, one call, bench/RESULTS.md): a k = 1 round 1.234 -> 0.907 ms (365 -> 249
# kernels), k = 2 1.422 -> 1.201 ms, against a k = 0 step of 0.620 ms. On since the seventeenth session (2026-12-06, an
# H100): the speculation and overlap GPU tests passed with it (17), and 16b's k = 1 round gained too, 4.367 -> 3.743 ms
# (k = 0: 2.594), though the dense GEMV alone at two rows lost to cuBLAS on 16b's shapes (DENSE_GEMV_ROWS).
# "round_graph" is not an op either: the engine runs a step of greedy requests (not in lockstep) as
# one CUDA graph (graphs.py DecodeGraphs.round): a speculation round in one launch instead of k + 1 graphs and ~20
# eager kernels between them; with True, a one-token step with its argmax too (~5 launches fewer). On for speculation
# rounds only (SPECULATION_ROUNDS), as measured on an H100 (2026-12-06, eighteenth session; the GPU tests of the
# round graph passed, 9): `small` at batch 1, random weights (bench/profile_gpu.py, wall a round), k = 1 1.281 ->
# 0.875 ms, k = 2 1.217 -> 1.152 (the device busy the same, 0.81 / 1.07 ms: the host's time between the graphs
# went); a trained `small` (bench/spec_gpu.py) k = 1 0.97x -> 1.17x plain decoding, k = 2 1.05x -> 1.09x. A
# one-token step lost a little in one sample, 0.622 -> 0.645 ms, so plain decoding keeps its graph and eager argmax
# (DSV3_KERNELS=round_graph=on takes it too), except for the steps whose batch asks for log-probabilities
# (LOGPROB_STEPS): there the round graph computes them inside (graphs.result_rows) instead of an eager log-softmax,
# top-k and gathers after the graph. Measured on an H100 (2026-12-07, twenty-third session, `small` trained 1.5
# minutes, greedy, batch 1, every request asking for the top 5, bench/spec_gpu.py --logprobs 5 --round-graph both):
# graphs + compile 1,312.5 -> 1,519.5 tok/s (1.16x; the compiled round fuses them), graphs alone (2026-12-06, H100)
# 721.3 -> 738.0 (1.02x).
# "round_compile" is not an op either: with the decode steps compiled (compile_decode), a round graph's whole forward
# (verification, acceptance, MTP steps, the copies between them) is one torch.compile'd function, so that inductor
# fuses the ~20 small eager kernels between the compiled steps (argmaxes, comparisons, cumprod, the copies into the
# next step's static inputs) instead of launching each. On, as measured on an H100 (2026-12-06, nineteenth session; the
# round graph's GPU tests passed with it, 8, the compiled round equal to the compiled steps one by one): `small` at
# batch 1, random weights (bench/profile_gpu.py, wall a round), k = 1 0.870 -> 0.814 ms (248 -> 226 kernels, device
# busy 0.802 -> 0.754), k = 2 1.144 -> 1.067 (286 -> 254); a trained `small` (bench/spec_gpu.py, 4.5 minutes, one
# checkpoint) k = 1 1.24x -> 1.32x plain decoding, the same tokens both ways. Should the whole round fail to compile
# (not measured on 16b or FP8 weights), the engine warns and runs the round's steps (graphs.py _run_round).
# "round_sampled" is not an op either: a step whose requests sample (temperature, top-k, top-p, min-p; no repetition
# penalty) runs as one graph too, a speculation round or plain decoding's one-token step with
# its draw (whatever round_graph says of greedy steps), its random numbers the hashed
# ones of sampling.py (the same tokens as its steps one by one: tests/test_engine.py on the CPU's static forwards);
# off, such steps run their forwards one by one with the sampling between them eager (~30 small launches a draw: the
# eager hashed draw alone 0.36 ms against 0.07 compiled, bench/sampler_speed.py on an H100). On since the
# twenty-first session (2026-12-06), as measured on an H100: its GPU tests passed (the graphed sampled round = its
# graphs one by one = its forward eager, compiled too; the hashed draw compiled = eager; one host sync a step), and a
# `small` trained 1.5 minutes on the GPU, sampled at temperature 0.7 at batch 1 (bench/spec_gpu.py, graphs +
# compile), decoded plain (k = 0) at 1,565 tok/s with it against 904 without, and at k = 1 at 1,913 against 678.
# Both round graphs carry log-probabilities where a request asks (since the twenty-second session: greedy with the
# top 5, batch 1, graphs without compile on an H100, 721 -> 738 tok/s at k = 0, 893 -> 921 at k = 1).
# "hashed_race" (sampling's draw in one Triton launch, race_triton.py; BatchSampler.draw takes the reference under
# torch.compile, whose fusion is as fast or faster): on. Measured on an H200 (2026-12-06, twenty-second session,
# bench/sampler_speed.py): 0.053-0.098 ms a draw against 0.26-0.44 for the eager reference (batch 1-32, V 32,768-
# 129,280); its GPU tests (bitwise the reference's tokens; graphed, compiled, in an engine) passed there. A whole
# sampled decode without compile (a trained `small`, temperature 0.7, H100, 2026-12-07, bench/spec_gpu.py): 1.03-1.05x
# at batch 1 and 32, k = 0 and 1. DSV3_KERNELS=hashed_race=off turns it off.
SWITCHED: dict[str, bool | str] = {"dense_gemv": True, "head_gemv": True, "latent_store": True,
                                   "moe_gemm": True, "pdl": True, "mla_uv": True, "shared_gemv": WEIGHTS_E4M3,
                                   "mla_prep": True, "verify_rows": True, "round_graph": SPECULATION_ROUNDS,
                                   "round_compile": True, "round_sampled": True, "hashed_race": True}
# ops that follow another op's switch: the dense SwiGLU's fused gate+up GEMV is one of the dense decode GEMVs
SWITCH_OF: dict[str, str] = {"swiglu_gemv": "dense_gemv"}
# Up to these many activation rows the Triton FP8-weight kernels run (decode; above, prefill:
# dequantise + cuBLAS): the dense GEMV / 16-row-tile GEMM and the per-routed-row expert GEMV.
DENSE_DECODE_ROWS = 64
EXPERT_DECODE_ROWS = 1024
# Up to these many rows a dense (bf16/fp16) linear may take the dense GEMV (its tiles hold up to 4 rows,
# dense_gemv_triton.py). 1: bench/dense_gemv_sweep.py on the H200 (2026-12-05) over the 188 dense linears of a 16b
# step: at one row the GEMV takes 1,060 us against cuBLAS's 1,246, at two 1,454 against 1,244, at four 2,336
# against 1,240 (its best configs per shape: 958 / 1,174 / 1,672).
DENSE_GEMV_ROWS = 1
# Up to these many (token, expert) pairs the routed experts may take the grouped decode GEMM (moe_gemm_triton.py:
# 16-64-row tiles per expert; above, prefill, torch._grouped_mm or the FP8 grouped path). 1024: decode batches up
# to 128 at top-8 (the 671B) or 170 at top-6 (16b). Measured on the H200 (16b, graphs + compile): batch 32 2,271 ->
# 3,134 tok/s (1.38x, 2026-12-05), batch 128 (768 pairs) 8,003 -> 10,658 (1.33x, the next session, same day).
MOE_GEMM_ROWS = 1024
# Up to these many query rows (batch x tokens) the attention's merge takes W_UV in its launch (mla_uv): 1. At batch 32
# the one launch was slower than the merge and a batched GEMM (an H100, 16b, 2026-12-05: bf16 -3.6%, FP8 -6.4%).
MLA_UV_ROWS = 1
# The batch-invariant mode (dsv3/kernels/invariant.py; kernels.set_batch_invariant), process-wide: while on, the ops of
# INVARIANT_ASIDE take "reference" (each is a kernel taken or not by the row count, or one whose sums follow the
# batch: a row's bits would depend on its batch), moe_gemm takes every row count (one tile shape), and the router
# and MLA decode kernels fix their per-batch choices (router_triton.py, mla_decode_triton.py).
BATCH_INVARIANT = False
INVARIANT_ASIDE = frozenset({"dense_gemv", "head_gemv", "swiglu_gemv", "expert_gemv", "shared_gemv", "mla_uv",
                             "mla_prep", "latent_store", "fp8_weight_gemm", "fp8_expert_rows"})



@contextlib.contextmanager
def row_limits(rows: int | None):
    """Inside the block, the one-row decode kernels' limits (DENSE_GEMV_ROWS, MLA_UV_ROWS) are at least `rows` (None:
    unchanged); restored on exit. What a CUDA graph or compiled step captures inside keeps the choice."""
    global DENSE_GEMV_ROWS, MLA_UV_ROWS
    if not rows:
        yield
        return
    saved = DENSE_GEMV_ROWS, MLA_UV_ROWS
    DENSE_GEMV_ROWS, MLA_UV_ROWS = max(DENSE_GEMV_ROWS, rows), max(MLA_UV_ROWS, rows)
    try:
        yield
    finally:
        DENSE_GEMV_ROWS, MLA_UV_ROWS = saved


def verify_rows(k: int) -> int | None:
    """The row limit of a speculative engine's decode steps (k + 1: one sequence's verification step), or None
    where k = 0 or the "verify_rows" switch is off."""
    _read_env()
    return k + 1 if k and SWITCHED["verify_rows"] else None


def round_graph(k: int) -> bool | str:
    """Whether an engine with speculative_k = k runs its greedy steps (speculation rounds) as one graph (the
    "round_graph" switch): True (every step), False (none), or LOGPROB_STEPS (k = 0 under SPECULATION_ROUNDS: the
    steps whose batch asks for log-probabilities)."""
    _read_env()
    on = SWITCHED["round_graph"]
    if on == SPECULATION_ROUNDS:
        return True if k else LOGPROB_STEPS
    return bool(on)


def round_sampled() -> bool:
    """Whether a round graph takes sampled steps too (the "round_sampled" switch)."""
    _read_env()
    return bool(SWITCHED["round_sampled"])


def round_compile() -> bool:
    """Whether compiled decode steps compile a round graph's forward as one function (the "round_compile" switch)."""
    _read_env()
    return bool(SWITCHED["round_compile"])


def switches_from_env(value: str | None) -> dict[str, bool]:
    """The DSV3_KERNELS environment variable: "op=on,op=off,..." (or 1/0, true/false) for ops of SWITCHED, or
    "all=on" / "all=off" first, so that the command line (`dsv3 serve`, the benches) can turn the switched
    decode kernels on without code. An unknown op or value raises ValueError naming it and what is accepted."""
    out: dict[str, bool] = {}
    for item in filter(None, (t.strip() for t in (value or "").split(","))):
        op, sep, flag = item.partition("=")
        op, flag = op.strip(), flag.strip().lower()
        if not sep or flag not in ("on", "off", "1", "0", "true", "false"):
            raise ValueError(f"DSV3_KERNELS: expected op=on|off items, got {item!r}")
        on = flag in ("on", "1", "true")
        if op == "all":
            out.update({name: on for name in SWITCHED})
        elif op in SWITCHED:
            out[op] = on
        else:
            raise ValueError(f"DSV3_KERNELS: {op!r} is not a switched kernel op; one of {sorted(SWITCHED)} or 'all'")
    return out


_env_read = False


def _read_env() -> None:
    """Apply DSV3_KERNELS once, at the first choice or switch (not at import: a bad value then surfaces inside
    the command that asked, as its clear error, instead of as an import traceback)."""
    global _env_read
    if not _env_read:
        _env_read = True
        SWITCHED.update(switches_from_env(os.environ.get("DSV3_KERNELS")))

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_probes: dict = {}  # memoised availability: "triton", "scaled_mm", ("capability", index)
_forced: dict[str, str] = {}  # use_backend: op (or "*" for all) -> backend


def _constant_result(fn):
    """torch.compiler.assume_constant_result without importing torch._dynamo, which that function does
    first (1.7 s in every process that imports dsv3, torchrun ranks included): the marker it sets (torch
    2.11-2.13: `fn._dynamo_marked_constant = True`). tests/test_kernels.py checks that a fullgraph compile
    calls the probes instead of tracing into them, so a torch that renames the marker fails there."""
    fn._dynamo_marked_constant = True
    return fn


# The probes are constants of the process: torch.compile calls them once while tracing instead of
# tracing into them (a failing `import triton` inside a traced function is a graph break).
@_constant_result
def _triton() -> bool:
    if "triton" not in _probes:
        try:
            import triton  # noqa: F401
            _probes["triton"] = True
        except ImportError:
            _probes["triton"] = False
    return _probes["triton"]


@_constant_result
def _scaled_mm() -> bool:
    """F.scaled_mm with blockwise scaling (torch 2.10+)."""
    if "scaled_mm" not in _probes:
        _probes["scaled_mm"] = hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")
    return _probes["scaled_mm"]


@_constant_result
def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = ("capability", index)
    if key not in _probes:
        _probes[key] = tuple(torch.cuda.get_device_capability(index))
    return _probes[key]


@_constant_result
def _sm89(device: torch.device) -> bool:
    """Compute capability 8.9 or above (e4m3 in Triton, FP8 tensor cores). A constant bool for torch.compile: on
    torch 2.11 dynamo cannot trace `tuple >= tuple` on the constant `_capability` returns (NotImplementedError
    from the guard of tuple.__ge__: the FP8 decode step's compile failed on the H200, 2026-12-05)."""
    return _capability(device) >= (8, 9)


@_constant_result
def _sm90(device: torch.device) -> bool:
    """Compute capability 9.0 or above: griddepcontrol (programmatic dependent launch). A constant bool, as _sm89."""
    return _capability(device) >= (9, 0)


def pdl(device: torch.device) -> bool:
    """Whether dsv3's decode kernels launch on `device` with programmatic dependent launch: switched on ("pdl" of
    SWITCHED: kernels.set_pdl, DSV3_KERNELS=pdl=on), an NVIDIA GPU of compute capability 9.0+ and not the Triton
    interpreter. Not an op: a launch option of every decode kernel (dense and expert GEMVs, the router, the latent
    store, MLA decode, the grouped decode GEMM, the head GEMV, the store and the W_UK GEMV in one launch). Such a
    launch may start while the launch before it drains: each program first tells the next launch it may start
    (griddepcontrol.launch_dependents), reads what no kernel of the step writes (weights), then waits for the
    launch before it to complete and its writes to be visible (griddepcontrol.wait) before it reads anything else
    or writes anything; so the results are the same bits with it on or off (tests/test_gpu_pdl.py)."""
    if not _env_read:
        _read_env()
    # (ROCm builds report their devices as "cuda" too, with capabilities such as (9, 4): griddepcontrol is PTX, so
    # NVIDIA builds only)
    return (bool(SWITCHED["pdl"]) and device.type == "cuda" and torch.version.hip is None
            and os.environ.get("TRITON_INTERPRET") != "1" and _sm90(device))


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def _decode_fits(x: torch.Tensor, max_rows: int) -> bool:
    return (x.dtype in (torch.bfloat16, torch.float16) and _rows(x) <= max_rows
            and not (torch.is_grad_enabled() and x.requires_grad))


def _dense_gemv_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The dense GEMV's per-call row: decode-sized 16-bit x, w (N, K) contiguous in x's dtype, no gradient
    through either (the kernel has no backward; a fine-tune may freeze x's producers but train w), and no CUDA
    autocast (whose F.linear would compute in the autocast dtype)."""
    return (_decode_fits(x, DENSE_GEMV_ROWS) and w.dtype == x.dtype and w.dim() == 2 and w.is_contiguous()
            and not (torch.is_grad_enabled() and w.requires_grad) and not torch.is_autocast_enabled("cuda"))


def _head_gemv_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The per-head GEMV's per-call rule: decode-sized 16-bit x (..., H, K) with its K contiguous, w (H, N, K) in
    x's dtype read along K or N (absorbed MLA's W_UV, W_UKᵀ), no gradient through either, no CUDA autocast."""
    if x.dim() < 2 or w.dim() != 3 or w.dtype != x.dtype or (x.stride(-1) != 1 and x.shape[-1] > 1):
        return False
    rows = x.numel() // max(x.shape[-1] * x.shape[-2], 1)
    return (x.dtype in (torch.bfloat16, torch.float16) and rows <= DENSE_GEMV_ROWS
            and (w.stride(2) == 1 or w.stride(1) == 1)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and not torch.is_autocast_enabled("cuda"))


def _latent_store_fits(kv_a: torch.Tensor, w: torch.Tensor) -> bool:
    """The fused latent store's per-call rule: 16-bit kv_a (its last dimension contiguous) and its norm weight alike,
    no gradient through either."""
    return (kv_a.dtype in (torch.bfloat16, torch.float16) and w.dtype == kv_a.dtype and kv_a.stride(-1) == 1
            and not (torch.is_grad_enabled() and (kv_a.requires_grad or w.requires_grad)))


def _e4m3_ok(w: torch.Tensor) -> bool:
    """Triton compiles e4m3 operands for SM 8.9+ only (an e4m3 weight read by a kernel that converts it)."""
    return w.dtype != torch.float8_e4m3fn or _sm89(w.device)


def _swiglu_gemv_fits(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> bool:
    """The dense SwiGLU GEMV's per-call rule: decode-sized 16-bit x, gate and up (N, K) contiguous and stored alike,
    in x's dtype or e4m3 (block scales: FP8Linear), no gradient through any of them, no CUDA autocast."""
    return (_decode_fits(x, DENSE_GEMV_ROWS) and gate.dtype == up.dtype and gate.shape == up.shape
            and gate.dtype in (x.dtype, torch.float8_e4m3fn) and gate.dim() == 2 and gate.is_contiguous()
            and up.is_contiguous() and not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad))
            and not torch.is_autocast_enabled("cuda"))


def available(op: str, device: torch.device | str = "cuda") -> bool:
    """Whether `op`'s accelerated backend can run on `device` at all (libraries and GPU capability;
    not the per-call shape conditions). For tests and benchmarks deciding what to skip."""
    device = torch.device(device)
    if op not in FAST:
        raise ValueError(f"unknown kernel op {op!r}; one of {sorted(FAST)}")
    if device.type != "cuda" or not torch.cuda.is_available() or not _triton():
        return False
    if op == "fp8_gemm":
        return _capability(device)[0] == 9 and _scaled_mm()
    if op in ("fp8_quant", "fp8_grouped_gemm"):
        return _sm89(device)
    return True


def _fast_fits(op: str, tensors: tuple[torch.Tensor, ...]) -> bool:
    if not tensors or not all(t.is_cuda and type(t) in _PLAIN for t in tensors):
        return False
    if not available(op, tensors[0].device):
        return False
    if op == "fp8_weight_gemm":
        return _decode_fits(tensors[0], DENSE_DECODE_ROWS)
    if op in ("fp8_expert_rows", "expert_gemv", "shared_gemv"):
        return _decode_fits(tensors[0], EXPERT_DECODE_ROWS)
    if op == "dense_gemv":
        return len(tensors) == 2 and _dense_gemv_fits(*tensors)
    if op == "head_gemv":
        return len(tensors) == 2 and _head_gemv_fits(*tensors)
    if op == "moe_gemm":  # (x, w)
        x, w = tensors[0], tensors[-1]
        rows = x.numel() if BATCH_INVARIANT else MOE_GEMM_ROWS  # the mode: every row count, one tile shape
        return (_decode_fits(x, rows) and w.dtype in (x.dtype, torch.float8_e4m3fn)
                and not (torch.is_grad_enabled() and w.requires_grad) and not torch.is_autocast_enabled("cuda")
                and _e4m3_ok(w))
    if op == "swiglu_gemv":
        return len(tensors) == 3 and _swiglu_gemv_fits(*tensors) and _e4m3_ok(tensors[1])
    if op == "latent_store":  # (kv_a, the norm weight)
        kv_a, w = tensors if len(tensors) == 2 else (tensors[0], tensors[0])
        return _latent_store_fits(kv_a, w)
    if op == "mla_prep":  # (kv_a, the norm weight, q_nope, W_UKᵀ): both rules; W_UKᵀ read along N
        return (len(tensors) == 4 and _latent_store_fits(*tensors[:2]) and _head_gemv_fits(*tensors[2:])
                and tensors[3].stride(2) != 1 and tensors[3].shape[2] > 1)
    if op == "router_topk":
        return tensors[0].dtype == torch.float32
    if op == "hashed_race":  # (w (B, V) weights)
        return tensors[0].dim() == 2 and tensors[0].is_floating_point()
    if op == "mla_uv":  # (q_lat (..., H, C), w_uv)
        q, w = tensors[0], tensors[-1]
        rows = q.numel() // max(q.shape[-1] * q.shape[-2], 1) if q.dim() >= 2 else 0
        return (0 < rows <= MLA_UV_ROWS and w.dim() == 3 and w.dtype == q.dtype and w.stride(2) == 1
                and not (torch.is_grad_enabled() and (q.requires_grad or w.requires_grad))
                and not torch.is_autocast_enabled("cuda"))
    return True


def _check(op: str, backend: str) -> str:
    allowed = ("reference", FAST[op])
    if backend not in allowed:
        raise ValueError(f"kernel op {op}: backend must be one of {allowed} (or None / 'auto' to choose), "
                         f"got {backend!r}")
    return backend


def select(op: str, *tensors: torch.Tensor, backend: str | None = None) -> str:
    """The backend that runs `op` on `tensors` (module docstring): `backend` when given, else the
    `use_backend` override, else the rule."""
    if op not in FAST:
        raise ValueError(f"unknown kernel op {op!r}; one of {sorted(FAST)}")
    if backend is not None and backend != "auto":
        return _check(op, backend)
    forced = _forced.get(op, _forced.get("*"))
    if forced is not None:
        return forced
    if not _env_read:
        _read_env()
    if BATCH_INVARIANT and op in INVARIANT_ASIDE:
        return "reference"
    on = SWITCHED.get(SWITCH_OF.get(op, op), True)
    if (op in PENDING or not on or (on == WEIGHTS_16BIT and any(t.dtype == torch.float8_e4m3fn for t in tensors))
            or (on == WEIGHTS_E4M3 and not any(t.dtype == torch.float8_e4m3fn for t in tensors))):
        return "reference"
    return FAST[op] if _fast_fits(op, tensors) else "reference"


def switch(op: str, on: bool | str) -> bool | str:
    """Switch the automatic choice of an op of SWITCHED on (every weight dtype), off, or to WEIGHTS_16BIT /
    WEIGHTS_E4M3 (process-wide; the rule still applies; "round_graph": SPECULATION_ROUNDS); returns the previous
    setting. A torch.compile'd caller recompiles on a change (its guards read it)."""
    _read_env()  # (first: a later switch wins over the environment)
    if op not in SWITCHED:
        raise ValueError(f"switch: {op!r} is not a switched op; one of {sorted(SWITCHED)}")
    # the values beyond on / off an op takes: SPECULATION_ROUNDS is round_graph's alone; a weight dtype means nothing
    # to any round switch
    extra = {"round_graph": ("SPECULATION_ROUNDS",), "round_compile": (), "round_sampled": ()}.get(
        op, ("WEIGHTS_16BIT", "WEIGHTS_E4M3"))
    named = {WEIGHTS_16BIT: "WEIGHTS_16BIT", WEIGHTS_E4M3: "WEIGHTS_E4M3", SPECULATION_ROUNDS: "SPECULATION_ROUNDS"}
    if isinstance(on, str) and named.get(on) not in extra:
        takes = f"on, off or {', '.join(extra)}" if extra else "on or off"
        raise ValueError(f"switch: {op!r} takes {takes}, got {on!r}")
    old = SWITCHED[op]
    SWITCHED[op] = on if isinstance(on, str) else bool(on)  # (a string: one the op takes, checked above)
    return old


@contextlib.contextmanager
def use_backend(all_ops: str | None = None, **per_op: str):
    """Force the automatic choices inside a `with` block: `use_backend("reference")` for every op,
    `use_backend(op="reference" | its accelerated backend, ...)` for some. Explicit `backend=`
    arguments still win. Restores the previous setting on exit (blocks nest)."""
    if all_ops not in (None, "reference"):
        raise ValueError(f"use_backend: only 'reference' applies to every op, got {all_ops!r}")
    for op, b in per_op.items():
        if op not in FAST:
            raise ValueError(f"use_backend: unknown kernel op {op!r}; one of {sorted(FAST)}")
        _check(op, b)
    old = dict(_forced)
    if all_ops is not None:
        _forced["*"] = all_ops
    _forced.update(per_op)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(old)

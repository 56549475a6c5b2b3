"""`dsv3 plan`: memory per GPU and communication per step of a training layout (SPEC §8-§10), for
scales that cannot run here. Parameter counts come from dsv3.info's arithmetic (no model is built); every
other number is a formula written out below. The worst rank (most memory) is reported.

Layout (paper §3): gpus = pp × dp; pipeline stage s is held by dp ranks; expert parallelism is carved from
those dp ranks (ep | dp): a layer's routed experts are split over ep ranks and each expert is replicated over
dp/ep ranks ("expert dp"). No TP. 1F1B and DualPipeV: the stages as dsv3 train places them
(dsv3.distributed.pipeline.PipelineConfig.split): the L main layers split evenly (the remainder one each to
the earliest stages), the D MTP modules on the last stage with the head; every stage needs a main layer.
DualPipe (not run by dsv3): stages take ceil((L + D)/pp) blocks; the stages holding the embedding / head get
one block fewer when the count does not divide. 1F1B: rank r holds stage r; DualPipe: rank r holds stages r
and pp-1-r (two copies of the parameters, Table 2), so the embedding, head and MTP sit on rank 0. DualPipeV
(the "cut in half" DualPipe that `dsv3 train --pp-schedule dualpipev` runs): 2·pp stages in a V, rank r holds
stages r and 2·pp-1-r (one copy; rank 0 holds the embedding, head and MTP).

Bytes per parameter (defaults = the paper's recipe, §3.3.3, used for every preset): working
weights bf16 (2; FP8 GEMM copies are quantised on the fly, as `dsv3 train` does with a pipeline
(--fp8-recompute-weights auto); where it keeps each FP8 weight transpose from a micro-batch's forward to its
backward (without a pipeline, or --fp8-recompute-weights off) `fp8_weight_copies` dense / all counts them, 1 B per
FP8 parameter of the stage (the blocks' params outside the routed experts, + the routed experts for all) per
micro-batch in flight; its auto follows dsv3 train's default; `weight_dtype` fp32 for dsv3's default of fp32
weights under autocast, which are their own masters: no master bytes, whatever master_dtype says), fp32
master weights (4), fp32 gradients
(4), AdamW m and v in bf16 (2 + 2): 14 B/param unsharded. ZeRO-1 shards master + moments over the
dp group (dense params: dp ranks; routed experts: dp/ep ranks); ZeRO-2 also gradients; ZeRO-3 also
the working weights. With DualPipe each copy keeps its own states (conservative).

Activations saved for backward, bytes per token per layer (b = 2 bf16; f = 1 if precision fp8 else
2; D hidden, qr/kvr/r q/kv-latent/rope dims, H heads, dqk/dv head dims, E experts, K top-k,
I expert width, S shared experts, F dense FFN width):
  attention   2D (block input) + 2D (normed input)* + 2qr (c_q) + 2qr (normed c_q)* + 2(kvr + r)
              (c_kv, k_pe) + 2kvr (normed c_kv)* + 2H·dqk (q)* + 2H(dqk - r + dv) (k, v)*
              + a·H·dv (attention output, a = 1.5 for fp8: E5M6, else 2) + 4H (softmax lse)
  MoE         2D (residual) + 2D (normed)* + 4E (fp32 scores) + K·D·f (dispatched tokens)
              + K·2I·f (SwiGLU inputs) + K·I·2 (SwiGLU output; 0 with fp8, which recomputes it)
              + S·(2I·f + I·2·[not fp8])  — the gate gradient is <down^T dy, SwiGLU out>, so the
              expert outputs need not be kept
  dense FFN   2D + 2D* + 2·2F + 2F;  MTP block = MoE block + 2·2D (eh_proj input)
  * = dropped by recompute "paper" (RMSNorms and MLA up-projections recomputed, §3.2.3).
  recompute "full": 2D per layer (the block input) + one layer without recomputation (working set).
Per rank: T = micro_batch × seq_len tokens × (the largest stage it holds) × in-flight micro-batches
(1F1B: pp - r, DualPipe: pp + 1; at most the micro-batches per step; DualPipeV: pp + 1 micro-batches of both
its stages, the DualPipe README's figure in units of a rank's layers [U]) + fp32 logits T·V·4 on the head
rank + MoE all-to-all buffers (c chunks in flight, c = 2 for DualPipe's overlapped fwd/bwd, else 1):
c·T·K·D·(f + 2) (received dispatch + combine send buffer).

Communication per GPU per step (n_mb = global_batch / (dp · micro_batch) micro-batches per rank,
passes = MoE layers a micro-batch crosses on this rank; ring collectives over a group of n):
  EP all-to-all  n_mb · passes · T · K · D · (f + 2 + f + 2): dispatch (fp8 in fp8 mode), combine
                 (bf16), their backward (grad before the down-projection fp8 in fp8 mode, dispatch
                 grad bf16) — upper bound, no node de-duplication, 0 when ep = 1
  DP             ZeRO-0: all-reduce 2(n-1)/n · P · 4; ZeRO-1/2: reduce-scatter (n-1)/n · P · 4 +
                 all-gather of the bf16 weights (n-1)/n · P · 2; ZeRO-3: + 2 weight all-gathers
                 (fwd, bwd); P and n for dense (n = dp) and routed-expert (n = dp/ep) parameters
  PP p2p         n_mb · T · D · 2 · 2 (activation forward, its gradient backward), 0 when pp = 1
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from dsv3.cliargs import setting
from dsv3.config import ModelConfig

GiB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "none": 0}
SCHEDULES = ("1f1b", "dualpipe", "dualpipev")
FP8_WEIGHT_COPIES = ("auto", "none", "dense", "all")


class PlanError(ValueError):
    """A layout that does not fit the GPU count or the model; the message names the conflict."""


@dataclass
class PlanConfig:
    """A training layout to plan; the fields are also the flags of `dsv3 plan` (gpu_mem_gib is --gpu-mem)."""
    gpus: int = setting(1, "GPUs in all")
    gpu_mem_gib: float = setting(80.0, "GiB per GPU")
    pp: int = setting(1, "pipeline stages")
    ep: int = setting(1, "expert-parallel degree (carved from the dp ranks)")
    dp: int | None = setting(None, "data-parallel degree (default: gpus / pp)")
    zero: int = setting(1, "ZeRO stage: 1 shards master weights and moments, 2 also gradients, 3 also weights",
                        choices=(0, 1, 2, 3))
    precision: str = setting("bf16", "GEMM precision", choices=("bf16", "fp8"))
    micro_batch: int = setting(1, "sequences per micro-batch")
    seq_len: int = setting(4096, "tokens per sequence")
    # sequences; default dp × micro_batch (one micro-batch per rank)
    global_batch: int | None = setting(None, "sequences per step (default: dp x micro-batch)")
    recompute: str = setting("none", "activation recomputation: paper = RMSNorms + MLA up-projections, full = "
                                     "per block", choices=("none", "paper", "full"))
    schedule: str = setting("1f1b", "pipeline schedule (dualpipev: 2 x pp stages in a V, one copy, as dsv3 trains)",
                            choices=SCHEDULES)
    weight_dtype: str = setting("bf16", "working weights' dtype (dsv3 train keeps fp32 without --bf16-weights)",
                                choices=("bf16", "fp32"))
    # "none": no separate master copy
    master_dtype: str = setting("fp32", "master weights' dtype (none: no separate copy)", choices=tuple(DTYPE_BYTES))
    grad_dtype: str = setting("fp32", "gradients' dtype", choices=tuple(DTYPE_BYTES))
    optim_dtype: str = setting("bf16", "AdamW moments' dtype", choices=tuple(DTYPE_BYTES))
    fp8_weight_copies: str = setting("auto", "with fp8: FP8 weight transposes kept from a micro-batch's forward to "
                                             "its backward, 1 B/param per micro-batch in flight: none (re-quantised "
                                             "in backward: the recipe), dense (attention, dense and shared MLPs), "
                                             "all (with --fp8-experts: the routed experts too); auto: what dsv3 train "
                                             "does by default, none with a pipeline (pp > 1), else dense",
                                     choices=FP8_WEIGHT_COPIES)

    def resolved(self, cfg: ModelConfig, n_blocks: int) -> "PlanConfig":
        def need(cond, msg):
            if not cond:
                raise PlanError(msg)

        for k in ("gpus", "pp", "ep", "micro_batch", "seq_len"):
            v = getattr(self, k)
            need(isinstance(v, int) and v >= 1, f"{k} must be an integer >= 1, got {v!r}")
        need(self.gpus % self.pp == 0, f"gpus ({self.gpus}) is not divisible by pp ({self.pp})")
        dp = self.dp if self.dp is not None else self.gpus // self.pp
        need(dp * self.pp == self.gpus, f"pp ({self.pp}) x dp ({dp}) = {self.pp * dp} != gpus ({self.gpus})")
        need(self.pp <= n_blocks, f"pp ({self.pp}) > layers to place ({cfg.num_hidden_layers} main + "
                                  f"{cfg.num_nextn_predict_layers} MTP = {n_blocks}): a stage would be empty")
        L = cfg.num_hidden_layers
        need(self.schedule != "1f1b" or self.pp <= L, f"1f1b: pp ({self.pp}) > num_hidden_layers ({L}): dsv3 train "
                                                      "gives every stage >= 1 main layer")
        E = cfg.n_routed_experts
        need(self.ep == 1 or E > 0, f"ep ({self.ep}) > 1 but the model has no routed experts")
        need(E == 0 or E % self.ep == 0, f"ep ({self.ep}) does not divide n_routed_experts ({E})")
        need(dp % self.ep == 0, f"ep ({self.ep}) does not divide the data-parallel degree dp ({dp}) "
                                f"(experts are spread over the dp ranks of a stage)")
        need(self.zero in (0, 1, 2, 3), f"zero must be 0, 1, 2 or 3, got {self.zero!r}")
        need(self.precision in ("bf16", "fp8"), f"precision must be bf16 or fp8, got {self.precision!r}")
        need(self.recompute in ("none", "paper", "full"), f"recompute must be none, paper or full, got {self.recompute!r}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(self.weight_dtype in ("bf16", "fp32"), f"weight_dtype must be bf16 or fp32, got {self.weight_dtype!r}")
        need(self.fp8_weight_copies in FP8_WEIGHT_COPIES,
             f"fp8_weight_copies must be one of {', '.join(FP8_WEIGHT_COPIES)}, got {self.fp8_weight_copies!r}")
        need(self.fp8_weight_copies in ("auto", "none") or self.precision == "fp8",
             f"fp8_weight_copies {self.fp8_weight_copies!r} needs precision fp8, got {self.precision!r}")
        # auto: dsv3 train's --fp8-recompute-weights auto (re-quantised where a pipeline keeps micro-batches in
        # flight) without --fp8-experts
        copies = (("none" if self.pp > 1 or self.precision != "fp8" else "dense")
                  if self.fp8_weight_copies == "auto" else self.fp8_weight_copies)
        for k in ("master_dtype", "grad_dtype", "optim_dtype"):
            need(getattr(self, k) in DTYPE_BYTES, f"{k} must be one of {list(DTYPE_BYTES)}, got {getattr(self, k)!r}")
        gb = self.global_batch if self.global_batch is not None else dp * self.micro_batch
        need(isinstance(gb, int) and gb >= 1, f"global_batch must be an integer >= 1, got {gb!r}")
        need(gb % (dp * self.micro_batch) == 0, f"global_batch ({gb}) is not divisible by dp ({dp}) x "
                                                f"micro_batch ({self.micro_batch})")
        if self.schedule == "dualpipev":
            need(self.pp >= 2, f"dualpipev needs pp >= 2 (pp ranks hold 2 x pp stages in a V), got pp = {self.pp}")
            need(2 * self.pp <= L, f"dualpipev places 2 x pp ({2 * self.pp}) stages but there are {L} main "
                                   "layers to place (dsv3 train gives every stage >= 1): a stage would be empty")
            need(gb // (dp * self.micro_batch) >= 2 * self.pp,
                 f"dualpipev needs at least its 2 x pp ({2 * self.pp}) stages' micro-batches per rank, got "
                 f"{gb // (dp * self.micro_batch)}")
        if self.schedule == "dualpipe":
            need(self.pp % 2 == 0, f"DualPipe needs an even pp, got pp = {self.pp}")
            need((gb // (dp * self.micro_batch)) % 2 == 0,
                 f"DualPipe needs an even number of micro-batches per rank, got {gb // (dp * self.micro_batch)}")
        return replace(self, dp=dp, global_batch=gb, fp8_weight_copies=copies)


@dataclass
class _Counts:
    """Parameter counts per block kind, computed arithmetically (dsv3.info), so planning costs O(pp)
    whatever the layer count."""
    cfg: ModelConfig
    per_kind: dict  # kind (dense | moe | mtp) -> (params outside the routed experts, routed params)
    n_blocks: int  # main layers + MTP modules, in this order
    embed: int
    head: int  # lm_head + final norm

    def kinds(self, blocks: range) -> dict:
        """kind -> how many of the blocks in `blocks` (global block indices) are of that kind."""
        L = self.cfg.num_hidden_layers
        main = max(0, min(blocks.stop, L) - blocks.start)
        moe = self.cfg.num_moe_layers(blocks.start, blocks.stop)
        return {"dense": main - moe, "moe": moe, "mtp": max(0, blocks.stop - max(blocks.start, L))}


def _counts(cfg: ModelConfig) -> _Counts:
    from dsv3.info import block_params

    D, V = cfg.hidden_size, cfg.vocab_size
    return _Counts(cfg, {k: block_params(cfg, k) for k in ("dense", "moe", "mtp")},
                   cfg.num_hidden_layers + cfg.num_nextn_predict_layers, V * D, V * D + D)


def _dsv3_stages(L: int, D: int, S: int) -> list[range]:
    """Block index ranges per stage as dsv3 train places them (dsv3.distributed.pipeline.PipelineConfig.split):
    the L main layers split evenly, the remainder one each to the earliest stages; the D MTP modules on the
    last stage (with the head). Its rule restated, not imported: that module brings torch.distributed and the
    model, which `dsv3 plan` does not load; tests/test_plan.py::test_stages_are_those_dsv3_train_builds holds
    the two together."""
    q, rem = divmod(L, S)
    out, i = [], 0
    for s in range(S):
        n = q + (1 if s < rem else 0)
        out.append(range(i, i + n + (D if s == S - 1 else 0)))
        i += n
    return out


def _stages(n: int, pp: int) -> list[range]:
    """Block index ranges per stage: ceil(n/pp) each, one fewer on the outer stages first."""
    base = math.ceil(n / pp)
    sizes = [base] * pp
    for j in range(base * pp - n):
        sizes[j // 2 if j % 2 == 0 else pp - 1 - j // 2] -= 1
    out, i = [], 0
    for s in sizes:
        out.append(range(i, i + s))
        i += s
    return out


def act_bytes_per_token(cfg: ModelConfig, kind: str, precision: str, recompute: str) -> float:
    """Bytes saved for backward per token for one block (formula in the module docstring)."""
    D, H, r = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_rope_head_dim
    qr, kvr = cfg.q_lora_rank or 0, cfg.kv_lora_rank
    fp8 = precision == "fp8"
    f = 1 if fp8 else 2
    if recompute == "full":
        return 2 * D
    rc = recompute == "paper"
    keep = 0 if rc else 1  # multiplier of the recomputed tensors
    attn = (2 * D + keep * 2 * D + 2 * qr + keep * 2 * qr + 2 * (kvr + r) + keep * 2 * kvr
            + keep * 2 * H * cfg.qk_head_dim + keep * 2 * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
            + (1.5 if fp8 else 2) * H * cfg.v_head_dim + 4 * H)
    if kind == "dense":
        F = cfg.intermediate_size
        return attn + 2 * D + keep * 2 * D + 2 * 2 * F + 2 * F
    K, I, E, S = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.n_shared_experts
    moe = (2 * D + keep * 2 * D + 4 * E + K * D * f + K * 2 * I * f + (0 if fp8 else K * I * 2)
           + S * (2 * I * f + (0 if fp8 else 2 * I)))
    return attn + moe + (2 * 2 * D if kind == "mtp" else 0)


@dataclass
class PlanResult:
    model: str
    cfg: PlanConfig
    rank: int  # the pipeline rank with the most memory (reported below)
    stages: tuple  # stages it holds
    n_params: int  # parameters on that rank (both DualPipe copies)
    n_routed: int  # of which routed-expert parameters (already divided by ep)
    n_micro: int  # micro-batches per rank per step
    in_flight: int
    mem: dict = field(default_factory=dict)  # bytes: params, grads, master, optimizer, activations, ...
    comm: dict = field(default_factory=dict)  # bytes per GPU per step: ep_all_to_all, dp, pp_p2p

    @property
    def total(self) -> float:
        return sum(self.mem.values())

    @property
    def headroom(self) -> float:
        return self.cfg.gpu_mem_gib * GiB - self.total

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    def format(self) -> str:
        c = self.cfg
        copies = "" if c.fp8_weight_copies == "none" else f" (FP8 weight copies: {c.fp8_weight_copies})"
        rows = [("model", self.model),
                ("layout", f"{c.gpus} GPUs = pp {c.pp} x dp {c.dp}; ep {c.ep} (experts replicated over "
                           f"{c.dp // c.ep} ranks); ZeRO-{c.zero}; {c.schedule}; {c.precision}"
                           f"{copies}; "
                           f"recompute {c.recompute}"),
                ("batch", f"{c.global_batch} seqs x {c.seq_len} tokens; micro-batch {c.micro_batch}; "
                          f"{self.n_micro} micro-batches/rank; {self.in_flight} in flight"),
                ("dtypes", f"weights {c.weight_dtype}, master {c.master_dtype}, grads {c.grad_dtype}, "
                           f"AdamW moments {c.optim_dtype}"),
                ("worst rank", f"pipeline rank {self.rank}, stages {list(self.stages)}, "
                               f"{self.n_params / 1e9:.2f}B parameters")]
        rows += [(f"  {k}", f"{v / GiB:8.2f} GiB") for k, v in self.mem.items()]
        rows += [("  total", f"{self.total / GiB:8.2f} GiB of {c.gpu_mem_gib:g} GiB "
                             f"(headroom {self.headroom / GiB:.2f} GiB) -> {'FITS' if self.fits else 'DOES NOT FIT'}")]
        rows += [("comm / GPU / step (busiest rank)", "")] + [(f"  {k}", f"{v / 1e9:8.2f} GB") for k, v in self.comm.items()]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}".rstrip() for k, v in rows)


def plan(model_cfg: ModelConfig, pcfg: PlanConfig, name: str = "model") -> PlanResult:
    cnt = _counts(model_cfg)
    n_blocks = cnt.n_blocks
    c = pcfg.resolved(model_cfg, n_blocks)
    pp, dp, ep = c.pp, c.dp, c.ep
    dp_e = dp // ep
    T = c.micro_batch * c.seq_len
    n_mb = c.global_batch // (dp * c.micro_batch)
    f = 1 if c.precision == "fp8" else 2
    D, K, V = model_cfg.hidden_size, model_cfg.num_experts_per_tok, model_cfg.vocab_size
    V_shape = c.schedule == "dualpipev"
    S = 2 * pp if V_shape else pp  # stages
    # DualPipe (the paper's, not run by dsv3): balanced; 1F1B and DualPipeV: dsv3 train's own split
    stages = (_stages(n_blocks, S) if c.schedule == "dualpipe" else
              _dsv3_stages(model_cfg.num_hidden_layers, model_cfg.num_nextn_predict_layers, S))
    has_mtp = model_cfg.num_nextn_predict_layers > 0
    gbytes, mbytes, obytes = (DTYPE_BYTES[c.grad_dtype], DTYPE_BYTES[c.master_dtype], 2 * DTYPE_BYTES[c.optim_dtype])
    if c.weight_dtype == "fp32":  # fp32 working weights are the masters (dsv3: a ZeRO chunk is a piece of them)
        mbytes = 0

    kinds = [cnt.kinds(rg) for rg in stages]  # per stage: kind -> block count

    def stage_params(s):
        dense = sum(n * cnt.per_kind[k][0] for k, n in kinds[s].items())
        routed = sum(n * cnt.per_kind[k][1] for k, n in kinds[s].items()) // ep
        if s == 0 or (s == S - 1 and has_mtp and c.schedule == "1f1b"):
            dense += cnt.embed  # 1F1B: the MTP module on the last stage needs its own embedding copy
        if s == S - 1:
            dense += cnt.head
        return dense, routed

    def stage_act(s):
        present = [k for k, n in kinds[s].items() if n]
        per_tok = sum(n * act_bytes_per_token(model_cfg, k, c.precision, c.recompute) for k, n in kinds[s].items())
        if c.recompute == "full":  # one layer being recomputed at a time
            per_tok += max(act_bytes_per_token(model_cfg, k, c.precision, "none") for k in present)
        return per_tok * T

    def stage_fp8_copies(s):  # bytes of the FP8 weight transposes one micro-batch keeps in stage s (1 B/param)
        blocks = sum(n * cnt.per_kind[k][0] for k, n in kinds[s].items())  # outside the routed experts (no embedding
        routed = sum(n * cnt.per_kind[k][1] for k, n in kinds[s].items()) // ep  # or head: they stay bf16)
        return {"none": 0, "dense": blocks, "all": blocks + routed}[c.fp8_weight_copies]

    def n_moe(s):
        return sum(n for k, n in kinds[s].items() if cnt.per_kind[k][1] > 0)

    best, comm_max = None, {}
    for r in range(pp if c.schedule != "dualpipe" else pp // 2):
        held = (r,) if c.schedule == "1f1b" else (r, S - 1 - r)
        dense = sum(stage_params(s)[0] for s in held)
        routed = sum(stage_params(s)[1] for s in held)
        sd = dp if c.zero >= 1 else 1
        se = dp_e if c.zero >= 1 else 1
        mem = {
            f"weights ({c.weight_dtype})": (dense / (dp if c.zero >= 3 else 1) + routed / (dp_e if c.zero >= 3 else 1))
            * DTYPE_BYTES[c.weight_dtype],
            f"gradients ({c.grad_dtype})": (dense / (dp if c.zero >= 2 else 1) + routed / (dp_e if c.zero >= 2 else 1)) * gbytes,
            f"master weights ({'the fp32 weights' if c.weight_dtype == 'fp32' else c.master_dtype})":
            (dense / sd + routed / se) * mbytes,
            f"AdamW m+v ({c.optim_dtype})": (dense / sd + routed / se) * obytes,
        }
        in_flight = min(n_mb, pp - r if c.schedule == "1f1b" else pp + 1)
        # DualPipeV: a micro-batch goes through both stages of the rank (its layers), DualPipe through one copy
        mem["activations"] = (sum if V_shape else max)(stage_act(s) for s in held) * in_flight
        if c.fp8_weight_copies != "none":
            mem["FP8 weight copies"] = (sum if V_shape else max)(stage_fp8_copies(s) for s in held) * in_flight
        mem["logits (fp32, head rank)"] = T * V * 4 if S - 1 in held else 0
        chunks = 2 if c.schedule != "1f1b" else 1
        mem["MoE all-to-all buffers"] = chunks * T * K * D * (f + 2) if ep > 1 and any(n_moe(s) for s in held) else 0
        # DualPipe: half the micro-batches per direction; DualPipeV: every micro-batch through both stages
        passes = sum(n_moe(s) for s in held) / (1 if V_shape else len(held))
        ring = lambda n: (n - 1) / n  # noqa: E731
        def dp_bytes(p, n):
            if n == 1:
                return 0.0
            if c.zero == 0:
                return 2 * ring(n) * p * gbytes
            return ring(n) * p * (gbytes + 2 + (2 * 2 if c.zero == 3 else 0))
        comm = {
            "EP all-to-all": n_mb * passes * T * K * D * (2 * f + 4) if ep > 1 else 0,
            "DP gradients + weight gather": dp_bytes(dense, dp) + dp_bytes(routed, dp_e),
            "PP p2p": n_mb * T * D * 2 * 2 * (2 if V_shape else 1) if pp > 1 else 0,
        }
        comm_max = {k: max(v, comm_max.get(k, 0)) for k, v in comm.items()}
        res = PlanResult(name, c, r, tuple(held), dense + routed, routed, n_mb, in_flight, mem, comm)
        if best is None or res.total > best.total:
            best = res
    best.comm = comm_max  # communication: the busiest rank for each kind
    return best


def suggest(model_cfg: ModelConfig, gpus: int, gpu_mem_gib: float, sort: str = "memory", name: str = "model",
            **kw) -> list[PlanResult]:
    """Every power-of-two (pp, ep) layout valid for the GPU count and the model (pp <= blocks to place,
    ep | n_routed_experts and ep | dp), planned with the other PlanConfig fields in kw; fitting
    layouts first, then by memory ("memory") or by total communication ("comm")."""
    out = []
    pp = 1
    while pp <= gpus:
        ep = 1
        while ep <= gpus // pp:
            try:
                out.append(plan(model_cfg, PlanConfig(gpus=gpus, gpu_mem_gib=gpu_mem_gib, pp=pp, ep=ep, **kw), name))
            except PlanError:
                pass
            ep *= 2
        pp *= 2
    key = (lambda p: p.total) if sort == "memory" else (lambda p: sum(p.comm.values()))
    return sorted(out, key=lambda p: (not p.fits, key(p)))


def format_suggestions(results: list[PlanResult]) -> str:
    lines = [f"{'pp':>4} {'ep':>4} {'dp':>5} {'memory GiB':>11} {'comm GB/step':>13}  fits"]
    for p in results:
        lines.append(f"{p.cfg.pp:>4} {p.cfg.ep:>4} {p.cfg.dp:>5} {p.total / GiB:>11.2f} "
                     f"{sum(p.comm.values()) / 1e9:>13.1f}  {'yes' if p.fits else 'no'}")
    return "\n".join(lines)

"""DeepSeekMoE (SPEC §4; paper §2.1.2): sigmoid router with an aux-loss-free correction bias,
group-limited top-k, normalised and scaled gates, stacked routed experts, shared experts.

Shape suffixes where tokens are permuted: N tokens, K experts per token, E routed experts,
D hidden, I expert width, so `x_ND`, `idx_NK`, `w1_EID`.

Routing (`Router.forward`), all in fp32:
    s = sigmoid(x @ W^T)                     affinities, (N, E)
    sel = s + b                              b = e_score_correction_bias, chooses experts only
    group score = sum of the top-2 of sel in each of n_group groups; keep topk_group groups
    experts outside the kept groups -> -inf  (HF fills 0.0, which differs when sel < 0)
    idx = top-K of sel; w = s[idx] / sum(s[idx]) * routed_scaling_factor
No capacity limit, no token dropping. Everything after the matmul is one kernels op, `router_topk`
(spec: kernels/reference.py; one Triton kernel on the GPU).

Experts (`Experts`): weights stacked as gate/up (E, I, D) and down (E, D, I). Two equal paths:
  * "grouped": sort the N·K (token, expert) pairs by expert, one `torch._grouped_mm` per
    projection over the offsets, then gather each token's K rows back and take their weighted sum:
    no host synchronisation, and no atomics (`_Dispatch`/`_Unsort` below: gathers both ways), so the
    forward and backward are deterministic;
  * "loop": a plain per-expert loop, the reference (it syncs on `nonzero`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import kernels
from dsv3.config import ModelConfig
from dsv3.model.layers import MLP, Linear, hooked

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
_CPU_GROUPED: bool | None = None


def _cpu_grouped_mm_works() -> bool:
    """Whether this torch runs fp32 `torch._grouped_mm` (forward and backward) on the CPU, checked once on
    tiny tensors against plain matmuls (torch 2.13.0's CPU build does not: its stride checks refuse these shapes
    and its backward fails on aligned ones, so the experts' loop runs there). MoE.__init__ asks first, so that
    the check never runs inside a forward: under activation checkpointing (`--recompute full`) its saved
    tensors counted in the first block's forward and not in its recomputation (torch's CheckpointError), and
    under a meta-device or no-grad context its tensors would not be the CPU tensors with gradients it needs."""
    global _CPU_GROUPED
    if _CPU_GROUPED is None:
        try:
            with torch.inference_mode(False), torch.enable_grad():
                _CPU_GROUPED = _grouped_mm_check()
        except (RuntimeError, NotImplementedError, TypeError):
            _CPU_GROUPED = False
    return _CPU_GROUPED


def _grouped_mm_check() -> bool:
    """One fp32 grouped GEMM forward and backward on CPU tensors against plain matmuls."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, requires_grad=True, device="cpu")
    w = torch.randn(2, 4, 3, generator=g, requires_grad=True, device="cpu")
    offs = torch.tensor([2, 5], dtype=torch.int32, device="cpu")
    y = torch._grouped_mm(x, w, offs=offs)
    y.sum().backward()
    ref = torch.cat([x[:2] @ w[0], x[2:] @ w[1]])
    return bool(torch.allclose(y, ref, atol=1e-5) and w.grad is not None)


class _Dispatch(torch.autograd.Function):
    """x_MD = x_ND[order // K]: the rows of the (token, expert) pairs sorted by expert. Backward without
    atomics: pair j = n·K + k sits at sorted row inv[j], so dx[n] = sum_k dx_MD[inv[n·K + k]] (a gather
    and a sum over K; autograd's default would be an atomic index_put)."""

    @staticmethod
    def forward(ctx, x_ND, order, inv, K: int):
        ctx.save_for_backward(inv)
        ctx.K = K
        return x_ND[order // K]

    @staticmethod
    def backward(ctx, g_MD):
        (inv,) = ctx.saved_tensors
        N = inv.shape[0] // ctx.K
        return g_MD[inv].view(N, ctx.K, -1).sum(1), None, None, None


class _Unsort(torch.autograd.Function):
    """y[inv]: rows sorted by expert back to (token, k) order; a permutation, so the backward is the
    gather by `order` (no atomic scatter)."""

    @staticmethod
    def forward(ctx, y_MD, inv, order):
        ctx.save_for_backward(order)
        return y_MD[inv]

    @staticmethod
    def backward(ctx, g):
        (order,) = ctx.saved_tensors
        return g[order], None, None


def _weighted_sum(y_NKD: torch.Tensor, w_NK: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ_k w[n, k] · y[n, k] in fp32 -> (N, D), rounded once to out_dtype. In the batch-invariant mode
    (kernels/invariant.py) the k terms are added one at a time in k order (torch's reduction over the middle
    dimension picks its thread layout from the whole shape, so a token's sum could follow another order in another
    batch): on the GPU in one launch (kernels/invariant_triton.py `weighted_sum`, the same bits as the loop below,
    which is its reference and the CPU's form)."""
    if not kernels.backend.BATCH_INVARIANT:
        return (y_NKD.float() * w_NK.unsqueeze(-1)).sum(1).to(out_dtype)
    if y_NKD.is_cuda and y_NKD.stride(-1) == 1:
        from dsv3.kernels.invariant_triton import weighted_sum

        return weighted_sum(y_NKD, w_NK, out_dtype)
    acc = y_NKD[:, 0].float() * w_NK[:, :1]
    for j in range(1, y_NKD.shape[1]):
        acc = acc + y_NKD[:, j].float() * w_NK[:, j:j + 1]
    return acc.to(out_dtype)


def _count(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Occurrences of 0..n-1 in idx, (n,) int64. Like bincount(minlength=n) but with a static output
    shape (bincount's length depends on the data), so torch.compile keeps the MoE in one graph."""
    return torch.zeros(n, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


class MoEStats(NamedTuple):
    counts: torch.Tensor  # (E,) int64, tokens routed to each expert in this forward (load)
    balance: torch.Tensor | None  # scalar: Σ_i f_i·P_i averaged over sequences (without α), or None


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # Updated by the training loop (sign rule), never by gradients; saved with the model.
        self.register_buffer("e_score_correction_bias", torch.empty(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Keep the correction bias in fp32 whatever the model's dtype: updates of γ = 1e-3 vanish
        # in bf16 (SPEC §4.1 "keep the router in FP32"; HF `_keep_in_fp32_modules_strict`).
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if new.dtype != torch.float32:
            self._buffers["e_score_correction_bias"] = bias.to(device=new.device, dtype=torch.float32)
        return self

    def logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> x · Wᵀ (N, E) in fp32. F.linear on fp32 copies; or, where the dense decode GEMV runs (a
        bf16 engine's decode step with the switch on: kernels.set_dense_gemv), the same sum straight from the
        16-bit x and W: a product of two bf16 numbers is exact in fp32, so only the summation order differs,
        and the step saves the weight's per-step fp32 cast and cuBLAS's fp32 dot + reduce (three launches
        per layer, 0.16 ms of a 3.5 ms 16b step with the router kernel: bench/RESULTS.md, 2026-12-04)."""
        if kernels.select_backend("dense_gemv", x_ND, self.weight) == "triton":
            return kernels.dense_gemv(x_ND, self.weight, out_dtype=torch.float32, backend="triton")
        if x_ND.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x_ND.device.type):
            # under bf16 autocast (training's bf16 / fp8 precision) F.linear would cast these fp32 copies back
            # down and return bf16 logits: routing from bf16 scores (gates in bf16 too), and the fp32-only router
            # kernel passed over for the reference's topk ops (36 topk + sort launches per `small` step on the
            # H200 profile of 2026-12-05). SPEC §4.1: FP32 routing; the engine's bf16 models run it so too.
            with torch.autocast(x_ND.device.type, enabled=False):
                return F.linear(x_ND.float(), self.weight.float())
        return F.linear(x_ND.float(), self.weight.float())

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> weights (N, K) fp32, indices (N, K) int64, affinities s (N, E) fp32."""
        logits_NE = self.logits(x_ND)
        # the routing formula of the module docstring (kernels.reference.router_topk_ref), one fused
        # kernel on the GPU; gradients reach the weight through s (the selection has none)
        return kernels.router_topk(logits_NE, self.e_score_correction_bias, self.top_k, self.n_group,
                                   self.topk_group, self.norm_topk_prob, self.scale)


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))  # w1
        self.up_proj = nn.Parameter(torch.empty(E, I, D))  # w3
        self.down_proj = nn.Parameter(torch.empty(E, D, I))  # w2
        self.expert_offset = 0  # global index of local expert 0 (an expert-parallel slice: keep_experts)

    def weights(self, e: int | None = None, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) of expert e, or of all experts stacked, in `dtype` (None: as stored). The
        forward reads the weights only through here, so that a subclass can store them differently
        (FP8 blocks: dsv3/model/fp8.py)."""
        ws = (self.gate_proj, self.up_proj, self.down_proj)
        if e is not None:
            ws = tuple(w[e] for w in ws)
        return ws if dtype is None else tuple(w.to(dtype) for w in ws)

    @torch.no_grad()
    def select_experts(self, ids) -> None:
        """Keep the experts `ids` (global indices, in this order; a copy may repeat) of every stacked (E, ...)
        tensor: local expert j is global ids[j] (an expert-parallel rank's slots under a redundant-expert
        placement, dsv3/inference/eplb.py). On the meta device this only changes shapes."""
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        for name, p in list(self._parameters.items()):
            self._parameters[name] = nn.Parameter(p[ids.to(p.device)].clone(), requires_grad=p.requires_grad)
        for name, b in list(self._buffers.items()):
            self._buffers[name] = b[ids.to(b.device)].clone()

    def keep_experts(self, first: int, count: int) -> None:
        """Keep only experts [first, first + count) of every stacked (E, ...) tensor (an expert-parallel
        rank's slice; the router still scores all E, and the dispatcher numbers local experts from 0).
        Parameters stay parameters and buffers (an FP8 subclass's weights and scales) stay buffers;
        on the meta device this only changes shapes (a sharded checkpoint load fills the slice)."""
        # the global index of local expert 0 (initialisation draws by it)
        self.expert_offset = getattr(self, "expert_offset", 0) + first
        for name, p in list(self._parameters.items()):
            self._parameters[name] = nn.Parameter(p[first:first + count].clone(), requires_grad=p.requires_grad)
        for name, b in list(self._buffers.items()):
            self._buffers[name] = b[first:first + count].clone()

    def forward(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        if self._impl(x_ND, impl) == "grouped":
            if impl == "auto" and self._gemv_fits(x_ND, idx_NK):
                return self.forward_gemv(x_ND, idx_NK, w_NK)
            if impl == "auto" and self._moe_gemm_fits(x_ND, idx_NK):
                return self.forward_moe_gemm(x_ND, idx_NK, w_NK)
            return self.forward_grouped(x_ND, idx_NK, w_NK)
        return self.forward_loop(x_ND, idx_NK, w_NK)

    def gemv_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                                    torch.Tensor, torch.Tensor | None]:
        """(gate, its scales, up, its scales, down, its scales) as stored, for `kernels.expert_gemv`: no
        scales here; FP8 storage gives its 128x128 block scales."""
        return self.gate_proj, None, self.up_proj, None, self.down_proj, None

    def _gemv_fits(self, x_ND: torch.Tensor, idx_NK: torch.Tensor) -> bool:
        """The decode GEMV path (`forward_gemv`) for this call: at most one (token, expert) pair per expert on
        average (each pair re-reads its expert's weights; above that the grouped GEMM, which reads each expert
        once, wins), weights stored in x's dtype or FP8, and the kernel's backend rule (GPU, bf16/fp16 x, no
        autograd). Shapes only: a CUDA-graph bucket always takes the same path."""
        ws = self.gemv_weights()
        w = ws[0]
        # the kernel has no backward: not where the expert weights need gradients either (the backend rule
        # checks x only; a fine-tune with everything before the experts frozen gives a plain x)
        weights_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ws)
        return (idx_NK.numel() <= w.shape[0] and w.dtype in (x_ND.dtype, torch.float8_e4m3fn) and not weights_grad
                and kernels.select_backend("expert_gemv", x_ND) != "reference")

    def _moe_gemm_fits(self, x_ND: torch.Tensor, idx_NK: torch.Tensor) -> bool:
        """The grouped decode GEMM path (`forward_moe_gemm`) for this call: a decode batch (at most MOE_GEMM_ROWS
        pairs: also a short prompt's prefill, up to MOE_GEMM_ROWS / K tokens), weights in x's dtype or FP8 and not
        needing gradients, and the kernel's rule (switched on, GPU, bf16/fp16 x, no CUDA autocast). Shapes only,
        as `_gemv_fits`."""
        ws = self.gemv_weights()
        weights_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ws)
        # (the limit read at each call, from the one place that holds it: benches raise it)
        # (the batch-invariant mode: every row count, one tile shape; kernels/invariant.py)
        return ((idx_NK.numel() <= kernels.backend.MOE_GEMM_ROWS or kernels.backend.BATCH_INVARIANT)
                and not weights_grad
                and kernels.select_backend("moe_gemm", x_ND, ws[0]) != "reference")

    def forward_moe_gemm(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """The same sum as `forward_grouped` for decode batches above one pair per expert: the pairs sorted by
        expert, then two grouped launches that read each selected expert's weights once (dsv3/kernels/
        moe_gemm_triton.py): gate+up+SwiGLU reading x through the sort (no gathered copy), down storing each row
        at its pair's place (no un-sort); then the fp32 weighted sum in k order."""
        N, K = idx_NK.shape
        flat = idx_NK.reshape(-1)  # (M = N*K,) pair n*K + k: token n's k-th expert
        order = flat.argsort(stable=True)  # the pairs sorted by expert
        offs = _count(flat, self.gate_proj.shape[0]).cumsum(0).to(torch.int32)  # (E,) end rows
        g, gs, u, us, d, ds = self.gemv_weights()
        h_MI = kernels.moe_gemm_swiglu(x_ND, g, gs, u, us, offs, order // K)  # sorted rows
        y_MD = kernels.moe_gemm_down(h_MI, d, ds, offs, order)  # (M, D) in pair order
        return _weighted_sum(y_MD.view(N, K, -1), w_NK, x_ND.dtype)

    def forward_gemv(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor,
                     shared: tuple | None = None) -> torch.Tensor:
        """The same sum as `forward_grouped` for decode-sized N: each (token, expert) pair is one row of two
        launches, gate+up+SwiGLU then down (dsv3/kernels/expert_gemv_triton.py), reading only the selected
        experts; no sort, no gather of x (row n*K + k reads token n). shared: the shared experts as a second stack
        of S experts (MoE.shared_stacks): S more rows per token in the same two launches, each added with weight 1,
        so the result is routed + shared (the shared part's fp32 sum of S rounded halves instead of one rounding)."""
        N, K = idx_NK.shape
        g, gs, u, us, d, ds = self.gemv_weights()
        if shared is None:
            flat = idx_NK.reshape(-1)  # (M = N*K,) row n*K + k: token n's k-th expert
            h_MI = kernels.expert_gemv(x_ND, g, gs, flat, K, up=u, up_s=us)  # silu(x·w1ᵀ) * (x·w3ᵀ)
            y_MD = kernels.expert_gemv(h_MI, d, ds, flat, 1)
            return (y_MD.view(N, K, -1).float() * w_NK.unsqueeze(-1)).sum(1).to(x_ND.dtype)  # fp32 weighted sum
        g2, gs2, u2, us2, d2, ds2 = shared
        S = g2.shape[0]
        # (N*(K+S),) rows: token n's K routed experts, then the S shared ones (kernels.expert_ids), which the
        # launches derive from idx themselves (routed=K): a concatenation here was a launch of its own at decode (16b
        # FP8 batch 1 on an H200, 2026-12-06: 519.2 -> 541.2 tok/s, with the latent store's query RoPE, which alone
        # bought bf16 nothing)
        flat = idx_NK.reshape(-1)
        h_MI = kernels.expert_gemv(x_ND, g, gs, flat, K + S, up=u, up_s=us, extra=(g2, gs2, u2, us2), routed=K)
        y_MD = kernels.expert_gemv(h_MI, d, ds, flat, 1, extra=(d2, ds2, None, None), routed=K)
        gates = torch.cat([w_NK.float(), w_NK.new_ones(N, S, dtype=torch.float32)], 1)  # the shared experts: 1
        return (y_MD.view(N, K + S, -1).float() * gates.unsqueeze(-1)).sum(1).to(x_ND.dtype)

    @staticmethod
    def _impl(x_ND: torch.Tensor, impl: str) -> str:
        """"grouped" or "loop" for `impl` ("auto", "grouped", "loop") on this input."""
        # "auto": grouped GEMMs on GPUs, and on the CPU in fp32 where torch has them: training the `tiny`
        # preset (width 192, 16 experts of 96) on 2 cores, a step took a median 0.50-0.55 s grouped against
        # 0.53-0.63 s with the per-expert loop (alternating probes, 2026-12-04; the whole main job ran at the
        # same speed both ways, 549 vs 553 s of training, within this VM's run-to-run noise, and gave the
        # same losses). The loop (the reference) is the fallback elsewhere, and under CPU autocast, whose bf16
        # GEMMs the loop's matmuls take (torch._grouped_mm is not an autocast op).
        if impl == "auto":
            cpu_ok = (x_ND.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and _HAS_GROUPED_MM
                      and _cpu_grouped_mm_works())
            return "grouped" if x_ND.is_cuda or cpu_ok else "loop"
        if impl not in ("grouped", "loop"):
            raise ValueError(f"unknown experts impl {impl!r} (use 'auto', 'grouped' or 'loop')")
        return "grouped" if impl == "grouped" and _HAS_GROUPED_MM else "loop"

    def forward_partial(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor,
                        impl: str = "auto") -> torch.Tensor:
        """-> (N, D) fp32: Σ_k w_nk · expert_{idx_nk}(x_n) over the pairs whose expert is one of this module's
        E (idx in [0, E)); the other pairs (experts held by other ranks) add exactly 0. The expert-parallel
        decode path (dsv3/distributed/expert_parallel.py) sums these partials over the ranks with one
        all-reduce. Shapes depend on N and K only and the grouped path never syncs with the host, so it can
        be captured in a CUDA graph: the pairs are sorted with the foreign ones last (key E), the grouped
        GEMMs' offsets end at the local pairs (rows past the last offset belong to no group), and the
        foreign rows' outputs, whatever they hold, are replaced by 0 with `where` (not multiplied: they
        may be uninitialised). Per-row kernels (FP8 decode) see expert -1 for them and skip them. Each
        token's K terms are summed in k order as in `forward`."""
        N, K = idx_NK.shape
        E = self.gate_proj.shape[0]
        mine = (idx_NK >= 0) & (idx_NK < E)  # (N, K)
        key = torch.where(mine, idx_NK, E)  # foreign pairs -> E, sorted after every local expert
        if self._impl(x_ND, impl) == "loop":  # the reference: visits experts 0..E-1 only, so key E is skipped
            return self.forward_loop(x_ND, key, w_NK, out_dtype=torch.float32)
        flat = key.reshape(-1)  # (M = N*K,)
        order = flat.argsort(stable=True)
        offs = _count(flat, E + 1)[:E].cumsum(0).to(torch.int32)  # (E,) end offsets of the local experts' rows
        if impl == "auto" and self._moe_gemm_fits(x_ND, idx_NK):
            # the grouped decode GEMM: rows past offs[-1] (foreign pairs) are neither computed nor written, so
            # their places in y hold whatever was allocated, and `where` below replaces them by 0
            g, gs, u, us, d, ds = self.gemv_weights()
            h_MI = kernels.moe_gemm_swiglu(x_ND, g, gs, u, us, offs, order // K)
            y_NKD = kernels.moe_gemm_down(h_MI, d, ds, offs, order).view(N, K, -1)  # pair order
            return torch.where(mine.unsqueeze(-1), y_NKD.float() * w_NK.unsqueeze(-1), 0.0).sum(1)
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        dt = torch.get_autocast_dtype("cuda") if x_ND.is_cuda and torch.is_autocast_enabled("cuda") else x_ND.dtype
        x_MD = x_ND.to(dt)[order // K]  # (M, D) sorted by key
        # foreign rows: past the grouped GEMMs' last offset, and expert -1 for per-row kernels (FP8 decode:
        # fp8_expert_rows reads no weight for them), so each rank computes only its own pairs
        y_MD = self.sorted_mlp(x_MD, torch.where(flat < E, flat, -1), order, offs, dt)  # (M, D)
        y_NKD = y_MD[inv].view(N, K, -1)  # each token's K outputs, in k order
        y_NKD = torch.where(mine.unsqueeze(-1), y_NKD.float() * w_NK.unsqueeze(-1), 0.0)
        return y_NKD.sum(1)  # (N, D) fp32

    def forward_grouped(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        N, K = idx_NK.shape
        E = self.gate_proj.shape[0]
        flat = idx_NK.reshape(-1)  # (N*K,)
        order = flat.argsort(stable=True)  # pairs sorted by expert
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts = _count(flat, E)
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end offset of each expert's rows
        # torch._grouped_mm is not an autocast op and is bf16-only on CUDA: cast explicitly
        dt = torch.get_autocast_dtype("cuda") if x_ND.is_cuda and torch.is_autocast_enabled("cuda") else x_ND.dtype
        x_MD = _Dispatch.apply(x_ND.to(dt), order, inv, K)  # (M = N*K, D)
        y_MD = self.sorted_mlp(x_MD, flat, order, offs, dt)  # (M, D)
        y_NKD = _Unsort.apply(y_MD, inv, order).view(N, K, -1)  # each token's K expert outputs
        return (y_NKD.float() * w_NK.unsqueeze(-1)).sum(1).to(x_ND.dtype)  # fp32 weighted sum

    def sorted_mlp(self, x_MD: torch.Tensor, flat: torch.Tensor, order: torch.Tensor, offs: torch.Tensor,
                   dt: torch.dtype) -> torch.Tensor:
        """SwiGLU of rows sorted by expert: x_MD (M, D), rows offs[e-1]:offs[e] belong to expert e
        (flat[order] is each row's expert). Grouped GEMMs; FP8 storage overrides this."""
        w1, w3, w2 = (w.transpose(-2, -1) for w in self.weights(dtype=dt))  # (E, D, I), (E, D, I), (E, I, D)
        h1 = torch._grouped_mm(x_MD, w1, offs=offs)  # (M, I)
        h3 = torch._grouped_mm(x_MD, w3, offs=offs)
        return torch._grouped_mm(F.silu(h1) * h3, w2, offs=offs)  # (M, D)

    def forward_loop(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
        out = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
        for e in range(self.gate_proj.shape[0]):
            tok, slot = (idx_NK == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            xe = x_ND[tok]
            w1, w3, w2 = self.weights(e, x_ND.dtype)
            h = F.silu(xe @ w1.T) * (xe @ w3.T)
            y = (h @ w2.T).float() * w_NK[tok, slot].unsqueeze(-1)
            out.index_add_(0, tok, y)
        return out.to(out_dtype or x_ND.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if _HAS_GROUPED_MM:
            _cpu_grouped_mm_works()  # once per process, here rather than inside a (checkpointed) forward
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size) if cfg.n_shared_experts > 0 else None
        )
        self.experts_impl = "auto"  # "grouped" | "loop" (the reference) | "auto" (by device)
        # The one parallelism seam (STYLE rule 3): None runs the local experts; otherwise a plain
        # callable (experts, x_ND, idx_NK, w_NK, impl) -> y_ND that computes the same sum, e.g. the
        # expert-parallel all-to-all of dsv3/distributed/expert_parallel.py. Not a submodule.
        self.dispatcher = None

    def forward(self, x: torch.Tensor, with_balance: bool = False) -> tuple[torch.Tensor, MoEStats]:
        """x (B, T, D) -> y (B, T, D), stats. `with_balance` also computes the sequence-wise balance term."""
        B, T, D = x.shape
        x_ND = x.reshape(-1, D)
        w_NK, idx_NK, s_NE = self.gate(x_ND)
        shared = self._shared_in_gemv(x_ND, idx_NK)
        if shared is not None:
            # decode: the shared experts as more rows of the routed experts' two GEMV launches (set_shared_gemv)
            y = self.experts.forward_gemv(x_ND, idx_NK, w_NK, shared=shared).view(B, T, D)
        elif self.dispatcher is None:
            y = self.experts(x_ND, idx_NK, w_NK, self.experts_impl).view(B, T, D)
        else:
            y = self.dispatcher(self.experts, x_ND, idx_NK, w_NK, self.experts_impl).view(B, T, D)
        if self.shared_experts is not None and shared is None:
            y = y + self.shared_experts(x)
        E = s_NE.shape[1]
        counts = _count(idx_NK.reshape(-1), E)
        balance = sequence_balance(s_NE.view(B, T, E), idx_NK.view(B, T, -1)) if with_balance else None
        return y, MoEStats(counts, balance)

    def _shared_in_gemv(self, x_ND: torch.Tensor, idx_NK: torch.Tensor) -> tuple | None:
        """`shared_stacks()` where this call runs the shared experts inside the routed experts' GEMV launches:
        switched on (kernels.set_shared_gemv), the routed experts on their decode GEMV path (local, "auto", decode
        sized: Experts._gemv_fits), the shared projections plain Linear / FP8Linear without hooks, stored like the
        routed experts; else None (the shared MLP runs as modules)."""
        if (self.shared_experts is None or self.dispatcher is not None or self.experts_impl != "auto"
                # Experts.forward's own choice (a subclass such as FP8TrainExperts chooses otherwise) and hooks
                or type(self.experts).forward is not Experts.forward or hooked(self.experts)
                # (the routed experts' gate weight: the switch may hold for e4m3 weights only, backend.WEIGHTS_E4M3)
                or kernels.select_backend("shared_gemv", x_ND, self.experts.gemv_weights()[0]) == "reference"
                or self.experts._impl(x_ND, "auto") != "grouped" or not self.experts._gemv_fits(x_ND, idx_NK)):
            return None
        # the kernels have no backward: not where the shared experts train (the routed ones' rule is _gemv_fits')
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.shared_experts.parameters()):
            return None
        return self.shared_stacks()

    def shared_stacks(self) -> tuple | None:
        """The shared experts (n_shared blocks of moe_intermediate_size in one MLP) as a second expert stack for
        `kernels.expert_gemv`'s `extra`, views of their matrices (no copy): gate, its scales, up, its scales (S, I,
        D) and down, its scales (S, D, I) with down's blocks strided along its row. None where that cannot be: hooks
        on the MLP or its projections (the views would skip them), projections other than bias-free Linear /
        FP8Linear, weights stored unlike the routed experts', or FP8 blocks that straddle two shared experts
        (I not a multiple of 128)."""
        sh = self.shared_experts
        mods = (sh.gate_proj, sh.up_proj, sh.down_proj)
        g = self.experts.gemv_weights()[0]
        E, I, D = g.shape
        if hooked(sh, *mods) or sh.gate_proj.weight.shape[0] % I or sh.gate_proj.weight.shape[1] != D:
            return None
        S = sh.gate_proj.weight.shape[0] // I
        if all(type(m) is Linear and m.bias is None for m in mods) and g.dtype == sh.gate_proj.weight.dtype:
            scales = (None, None, None)
        elif all(_is_fp8_linear(m) for m in mods) and g.dtype == torch.float8_e4m3fn and I % kernels.BLOCK == 0:
            scales = tuple(m.weight_scale_inv for m in mods)
        else:
            return None
        gw, uw, dw = (m.weight for m in mods)
        if not all(t.is_contiguous() for t in (gw, uw, dw)):
            return None
        b = kernels.BLOCK

        def rows(t, n):  # (S*n, cols) -> (S, n, cols)
            return None if t is None else t.view(S, n, t.shape[1])

        def cols(t, n):  # (rows, S*n) -> (S, rows, n): expert j's columns j*n .. (j+1)*n - 1
            return None if t is None else t.view(t.shape[0], S, n).transpose(0, 1)

        gs, us, ds = scales
        nb = I // b if gs is not None else 0
        return (rows(gw, I), rows(gs, nb), rows(uw, I), rows(us, nb), cols(dw, I), cols(ds, nb))


def _is_fp8_linear(m: nn.Module) -> bool:
    """type(m) is dsv3.model.fp8.FP8Linear, without importing that module (it imports this one)."""
    return type(m).__name__ == "FP8Linear" and type(m).__module__ == "dsv3.model.fp8"


def sequence_balance(s_BTE: torch.Tensor, idx_BTK: torch.Tensor) -> torch.Tensor:
    """Complementary sequence-wise balance loss without α (paper eqs. 17–20), mean over sequences:
        f_i = E/(K·T) · Σ_t 1[i chosen for t],  P_i = (1/T) Σ_t s_{i,t}/Σ_j s_{j,t},  L = Σ_i f_i·P_i.
    Choice ([U], SPEC §4.3): the indicator is the set actually routed to (biased, group-limited)."""
    B, T, E = s_BTE.shape
    K = idx_BTK.shape[-1]
    chosen = torch.zeros_like(s_BTE).scatter_(2, idx_BTK, 1.0)  # (B, T, E)
    f = chosen.sum(1) * (E / (K * T))  # (B, E), no gradient through the indicator
    P = (s_BTE / s_BTE.sum(-1, keepdim=True)).mean(1)  # (B, E)
    return (f * P).sum(-1).mean()


@torch.no_grad()
def update_expert_bias(routers: list[Router], counts_LE: torch.Tensor, gamma: float,
                       applied: torch.Tensor | None = None) -> None:
    """Aux-loss-free balancing (paper §2.1.2): b_i += γ·sign(mean(c) − c_i) per MoE layer, from the
    load c counted over the whole global batch (the caller sums counts across data-parallel ranks).
    applied: optional 0-dim bool device tensor; where False the biases keep their bits (the training
    loop's skipped step), selected on the device."""
    if gamma == 0:
        return
    if counts_LE.shape[0] != len(routers):
        raise ValueError(f"counts has {counts_LE.shape[0]} rows for {len(routers)} MoE layers")
    c = counts_LE.float()
    delta = gamma * torch.sign(c.mean(-1, keepdim=True) - c)  # (L, E)
    for r, d in zip(routers, delta):
        b = r.e_score_correction_bias
        if applied is None:
            b.add_(d.to(b.device))
        else:
            b.copy_(torch.where(applied.to(b.device), b + d.to(b.device), b))


def max_violation(counts_LE: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer = (max_i c_i − mean c) / mean c (Loss-Free Balancing paper)."""
    c = counts_LE.float()
    mean = c.mean(-1)
    return (c.max(-1).values - mean) / mean.clamp_min(1e-9)  # a layer without tokens: 0, not -1

"""FP8 mixed-precision training, the paper's recipe (SPEC §9; paper §3.3): every GEMM of a swapped
Linear — forward, input gradient, weight gradient — takes E4M3 operands with fine-grained online
scales and accumulates in fp32; everything else stays as it was (bf16 autocast / fp32).

    FP8TrainLinear          an nn.Linear (same `weight` parameter, same state_dict) whose matmuls run
                            in FP8; the master weight keeps its dtype (fp32)
    FP8TrainExperts         the routed `Experts` (same parameters, same state_dict) with the same
                            three GEMMs per expert, grouped (see "Experts" below)
    convert_to_fp8_training(model, backend="auto", experts=False)
                            swap, in place, the attention projections (q_a/q_b/q_proj, kv_a, kv_b,
                            o_proj) and the dense / shared-expert MLPs of every block (MTP blocks
                            included), and with experts=True the routed experts. Not swapped, as in
                            the paper: embedding, lm_head, norms, the router (`Router.weight`), the
                            MTP `eh_proj`; the attention core is SDPA in bf16 anyway.

The three GEMMs of Y = X Wᵀ (X: M tokens x K, W: N x K):
    fprop   Y  = Q1x128(X) · Q128x128(W)ᵀ
    dgrad   dX = Q1x128(dY) · Q128x128(W)
    wgrad   dW = Q1x128(dYᵀ) · Q1x128(Xᵀ)ᵀ     both tiled 1x128 along the tokens (128x1 tiles of
                                               dY and X); Xᵀ is re-tiled from the FP8 X kept for
                                               backward: dequantise, transpose, requantise
Q1x128: one scale per token per 128 channels, s = max(amax, 1e-4) / 448 (`kernels.act_quant`);
Q128x128: one scale per 128x128 weight block, max(amax / 448, 1e-12) (`kernels.weight_quant`).
Scales are fp32 and computed from the current tensor (no delayed scaling). Backward keeps the FP8 X
(1 byte/element + scales) and the FP8 Wᵀ with W's scales (written by the forward's weight quantiser in
the same pass as W), not the bf16 X.
Gradients (dY, dYᵀ): the paper's s = amax / 448 with no floor. The 1e-4 floor of `act_quant` (from
the inference kernel) is harmless for activations (tile amax ~0.05-5) but dY tiles are ~1e-9..1e-4
(the loss is a mean over B*T tokens), so with it almost every dY tile was quantised on a scale up to
1e4x too coarse (e.g. amax 1e-8: values on 0..0.05 of the e4m3 range, subnormals, mostly zeros):
FP8 learnt markedly slower (bench/fp8_loss_cpu.py). Both backends therefore multiply dY by one
power of two p = 2^(64 - e), e = exponent of the tensor's amax (exact, no host sync), quantise
(same kernels: the floor no longer binds), and divide the scales by p (exact): the e4m3 bytes are
those of s = amax / 448 and the scales are amax / 448, for every tile above ~1e-23 x the tensor's amax.

Backends (one autograd function, `backend=`):
  * "emulate": the contract, any device. Quantise with the reference functions, dequantise to fp32,
    matmul in fp32, cast (Y to the autocast/input dtype, dX to X's dtype, dW to W's dtype). On the
    CPU this is what `--precision fp8` runs (slow, ~2-3x an fp32 step; for tests).
  * "scaled_mm": CUDA SM90, torch with `F.scaled_mm` (2.10+): quantisation by the Triton kernels of
    `dsv3/kernels/fp8_triton.py` (byte-equal to the references), GEMMs by `F.scaled_mm` with
    `ScalingType.BlockWise1x128` (activations, gradients) x `BlockWise128x128` (weights) for fprop
    and dgrad, `BlockWise1x128` x `BlockWise1x128` for wgrad (fp32 output). M, N, K are zero-padded
    to multiples of 128 where needed (e.g. kv_a_proj's 576 outputs -> 640): zeros change no amax, so
    the result is the emulation's up to fp32 accumulation order and the output rounding.
  * "auto": scaled_mm where it is available (CUDA, SM 9.x, F.scaled_mm, triton), else emulate.

Experts (`FP8TrainExperts.sorted_mlp`, inside `Experts.forward_grouped`): the (token, expert) rows are
sorted by expert, rows_e = offs[e-1]:offs[e], and each expert matrix W_e (N x K) gets the same three
GEMMs:
    fprop   Y[rows_e]  = Q1x128(X)[rows_e] · Q128x128(W_e)ᵀ
    dgrad   dX[rows_e] = Q1x128(dY)[rows_e] · Q128x128(W_e)
    wgrad   dW_e       = Q1x128(dYᵀ)[:, rows_e] · Q1x128(Xᵀ)[:, rows_e]ᵀ
X and dY are quantised over the whole sorted M (a row's 1x128 tiles never mix experts). dYᵀ and Xᵀ are
tiled along the tokens of the whole sorted M, so a 128-token tile may straddle two experts: each
element still has exactly one scale, and expert e's contraction sums its own rows only. Weights get
128x128 blocks per expert. gate and up are two linears sharing one quantisation of X: one GEMM for
both ([gate; up], 2I outputs) and one dgrad GEMM over the 2I contraction (each one's dY in its own
1x128 tiles); their fp8 weights are read in place, never concatenated. Backends (`convert_to_fp8_training`
gives the experts "triton" where the Linears get "scaled_mm"):
  * "emulate": the reference functions, fp32 matmul per expert (a loop over the host copy of offs:
    one sync per grouped linear, acceptable for the contract); what the CPU runs.
  * "triton": CUDA SM 8.9+. Quantisation by `dsv3/kernels/fp8_triton.py`, GEMMs by the grouped kernels
    of `dsv3/kernels/fp8_grouped_triton.py`, which read offs on the device: no host sync. D and I are
    zero-padded to multiples of 128 where needed (every preset is aligned; tiny test models are not),
    M to a multiple of 128 for the wgrad re-tiling.
  * "auto": triton where available, else emulate.
Why Triton: torch 2.11's `F.scaled_grouped_mm` on SM90 is rowwise-only (BlockWise1x128 / 128x128 raise
"No gemm implementation was found"), and a per-expert loop of blockwise `F.scaled_mm` needs the
per-expert counts on the host (a sync per layer) and runs small GEMMs whose FP8 gain is small or
negative (ANCHORS: 128 tokens, 49 vs 67 bf16 TFLOP/s). Limits: the SwiGLU input is saved for backward
in the autocast dtype (the paper caches it in FP8 and recomputes SwiGLU) and dispatch/combine stay bf16;
`experts=False` is the default until the kernels are measured against bf16 `torch._grouped_mm`
(bench/fp8_experts_speed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import (BLOCK, act_dequant, act_quant, fp8_grouped_kernels, fp8_quant_kernels, weight_dequant,
                          weight_quant)
from dsv3.model.moe import Experts

BACKENDS = ("auto", "emulate", "scaled_mm")
EXPERT_BACKENDS = ("auto", "emulate", "triton")


def _ceil(n: int, m: int = BLOCK) -> int:
    return -(-n // m) * m


def scaled_mm_available(device: torch.device | str | None = None) -> bool:
    """True where the scaled_mm backend can run: CUDA SM 9.x, `F.scaled_mm` with blockwise scaling, triton."""
    if not torch.cuda.is_available() or not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return False
    if torch.cuda.get_device_capability(dev)[0] != 9:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


GRAD_AMAX_EXP = 64  # dY is pre-scaled so that its amax lies in [2^63, 2^64)


def _grad_prescale(g: torch.Tensor) -> torch.Tensor:
    """The power of two p (fp32, 0-dim, on g's device) with amax(|g| * p) in [2^63, 2^64); built from
    the exponent bits so it is exact on every device. p = 2^64 for an all-zero g."""
    amax = torch.linalg.vector_norm(g.detach(), float("inf")).float()  # max |g| in one reduction, no |g| copy
    _, e = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1)
    k = (GRAD_AMAX_EXP - e.to(torch.int32)).clamp(-126, 127)
    return ((k + 127) << 23).view(torch.float32)


def _grad_quant_ref(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q1x128 of a gradient without the activation floor: (fp8, fp32 scales amax/448) (module doc)."""
    p = _grad_prescale(g)
    q, s = act_quant(g * p)
    return q, s / p


# --- emulation (the contract) -------------------------------------------------------------------

def _emu_fwd(x2: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype):
    xq, xs = act_quant(x2)
    wq, ws = weight_quant(w)
    y = act_dequant(xq, xs) @ weight_dequant(wq, ws, torch.float32).T
    return y.to(out_dtype), (xq, xs, wq, ws)


def _emu_bwd(g2: torch.Tensor, saved, x_dtype: torch.dtype, w_dtype: torch.dtype, need_dx: bool, need_dw: bool):
    xq, xs, wq, ws = saved
    dx = dw = None
    if need_dx:
        gq, gs = _grad_quant_ref(g2)
        dx = (act_dequant(gq, gs) @ weight_dequant(wq, ws, torch.float32)).to(x_dtype)
    if need_dw:
        gtq, gts = _grad_quant_ref(g2.t().contiguous())  # dYᵀ (N, M): 1x128 tiles along the tokens
        xtq, xts = act_quant(act_dequant(xq, xs).t().contiguous())  # re-tile X: dequant, transpose, requant
        dw = (act_dequant(gtq, gts) @ act_dequant(xtq, xts).T).to(w_dtype)
    return dx, dw


# --- scaled_mm backend (CUDA SM90) --------------------------------------------------------------

def _pad2(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    r, c = t.shape
    if r == rows and c == cols:
        return t.contiguous()
    return F.pad(t, (0, cols - c, 0, rows - r))


def _smm_fwd(x2: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype):
    k = fp8_quant_kernels()
    M, K = x2.shape
    N = w.shape[0]
    Mp, Kp, Np = _ceil(M), _ceil(K), _ceil(N)
    xq, xs = k.act_quant_cm(_pad2(x2, Mp, Kp))  # (Mp, Kp), scales (Mp, Kp/128) column-major
    # (Np, Kp), scales (Np/128, round4(Kp/128)), and the fp8 transpose (Kp, Np) for dgrad from the same pass
    wq, ws, wqt = k.weight_quant_pad(_pad2(w, Np, Kp), transposed=True)
    y = F.scaled_mm(xq, wq.t(), xs, F.ScalingType.BlockWise1x128, ws.t(), F.ScalingType.BlockWise128x128,
                    output_dtype=out_dtype)
    return y[:M, :N], (xq, xs, wqt, ws, M, N, K)


def _smm_bwd(g2: torch.Tensor, saved, x_dtype: torch.dtype, w_dtype: torch.dtype, need_dx: bool, need_dw: bool):
    k = fp8_quant_kernels()
    xq, xs, wqt, ws, M, N, K = saved
    Mp, Kp = xq.shape
    Np = wqt.shape[1]
    # as in the emulation: exact power-of-two pre-scale p, applied inside the quantisers, which also
    # store the scales divided by p
    p = _grad_prescale(g2).reshape(1)
    gp = _pad2(g2, Mp, Np)
    dx = dw = None
    if need_dx:
        gq, gs = k.act_quant_cm(gp, p)
        nb, kb = Np // BLOCK, Kp // BLOCK
        # wqt (Kp, Np) = the forward's 128x128 blocks transposed (written by the weight quantiser)
        wst = torch.ones(kb, -(-nb // 4) * 4, dtype=torch.float32, device=ws.device)
        wst[:, :nb] = ws[:, :kb].t()
        dx = F.scaled_mm(gq, wqt.t(), gs, F.ScalingType.BlockWise1x128, wst.t(), F.ScalingType.BlockWise128x128,
                         output_dtype=x_dtype)[:M, :K]
    if need_dw:
        gtq, gts = k.act_quant_t(gp, p=p)  # dYᵀ (Np, Mp), scales (Np, Mp/128) column-major
        xtq, xts = k.act_quant_t(xq, xs)  # Xᵀ (Kp, Mp) re-tiled from the FP8 X
        dw = F.scaled_mm(gtq, xtq.t(), gts, F.ScalingType.BlockWise1x128, xts, F.ScalingType.BlockWise1x128,
                         output_dtype=torch.float32)[:N, :K].to(w_dtype)
    return dx, dw


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        with torch.autocast(x.device.type, enabled=False):
            if backend == "scaled_mm":
                y, saved = _smm_fwd(x2, w.detach(), out_dtype)
            else:
                y, saved = _emu_fwd(x2, w.detach(), out_dtype)
        ctx.saved = saved
        ctx.backend, ctx.x_dtype, ctx.w_dtype, ctx.x_shape = backend, x.dtype, w.dtype, x.shape
        return y.reshape(*lead, w.shape[0])

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        g2 = gy.reshape(-1, gy.shape[-1])
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(gy.device.type, enabled=False):
            bwd = _smm_bwd if ctx.backend == "scaled_mm" else _emu_bwd
            dx, dw = bwd(g2, ctx.saved, ctx.x_dtype, ctx.w_dtype, need_dx, need_dw)
        ctx.saved = None
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto",
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x Wᵀ with the three GEMMs in FP8 (module docstring). out_dtype: the autocast dtype where
    autocast is on, else x's dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"fp8 backend must be one of {BACKENDS}, got {backend!r}")
    dev = x.device.type
    if out_dtype is None:
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if backend == "auto":
        backend = "scaled_mm" if x.is_cuda and scaled_mm_available(x.device) else "emulate"
    if backend == "scaled_mm" and x.shape[-1] % 16:  # fp8 row strides must stay 16-byte aligned
        backend = "emulate"
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != out_dtype:
        x = x.to(out_dtype)  # the copy autocast would have made for F.linear (both backends alike)
    return _FP8LinearFn.apply(x, weight, out_dtype, backend)


class FP8TrainLinear(nn.Linear):
    """nn.Linear whose forward, input-gradient and weight-gradient GEMMs run in FP8 (see module
    docstring). Same parameters and state_dict as nn.Linear; `isinstance(m, nn.Linear)` holds, so
    initialisation and checkpoint code treat it as one."""

    fp8_backend: str = "auto"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp8_backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto") -> "FP8TrainLinear":
        """Turn `linear` into an FP8TrainLinear in place (same Parameter objects) and return it."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"expected a plain nn.Linear, got {type(linear).__name__}")
        linear.__class__ = cls
        linear.fp8_backend = backend
        return linear

    @torch.compiler.disable  # opaque to torch.compile: Triton kernels + F.scaled_mm in an autograd.Function
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.fp8_backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.fp8_backend}"


# --- routed experts: grouped FP8 GEMMs over rows sorted by expert (module docstring, "Experts") ----

def grouped_triton_available(device: torch.device | str | None = None) -> bool:
    """True where the Triton grouped FP8 kernels can run: CUDA with FP8 tensor cores (SM 8.9+), triton."""
    if not torch.cuda.is_available():
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 9):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _expert_rows(offs: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of each expert's sorted rows, on the host: the emulation's one sync."""
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


def _emu_expert_weights(wqs) -> torch.Tensor:
    """Per weight a list over experts of (fp8, 128x128 scales) -> the dequantised weights concatenated
    along N, (E, ΣN_i, K) fp32."""
    return torch.cat([torch.stack([weight_dequant(q, s, torch.float32) for q, s in w]) for w in wqs], dim=1)


def _emu_grouped_fwd(x: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor, out_dtype: torch.dtype):
    rows = _expert_rows(offs)
    xq, xs = act_quant(x)  # 1x128 tiles of each row: rows are independent, so the grouping does not matter
    wqs = [[weight_quant(w_e) for w_e in w] for w in ws]  # each expert its own 128x128 grid
    xd, wd = act_dequant(xq, xs), _emu_expert_weights(wqs)  # (M, K), (E, N, K)
    y = xd.new_zeros(x.shape[0], wd.shape[1])
    for e, (a, b) in enumerate(rows):
        y[a:b] = xd[a:b] @ wd[e].T
    return y.to(out_dtype), (xq, xs, wqs, rows)


def _emu_grouped_bwd(g: torch.Tensor, saved, x_dtype: torch.dtype, w_dtypes: list[torch.dtype],
                     need_dx: bool, need_dw: bool):
    xq, xs, wqs, rows = saved
    dx = dws = None
    ns = [w[0][0].shape[0] for w in wqs]
    if need_dx:
        wd = _emu_expert_weights(wqs)  # (E, N, K)
        # (M, N): each weight's dY in its own 1x128 tiles (gate and up are two linears; the tiles of
        # [dY_gate | dY_up] are the same when I % 128 == 0)
        gd = torch.cat([act_dequant(*_grad_quant_ref(gi)) for gi in g.split(ns, dim=1)], dim=1)
        dx = gd.new_zeros(g.shape[0], wd.shape[2])
        for e, (a, b) in enumerate(rows):
            dx[a:b] = gd[a:b] @ wd[e]
        dx = dx.to(x_dtype)
    if need_dw:
        # dYᵀ (N, M) and Xᵀ (K, M), tiled 1x128 along the tokens of the whole sorted M (a tile may
        # straddle two experts); Xᵀ re-tiled from the FP8 X. An expert without rows gets zeros.
        gtd = act_dequant(*_grad_quant_ref(g.t().contiguous()))
        xtd = act_dequant(*act_quant(act_dequant(xq, xs).t().contiguous()))
        dws = [torch.stack([gt[:, a:b] @ xtd[:, a:b].T for a, b in rows]).to(dt)  # (E, N_i, K)
               for gt, dt in zip(gtd.split(ns), w_dtypes)]
    return dx, dws


def _block_scales(s: torch.Tensor, E: int, n: int, k: int) -> torch.Tensor:
    """weight_quant_pad's scales of a stacked (E*n, k) weight -> (E, n/128, k/128), each expert's blocks."""
    return s.view(E, n // BLOCK, -1)[:, :, : k // BLOCK]


def _tri_grouped_fwd(x: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor, out_dtype: torch.dtype):
    k, gk = fp8_quant_kernels(), fp8_grouped_kernels()
    M, K = x.shape
    E = offs.shape[0]
    assert K % BLOCK == 0 and all(w.shape[1] % BLOCK == 0 for w in ws), "triton experts: N, K multiples of 128"
    # (Mp, K), zero rows past M for the wgrad re-tiling; scales (Mp, K/128) column-major
    xq, xs = k.act_quant_cm(_pad2(x, _ceil(M), K))
    bs, saved_w = [], []
    for w in ws:
        n = w.shape[1]
        # the stacked (E*n, K) view: its 128x128 grid is each expert's own (n % 128 == 0); qt (K, E*n)
        # is the fp8 transpose for dgrad, from the same pass
        q, s, qt = k.weight_quant_pad(w.reshape(E * n, K), transposed=True)
        bs.append((q.view(E, n, K), _block_scales(s, E, n, K)))
        saved_w.append((qt, s))
    y = gk.fp8_grouped_mm(xq[:M], xs[:M], bs, offs, out_dtype, cat="n")
    return y, (xq, xs, saved_w, M)


def _tri_grouped_bwd(g: torch.Tensor, saved, offs: torch.Tensor, x_dtype: torch.dtype,
                     w_dtypes: list[torch.dtype], need_dx: bool, need_dw: bool):
    k, gk = fp8_quant_kernels(), fp8_grouped_kernels()
    xq, xs, saved_w, M = saved
    Mp, K = xq.shape
    E = offs.shape[0]
    ns = [qt.shape[1] // E for qt, _ in saved_w]
    p = _grad_prescale(g).reshape(1)  # as in the emulation, applied inside the quantisers
    gp = _pad2(g, Mp, sum(ns))
    dx = dws = None
    if need_dx:
        gq, gs = k.act_quant_cm(gp, p)  # (Mp, N), 1x128 tiles along N
        # W_eᵀ (E, K, n) as views of qt (K, E*n), and the transposed block scales (E, K/128, n/128)
        bts = [(qt.view(K, E, n).permute(1, 0, 2), _block_scales(s, E, n, K).transpose(1, 2))
               for (qt, s), n in zip(saved_w, ns)]
        dx = gk.fp8_grouped_mm(gq[:M], gs[:M], bts, offs, x_dtype, cat="k")
    if need_dw:
        gtq, gts = k.act_quant_t(gp, p=p)  # dYᵀ (N, Mp), scales (N, Mp/128)
        xtq, xts = k.act_quant_t(xq, xs)  # Xᵀ (K, Mp) re-tiled from the FP8 X
        dws = [d.to(dt) for d, dt in zip(gk.fp8_grouped_wgrad(gtq, gts, xtq, xts, offs, ns), w_dtypes)]
    return dx, dws


class _FP8GroupedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype, backend: str,
                *ws: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            fwd = _tri_grouped_fwd if backend == "triton" else _emu_grouped_fwd
            y, saved = fwd(x, [w.detach() for w in ws], offs, out_dtype)
        ctx.saved, ctx.offs = saved, offs
        ctx.backend, ctx.x_dtype, ctx.w_dtypes = backend, x.dtype, [w.dtype for w in ws]
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        need_dx, need_dw = ctx.needs_input_grad[0], any(ctx.needs_input_grad[4:])
        with torch.autocast(gy.device.type, enabled=False):
            if ctx.backend == "triton":
                dx, dws = _tri_grouped_bwd(gy, ctx.saved, ctx.offs, ctx.x_dtype, ctx.w_dtypes, need_dx, need_dw)
            else:
                dx, dws = _emu_grouped_bwd(gy, ctx.saved, ctx.x_dtype, ctx.w_dtypes, need_dx, need_dw)
        ctx.saved = ctx.offs = None
        return (dx, None, None, None, *(dws or [None] * len(ctx.w_dtypes)))


def fp8_grouped_linear(x: torch.Tensor, weights: tuple[torch.Tensor, ...], offs: torch.Tensor,
                       backend: str = "auto", out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows of x (M, K) sorted by expert (offs (E,) int32 end rows, offs[-1] = M) times the expert
    weights (E, N_i, K), concatenated along N: Y[rows_e] = X[rows_e] · [W1_e; W2_e]ᵀ -> (M, ΣN_i) in
    out_dtype (default x's), the three GEMMs in FP8 (module docstring, "Experts"). Several weights
    share one quantisation of x (gate and up)."""
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"fp8 experts backend must be one of {EXPERT_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if x.is_cuda and grouped_triton_available(x.device) else "emulate"
    return _FP8GroupedFn.apply(x, offs, out_dtype or x.dtype, backend, *weights)


class FP8TrainExperts(Experts):
    """Routed experts whose grouped GEMMs (forward, input and weight gradients) run in FP8 (module
    docstring, "Experts"). Same parameters and state_dict as Experts. Always the grouped path: the
    FP8 GEMMs exist only in that form, so `impl` ("loop" / "grouped") does not apply."""

    fp8_backend: str = "auto"

    @classmethod
    def from_experts(cls, experts: Experts, backend: str = "auto") -> "FP8TrainExperts":
        """Turn `experts` into an FP8TrainExperts in place (same Parameter objects) and return it."""
        if type(experts) is not Experts:
            raise TypeError(f"expected a plain Experts, got {type(experts).__name__}")
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"fp8 experts backend must be one of {EXPERT_BACKENDS}, got {backend!r}")
        experts.__class__ = cls
        experts.fp8_backend = backend
        return experts

    def forward(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        return self.forward_grouped(x_ND, idx_NK, w_NK)

    @torch.compiler.disable  # opaque to torch.compile: Triton kernels / host syncs in an autograd.Function
    def sorted_mlp(self, x_MD: torch.Tensor, flat: torch.Tensor, order: torch.Tensor, offs: torch.Tensor,
                   dt: torch.dtype) -> torch.Tensor:
        backend = self.fp8_backend
        if backend == "auto":
            backend = "triton" if x_MD.is_cuda and grouped_triton_available(x_MD.device) else "emulate"
        w1, w3, w2 = self.gate_proj, self.up_proj, self.down_proj  # (E, I, D), (E, I, D), (E, D, I)
        I, D = w1.shape[1:]
        if backend == "triton" and (D % BLOCK or I % BLOCK):
            # the kernels take whole 128-blocks: zero-pad D and I (zeros change no amax and SwiGLU
            # keeps the padded columns at 0, so this is the unpadded computation)
            Dp, Ip = _ceil(D), _ceil(I)
            x_MD = F.pad(x_MD, (0, Dp - D))
            w1, w3 = (F.pad(w, (0, Dp - D, 0, Ip - I)) for w in (w1, w3))
            w2 = F.pad(w2, (0, Ip - I, 0, Dp - D))
        Iw = w1.shape[1]
        h13 = fp8_grouped_linear(x_MD, (w1, w3), offs, backend, dt)  # (M, 2I): gate | up
        h = F.silu(h13[:, :Iw]) * h13[:, Iw:]
        return fp8_grouped_linear(h, (w2,), offs, backend, dt)[:, :D]  # (M, D)

    def extra_repr(self) -> str:
        E, I, D = self.gate_proj.shape
        return f"experts={E}, hidden={D}, inter={I}, fp8={self.fp8_backend}"


def fp8_target_names(model: nn.Module) -> list[str]:
    """Qualified names of the nn.Linear modules that `convert_to_fp8_training` swaps: every Linear
    directly inside an MLA (attention projections) or an MLP (dense FFN, shared experts)."""
    from dsv3.model.layers import MLP
    from dsv3.model.mla import MLA

    names = []
    for pname, parent in model.named_modules():
        if isinstance(parent, (MLA, MLP)):
            for cname, child in parent.named_children():
                if type(child) is nn.Linear:
                    names.append(f"{pname}.{cname}" if pname else cname)
    return names


def convert_to_fp8_training(model: nn.Module, backend: str = "auto", experts: bool = False) -> list[str]:
    """Swap, in place, the attention and dense/shared-expert MLP Linears for FP8TrainLinear and, with
    `experts`, every routed Experts for FP8TrainExperts (same parameters, same state_dict names; the
    experts' backend is "triton" where the Linears' is "scaled_mm"). Call before torch.compile and
    before building the optimizer or after (the Parameter objects are kept). Returns the swapped names."""
    if backend not in BACKENDS:
        raise ValueError(f"fp8 backend must be one of {BACKENDS}, got {backend!r}")
    names = fp8_target_names(model)
    for name in names:
        FP8TrainLinear.from_linear(model.get_submodule(name), backend)
    if experts:
        expert_backend = "triton" if backend == "scaled_mm" else backend
        for name, m in model.named_modules():
            if type(m) is Experts:
                FP8TrainExperts.from_experts(m, expert_backend)
                names.append(name)
    return names

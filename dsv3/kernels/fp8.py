"""The FP8 operations of dsv3.kernels (SPEC §6.3, §9). Each checks its inputs, asks `backend.select`
which backend runs, and calls either the reference (reference.py) or the GPU path:

    act_quant_cm(x, p=None)                x (M, K) -> fp8 (M, K), 1x128 scales (M, K/128) column-major
    act_quant_t(x, s_in=None, p=None)      x (M, K) -> fp8 (K, M) = Q1x128(xᵀ), scales (K, M/128)
                                           column-major; s_in: x is fp8 with 1x128 scales (re-tiling)
    weight_quant_pad(w, transposed=False)  w (N, K) -> fp8 (N, K), 128x128 scales (N/128, round4(K/128))
                                           [+ the fp8 transpose (K, N)]
    weight_quant_pad_t(w)                  -> (the fp8 transpose (K, N), the scales) alone
        "triton": fp8_triton.py (byte-equal to the reference), on SM 8.9+.
    fp8_gemm_fwd(x2, w, out_dtype) -> (y, saved); fp8_gemm_bwd(g2, saved, ...) -> (dx, dw)
        fprop / dgrad / wgrad of a training Linear (the recipe: dsv3/training/fp8.py).
        "scaled_mm" (SM90): the quantisers above + `F.scaled_mm` BlockWise1x128 x BlockWise128x128
        (fprop, dgrad) and 1x128 x 1x128 (wgrad, fp32 out), M, N, K zero-padded to multiples of 128
        (zeros change no amax); K % 16 != 0 (unaligned fp8 rows) runs the reference.
    fp8_grouped_gemm_fwd(x, ws, offs, out_dtype) -> (y, saved); fp8_grouped_gemm_bwd(g, saved, ...)
        the same three GEMMs per routed expert over rows sorted by expert.
        "triton" (SM 8.9+): the quantisers above + fp8_grouped_triton.py, which read offs on the
        device (no host sync); N and K multiples of 128 (FP8TrainExperts pads), M padded here.
    fp8_weight_linear(x, w, s)             y = x · dequant(w, s)ᵀ on an official-format FP8 weight
    fp8_expert_rows(x, w, s, expert)       row m of x through expert[m]'s FP8 weight
        "triton": fp8_gemm_triton.py, read the e4m3 bytes directly (decode sizes, no autograd).

`saved` is what a forward keeps for its backward, tagged with the backend that produced it (the
backward runs the same one). The quantisers inside the GPU paths are chosen by their own op, so
`use_backend(fp8_quant="reference")` runs the GPU GEMMs on reference-quantised operands (and the
Triton interpreter tests run the grouped kernels on CPU tensors the same way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.kernels import reference
from dsv3.kernels.backend import select
from dsv3.kernels.reference import BLOCK


def _ceil(n: int, m: int = BLOCK) -> int:
    return -(-n // m) * m


def _pad2(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    r, c = t.shape
    if r == rows and c == cols:
        return t.contiguous()
    return F.pad(t, (0, cols - c, 0, rows - r))


# --- quantisers ----------------------------------------------------------------------------------

def _check_p(p: torch.Tensor | None) -> None:
    assert p is None or (p.numel() == 1 and p.dtype == torch.float32), "p is a 1-element fp32 tensor"


def act_quant_cm(x: torch.Tensor, p: torch.Tensor | None = None, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_p(p)
    assert x.dim() == 2 and x.shape[1] % BLOCK == 0, \
        f"act_quant_cm: x (M, K) with K a multiple of {BLOCK}, got {tuple(x.shape)}"
    if select("fp8_quant", x, backend=backend) == "triton":
        from dsv3.kernels import fp8_triton

        return fp8_triton.act_quant_cm(x, p)
    return reference.act_quant_cm_ref(x, p)


def act_quant_t(x: torch.Tensor, s_in: torch.Tensor | None = None, p: torch.Tensor | None = None, *,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_p(p)
    assert x.dim() == 2 and x.shape[0] % BLOCK == 0 and x.shape[1] % BLOCK == 0, \
        f"act_quant_t: x (M, K) with M and K multiples of {BLOCK}, got {tuple(x.shape)}"
    if s_in is not None:
        assert x.dtype == torch.float8_e4m3fn and s_in.dtype == torch.float32 \
            and s_in.shape == (x.shape[0], x.shape[1] // BLOCK), "act_quant_t: s_in, the (M, K/128) scales of fp8 x"
    if select("fp8_quant", x, backend=backend) == "triton":
        from dsv3.kernels import fp8_triton

        return fp8_triton.act_quant_t(x, s_in, p)
    return reference.act_quant_t_ref(x, s_in, p)


def weight_quant_pad(w: torch.Tensor, transposed: bool = False, *, backend: str | None = None):
    assert w.dim() == 2, f"weight_quant_pad: a 2-D weight, got {tuple(w.shape)}"
    if select("fp8_quant", w, backend=backend) == "triton":
        from dsv3.kernels import fp8_triton

        return fp8_triton.weight_quant_pad(w, transposed)
    return reference.weight_quant_pad_ref(w, transposed)


def weight_quant_pad_t(w: torch.Tensor, *, backend: str | None = None):
    """w (N, K) -> (qt (K, N), s): weight_quant_pad(w, transposed=True)'s fp8 transpose and scales, the same
    bytes, without the (N, K) copy (the dgrad operand where backward recomputes it)."""
    assert w.dim() == 2, f"weight_quant_pad_t: a 2-D weight, got {tuple(w.shape)}"
    if select("fp8_quant", w, backend=backend) == "triton":
        from dsv3.kernels import fp8_triton

        return fp8_triton.weight_quant_pad_t(w)
    return reference.weight_quant_pad_t_ref(w)


# --- FP8 GEMMs of a training Linear --------------------------------------------------------------

def _smm_fwd(x2: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, recompute_w: bool = False):
    M, K = x2.shape
    N = w.shape[0]
    Mp, Kp, Np = _ceil(M), _ceil(K), _ceil(N)
    xq, xs = act_quant_cm(_pad2(x2, Mp, Kp))  # (Mp, Kp), scales (Mp, Kp/128) column-major
    if recompute_w:  # backward re-quantises w for dgrad (weight_quant_pad_t): w itself kept, no FP8 form of it
        wq, ws = weight_quant_pad(_pad2(w, Np, Kp))
        kept = (None, None, w)
    else:  # (Np, Kp), scales (Np/128, round4(Kp/128)), and the fp8 transpose (Kp, Np) for dgrad, same pass
        wq, ws, wqt = weight_quant_pad(_pad2(w, Np, Kp), transposed=True)
        kept = (wqt, ws, None)
    y = F.scaled_mm(xq, wq.t(), xs, F.ScalingType.BlockWise1x128, ws.t(), F.ScalingType.BlockWise128x128,
                    output_dtype=out_dtype)
    return y[:M, :N], (xq, xs, *kept, M, N, K)


def _smm_bwd(g2: torch.Tensor, saved, x_dtype: torch.dtype, w_dtype: torch.dtype, need_dx: bool, need_dw: bool):
    xq, xs, wqt, ws, w, M, N, K = saved
    Mp, Kp = xq.shape
    Np = _ceil(N)
    # as in the reference: exact power-of-two pre-scale p, applied inside the quantisers, which also
    # store the scales divided by p
    p = reference.grad_prescale(g2).reshape(1)
    gp = _pad2(g2, Mp, Np)
    dx = dw = None
    if need_dx:
        gq, gs = act_quant_cm(gp, p)
        if wqt is None:  # recompute_w: the forward's bytes again, from the weight (alive anyway)
            wqt, ws = weight_quant_pad_t(_pad2(w, Np, Kp))
        nb, kb = Np // BLOCK, Kp // BLOCK
        # wqt (Kp, Np) = the forward's 128x128 blocks transposed (written by the weight quantiser)
        wst = torch.ones(kb, -(-nb // 4) * 4, dtype=torch.float32, device=ws.device)
        wst[:, :nb] = ws[:, :kb].t()
        dx = F.scaled_mm(gq, wqt.t(), gs, F.ScalingType.BlockWise1x128, wst.t(), F.ScalingType.BlockWise128x128,
                         output_dtype=x_dtype)[:M, :K]
        # dgrad's transients go before wgrad's come (a recomputed Wᵀ among them; the saved one stays in `saved`)
        del gq, gs, wst, wqt, ws
    if need_dw:
        gtq, gts = act_quant_t(gp, p=p)  # dYᵀ (Np, Mp), scales (Np, Mp/128) column-major
        xtq, xts = act_quant_t(xq, xs)  # Xᵀ (Kp, Mp) re-tiled from the FP8 X
        dw = _wgrad_mm(gtq, gts, xtq, xts, w_dtype)[:N, :K].to(w_dtype)
    return dx, dw


# dtype -> whether F.scaled_mm gave a 1x128 x 1x128 GEMM that output dtype (absent: not tried yet in this process)
_WGRAD_DIRECT: dict[torch.dtype, bool] = {}


def _wgrad_mm(gtq, gts, xtq, xts, w_dtype: torch.dtype) -> torch.Tensor:
    """wgrad dW (Np, Kp) = Q(dYᵀ)·Q(Xᵀ)ᵀ, written in the weight's dtype where F.scaled_mm can (16-bit working
    weights: the fp32 accumulator rounded once in the GEMM's epilogue, where an fp32 result and its cast were two
    copies of the gradient alive at once, 3x its bytes), else in fp32 (cast by the caller). A torch or cuBLAS
    without that output for the 1x128 x 1x128 recipe raises once; fp32 from then on."""
    args = (gtq, xtq.t(), gts, F.ScalingType.BlockWise1x128, xts, F.ScalingType.BlockWise1x128)
    if w_dtype in (torch.bfloat16, torch.float16) and _WGRAD_DIRECT.get(w_dtype, True):
        try:
            out = F.scaled_mm(*args, output_dtype=w_dtype)
            _WGRAD_DIRECT[w_dtype] = True
            return out
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            _WGRAD_DIRECT[w_dtype] = False
    return F.scaled_mm(*args, output_dtype=torch.float32)


def _linear_backend(op: str, x2: torch.Tensor, w: torch.Tensor, backend: str | None) -> str:
    """The checked shapes of a training Linear's x2 (M, K) and w (N, K) -> the backend its GEMMs run on."""
    assert x2.dim() == 2 and w.dim() == 2 and x2.shape[1] == w.shape[1], \
        f"{op}: x (M, K) and w (N, K), got {tuple(x2.shape)} and {tuple(w.shape)}"
    which = select("fp8_gemm", x2, backend=backend)
    return "reference" if which == "scaled_mm" and x2.shape[1] % 16 else which  # fp8 rows stay 16-byte aligned


def fp8_gemm_fwd(x2: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, *, backend: str | None = None,
                 recompute_w: bool = False):
    """fprop Y = Q1x128(X) · Q128x128(W)ᵀ, X (M, K), W (N, K) -> (Y (M, N) in out_dtype, saved). recompute_w:
    `saved` holds w itself (a reference, no copy), not its FP8 form: backward quantises it again for dgrad
    (the same bytes; 1 byte a parameter less kept between forward and backward, a weight pass more)."""
    which = _linear_backend("fp8_gemm_fwd", x2, w, backend)
    fwd = _smm_fwd if which == "scaled_mm" else reference.fp8_gemm_fwd_ref
    y, saved = fwd(x2, w, out_dtype, recompute_w)
    return y, (which, saved)


def fp8_gemm_bwd(g2: torch.Tensor, saved, x_dtype: torch.dtype, w_dtype: torch.dtype, need_dx: bool,
                 need_dw: bool):
    """dgrad dX = Q1x128(dY) · Q128x128(W) and wgrad dW = Q1x128(dYᵀ) · Q1x128(Xᵀ)ᵀ (each when needed) from
    g2 = dY (M, N) and fp8_gemm_fwd's `saved`, on the forward's backend -> (dX in x_dtype, dW in w_dtype)."""
    which, payload = saved
    bwd = _smm_bwd if which == "scaled_mm" else reference.fp8_gemm_bwd_ref
    return bwd(g2, payload, x_dtype, w_dtype, need_dx, need_dw)


# --- the training Linear as one differentiable op that torch.compile sees through ----------------
# `fp8_linear(x2, w, out_dtype, which, recompute_w)`: two custom ops (fprop; dgrad + wgrad) with fake
# implementations and an autograd formula, so a compiled block keeps one graph around its FP8 linears. (They were
# `torch.compiler.disable`d autograd Functions: a graph break at every swapped linear, 8 a block, which cost a
# resume function, its guards and a separately compiled fragment each, and kept inductor from fusing or
# recomputing across them.) The ops' outputs are plain tensors: `saved` becomes (xq, xs, wk, wsk), contiguous, with
# an empty tensor for what a mode does not keep; autocast is off inside (the GEMMs choose their own dtypes), as
# the eager path's autograd Function had it.

def _empty(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.new_empty(0, dtype=dtype)


def _fp8_linear_fwd_saved(x2: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, which: str,
                          recompute_w: bool):
    """(y, xq, xs, wk, wsk) of `which`'s forward on real or fake tensors. scaled_mm: xs is stored as the
    (Kp/128, Mp) transpose of its column-major scales (the same storage, contiguous); wk, wsk = the FP8 Wᵀ and
    the 128x128 scales (empty with recompute_w). reference: its own layouts made contiguous."""
    fwd = _smm_fwd if which == "scaled_mm" else reference.fp8_gemm_fwd_ref
    y, saved = fwd(x2, w, out_dtype, recompute_w)
    xq, xs, wk, wsk = saved[:4]
    if which == "scaled_mm":
        xs = xs.t()
    keep = [t.contiguous() if t is not None else _empty(x2, torch.float8_e4m3fn if i == 2 else torch.float32)
            for i, t in enumerate((xq, xs, wk, wsk))]
    return (y.contiguous(), *keep)


@torch.library.custom_op("dsv3::fp8_train_fwd", mutates_args=())
def _fp8_train_fwd(x2: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, which: str,
                   recompute_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(x2.device.type, enabled=False):
        return _fp8_linear_fwd_saved(x2, w, out_dtype, which, recompute_w)


@_fp8_train_fwd.register_fake
def _(x2, w, out_dtype, which, recompute_w):
    M, K = x2.shape
    N = w.shape[0]
    if which != "scaled_mm":  # the reference is plain torch: run it on the fake tensors for its exact layouts
        with torch.autocast(x2.device.type, enabled=False):
            return _fp8_linear_fwd_saved(x2, w, out_dtype, which, recompute_w)
    Mp, Kp, Np = _ceil(M), _ceil(K), _ceil(N)
    e4m3 = torch.float8_e4m3fn
    wk = _empty(x2, e4m3) if recompute_w else x2.new_empty(Kp, Np, dtype=e4m3)
    wsk = _empty(x2, torch.float32) if recompute_w else x2.new_empty(Np // BLOCK, -(-(Kp // BLOCK) // 4) * 4,
                                                                       dtype=torch.float32)
    return (x2.new_empty(M, N, dtype=out_dtype), x2.new_empty(Mp, Kp, dtype=e4m3),
            x2.new_empty(Kp // BLOCK, Mp, dtype=torch.float32), wk, wsk)


@torch.library.custom_op("dsv3::fp8_train_bwd", mutates_args=())
def _fp8_train_bwd(g2: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, wk: torch.Tensor, wsk: torch.Tensor,
                   w: torch.Tensor, K: int, x_dtype: torch.dtype, w_dtype: torch.dtype, which: str,
                   recompute_w: bool, need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = g2.shape
    wk, wsk, w = (None, None, w) if recompute_w else (wk, wsk, None)
    with torch.autocast(g2.device.type, enabled=False):
        if which == "scaled_mm":
            dx, dw = _smm_bwd(g2, (xq, xs.t(), wk, wsk, w, M, N, K), x_dtype, w_dtype, need_dx, need_dw)
        else:
            dx, dw = reference.fp8_gemm_bwd_ref(g2, (xq, xs, wk, wsk, w), x_dtype, w_dtype, need_dx, need_dw)
    return (dx.contiguous() if dx is not None else _empty(g2, x_dtype),
            dw.contiguous() if dw is not None else _empty(g2, w_dtype))


@_fp8_train_bwd.register_fake
def _(g2, xq, xs, wk, wsk, w, K, x_dtype, w_dtype, which, recompute_w, need_dx, need_dw):
    M, N = g2.shape
    return (g2.new_empty(M, K, dtype=x_dtype) if need_dx else _empty(g2, x_dtype),
            g2.new_empty(N, K, dtype=w_dtype) if need_dw else _empty(g2, w_dtype))


def _fp8_train_setup(ctx, inputs, output) -> None:
    x2, w, out_dtype, which, recompute_w = inputs
    _, xq, xs, wk, wsk = output
    ctx.mark_non_differentiable(xq, xs, wk, wsk)
    # the weight itself only where backward quantises it again (recompute_w): under FSDP2 it is the gathered copy
    ctx.save_for_backward(xq, xs, wk, wsk, w if recompute_w else None)
    ctx.meta = (x2.dtype, w.dtype, w.shape[1], which, recompute_w)


def _fp8_train_backward(ctx, gy, *_):
    xq, xs, wk, wsk, w = ctx.saved_tensors
    x_dtype, w_dtype, K, which, recompute_w = ctx.meta
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # a pipeline's split backward (input gradients, then weight gradients, torch.distributed.pipelining) calls
    # this twice on one graph, each time with one of the two: its input pass retains the graph
    dx, dw = _fp8_train_bwd(gy.contiguous(), xq, xs, wk, wsk, w if w is not None else _empty(gy), K, x_dtype,
                            w_dtype, which, recompute_w, need_dx, need_dw)
    return dx if need_dx else None, dw if need_dw else None, None, None, None


_fp8_train_fwd.register_autograd(_fp8_train_backward, setup_context=_fp8_train_setup)


def fp8_linear(x2: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, *, backend: str | None = None,
               recompute_w: bool = False) -> torch.Tensor:
    """Y (M, N) = X · Wᵀ in out_dtype with fprop, dgrad and wgrad in FP8, differentiable in x2 (M, K) and w (N, K):
    fp8_gemm_fwd / fp8_gemm_bwd as one autograd op that torch.compile traces without a graph break (the backend
    chosen here, at trace time: a compiled caller guards on the choice)."""
    which = _linear_backend("fp8_linear", x2, w, backend)
    return _fp8_train_fwd(x2, w, out_dtype, which, recompute_w)[0]


# --- FP8 grouped GEMMs of the routed experts ------------------------------------------------------

def _block_scales(s: torch.Tensor, E: int, n: int, k: int) -> torch.Tensor:
    """weight_quant_pad's scales of a stacked (E*n, k) weight -> (E, n/128, k/128), each expert's blocks."""
    return s.view(E, n // BLOCK, -1)[:, :, : k // BLOCK]


def _tri_grouped_fwd(x: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor, out_dtype: torch.dtype,
                     recompute_w: bool = False):
    from dsv3.kernels import fp8_grouped_triton as gk

    M, K = x.shape
    E = offs.shape[0]
    assert K % BLOCK == 0 and all(w.shape[1] % BLOCK == 0 for w in ws), "triton experts: N, K multiples of 128"
    # (Mp, K), zero rows past M for the wgrad re-tiling; scales (Mp, K/128) column-major
    xq, xs = act_quant_cm(_pad2(x, _ceil(M), K))
    bs, saved_w = [], []
    for w in ws:
        n = w.shape[1]
        # the stacked (E*n, K) view: its 128x128 grid is each expert's own (n % 128 == 0); qt (K, E*n)
        # is the fp8 transpose for dgrad, from the same pass
        if recompute_w:  # backward re-quantises w for dgrad (fp8_gemm_fwd's recompute_w)
            q, s = weight_quant_pad(w.reshape(E * n, K))
            saved_w.append((None, None, w))
        else:
            q, s, qt = weight_quant_pad(w.reshape(E * n, K), transposed=True)
            saved_w.append((qt, s, None))
        bs.append((q.view(E, n, K), _block_scales(s, E, n, K)))
    y = gk.fp8_grouped_mm(xq[:M], xs[:M], bs, offs, out_dtype, cat="n")
    return y, (xq, xs, saved_w, [w.shape[1] for w in ws], M, offs)


_WGRAD_OUT = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes fp8_grouped_wgrad writes


def _tri_grouped_bwd(g: torch.Tensor, saved, x_dtype: torch.dtype, w_dtypes: list[torch.dtype],
                     need_dx: bool, need_dw: bool):
    from dsv3.kernels import fp8_grouped_triton as gk

    xq, xs, saved_w, ns, M, offs = saved
    Mp, K = xq.shape
    E = offs.shape[0]
    p = reference.grad_prescale(g).reshape(1)  # as in the reference, applied inside the quantisers
    gp = _pad2(g, Mp, sum(ns))
    dx = dws = None
    if need_dx:
        gq, gs = act_quant_cm(gp, p)  # (Mp, N), 1x128 tiles along N
        # W_eᵀ (E, K, n) as views of qt (K, E*n), and the transposed block scales (E, K/128, n/128)
        wts = [(qt, s) if qt is not None else weight_quant_pad_t(w.reshape(E * n, K))  # recompute_w
               for (qt, s, w), n in zip(saved_w, ns)]
        bts = [(qt.view(K, E, n).permute(1, 0, 2), _block_scales(s, E, n, K).transpose(1, 2))
               for (qt, s), n in zip(wts, ns)]
        dx = gk.fp8_grouped_mm(gq[:M], gs[:M], bts, offs, x_dtype, cat="k")
        # dgrad's transients go before wgrad's come: the quantised dY and, with recompute_w, the experts' Wᵀ (on
        # the 671b-slice 0.44 GiB of them were alive at the FP8-experts step's peak, H100, 2026-12-06)
        del gq, gs, bts, wts
    if need_dw:
        gtq, gts = act_quant_t(gp, p=p)  # dYᵀ (N, Mp), scales (N, Mp/128)
        xtq, xts = act_quant_t(xq, xs)  # Xᵀ (K, Mp) re-tiled from the FP8 X
        # written in the weights' dtype where they share one (the same bits as fp32 then a cast, without the fp32
        # copies: with bf16 working weights those were the largest transient of an FP8-experts backward)
        one = w_dtypes[0] if len(set(w_dtypes)) == 1 and w_dtypes[0] in _WGRAD_OUT else torch.float32
        dws = [d.to(dt) for d, dt in zip(gk.fp8_grouped_wgrad(gtq, gts, xtq, xts, offs, ns, one), w_dtypes)]
    return dx, dws


def _check_grouped(op: str, x: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor) -> None:
    E = offs.shape[0]
    assert x.dim() == 2 and offs.dim() == 1 and ws and all(w.dim() == 3 and w.shape[0] == E and w.shape[2] == x.shape[1]
                                                           for w in ws), \
        f"{op}: x (M, K), weights (E, N_i, K), offs (E,); got {tuple(x.shape)}, " \
        f"{[tuple(w.shape) for w in ws]}, {tuple(offs.shape)}"


def fp8_grouped_gemm_fwd(x: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor, out_dtype: torch.dtype, *,
                         backend: str | None = None, recompute_w: bool = False):
    """Rows of x (M, K) sorted by expert (offs (E,) int32 end rows, offs[-1] = M) through the expert
    weights ws[i] (E, N_i, K), concatenated along N -> (Y (M, ΣN_i) in out_dtype, saved). Several
    weights share one quantisation of x (gate and up). recompute_w: as fp8_gemm_fwd's."""
    _check_grouped("fp8_grouped_gemm_fwd", x, ws, offs)
    which = select("fp8_grouped_gemm", x, backend=backend)
    fwd = _tri_grouped_fwd if which == "triton" else reference.fp8_grouped_gemm_fwd_ref
    y, saved = fwd(x, ws, offs, out_dtype, recompute_w)
    return y, (which, saved)


def fp8_grouped_gemm_bwd(g: torch.Tensor, saved, x_dtype: torch.dtype, w_dtypes: list[torch.dtype], need_dx: bool,
                         need_dw: bool):
    """dgrad and wgrad of fp8_grouped_gemm_fwd from g = dY (M, ΣN_i), on the forward's backend ->
    (dX (M, K) in x_dtype, [dW_i (E, N_i, K) in w_dtypes[i]]), each None where not needed."""
    which, payload = saved
    bwd = _tri_grouped_bwd if which == "triton" else reference.fp8_grouped_gemm_bwd_ref
    return bwd(g, payload, x_dtype, w_dtypes, need_dx, need_dw)


# --- the routed experts' grouped GEMMs as one differentiable op that torch.compile sees through -------
# `fp8_grouped_linear(x, ws, offs, out_dtype, which, recompute_w)`: as fp8_linear above, for
# fp8_grouped_gemm_fwd / _bwd. Outputs [y, xq, xs, then per weight wk, wsk]: triton: xs as the transpose of its
# column-major scales, wk / wsk each weight's FP8 transpose (K, E*n) and its 128x128 scales; reference: xq, xs as
# act_quant gives them (contiguous), wk / wsk the per-expert FP8 weights and scales stacked, (E, n, K) and
# (E, ceil(n/128), ceil(K/128)). Empty where recompute_w keeps the weights themselves. The backward op writes the
# weight gradients in one dtype (the weights' where they share one, else fp32) and each is cast to its weight's after:
# the old path's values (fp32 then a cast, or the shared dtype written by the kernel).

def _grouped_saved_out(which: str, saved, like: torch.Tensor) -> list[torch.Tensor]:
    e4m3, f32 = torch.float8_e4m3fn, torch.float32
    if which == "triton":
        xq, xs, saved_w = saved[:3]
        out = [xq.contiguous(), xs.t().contiguous()]
        for qt, s, _w in saved_w:
            out += [qt, s] if qt is not None else [_empty(like, e4m3), _empty(like, f32)]
        return out
    xq, xs, wqs = saved[:3]
    out = [xq.contiguous(), xs.contiguous()]
    for w in wqs:
        if isinstance(w, torch.Tensor):  # recompute_w: the weight itself
            out += [_empty(like, e4m3), _empty(like, f32)]
        else:
            out += [torch.stack([q for q, _ in w]), torch.stack([sc for _, sc in w])]
    return out


@torch.library.custom_op("dsv3::fp8_train_grouped_fwd", mutates_args=())
def _fp8_train_grouped_fwd(x: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor, out_dtype: torch.dtype,
                           which: str, recompute_w: bool) -> list[torch.Tensor]:
    with torch.autocast(x.device.type, enabled=False):
        fwd = _tri_grouped_fwd if which == "triton" else reference.fp8_grouped_gemm_fwd_ref
        y, saved = fwd(x, list(ws), offs, out_dtype, recompute_w)
        return [y.contiguous(), *_grouped_saved_out(which, saved, x)]


@_fp8_train_grouped_fwd.register_fake
def _(x, ws, offs, out_dtype, which, recompute_w):
    M, K = x.shape
    E = offs.shape[0]
    e4m3, f32 = torch.float8_e4m3fn, torch.float32
    out = [x.new_empty(M, sum(w.shape[1] for w in ws), dtype=out_dtype)]
    if which == "triton":
        Mp = _ceil(M)
        out += [x.new_empty(Mp, K, dtype=e4m3), x.new_empty(K // BLOCK, Mp, dtype=f32)]
    else:
        out += [x.new_empty(M, K, dtype=e4m3), x.new_empty(M, -(-K // BLOCK), dtype=f32)]
    for w in ws:
        n = w.shape[1]
        if recompute_w:
            out += [_empty(x, e4m3), _empty(x, f32)]
        elif which == "triton":
            out += [x.new_empty(K, E * n, dtype=e4m3),
                    x.new_empty(E * n // BLOCK, -(-(K // BLOCK) // 4) * 4, dtype=f32)]
        else:
            out += [x.new_empty(E, n, K, dtype=e4m3), x.new_empty(E, -(-n // BLOCK), -(-K // BLOCK), dtype=f32)]
    return out


@torch.library.custom_op("dsv3::fp8_train_grouped_bwd", mutates_args=())
def _fp8_train_grouped_bwd(g: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, wks: list[torch.Tensor],
                           wsks: list[torch.Tensor], ws: list[torch.Tensor], offs: torch.Tensor, ns: list[int], K: int,
                           x_dtype: torch.dtype, w_dtype: torch.dtype, which: str, recompute_w: bool, need_dx: bool,
                           need_dw: bool) -> list[torch.Tensor]:
    w_dtypes = [w_dtype] * len(ns)
    with torch.autocast(g.device.type, enabled=False):
        if which == "triton":
            saved_w = [(None, None, w) if recompute_w else (qt, s, None) for qt, s, w in zip(wks, wsks, ws)]
            dx, dws = _tri_grouped_bwd(g, (xq, xs.t(), saved_w, list(ns), g.shape[0], offs), x_dtype, w_dtypes,
                                       need_dx, need_dw)
        else:
            wqs = list(ws) if recompute_w else [list(zip(q.unbind(0), sc.unbind(0))) for q, sc in zip(wks, wsks)]
            saved = (xq, xs, wqs, list(ns), reference._expert_rows(offs))
            dx, dws = reference.fp8_grouped_gemm_bwd_ref(g, saved, x_dtype, w_dtypes, need_dx, need_dw)
    return [dx.contiguous() if dx is not None else _empty(g, x_dtype),
            *([d.contiguous() for d in dws] if dws is not None else [_empty(g, w_dtype) for _ in ns])]


@_fp8_train_grouped_bwd.register_fake
def _(g, xq, xs, wks, wsks, ws, offs, ns, K, x_dtype, w_dtype, which, recompute_w, need_dx, need_dw):
    E = offs.shape[0]
    return [g.new_empty(g.shape[0], K, dtype=x_dtype) if need_dx else _empty(g, x_dtype),
            *[g.new_empty(E, n, K, dtype=w_dtype) if need_dw else _empty(g, w_dtype) for n in ns]]


def _fp8_train_grouped_setup(ctx, inputs, output) -> None:
    x, ws, offs, out_dtype, which, recompute_w = inputs
    xq, xs, *wkeep = output[1:]
    ctx.mark_non_differentiable(*output[1:])
    wks, wsks = wkeep[0::2], wkeep[1::2]
    ctx.save_for_backward(xq, xs, offs, *wks, *wsks, *(ws if recompute_w else ()))
    w_dtypes = [w.dtype for w in ws]
    ctx.meta = (len(ws), [w.shape[1] for w in ws], x.dtype, w_dtypes, x.shape[1], which, recompute_w)


def _fp8_train_grouped_backward(ctx, grads):
    nw, ns, x_dtype, w_dtypes, K, which, recompute_w = ctx.meta
    w_dtype = w_dtypes[0] if len(set(w_dtypes)) == 1 else torch.float32
    xq, xs, offs, *rest = ctx.saved_tensors
    wks, wsks = rest[:nw], rest[nw:2 * nw]
    ws = rest[2 * nw:] if recompute_w else [_empty(xq)] * nw
    need_dx, need_dw = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1])
    gy = grads[0]
    # (a pipeline's split backward: as fp8_linear's, one of the two a call)
    out = _fp8_train_grouped_bwd(gy.contiguous(), xq, xs, list(wks), list(wsks), list(ws), offs, ns, K, x_dtype,
                                 w_dtype, which, recompute_w, need_dx, need_dw)
    return (out[0] if need_dx else None, [d.to(dt) if need_dw else None for d, dt in zip(out[1:], w_dtypes)], None,
            None, None, None)


_fp8_train_grouped_fwd.register_autograd(_fp8_train_grouped_backward, setup_context=_fp8_train_grouped_setup)


def fp8_grouped_linear(x: torch.Tensor, ws: list[torch.Tensor], offs: torch.Tensor, out_dtype: torch.dtype, *,
                       backend: str | None = None, recompute_w: bool = False) -> torch.Tensor:
    """Y (M, ΣN_i) of rows of x (M, K) sorted by expert through the expert weights ws[i] (E, N_i, K), the three
    GEMMs in FP8, differentiable in x and the weights: fp8_grouped_gemm_fwd / _bwd as one autograd op that
    torch.compile traces without a graph break (the backend chosen here, at trace time)."""
    _check_grouped("fp8_grouped_linear", x, ws, offs)
    which = select("fp8_grouped_gemm", x, backend=backend)
    return _fp8_train_grouped_fwd(x, list(ws), offs, out_dtype, which, recompute_w)[0]


# --- FP8-weight GEMMs for decoding ----------------------------------------------------------------

def _check_fp8_weight(w: torch.Tensor, s: torch.Tensor, K: int) -> None:
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32, \
        f"expected an e4m3 weight and fp32 scales, got {w.dtype}, {s.dtype}"
    assert w.shape[-1] == K, f"x has K = {K}, the weight {w.shape[-1]}"
    assert s.shape[-2:] == (-(-w.shape[-2] // BLOCK), -(-w.shape[-1] // BLOCK)), \
        f"scales {tuple(s.shape)} do not match 128x128 blocks of a {tuple(w.shape)} weight"


def fp8_weight_linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) · dequant(w, s)ᵀ, w (N, K) e4m3, s (ceil(N/128), ceil(K/128)) fp32. "triton"
    (decode: bf16/fp16 x, few rows, no autograd): a GEMV (up to 4 rows) or 16-row-tile GEMM reading the
    e4m3 bytes; else the weight is dequantised to x's dtype and F.linear runs (prefill, CPU, training
    through x)."""
    assert w.dim() == 2, f"fp8_weight_linear: a 2-D weight, got {tuple(w.shape)}"
    _check_fp8_weight(w, s, x.shape[-1])
    if select("fp8_weight_gemm", x, backend=backend) == "triton":
        from dsv3.kernels import fp8_gemm_triton

        rows = x.numel() // max(x.shape[-1], 1)
        y = fp8_gemm_triton.fp8_linear_small_m(x.reshape(rows, x.shape[-1]), w, s)
        return y.view(*x.shape[:-1], w.shape[0])
    return reference.fp8_weight_linear_ref(x, w, s)


def fp8_weight_linear2(x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, *,
                       backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8_weight_linear(x, w1, s1), fp8_weight_linear(x, w2, s2)): two e4m3 weights of one input. "triton" at
    the GEMV form's rows (up to fp8_gemm_triton.GEMV_ROWS): one launch over both weights' column tiles
    (dense_gemv_triton.py `launch_dual`, as `kernels.dense_gemv2` for 16-bit weights: MLA's kv_a_proj_with_mqa
    alone is 72 programs and a launch of its own); else each its own `fp8_weight_linear`."""
    assert w1.dim() == 2 and w2.dim() == 2, \
        f"fp8_weight_linear2: 2-D weights, got {tuple(w1.shape)}, {tuple(w2.shape)}"
    _check_fp8_weight(w1, s1, x.shape[-1])
    _check_fp8_weight(w2, s2, x.shape[-1])
    if select("fp8_weight_gemm", x, backend=backend) == "triton":
        from dsv3.kernels import fp8_gemm_triton

        rows = x.numel() // max(x.shape[-1], 1)
        if rows <= fp8_gemm_triton.GEMV_ROWS:
            from dsv3.kernels.dense_gemv_triton import fp8_linear2_op

            y1, y2 = fp8_linear2_op(x.reshape(rows, x.shape[-1]), w1, s1, w2, s2)
            return y1.view(*x.shape[:-1], w1.shape[0]), y2.view(*x.shape[:-1], w2.shape[0])
    return fp8_weight_linear(x, w1, s1, backend=backend), fp8_weight_linear(x, w2, s2, backend=backend)


def fp8_expert_rows(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, expert: torch.Tensor, *,
                    backend: str | None = None) -> torch.Tensor:
    """x (M, K), w (E, N, K) e4m3, s (E, ceil(N/128), ceil(K/128)), expert (M,) int -> y (M, N) in x's
    dtype, row m through expert[m]; a row with expert[m] < 0 is 0 and reads no weight (an expert-parallel
    rank's foreign pairs). "triton": one GEMV per row and column tile, reading only the
    experts the rows select (decode). The reference dequantises every expert: callers with many rows
    take the grouped path instead (select("fp8_expert_rows", x) tells which one runs)."""
    assert x.dim() == 2 and w.dim() == 3 and expert.shape == (x.shape[0],), \
        f"fp8_expert_rows: x (M, K), w (E, N, K), expert (M,); got {tuple(x.shape)}, {tuple(w.shape)}, " \
        f"{tuple(expert.shape)}"
    _check_fp8_weight(w, s, x.shape[-1])
    if select("fp8_expert_rows", x, backend=backend) == "triton":
        from dsv3.kernels import fp8_gemm_triton

        return fp8_gemm_triton.fp8_expert_rows(x, w, s, expert)
    return reference.fp8_expert_rows_ref(x, w, s, expert)

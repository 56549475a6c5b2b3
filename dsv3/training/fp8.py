"""FP8 mixed-precision training, the paper's recipe (SPEC §9; paper §3.3): every GEMM of a swapped
Linear — forward, input gradient, weight gradient — takes E4M3 operands with fine-grained online
scales and accumulates in fp32; everything else stays as it was (bf16 autocast / fp32).

    FP8TrainLinear          an nn.Linear (same `weight` parameter, same state_dict) whose matmuls run
                            in FP8; the master weight keeps its dtype (fp32)
    FP8TrainExperts         the routed `Experts` (same parameters, same state_dict) with the same
                            three GEMMs per expert, grouped (see "Experts" below)
    convert_to_fp8_training(model, backend="auto", experts=False, recompute_weights=False)
                            swap, in place, the attention projections (q_a/q_b/q_proj, kv_a, kv_b,
                            o_proj) and the dense / shared-expert MLPs of every block (MTP blocks
                            included), and with experts=True the routed experts. Not swapped, as in
                            the paper: embedding, lm_head, norms, the router (`Router.weight`), the
                            MTP `eh_proj`; the attention core is SDPA in bf16 anyway.
                            recompute_weights: "Weights kept or recomputed" below.
    swiglu_cat(h)           silu(gate) * up of the gate | up GEMM's output, keeping only h for backward

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

Weights kept or recomputed (`recompute_weights`; TrainConfig.fp8_recompute_weights, whose auto turns it on for a
pipeline): without it backward keeps each FP8 Wᵀ from its forward, 1 byte a parameter alive from the forward to the
backward of its layer (once per micro-batch in flight under pipelining). With it the forward writes only the FP8 W
it multiplies by, and backward quantises W again for dgrad (`kernels.weight_quant_pad_t`: the block read
transposed, the same bytes, so the same gradients bit for bit): no weight copy is kept, at the price of one
more read of every weight a step. The weight itself stays referenced (as nn.Linear's backward keeps it;
under FSDP2 the backward's re-gathered weight).

Gradients (dY, dYᵀ): the paper's s = amax / 448 with no floor. The 1e-4 floor of `act_quant` (from
the inference kernel) is harmless for activations (tile amax ~0.05-5) but dY tiles are ~1e-9..1e-4
(the loss is a mean over B*T tokens), so with it almost every dY tile was quantised on a scale up to
1e4x too coarse (e.g. amax 1e-8: values on 0..0.05 of the e4m3 range, subnormals, mostly zeros):
FP8 learnt markedly slower (bench/fp8_loss_cpu.py). Both backends therefore multiply dY by one
power of two p = 2^(64 - e), e = exponent of the tensor's amax (exact, no host sync), quantise
(same kernels: the floor no longer binds), and divide the scales by p (exact): the e4m3 bytes are
those of s = amax / 448 and the scales are amax / 448, for every tile above ~1e-23 x the tensor's amax.

Backends (`kernels.fp8_linear`: the kernel ops `fp8_gemm_fwd` / `fp8_gemm_bwd` as one differentiable custom op that
torch.compile traces without a graph break; `backend=`):
  * "emulate": the contract, any device (the ops' "reference": dsv3/kernels/reference.py). Quantise
    with the reference functions, dequantise to fp32, matmul in fp32, cast (Y to the autocast/input
    dtype, dX to X's dtype, dW to W's dtype). On the CPU this is what `--precision fp8` runs (slow,
    ~2-3x an fp32 step; for tests).
  * "scaled_mm": CUDA SM90, torch with `F.scaled_mm` (2.10+): quantisation by the Triton kernels of
    `dsv3/kernels/fp8_triton.py` (byte-equal to the references), GEMMs by `F.scaled_mm` with
    `ScalingType.BlockWise1x128` (activations, gradients) x `BlockWise128x128` (weights) for fprop
    and dgrad, `BlockWise1x128` x `BlockWise1x128` for wgrad (fp32 output). M, N, K are zero-padded
    to multiples of 128 where needed (e.g. kv_a_proj's 576 outputs -> 640): zeros change no amax, so
    the result is the emulation's up to fp32 accumulation order and the output rounding.
  * "auto": the kernels seam chooses (dsv3/kernels/backend.py: scaled_mm on CUDA SM 9.x with
    F.scaled_mm and triton, else emulate).

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
1x128 tiles); their fp8 weights are read in place, never concatenated. Backends (kernel ops
`kernels.fp8_grouped_gemm_fwd` / `_bwd`; `convert_to_fp8_training` gives the experts "triton" where
the Linears get "scaled_mm"):
  * "emulate": the reference functions, fp32 matmul per expert (a loop over the host copy of offs:
    one sync per grouped linear, acceptable for the contract); what the CPU runs.
  * "triton": CUDA SM 8.9+. Quantisation by `dsv3/kernels/fp8_triton.py`, GEMMs by the grouped kernels
    of `dsv3/kernels/fp8_grouped_triton.py`, which read offs on the device: no host sync. D and I are
    zero-padded to multiples of 128 here where needed (every preset is aligned; tiny test models are
    not), M to a multiple of 128 (for the wgrad re-tiling) by the op.
  * "auto": the kernels seam chooses (triton on CUDA SM 8.9+ with triton, else emulate).
Why Triton: torch 2.11's `F.scaled_grouped_mm` on SM90 is rowwise-only (BlockWise1x128 / 128x128 raise
"No gemm implementation was found"), and a per-expert loop of blockwise `F.scaled_mm` needs the
per-expert counts on the host (a sync per layer) and runs small GEMMs whose FP8 gain is small or
negative (ANCHORS: 128 tokens, 49 vs 67 bf16 TFLOP/s). SwiGLU (`swiglu_cat`) keeps only its input for backward
and recomputes its output there, as the paper does. Limits: that input is kept in the autocast dtype (the paper
caches it in FP8) and dispatch/combine stay bf16;
`experts=False` is the default until the kernels are measured against bf16 `torch._grouped_mm`
(bench/fp8_experts_speed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import kernels
from dsv3.kernels import BLOCK
from dsv3.model.layers import Linear
from dsv3.model.moe import Experts

_PLAIN_LINEARS = (nn.Linear, Linear)  # what converts: the model's dense Linear (same parameters) or a torch one

BACKENDS = ("auto", "emulate", "scaled_mm")
EXPERT_BACKENDS = ("auto", "emulate", "triton")
_KERNEL_BACKEND = {"auto": None, "emulate": "reference", "scaled_mm": "scaled_mm", "triton": "triton"}  # -> the ops'


def _ceil(n: int, m: int = BLOCK) -> int:
    return -(-n // m) * m


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto",
               out_dtype: torch.dtype | None = None, recompute_weight: bool = False) -> torch.Tensor:
    """y = x Wᵀ with the three GEMMs in FP8 (module docstring). out_dtype: the autocast dtype where
    autocast is on, else x's dtype. recompute_weight: backward quantises W again for dgrad instead of keeping
    its FP8 transpose from the forward (module docstring, "Weights kept or recomputed")."""
    if backend not in BACKENDS:
        raise ValueError(f"fp8 backend must be one of {BACKENDS}, got {backend!r}")
    dev = x.device.type
    if out_dtype is None:
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != out_dtype:
        x = x.to(out_dtype)  # the copy autocast would have made for F.linear (both backends alike)
    lead, K = x.shape[:-1], x.shape[-1]
    y = kernels.fp8_linear(x.reshape(-1, K), weight, out_dtype, backend=_KERNEL_BACKEND[backend],
                           recompute_w=recompute_weight)
    return y.reshape(*lead, weight.shape[0])


class FP8TrainLinear(nn.Linear):
    """nn.Linear whose forward, input-gradient and weight-gradient GEMMs run in FP8 (see module
    docstring). Same parameters and state_dict as nn.Linear; `isinstance(m, nn.Linear)` holds, so
    initialisation and checkpoint code treat it as one."""

    fp8_backend: str = "auto"
    fp8_recompute_weight: bool = False  # backward re-quantises the weight (module docstring)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None,
                 backend: str = "auto", recompute_weight: bool = False):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp8_backend = backend
        self.fp8_recompute_weight = recompute_weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto", recompute_weight: bool = False) -> "FP8TrainLinear":
        """Turn `linear` into an FP8TrainLinear in place (same Parameter objects) and return it."""
        if type(linear) not in _PLAIN_LINEARS:
            raise TypeError(f"expected a plain nn.Linear, got {type(linear).__name__}")
        linear.__class__ = cls
        linear.fp8_backend = backend
        linear.fp8_recompute_weight = recompute_weight
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # one op a compiled block traces through (no graph break)
        y = fp8_linear(x, self.weight, self.fp8_backend, recompute_weight=self.fp8_recompute_weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.fp8_backend}" + (", recompute_weight" if self.fp8_recompute_weight
                                                                     else "")


# --- routed experts: grouped FP8 GEMMs over rows sorted by expert (module docstring, "Experts") ----

def fp8_grouped_linear(x: torch.Tensor, weights: tuple[torch.Tensor, ...], offs: torch.Tensor,
                       backend: str = "auto", out_dtype: torch.dtype | None = None,
                       recompute_weight: bool = False) -> torch.Tensor:
    """Rows of x (M, K) sorted by expert (offs (E,) int32 end rows, offs[-1] = M) times the expert
    weights (E, N_i, K), concatenated along N: Y[rows_e] = X[rows_e] · [W1_e; W2_e]ᵀ -> (M, ΣN_i) in
    out_dtype (default x's), the three GEMMs in FP8 (module docstring, "Experts"). Several weights
    share one quantisation of x (gate and up). recompute_weight: as fp8_linear's."""
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"fp8 experts backend must be one of {EXPERT_BACKENDS}, got {backend!r}")
    return kernels.fp8_grouped_linear(x, list(weights), offs, out_dtype or x.dtype, backend=_KERNEL_BACKEND[backend],
                                      recompute_w=recompute_weight)


class _SwiGLUCat(torch.autograd.Function):
    """silu(h[..., :I]) * h[..., I:] of the gate | up GEMM's output h (..., 2I). Backward keeps h alone and
    recomputes silu(gate), where autograd's chain also kept silu(gate) ((M, I) more a MoE layer per micro-batch in
    flight) and built h's gradient from two zero-filled (M, 2I) slice gradients and their sum; here one
    concatenation of the same values: mul's two products and aten.silu_backward, as autograd computes them (the
    same bits, up to the sign of a zero)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        I = h.shape[-1] // 2
        ctx.save_for_backward(h)
        return F.silu(h[..., :I]) * h[..., I:]

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        (h,) = ctx.saved_tensors
        I = h.shape[-1] // 2
        g, u = h[..., :I], h[..., I:]
        dg = torch.ops.aten.silu_backward(gy * u, g)
        du = gy * F.silu(g)
        return torch.cat([dg, du], dim=-1)


def swiglu_cat(h: torch.Tensor) -> torch.Tensor:
    """(..., 2I) gate | up -> (..., I) silu(gate) * up, keeping only h for backward (`_SwiGLUCat`)."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu_cat: an even last dimension (gate | up), got {tuple(h.shape)}")
    return _SwiGLUCat.apply(h)


class FP8TrainExperts(Experts):
    """Routed experts whose grouped GEMMs (forward, input and weight gradients) run in FP8 (module
    docstring, "Experts"). Same parameters and state_dict as Experts. Always the grouped path: the
    FP8 GEMMs exist only in that form, so `impl` ("loop" / "grouped") does not apply."""

    fp8_backend: str = "auto"
    fp8_recompute_weight: bool = False  # backward re-quantises the weights (module docstring)

    @classmethod
    def from_experts(cls, experts: Experts, backend: str = "auto", recompute_weight: bool = False) -> "FP8TrainExperts":
        """Turn `experts` into an FP8TrainExperts in place (same Parameter objects) and return it."""
        if type(experts) is not Experts:
            raise TypeError(f"expected a plain Experts, got {type(experts).__name__}")
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"fp8 experts backend must be one of {EXPERT_BACKENDS}, got {backend!r}")
        experts.__class__ = cls
        experts.fp8_backend = backend
        experts.fp8_recompute_weight = recompute_weight
        return experts

    def forward(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        return self.forward_grouped(x_ND, idx_NK, w_NK)

    def sorted_mlp(self, x_MD: torch.Tensor, flat: torch.Tensor, order: torch.Tensor, offs: torch.Tensor,
                   dt: torch.dtype) -> torch.Tensor:
        # resolved once for the three GEMMs (and the padding below)
        backend = kernels.select_backend("fp8_grouped_gemm", x_MD, backend=_KERNEL_BACKEND[self.fp8_backend])
        w1, w3, w2 = self.gate_proj, self.up_proj, self.down_proj  # (E, I, D), (E, I, D), (E, D, I)
        I, D = w1.shape[1:]
        rw = self.fp8_recompute_weight
        if backend != "reference" and (D % BLOCK or I % BLOCK):
            # the accelerated kernels take whole 128-blocks: zero-pad D and I (zeros change no amax and
            # SwiGLU keeps the padded columns at 0, so this is the unpadded computation)
            Dp, Ip = _ceil(D), _ceil(I)
            x_MD = F.pad(x_MD, (0, Dp - D))
            w1, w3 = (F.pad(w, (0, Dp - D, 0, Ip - I)) for w in (w1, w3))
            w2 = F.pad(w2, (0, Ip - I, 0, Dp - D))
            # padded weights are copies made here: re-quantising them in backward would keep those copies (the
            # weights' own dtype, 2-4 bytes a parameter) where the FP8 transposes take 1 (no preset pads)
            rw = False
        # one op each that torch.compile traces through (kernels.fp8_grouped_linear; the reference's host loop inside)
        h13 = kernels.fp8_grouped_linear(x_MD, [w1, w3], offs, dt, backend=backend, recompute_w=rw)  # (M, 2I)
        h = swiglu_cat(h13)  # (M, I); its backward recomputes silu(gate) from h13
        return kernels.fp8_grouped_linear(h, [w2], offs, dt, backend=backend, recompute_w=rw)[:, :D]  # (M, D)

    def extra_repr(self) -> str:
        E, I, D = self.gate_proj.shape
        return f"experts={E}, hidden={D}, inter={I}, fp8={self.fp8_backend}" + (
            ", recompute_weight" if self.fp8_recompute_weight else "")


def fp8_target_names(model: nn.Module) -> list[str]:
    """Qualified names of the nn.Linear modules that `convert_to_fp8_training` swaps: every Linear
    directly inside an MLA (attention projections) or an MLP (dense FFN, shared experts)."""
    from dsv3.model.layers import MLP
    from dsv3.model.mla import MLA

    names = []
    for pname, parent in model.named_modules():
        if isinstance(parent, (MLA, MLP)):
            for cname, child in parent.named_children():
                if type(child) in _PLAIN_LINEARS:
                    names.append(f"{pname}.{cname}" if pname else cname)
    return names


def convert_to_fp8_training(model: nn.Module, backend: str = "auto", experts: bool = False,
                            recompute_weights: bool = False) -> list[str]:
    """Swap, in place, the attention and dense/shared-expert MLP Linears for FP8TrainLinear and, with
    `experts`, every routed Experts for FP8TrainExperts (same parameters, same state_dict names; the
    experts' backend is "triton" where the Linears' is "scaled_mm"). recompute_weights: their backward
    quantises the weights again for dgrad (module docstring). Call before torch.compile and before building
    the optimizer or after (the Parameter objects are kept). Returns the swapped names."""
    if backend not in BACKENDS:
        raise ValueError(f"fp8 backend must be one of {BACKENDS}, got {backend!r}")
    names = fp8_target_names(model)
    for name in names:
        FP8TrainLinear.from_linear(model.get_submodule(name), backend, recompute_weights)
    if experts:
        expert_backend = "triton" if backend == "scaled_mm" else backend
        for name, m in model.named_modules():
            if type(m) is Experts:
                FP8TrainExperts.from_experts(m, expert_backend, recompute_weights)
                names.append(name)
    return names

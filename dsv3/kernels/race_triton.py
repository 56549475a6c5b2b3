"""The hashed exponential race (dsv3/inference/sampling.py `BatchSampler.draw`) in one Triton kernel.

    hashed_race(w, keys, slot) -> tokens

w (B, V) non-negative weights (fp32/bf16/fp16, V contiguous), keys (B,) each row's phase key (int64, or the
float64 key column of BatchSampler.rows: integers below 2^32, exact in either), slot a small int -> (B,) int64:
argmax over V of w / -log(u), u the row's hashed uniforms of slot `slot` (sampling.random_bits, uniforms with
open_low). The specification is the eager reference in sampling.py (`race_ref`); tests/test_race.py (Triton
interpreter) and tests/test_gpu_race.py compare the two.

Why: the reference is ~20 elementwise torch ops on (B, V) (the hash's shifts, xors, products and masks, the
uniforms, the log, the division, the argmax), each a launch and a round trip through memory: 0.36 ms a draw at
batch 1 against 0.08 for torch's generator (H100, bench/sampler_speed.py). Compiled rounds fuse it already
(round_compile; BatchSampler.draw takes the reference under torch.compile); this is for draws outside compiled code
(prefill's last chunk, steps with a repetition penalty, CUDA graphs captured without compile). On an H200 it takes
0.053-0.098 ms a draw against the reference's 0.26-0.44 (bench/sampler_speed.py, 2026-12-06). One launch: a
program per row walks V in BLOCK-wide tiles, hashing, drawing and keeping the running maximum and its first index
(one SM a row: at batch 1 slower than inductor's split reduction of the reference at V >= 102,400).

Exactness: the hash runs on uint32 lanes (sampling.py computes it in int64 with explicit 32-bit masks; a
wrapping 32-bit product is the low 32 bits of the exact one, and shifts of unsigned values are logical), the same
bits without 64-bit products (several instructions each on the GPU). The log is
libdevice's logf and the division rounds to nearest (div_rn), the operations of torch's CUDA log and true
division, so the scores are bitwise the reference's and the token the same (tests/test_gpu_race.py, H200; the
top 24-bit bin's u is 1 - 2^-24 in both: its centre rounds to 1.0 in fp32, whose log is 0); the interpreter (no
libdevice) uses numpy's log, which may differ in the last bit (the CPU tests compare on weights without near
ties, and compare the hash exactly through a uniform-weight row, whose argmax is the largest uniform).
Ties take the first index (tl.argmax within a tile, a strict > across tiles), torch.argmax's rule. NaN weights
are not supported (the reference returns the first NaN; weights are probabilities here).

Wrapping: torch.library.custom_op("dsv3::hashed_race") with a fake, so torch.compile treats it as one opaque op
and a CUDA graph captures the launch (the grid depends on B only).
"""

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# (globals a kernel reads must be constexprs)
_GOLDEN = tl.constexpr(0x9E3779B9)  # sampling._GOLDEN (a uint32 value to Triton: above int32, below 2^32)
_MIX = tl.constexpr(0x45D9F3B)  # sampling._MIX


@triton.jit
def _hash32(x):
    """sampling.hash32 on uint32 lanes: a wrapping 32-bit product is the low 32 bits of the exact one."""
    x = ((x >> 16) ^ x) * _MIX
    x = ((x >> 16) ^ x) * _MIX
    return (x >> 16) ^ x


@triton.jit(do_not_specialize=["slot"])  # (an int argument equal to 1 would reach the kernel as a constexpr)
def _race_kernel(w_ptr, keys_ptr, out_ptr, slot, s_wb, s_k, V: tl.constexpr, BLOCK: tl.constexpr,
                 EXACT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    key = tl.load(keys_ptr + b * s_k).to(tl.int64).to(tl.uint32)  # (a key is below 2^32)
    # the row's base: hash32(key ^ hash32((slot + 1) * GOLDEN mod 2^32)), as sampling.random_bits
    base = _hash32(key ^ _hash32((slot + 1).to(tl.uint32) * _GOLDEN))
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < V
        w = tl.load(w_ptr + b * s_wb + offs, mask=ok, other=0.0).to(tl.float32)
        bits = _hash32(base ^ (offs.to(tl.uint32) * _GOLDEN))
        # 2^-24; in (0, 1): the top bin at 1 - 2^-24, as sampling.uniforms
        u = tl.minimum(((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08, 0.999999940395355224609375)
        if EXACT:
            e = -libdevice.log(u)
            score = tl.math.div_rn(w, e)
        else:  # the interpreter (no libdevice)
            e = -tl.log(u)
            score = w / e
        score = tl.where(ok, score, float("-inf"))
        m = tl.max(score, 0)
        i = tl.argmax(score, 0).to(tl.int64) + start
        better = m > best
        best_i = tl.where(better, i, best_i)
        best = tl.where(better, m, best)
    tl.store(out_ptr + b, best_i)


@torch.library.custom_op("dsv3::hashed_race", mutates_args=())
def hashed_race(w: torch.Tensor, keys: torch.Tensor, slot: int) -> torch.Tensor:
    """See the module docstring."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    assert w.is_cuda or interpret, "hashed_race needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    assert w.dim() == 2 and keys.shape == (w.shape[0],), f"w (B, V), keys (B,): got {tuple(w.shape)}, " \
        f"{tuple(keys.shape)}"
    assert keys.dtype in (torch.int64, torch.float64), f"keys int64 or float64, got {keys.dtype}"
    assert 0 <= slot < 2 ** 30, f"slot {slot}"
    if w.stride(-1) != 1:
        w = w.contiguous()
    B, V = w.shape
    out = torch.empty(B, dtype=torch.int64, device=w.device)
    if B == 0:
        return out
    if V == 0:
        return out.zero_()  # (argmax of an empty row raises in torch; the engine never asks)
    # 4,096 lanes a tile: ~32 tiles for a 129,280-token vocabulary; one program per row (at batch 1 a single SM
    # reads 0.5 MB of fp32 weights and hashes them: predicted ~10-40 us, unmeasured, against ~20 launches of the
    # reference). V is a constexpr (one compile per vocabulary size; a runtime loop bound also trips the
    # interpreter under numpy 2)
    block = min(4096, triton.next_power_of_2(V))
    _race_kernel[(B,)](w, keys, out, int(slot), w.stride(0), keys.stride(0), V=V, BLOCK=block, EXACT=not interpret,
                       num_warps=8 if block >= 2048 else 4)
    return out


@hashed_race.register_fake
def _(w, keys, slot):
    return w.new_empty(w.shape[0], dtype=torch.int64)

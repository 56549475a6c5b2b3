"""FP8 training (dsv3/training/fp8.py, SPEC §9) on the CPU: the emulation contract written out by
hand, accuracy against fp32, tile orientation of the three GEMMs, the module swap, and a tiny model
training with precision fp8. The GPU backend is checked against this emulation in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import bench_module, tiny_cfg
from dsv3.model import build_model
from dsv3.model.layers import Linear
from dsv3.training.fp8 import FP8TrainLinear, convert_to_fp8_training, fp8_linear

E4M3 = torch.float8_e4m3fn


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --- a hand-written statement of the contract (shapes multiples of 128) --------------------------

def _q_rows(t, floor=1e-4):
    """1x128 tiles along the last dim: scale max(amax, floor)/448, e4m3, back to fp32. Activations
    keep the 1e-4 floor; gradients have none (floor 0: an all-zero tile would be 0/0, none here)."""
    M, K = t.shape
    v = t.float().reshape(M, K // 128, 128)
    s = v.abs().amax(-1, keepdim=True).clamp_min(floor) / 448.0
    return ((v / s).clamp(-448, 448).to(E4M3).float() * s).reshape(M, K)


def _q_blocks(w):
    """128x128 blocks: scale max(amax/448, 1e-12), e4m3, back to fp32."""
    N, K = w.shape
    v = w.float().reshape(N // 128, 128, K // 128, 128)
    s = (v.abs().amax(dim=(1, 3), keepdim=True) / 448.0).clamp_min(1e-12)
    return ((v / s).clamp(-448, 448).to(E4M3).float() * s).reshape(N, K)


def _hand_fp8(x2, w, g2):
    """(y, dx, dw) of the paper's recipe: fprop X·Wᵀ, dgrad dY·W, wgrad dYᵀ·X with dYᵀ and Xᵀ tiled
    1x128 along the tokens, Xᵀ requantised from the FP8 X of the forward."""
    xd, wd = _q_rows(x2), _q_blocks(w)
    y = xd @ wd.T
    dx = _q_rows(g2, 0.0) @ wd
    dw = _q_rows(g2.t().contiguous(), 0.0) @ _q_rows(xd.t().contiguous()).T
    return y, dx, dw


def _run(x, w, g, backend="emulate"):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fp8_linear(x, w, backend)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def test_emulation_equals_the_hand_written_contract():
    torch.manual_seed(0)
    x = torch.randn(2, 128, 384)  # 256 tokens as (batch, seq, K)
    w = torch.randn(256, 384) * 0.05
    g = torch.randn(2, 128, 256)
    y, dx, dw = _run(x, w, g)
    hy, hdx, hdw = _hand_fp8(x.reshape(-1, 384), w, g.reshape(-1, 256))
    assert torch.equal(y.reshape(-1, 256), hy)
    assert torch.equal(dx.reshape(-1, 384), hdx)
    assert torch.equal(dw, hdw)
    assert y.dtype == dx.dtype == dw.dtype == torch.float32


def test_gradients_close_to_fp32():
    """Measured on Gaussian data: 3.6% (y), 3.6% (dx), 4.5% (dw: X is quantised twice, 1x128 then
    re-tiled 128x1) relative Frobenius error; e4m3 alone leaves ~2.6% per operand. Bound 6%."""
    torch.manual_seed(1)
    x, w, g = torch.randn(300, 200), torch.randn(72, 200) * 0.1, torch.randn(300, 72)  # ragged shapes
    y, dx, dw = _run(x, w, g)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    yr = xr @ wr.T
    yr.backward(g)
    for a, b in ((y, yr), (dx, xr.grad), (dw, wr.grad)):
        assert torch.isfinite(a).all()
        assert _rel(a, b) < 0.06, _rel(a, b)


def test_emulation_contract_with_small_gradients():
    """The contract for real training gradients, whose 1x128 tiles are ~1e-9..1e-4 (the loss is a
    mean over the tokens): dY's scales are amax/448 with no floor."""
    torch.manual_seed(3)
    x = torch.randn(256, 256)
    w = torch.randn(256, 256) * 0.05
    g = torch.randn(256, 256) * 1e-7
    g[:, 128:] *= 1e-3  # tiles of ~1e-10 too
    y, dx, dw = _run(x, w, g)
    hy, hdx, hdw = _hand_fp8(x, w, g)
    assert torch.equal(dx, hdx)
    assert torch.equal(dw, hdw)


@pytest.mark.parametrize("gscale", [1e-9, 1e-6, 1.0, 1e3])
def test_gradient_quantisation_is_scale_invariant(gscale):
    """The FP8 error of dgrad and wgrad must not depend on the loss scale. With the activation floor
    max(amax, 1e-4)/448 on dY, a dY of amax ~1e-9 (typical, see the bench) was quantised onto 0..0.005
    of the e4m3 range: 60-100% error (the bug behind FP8 training learning slower,
    bench/fp8_loss_cpu.py). Power-of-two scales of dY give bit-identical results up to that factor."""
    torch.manual_seed(4)
    x, w, g = torch.randn(256, 384), torch.randn(256, 384) * 0.05, torch.randn(256, 256)
    _, dx1, dw1 = _run(x, w, g)
    _, dx2, dw2 = _run(x, w, g * 2.0 ** -40)
    assert torch.equal(dx2, dx1 * 2.0 ** -40)
    assert torch.equal(dw2, dw1 * 2.0 ** -40)
    gs = g * gscale
    _, dx, dw = _run(x, w, gs)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (xr @ wr.T).backward(gs)
    assert _rel(dx, xr.grad) < 0.06, _rel(dx, xr.grad)
    assert _rel(dw, wr.grad) < 0.06, _rel(dw, wr.grad)


def test_grad_prescale_is_an_exact_power_of_two():
    from dsv3.kernels.reference import grad_prescale

    for amax in (0.0, 1e-30, 6e-9, 1e-4, 1.0, 448.0, 3e30):
        g = torch.tensor([amax, -amax / 3])
        p = grad_prescale(g)
        m, _ = torch.frexp(p)
        assert p.dtype == torch.float32 and p.dim() == 0 and m.item() == 0.5
        if amax > 1e-19:  # below 2^-63 the exponent is clamped at 127 (p stays a finite fp32)
            assert 2.0 ** 63 <= amax * p.item() < 2.0 ** 64
    assert grad_prescale(torch.tensor([1e-6], dtype=torch.bfloat16)).dtype == torch.float32


def test_tile_orientation():
    """One outlier perturbs only its own tile. Forward/dgrad tile 1x128 along the channels (so only the
    outlier's token row moves); wgrad tiles 128x1 along the tokens (so only the outlier's channel
    moves). Each assertion fails if the corresponding tiling is transposed."""
    torch.manual_seed(2)
    M, K, N = 256, 256, 256
    x, w, g = torch.randn(M, K), torch.randn(N, K) * 0.05, torch.randn(M, N)
    y0, dx0, dw0 = _run(x, w, g)
    rows = torch.arange(M) != 5

    # fprop: X[5, 3] huge -> only Y's row 5 changes
    xo = x.clone()
    xo[5, 3] = 1e4
    y1, _, _ = _run(xo, w, g)
    torch.testing.assert_close(y1[rows], y0[rows], rtol=1e-6, atol=1e-6)

    # dgrad and wgrad: dY[5, 3] huge -> dX changes only in row 5 (1x128 tiles of dY along N) and dW only
    # in row 3 (dYᵀ tiled along the tokens: the tile (channel 3, tokens 0-127))
    go = g.clone()
    go[5, 3] = 1e4
    _, dx1, dw1 = _run(x, w, go)
    torch.testing.assert_close(dx1[rows], dx0[rows], rtol=1e-6, atol=1e-6)
    others = torch.arange(N) != 3
    torch.testing.assert_close(dw1[others], dw0[others], rtol=1e-6, atol=1e-6)
    assert (dw1[3] - dw0[3]).abs().max() > 1.0

    # wgrad, the Xᵀ operand: X[5, 3] huge but dY[5] = 0, so token 5 contributes nothing to dW by itself.
    # Tiled along the tokens, the outlier coarsens the scale of channel 3's tile (tokens 0-127): dW's
    # column 3 loses (nearly) everything; tiled along the channels it would touch nothing.
    # (1e8: e4m3 subnormals reach 2^-9, so the outlier must exceed the rest by more than 448 * 2^9)
    gz = g.clone()
    gz[5] = 0
    xo[5, 3] = 1e8
    _, _, dw2 = _run(xo, w, gz)
    exact = gz.t() @ xo
    col = torch.arange(K) == 3
    assert _rel(dw2[:, col], exact[:, col]) > 0.5
    assert _rel(dw2[:, ~col], exact[:, ~col]) < 0.06


def test_convert_swaps_exactly_the_intended_linears():
    torch.manual_seed(0)
    cfg = tiny_cfg(q_lora_rank=24)
    model = build_model(cfg, seed=0)
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    names = convert_to_fp8_training(model)
    swapped = {n for n, m in model.named_modules() if isinstance(m, FP8TrainLinear)}
    assert swapped == set(names)
    attn = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    mlp = {"gate_proj", "up_proj", "down_proj"}
    want = set()
    for prefix in [f"layers.{i}" for i in range(cfg.num_hidden_layers)] + ["mtp.0"]:
        want |= {f"{prefix}.self_attn.{a}" for a in attn}
        dense = prefix == "layers.0"
        want |= {f"{prefix}.mlp.{p}" if dense else f"{prefix}.mlp.shared_experts.{p}" for p in mlp}
    assert swapped == want
    plain = {n for n, m in model.named_modules() if type(m) in (nn.Linear, Linear)}
    assert plain == {"lm_head", "mtp.0.eh_proj"}
    sd1 = model.state_dict()
    assert list(sd1) == list(sd0)
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    # MHA variant (no q-LoRA): q_proj is swapped
    m2 = build_model(tiny_cfg(q_lora_rank=None), seed=0)
    assert "layers.0.self_attn.q_proj" in convert_to_fp8_training(m2)


def _train(cfg, fp8: bool, steps: int, experts: bool = False):
    """Losses of `steps` AdamW steps on a learnable batch; fp8: the emulated recipe (experts: routed too)."""
    from dsv3.training.loss import compute_loss

    model = build_model(cfg, seed=0)
    if fp8:
        convert_to_fp8_training(model, "emulate", experts=experts)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(0, 32, (4, 17), generator=gen)
    x = torch.cat([base, base], 1)  # repeated halves: learnable
    losses = []
    for _ in range(steps):
        out = model(x[:, :-1])
        loss = compute_loss(out, x[:, 1:], 0.3).total
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_tiny_model_trains_in_fp8_close_to_fp32():
    cfg = tiny_cfg(hidden_size=64, intermediate_size=128, initializer_range=0.02)
    l32 = _train(cfg, False, 12)
    l8 = _train(cfg, True, 12)
    assert l8[-1] < 0.8 * l8[0]
    rel = abs(l8[-1] - l32[-1]) / l32[-1]
    assert rel < 0.03, (l8, l32)


def test_precision_fp8_in_the_training_loop(tmp_path):
    """`precision="fp8"` on the CPU: the swap happens, the run trains and the checkpoint loads into a
    plain model (state_dict unchanged); with fp8_recompute_weights "on" the swapped modules re-quantise their weights
    in backward (the log says so; "auto" in one process keeps them) and the run ends on the same weights bit for
    bit."""
    import os

    from test_training import micro_config, tcfg, write_corpus

    from dsv3.checkpoints.rundir import latest_checkpoint, load_checkpoint
    from dsv3.training.pretrain import train
    from dsv3.tokenizer import DSTokenizer

    data = write_corpus(tmp_path / "corpus", n_files=8)
    tok = DSTokenizer.train((p.read_text(encoding="utf-8") for p in sorted((tmp_path / "corpus").iterdir())), 512)
    env = {"data": data, "tokenizer": str(tok.save(tmp_path / "tok")), "cache": str(tmp_path / "cache")}
    logs = []
    models = []
    for rw in ("auto", "on"):
        run = tmp_path / f"run_{rw}"
        logs.clear()
        train(micro_config(), tcfg(env, run, steps=3, precision="fp8", save_every=3, device="cpu",
                                   fp8_recompute_weights=rw), log=logs.append)
        assert any("fp8:" in str(line) and ("re-quantised" in str(line)) == (rw == "on") for line in logs)
        model, *_ = load_checkpoint(latest_checkpoint(os.path.join(run, "checkpoints")), "cpu", torch.float32)
        assert not any(isinstance(m, FP8TrainLinear) for m in model.modules())
        models.append(model.state_dict())
    for k, v in models[0].items():
        assert torch.equal(v, models[-1][k]), k


def test_train_config_fp8_recompute_weights():
    """auto (the default) with any precision; on / off only with fp8; nothing else."""
    from dsv3.training.config import TrainConfig

    for v in ("on", "off"):
        with pytest.raises(ValueError, match="needs precision fp8"):
            TrainConfig(out_dir="unused", precision="bf16", fp8_recompute_weights=v).validate()
        TrainConfig(out_dir="unused", precision="fp8", fp8_recompute_weights=v).validate()
    TrainConfig(out_dir="unused", precision="bf16").validate()
    with pytest.raises(ValueError, match="auto, on or off"):
        TrainConfig(out_dir="unused", precision="fp8", fp8_recompute_weights=True).validate()


@pytest.mark.parametrize("setting,pipelined,want", [("auto", False, False), ("auto", True, True), ("on", False, True),
                                                    ("off", True, False)])
def test_prepare_model_recomputes_fp8_weights_under_a_pipeline(setting, pipelined, want):
    """prepare_model's fp8_recompute_weights: auto re-quantises the weights in backward where the strategy
    pipelines (several micro-batches in flight, each keeping its copies otherwise), keeps them in one process; on /
    off as said. Every swapped module, routed experts included, gets the choice."""
    from dsv3.training.fp8 import FP8TrainExperts
    from dsv3.training.strategy import Strategy, prepare_model

    class S(Strategy):
        def parallelize(self, model):
            self.model = model

    st = S(torch.device("cpu"))
    st.pipelined = pipelined
    m = build_model(tiny_cfg(), seed=0)
    prepare_model(m, st, precision="fp8", fp8_experts=True, fp8_recompute_weights=setting, log=lambda *a: None)
    mods = [x for x in m.modules() if isinstance(x, (FP8TrainLinear, FP8TrainExperts))]
    assert mods and any(isinstance(x, FP8TrainExperts) for x in mods)
    assert all(x.fp8_recompute_weight is want for x in mods)


def test_bad_backend():
    with pytest.raises(ValueError):
        fp8_linear(torch.randn(2, 4), torch.randn(3, 4), "fast")


def test_emulation_bf16_inputs_realistic_shapes_and_tiny_gradients():
    """The GPU bench's setting (bf16 autocast: x and dY arrive in bf16; K = 1024, several 1x128 tiles
    per row; dY ~1e-9..1e-7, the loss being a mean over the tokens): the emulation equals the
    hand-written contract bit for bit, is within the e4m3 error of the exact product, and a strided
    (non-contiguous) x gives the same bytes as a contiguous one."""
    torch.manual_seed(5)
    M, K, N = 512, 1024, 640
    x = (torch.randn(M, K) * (1 + 4 * (torch.rand(K) < 0.02).float())).to(torch.bfloat16)
    w = torch.randn(N, K) * 0.006
    g = (torch.randn(M, N) * 1e-8 * torch.logspace(-1, 1, M).unsqueeze(1)).to(torch.bfloat16)
    y, dx, dw = _run(x, w, g)
    assert y.dtype == dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    hy, hdx, hdw = _hand_fp8(x.float(), w, g.float())
    assert torch.equal(y, hy.to(torch.bfloat16))
    assert torch.equal(dx, hdx.to(torch.bfloat16))
    assert torch.equal(dw, hdw)
    xr, wr = x.float().requires_grad_(), w.clone().requires_grad_()
    (xr @ wr.T).backward(g.float())
    assert _rel(y, xr.detach() @ wr.detach().T) < 0.06
    assert _rel(dx, xr.grad) < 0.06 and _rel(dw, wr.grad) < 0.06, (_rel(dx, xr.grad), _rel(dw, wr.grad))
    big = torch.zeros(M, 2 * K, dtype=torch.bfloat16)
    big[:, 3:3 + K] = x
    xs = big[:, 3:3 + K]  # row stride 2K: not contiguous
    ys, dxs, dws = _run(xs, w, g)
    assert torch.equal(ys, y) and torch.equal(dxs, dx) and torch.equal(dws, dw)


def test_grad_prescale_bf16_is_exact():
    """g * p in bf16 (the dtype dY has under autocast) is exact: the bytes of the prescaled gradient
    are those of the fp32 product, for tiny, zero and huge amax."""
    from dsv3.kernels.reference import grad_prescale

    for amax in (1e-30, 1e-9, 1e-4, 3e30):
        g = (torch.randn(64, 128) * amax).to(torch.bfloat16)
        g[3] = 0
        p = grad_prescale(g)
        gp = g * p
        assert gp.dtype == torch.bfloat16 and torch.isfinite(gp).all()
        assert torch.equal(gp.float(), g.float() * p)
        if amax > 1e-19:  # below, p is clamped at 2^127 (as test_grad_prescale_is_an_exact_power_of_two)
            assert 2.0 ** 63 <= gp.float().abs().max() < 2.0 ** 64
    z = torch.zeros(4, 128, dtype=torch.bfloat16)
    assert grad_prescale(z).item() == 2.0 ** 64


def test_fp8_keeps_less_for_backward_than_bf16():
    """bench/fp8_memory.py on a 2-layer tiny model (CPU, emulation): what autograd keeps for backward in FP8 (the
    1-byte activations and weights with their scales, all linears and experts swapped) is smaller than bf16
    autocast's, and the FP8 payloads are really there (the accounting sees the FP8 functions' own saved tuples)."""
    import argparse

    bench = bench_module("fp8_memory")
    args = argparse.Namespace(device="cpu", preset="tiny", layers=2, vocab=0, batch=1, seq_len=64, compile=False)
    bf16, fp8 = bench.measure(args, "bf16"), bench.measure(args, "fp8")
    assert bf16["saved_fp8"] == 0 and fp8["saved_fp8"] > 0
    assert fp8["saved"] < 0.9 * bf16["saved"], (fp8, bf16)


def test_fp8_gemm_ceiling_bench_on_the_cpu():
    """bench/fp8_gemm_ceiling.py: the FP8-swapped Linears it weighs are the slice's (3 layers: 5 attention
    projections each, the dense layer's MLP, two shared experts), its rows run on the CPU (the FP8 Linear through
    the reference; the scaled_mm rows need SM90), and the Amdahl arithmetic."""
    import importlib.util
    import os
    import sys

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench")
    sys.path.insert(0, here)
    try:
        spec = importlib.util.spec_from_file_location("fp8_gemm_ceiling", os.path.join(here, "fp8_gemm_ceiling.py"))
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        counts = bench.shapes_of("671b-slice")
    finally:
        sys.path.remove(here)
    assert sum(counts.values()) == 3 * 5 + 3 + 2 * 3
    assert counts[(7168, 16384)] == 3 and counts[(576, 7168)] == 3 and counts[(18432, 7168)] == 2
    r = bench.gemm_rows(96, 128, 64, torch.device("cpu"), iters=1, warmup=0)
    assert {"bf16_gemms", "dsv3_bf16", "dsv3_fp8"} <= set(r) and "fp8_gemms" not in r
    assert all(r[k] > 0 for k in ("bf16_gemms", "dsv3_bf16", "dsv3_fp8"))
    assert bench.amdahl(100.0, 40.0, 20.0) == 100.0 / 80.0


def test_fp8_host_overhead_bench_on_the_cpu(capsys):
    """bench/fp8_host_overhead.py runs its rows on the CPU (the FP8 GEMMs through the reference): each row prints the
    launch loop's host time and the wall time per call."""
    from tests.conftest import bench_module

    bench_module("fp8_host_overhead").main(["--device", "cpu", "--shape", "32,128,128", "--calls", "2", "--cprofile"])
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if "us/call" in ln]
    assert len(rows) == 17 and rows[0].lstrip().startswith("bf16 F.linear") and "fp8 kernels.fp8_linear" in rows[1]
    assert "the op wrappers ('reference' backend)" in out and any("+ autograd" in ln for ln in rows)
    assert all(float(ln.split("host")[1].split("us")[0]) > 0 for ln in rows)
    assert "cProfile of 2 calls" in out and "fp8_gemm_bwd_ref" in out  # (the reference backward's own frame)
    with pytest.raises(SystemExit):
        bench_module("fp8_host_overhead").main(["--device", "cpu", "--shape", "32,128"])
    assert "--shape takes M,K,N" in capsys.readouterr().err


def test_gradient_quantiser_prescales_in_fp32():
    """grad_quant and the Triton-layout references with p: the power-of-two pre-scale (amax -> 2^63..2^64) is
    applied in fp32, so an fp16 gradient quantises to the bytes of its fp32 copy (multiplied in fp16 it overflowed
    to inf and FP8 backward of fp16 activations gave NaN) and a bf16 one to the same bytes as before (exact)."""
    from dsv3.kernels.reference import act_quant_cm_ref, act_quant_t_ref, grad_prescale, grad_quant

    g = torch.randn(128, 256, generator=torch.Generator().manual_seed(4)) * 1e-3
    for dt in (torch.float16, torch.bfloat16):
        gd = g.to(dt)
        q, s = grad_quant(gd)
        q32, s32 = grad_quant(gd.float())
        assert torch.isfinite(s).all() and torch.equal(s, s32)
        assert torch.equal(q.view(torch.uint8), q32.view(torch.uint8))
        p = grad_prescale(gd).reshape(1)
        for f in (act_quant_cm_ref, lambda x, p: act_quant_t_ref(x, p=p)):
            (a, sa), (b, sb) = f(gd, p), f(gd.float(), p)
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            assert torch.equal(sa, sb) and torch.isfinite(sa).all()


def test_dense_wgrad_in_the_weights_dtype_where_scaled_mm_gives_it(monkeypatch):
    """kernels.fp8._wgrad_mm (the scaled_mm backend's wgrad): 16-bit weights ask F.scaled_mm for their own dtype (no
    fp32 copy of the gradient); where that raises (a torch / cuBLAS without the output for the 1x128 x 1x128 recipe),
    fp32 from then on, remembered per dtype; fp32 weights ask for fp32; an out-of-memory error is not taken for a
    missing output type."""
    import torch.nn.functional as F

    from dsv3.kernels import fp8 as kf

    asked = []

    def fake(a, b, sa, ra, sb, rb, output_dtype):
        asked.append(output_dtype)
        if output_dtype == torch.float16:
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
        return (a @ b).to(output_dtype)

    monkeypatch.setattr(F, "scaled_mm", fake, raising=False)
    monkeypatch.setattr(F, "ScalingType", type("S", (), {"BlockWise1x128": 0}), raising=False)
    monkeypatch.setattr(kf, "_WGRAD_DIRECT", {})
    a, b = torch.randn(4, 8), torch.randn(6, 8)
    assert kf._wgrad_mm(a, None, b, None, torch.bfloat16).dtype == torch.bfloat16 and asked == [torch.bfloat16]
    assert kf._wgrad_mm(a, None, b, None, torch.float16).dtype == torch.float32
    assert asked[1:] == [torch.float16, torch.float32]
    assert kf._wgrad_mm(a, None, b, None, torch.float16).dtype == torch.float32 and asked[3:] == [torch.float32]
    assert kf._WGRAD_DIRECT == {torch.bfloat16: True, torch.float16: False}
    assert kf._wgrad_mm(a, None, b, None, torch.float32).dtype == torch.float32 and asked[-1] == torch.float32

    def oom(*a, output_dtype):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(F, "scaled_mm", oom, raising=False)
    monkeypatch.setattr(kf, "_WGRAD_DIRECT", {})
    with pytest.raises(torch.OutOfMemoryError):
        kf._wgrad_mm(a, None, b, None, torch.bfloat16)
    assert kf._WGRAD_DIRECT == {}


@pytest.mark.parametrize("shape", [(70, 200, 136), (128, 256, 384)])
def test_recomputed_weights_give_the_same_gradients_and_keep_no_fp8_weight(shape):
    """fp8_linear(recompute_weight=True) (TrainConfig.fp8_recompute_weights): y, dx and dw bit for bit those of the
    default (backward quantises W again to the same bytes), what autograd keeps holds W itself (no copy) and no
    FP8 weight, where the default keeps the FP8 W; a second backward on the same graph (a pipeline's split
    backward) recomputes again and gives the same dx."""
    M, K, N = shape
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen) * 0.05
    g = torch.randn(M, N, generator=gen)
    res, kept = {}, {}
    for rw in (False, True):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        kept[rw] = []  # what backward will get
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept[rw].append(t) or t, lambda t: t):
            y = fp8_linear(xr, wr, "emulate", recompute_weight=rw)
        y.backward(g, retain_graph=True)
        res[rw] = (y.detach(), xr.grad.clone(), wr.grad.clone())
        if rw:
            (dx2,) = torch.autograd.grad(y, xr, g)
            assert torch.equal(dx2, res[rw][1])
            assert any(t.data_ptr() == wr.data_ptr() for t in kept[rw])  # W referenced, not copied
        else:  # the weight itself not kept by default (under FSDP2 it is the gathered copy)
            assert not any(t.data_ptr() == wr.data_ptr() for t in kept[rw] if t.numel())
    for a, b in zip(res[True], res[False]):
        assert torch.equal(a, b)
    assert [t.shape for t in kept[False] if t.dtype == E4M3 and t.numel()] == [(M, K), (N, K)]  # X and W in FP8
    assert [t.shape for t in kept[True] if t.dtype == E4M3 and t.numel()] == [(M, K)]  # X only


def test_scaled_mm_glue_recomputes_the_same_dgrad_operand(monkeypatch):
    """kernels.fp8 `_smm_fwd` / `_smm_bwd` (the scaled_mm backend's glue; the quantisers run their references on
    the CPU, F.scaled_mm is recorded): with recompute_w the dgrad GEMM gets the same FP8 Wᵀ bytes and scales as
    the default's transpose from the forward (padded shapes: N 136 -> 256, K 200 -> 256), and the forward does
    not write the transpose."""
    import torch.nn.functional as F

    from dsv3.kernels import fp8 as kf

    calls = []

    def fake(a, b, sa, ra, sb, rb, output_dtype):
        calls.append((a, b, sa, sb))
        return torch.zeros(a.shape[0], b.shape[1], dtype=output_dtype)

    monkeypatch.setattr(F, "scaled_mm", fake, raising=False)
    monkeypatch.setattr(F, "ScalingType", type("S", (), {"BlockWise1x128": 0, "BlockWise128x128": 1}), raising=False)
    monkeypatch.setattr(kf, "_WGRAD_DIRECT", {})
    monkeypatch.setattr(kf, "weight_quant_pad", lambda w, transposed=False: calls.append(("wq", transposed)) or
                        kf.reference.weight_quant_pad_ref(w, transposed))
    gen = torch.Generator().manual_seed(0)
    x, w, g = torch.randn(70, 200, generator=gen), torch.randn(136, 200, generator=gen) * 0.05, torch.randn(70, 136)
    dgrad = {}
    for rw in (False, True):
        calls.clear()
        _, saved = kf._smm_fwd(x, w, torch.float32, rw)
        assert ("wq", not rw) in calls  # the transpose written by the forward only where it is kept
        kf._smm_bwd(g, saved, torch.float32, torch.float32, True, False)
        a, b, sa, sb = calls[-1]  # the dgrad GEMM: dY · W, W as (Wᵀ)ᵀ
        dgrad[rw] = (b.t().contiguous().view(torch.uint8), sb)
    assert torch.equal(dgrad[True][0], dgrad[False][0]) and torch.equal(dgrad[True][1], dgrad[False][1])


def test_interp_weight_quant_transpose_alone_is_the_same_bytes(monkeypatch):
    """fp8_triton.weight_quant_pad_t (the block read transposed only, its amax from that read) writes the bytes
    and scales of weight_quant_pad(w, transposed=True)'s transpose, on edge blocks too (Triton interpreter; the
    kernel against the reference is tests/test_gpu.py's)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    from triton.runtime import interpreter as ti

    from dsv3.kernels import fp8_triton

    patch = ti._patch_lang_tensor  # (test_fp8_experts.numpy24_interpreter's fix)
    monkeypatch.setattr(ti, "_patch_lang_tensor", lambda t, scope: patch(t, scope) or scope.set_attr(
        t, "__index__", lambda self: int(self.handle.data.squeeze())))
    for N, K in [(200, 300), (128, 384)]:
        w = torch.randn(N, K, generator=torch.Generator().manual_seed(N)) * 0.02
        w[:128, :128] *= 1e3  # blocks of very different scales
        q, s, qt = fp8_triton.weight_quant_pad(w, transposed=True)
        qt2, s2 = fp8_triton.weight_quant_pad_t(w)
        assert qt2.shape == (K, N) and torch.equal(qt2.view(torch.uint8), qt.view(torch.uint8))
        assert torch.equal(s2, s)


def test_weight_quant_kernel_compiles_for_sm90_with_and_without_the_plain_copy():
    """_weight_quant_kernel with HAS_Q False (the transpose alone: its scale from the transposed read) compiles for
    sm_90 (Triton's NVIDIA back end on the CPU) and stores one fp8 tile where HAS_Q True stores two."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles the kernel: not under the interpreter")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv3.kernels import fp8_triton

    k = fp8_triton._weight_quant_kernel
    ptrs = {"w_ptr": "*bf16", "q_ptr": "*fp8e4nv", "qt_ptr": "*fp8e4nv", "s_ptr": "*fp32"}
    stores = {}
    for has_q in (True, False):
        signature, consts = {}, {}
        for i, n in enumerate(k.arg_names):
            if n in ptrs:
                signature[n] = ptrs[n]
            elif n in ("HAS_Q", "HAS_T", "BLK"):
                signature[n] = "constexpr"
                consts[(i,)] = {"HAS_Q": has_q, "HAS_T": True, "BLK": 128}[n]
            else:
                signature[n] = "i32"
        c = triton.compile(ASTSource(k, signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 8})
        ptx = c.asm["ptx"]
        stores[has_q] = ptx.count("st.global.b8") + ptx.count("st.global.v2.b8") + ptx.count("st.global.v4.b8") \
            + ptx.count("st.global.b32") + ptx.count("st.global.v4.b32") + ptx.count("st.global.v2.b32")
        assert ".local" not in ptx  # no spills
    assert stores[False] < stores[True], stores


def test_quantiser_kernels_keep_nan_for_sm90():
    """The reference's amax and clamps keep a NaN (the tile's scale and bytes NaN: a NaN activation or gradient
    stays non-finite, so the loss and the step's finiteness check see it). Triton's tl.max / tl.maximum /
    tl.minimum default to maxnum / minnum, which drop it: a NaN came out as a finite -448 x a finite scale, on the
    GPU only (the interpreter's numpy keeps NaN). Checked on the kernels compiled for sm_90 on the CPU."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles the kernels: not under the interpreter")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsv3.kernels import fp8_triton

    ptrs = {"x_ptr": "*bf16", "w_ptr": "*bf16", "q_ptr": "*fp8e4nv", "qt_ptr": "*fp8e4nv", "s_ptr": "*fp32",
            "p_ptr": "*fp32", "sin_ptr": "*fp32"}
    consts = {"HAS_P": True, "HAS_SCALE": True, "HAS_Q": True, "HAS_T": True, "BM": 32, "BK": 64, "BLK": 128}
    for k in (fp8_triton._act_quant_kernel, fp8_triton._act_quant_t_kernel, fp8_triton._weight_quant_kernel):
        signature, cx = {}, {}
        for i, n in enumerate(k.arg_names):
            signature[n] = ptrs.get(n, "constexpr" if n in consts else "i32")
            if n in consts:
                cx[(i,)] = consts[n]
        ttir = triton.compile(ASTSource(k, signature, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4}).asm["ttir"]
        assert "maxnumf" not in ttir and "minnumf" not in ttir and "maximumf" in ttir, k.fn.__name__


def test_activation_recomputation_drops_the_fp8_payloads():
    """The FP8 functions keep their payloads (FP8 inputs, weight copies, scales) through save_for_backward, so
    --recompute full drops them with the rest of a block's activations and recomputes them in backward: nothing FP8
    is kept for backward then (before, held on ctx, they outlived the checkpoint: 6.4 MB of FP8 payload on this
    model under every recompute setting), and the gradients are those of no recomputation, bit for bit."""
    from dsv3.training.loss import compute_loss

    cfg = tiny_cfg()
    res = {}
    for rec in ("none", "full"):
        m = build_model(cfg, seed=0)
        convert_to_fp8_training(m, backend="emulate", experts=True)
        m.set_recompute(rec)
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        x = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
        kept = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                kept[t.untyped_storage().data_ptr()] = t.dtype
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = m(x[:, :-1])
            loss = compute_loss(out, x[:, 1:], 0.3).total
        loss.backward()
        res[rec] = (sum(d == E4M3 for d in kept.values()), {n: p.grad for n, p in m.named_parameters()})
    assert res["none"][0] > 0 and res["full"][0] == 0
    for n, g in res["none"][1].items():
        assert (g is None and res["full"][1][n] is None) or torch.equal(g, res["full"][1][n]), n


def test_scaled_mm_glue_frees_dgrad_transients_before_wgrad(monkeypatch):
    """kernels.fp8._smm_bwd with recompute_w: the recomputed FP8 Wᵀ and the quantised dY of dgrad are freed before
    wgrad's own transients are made (F.scaled_mm recorded; the quantisers' references on the CPU)."""
    import gc

    import torch.nn.functional as F

    from conftest import weakrefs_of_outputs
    from dsv3.kernels import fp8 as kf

    monkeypatch.setattr(F, "scaled_mm", lambda a, b, sa, ra, sb, rb, output_dtype:
                        torch.zeros(a.shape[0], b.shape[1], dtype=output_dtype), raising=False)
    monkeypatch.setattr(F, "ScalingType", type("S", (), {"BlockWise1x128": 0, "BlockWise128x128": 1}), raising=False)
    monkeypatch.setattr(kf, "_WGRAD_DIRECT", {})
    made = []
    monkeypatch.setattr(kf, "weight_quant_pad_t", weakrefs_of_outputs(kf.weight_quant_pad_t, made))
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(70, 200, generator=gen), torch.randn(136, 200, generator=gen) * 0.05
    _, saved = kf._smm_fwd(x, w, torch.float32, True)
    monkeypatch.setattr(kf, "act_quant_cm", weakrefs_of_outputs(kf.act_quant_cm, made))  # backward's: dY's
    alive = []
    real_w = kf._wgrad_mm
    monkeypatch.setattr(kf, "_wgrad_mm", lambda *a: (gc.collect(), alive.append([r() is not None for r in made]),
                                                     real_w(*a))[2])
    kf._smm_bwd(torch.randn(70, 136, generator=gen), saved, torch.float32, torch.float32, True, True)
    assert len(made) == 4 and alive == [[False] * 4]  # Wᵀ, its scales, dY's FP8 and scales: gone by wgrad


def _fake_scaled_mm(a, b, sa, ra, sb, rb, output_dtype):
    """A stand-in for F.scaled_mm on the CPU (the layouts and shapes of the scaled_mm backend's glue; values unused)."""
    return (a.float() @ b.float()).to(output_dtype)


@pytest.mark.parametrize("which", ["reference", "scaled_mm"])
@pytest.mark.parametrize("shape", [(70, 200, 136), (128, 256, 384)])
@pytest.mark.parametrize("rw", [False, True])
def test_fp8_linear_ops_fakes_and_autograd_match_the_kernels(monkeypatch, which, shape, rw):
    """kernels.fp8_linear's two custom ops (dsv3::fp8_train_fwd / _bwd): torch.library.opcheck (schema, autograd
    registration, the fake implementations' shapes, dtypes and strides against the real outputs) for both backends'
    layouts (scaled_mm's glue on the CPU with F.scaled_mm stood in for), padded and aligned shapes, weights kept and
    recomputed; what torch.compile traces without running the kernels."""
    import torch.nn.functional as F

    from dsv3.kernels import fp8 as kf

    if which == "scaled_mm":
        monkeypatch.setattr(F, "scaled_mm", _fake_scaled_mm, raising=False)
        monkeypatch.setattr(F, "ScalingType", type("S", (), {"BlockWise1x128": 0, "BlockWise128x128": 1}),
                            raising=False)
        monkeypatch.setattr(kf, "_WGRAD_DIRECT", {})
    M, K, N = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen).requires_grad_()
    w = (torch.randn(N, K, generator=gen) * 0.05).requires_grad_()
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.dsv3.fp8_train_fwd.default, (x, w, torch.float32, which, rw), test_utils=utils)
    out = torch.ops.dsv3.fp8_train_fwd(x.detach(), w.detach(), torch.float32, which, rw)
    g = torch.randn(M, N, generator=gen)
    for need_dx, need_dw in ((True, True), (True, False), (False, True)):
        wa = w.detach() if rw else torch.empty(0)
        torch.library.opcheck(torch.ops.dsv3.fp8_train_bwd.default,
                              (g, *out[1:], wa, K, torch.float32, torch.float32, which, rw, need_dx, need_dw),
                              test_utils=utils[1:])  # (SchemaCheckMode compares e4m3 inputs: unsupported on the CPU)


def test_compiled_fp8_block_traces_whole_and_equals_eager():
    """torch.compile traces a block's FP8 linears (kernels.fp8_linear, custom ops with fakes) without a graph break:
    the dense block of the tiny model, its 8 swapped linears, compiles with fullgraph=True (a break raises), and its
    output and every gradient equal eager's. (They were torch.compiler.disable'd: a break at every linear.)"""
    from dsv3.model import rope

    cfg = tiny_cfg()
    m = build_model(cfg, seed=0)
    assert len(convert_to_fp8_training(m, backend="emulate")) > 0
    blk = m.layers[0]
    assert sum(isinstance(mod, FP8TrainLinear) for mod in blk.modules()) == 8  # q_a, q_b, kv_a, kv_b, o; gate, up, down
    pos = torch.arange(16).unsqueeze(0)
    cos, sin = rope.cos_sin(pos, m.rope_inv_freq, m.rope_factor)
    h = torch.randn(2, 16, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    res = []
    for fn in (blk, torch.compile(blk, fullgraph=True, backend="aot_eager")):
        blk.zero_grad(set_to_none=True)
        hr = h.clone().requires_grad_()
        out, _ = fn(hr, cos, sin)
        out.square().sum().backward()
        res.append([out.detach(), hr.grad, *[p.grad for p in blk.parameters()]])
    torch._dynamo.reset()
    for a, b in zip(*res):
        assert a is not None and torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()

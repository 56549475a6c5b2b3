"""FP8 weights for inference (dsv3/model/fp8.py): FP8Linear / FP8Experts compute exactly
F.linear(x, weight_dequant(...)); quantize_model_fp8 swaps exactly the official FP8 tensors; the
logits stay within a stated tolerance of the fp32 model; save -> load(keep_fp8=True) is bitwise;
load(keep_fp8=False) of the same files computes the same logits; `dsv3 quantize` end to end.

Run: python -m pytest tests/test_fp8.py -q        (CPU, a few seconds)
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import make_model, rand_ids, tiny_cfg
from dsv3.checkpoints.hf import CheckpointError, disk_layout, load_pretrained, save_pretrained
from dsv3.cli import main
from dsv3.checkpoints.hf import quantize_model_fp8
from dsv3.model.fp8 import FP8Experts, FP8Linear, linear_weight, swap_to_fp8
from dsv3.kernels import weight_dequant, weight_quant
from dsv3.model.moe import Experts

# Relative (Frobenius) error of the FP8 model's logits vs the fp32 model, on the ragged model below.
# Each quantised matrix carries ~2.6% RMS weight error (e4m3: 3 mantissa bits) and moves the logits by
# 0.2-3.7%; the ~20 contributions add in quadrature to the measured 8.7% (main) / 9.7% (MTP) at seed 0,
# 7.3-9.7% over seeds 0-2 (max abs 0.23 / 0.74 on logits of RMS 0.7). Tolerance, with margin:
FP8_REL_TOL = 0.12

FP8_MODULES = {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj"}  # SPEC §6.2; not eh_proj, embeddings, head, router


def fp8_cfg(**kw):
    """Ragged FP8 sizes: hidden 192 (1.5 blocks), kv_a 576 rows (4.5 blocks, as official), experts 144
    wide, dense FFN 320; init std 0.05 so that every branch matters to the logits (RMS 0.7)."""
    base = dict(vocab_size=160, hidden_size=192, intermediate_size=320, moe_intermediate_size=144,
                num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
                q_lora_rank=96, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
                n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, initializer_range=0.05,
                num_nextn_predict_layers=1)
    base.update(kw)
    return tiny_cfg(**base)


@pytest.fixture(scope="module")
def dense():
    return make_model(fp8_cfg(), seed=0, bias_std=0.3)


@pytest.fixture(scope="module")
def fp8(dense):
    return quantize_model_fp8(copy.deepcopy(dense))


@pytest.fixture(scope="module")
def ids():
    return rand_ids(fp8_cfg(), 2, 16)


def fp8_tensors(model) -> dict[str, torch.Tensor]:
    """state_dict entries of the FP8 modules (weights and scales)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (FP8Linear, FP8Experts)):
            out.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float8_e4m3fn:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# modules

def test_fp8_linear_is_dequantize_then_linear():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(200, 300, bias=False)  # ragged: 2.34 x 1.56 blocks
    with torch.no_grad():
        lin.weight.copy_(torch.randn(300, 200, generator=g) * 0.05)
    m = FP8Linear.from_linear(lin)
    q, s = weight_quant(lin.weight.detach())
    assert (m.in_features, m.out_features) == (200, 300)
    assert set(m.state_dict()) == {"weight", "weight_scale_inv"}  # the official names
    assert same_bits(m.weight, q) and same_bits(m.weight_scale_inv, s) and s.shape == (3, 2)
    assert list(m.parameters()) == [] and not m.weight.requires_grad  # inference state, never trained
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 200, generator=g).to(dtype)
        y = m(x)
        assert y.dtype == dtype and torch.equal(y, F.linear(x, weight_dequant(q, s, dtype=dtype)))
        assert torch.equal(linear_weight(m, dtype), weight_dequant(q, s, dtype=dtype))
        assert torch.equal(m.dequantized_weight(dtype), weight_dequant(q, s, dtype=dtype))
    assert linear_weight(lin, torch.float32) is lin.weight  # plain nn.Linear: its weight (autograd intact)
    assert torch.equal(linear_weight(lin, torch.bfloat16), lin.weight.bfloat16())
    with pytest.raises(TypeError):
        linear_weight(nn.Embedding(3, 4), torch.float32)
    with pytest.raises(ValueError, match="bias"):
        FP8Linear.from_linear(nn.Linear(4, 4))

    # gradients flow to the input only
    x = torch.randn(3, 200, generator=g, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and m.weight.grad is None

    # dtype casts of the module move nothing and change no format; device moves and to_empty work
    for cast in (lambda t: t.to(torch.bfloat16), lambda t: t.half(), lambda t: t.float(), lambda t: t.double()):
        cast(m)
        assert same_bits(m.weight, q) and same_bits(m.weight_scale_inv, s)
    m.to("meta")
    assert m.weight.is_meta and m.weight.dtype == torch.float8_e4m3fn
    m.to_empty(device="cpu")
    assert m.weight.device.type == "cpu" and m.weight_scale_inv.dtype == torch.float32


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_fp8_experts_equal_dense_experts_on_dequantized_weights(impl):
    cfg = fp8_cfg()
    g = torch.Generator().manual_seed(1)
    ex = Experts(cfg)
    with torch.no_grad():
        for p in (ex.gate_proj, ex.up_proj, ex.down_proj):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    q = FP8Experts.from_experts(ex)
    E, I, D = ex.gate_proj.shape
    assert q.gate_proj.dtype == torch.float8_e4m3fn and q.gate_proj.shape == (E, I, D)
    assert q.gate_proj_scale_inv.shape == (E, 2, 2) and q.down_proj_scale_inv.shape == (E, 2, 2)  # 144, 192
    assert list(q.parameters()) == []
    ref = Experts(cfg)  # dense experts holding exactly the dequantised weights
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            w, s = getattr(q, name), getattr(q, name + "_scale_inv")
            assert same_bits(w[1], weight_quant(getattr(ex, name)[1].detach())[0])  # per-expert blocks
            getattr(ref, name).copy_(torch.stack([weight_dequant(w[e], s[e], torch.float32) for e in range(E)]))
    for e in (None, 2):
        for a, b in zip(q.weights(e, torch.float32), ref.weights(e, torch.float32)):
            assert torch.equal(a, b)
    assert q.weights(0)[0].dtype == torch.bfloat16
    N, K = 10, cfg.num_experts_per_tok
    x = torch.randn(N, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    w = torch.rand(N, K, generator=g)
    assert torch.equal(q(x, idx, w, impl), ref(x, idx, w, impl))


# ------------------------------------------------------------------------------------------------
# quantize_model_fp8

def test_quantize_model_fp8_swaps_exactly_the_official_fp8_matrices(dense, fp8, tmp_path):
    names = {name for name, m in fp8.named_modules() if isinstance(m, (FP8Linear, FP8Experts))}
    want = {name for name, m in dense.named_modules() if name.split(".")[-1] in FP8_MODULES | {"experts"}}
    # 5 attention matrices x 3 blocks (MTP included), the dense FFN, 2 x (shared FFN + stacked experts)
    assert names == want and len(names) == 3 * 5 + 3 + 2 * (3 + 1)
    assert isinstance(fp8.layers[1].mlp.experts, FP8Experts)
    assert fp8.layers[0].self_attn.kv_a_proj_with_mqa.weight_scale_inv.shape == (5, 2)  # 576 x 192
    for keep in ("lm_head", "mtp.0.eh_proj"):  # stay high precision
        assert isinstance(fp8.get_submodule(keep), nn.Linear)
    assert isinstance(fp8.embed_tokens, nn.Embedding) and fp8.layers[1].mlp.gate.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.requires_grad for p in fp8.parameters())
    assert all(not t.requires_grad for t in fp8_tensors(fp8).values())
    assert quantize_model_fp8(fp8) is fp8  # idempotent: FP8 modules stay as they are

    # the in-memory quantisation is bit for bit what save_pretrained(fp8=True) writes for the dense model,
    # and saving the FP8 model writes its FP8 bytes as they are (official names, quantization_config)
    save_pretrained(dense, tmp_path / "a", fp8=True)
    save_pretrained(fp8, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert set(a) == set(b) and sum(t.dtype == torch.float8_e4m3fn for t in b.values()) == 3 * 5 + 3 + 2 * (3 + 4 * 3)
    assert all(same_bits(a[k], b[k]) for k in a)
    conf = json.loads((tmp_path / "b" / "config.json").read_text())
    assert conf["quantization_config"]["weight_block_size"] == [128, 128]


def test_fp8_logits_within_tolerance_of_fp32(dense, fp8, ids):
    with torch.no_grad():
        a, b = dense(ids), fp8(ids)
    for la, lb in ((a.logits, b.logits), (a.mtp_logits[0], b.mtp_logits[0])):
        rel = ((la - lb).norm() / la.norm()).item()
        assert 0.01 < rel < FP8_REL_TOL, rel  # nonzero: the weights really are rounded
    # both expert paths agree on the FP8 model
    m = copy.deepcopy(fp8)
    m.set_experts_impl("grouped")
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, b.logits, atol=1e-5)


def test_fp8_memory_is_a_quarter(dense, fp8):
    dense_sd, fp8_sd = dense.state_dict(), fp8.state_dict()
    swapped = fp8_tensors(fp8)
    weights = [k for k in swapped if not k.endswith("_scale_inv")]
    fp32_bytes = sum(dense_sd[k].numel() * dense_sd[k].element_size() for k in weights)
    fp8_bytes = sum(t.numel() * t.element_size() for t in swapped.values())  # fp8 weights + fp32 scales
    assert 0.25 < fp8_bytes / fp32_bytes < 0.2502  # scales: 4 bytes per 128x128 block (fewer if ragged)
    total = lambda sd: sum(t.numel() * t.element_size() for t in sd.values())  # noqa: E731
    assert total(fp8_sd) < 0.45 * total(dense_sd)  # embeddings, head, norms, router stay fp32


# ------------------------------------------------------------------------------------------------
# checkpoints

def test_save_load_keep_fp8_is_bitwise(fp8, ids, tmp_path):
    save_pretrained(fp8, tmp_path, max_shard_bytes=200_000)  # sharded: scales may sit in other shards
    assert (tmp_path / "model.safetensors.index.json").exists()
    kept = load_pretrained(tmp_path, keep_fp8=True).eval()
    assert next(kept.parameters()).dtype == torch.float32
    want, got = fp8_tensors(fp8), fp8_tensors(kept)
    assert set(got) == set(want) and all(same_bits(got[k], want[k]) for k in want)
    for k, v in fp8.state_dict().items():
        assert same_bits(kept.state_dict()[k], v), k
    with torch.no_grad():
        a, b = fp8(ids), kept(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits[0], b.mtp_logits[0])

    # the same files loaded dequantised: dense modules, same math, identical logits
    deq = load_pretrained(tmp_path, keep_fp8=False).eval()
    assert not fp8_tensors(deq)
    w = kept.layers[1].self_attn.kv_b_proj
    assert torch.equal(deq.layers[1].self_attn.kv_b_proj.weight, linear_weight(w, torch.float32))
    with torch.no_grad():
        c = deq(ids)
    assert torch.equal(c.logits, b.logits) and torch.equal(c.mtp_logits[0], b.mtp_logits[0])

    # bf16 activations: the FP8 bytes are still the file's, everything else is bf16
    bf = load_pretrained(tmp_path, dtype=torch.bfloat16, keep_fp8=True).eval()
    assert all(same_bits(fp8_tensors(bf)[k], want[k]) for k in want)
    with torch.no_grad():
        lb = bf(ids).logits
    assert lb.dtype == torch.bfloat16 and ((lb.float() - b.logits).norm() / b.logits.norm()) < 0.05

    # a dense checkpoint loads dense whatever keep_fp8 says
    save_pretrained(deq, tmp_path / "dense")
    assert not fp8_tensors(load_pretrained(tmp_path / "dense", keep_fp8=True))


def test_keep_fp8_follows_the_file_tensor_by_tensor(dense, tmp_path):
    """Only what the file stores in FP8 is kept FP8: a matrix stored in bf16 stays an nn.Linear, and an
    Experts module with one expert in bf16 loads dense (one storage format per stacked tensor)."""
    save_pretrained(dense, tmp_path, fp8=True)
    t = load_file(tmp_path / "model.safetensors")
    for k in ("model.layers.0.self_attn.q_b_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight"):
        t[k] = weight_dequant(t[k], t.pop(k + "_scale_inv"), dtype=torch.bfloat16)
    save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})
    kept = load_pretrained(tmp_path, keep_fp8=True)
    assert isinstance(kept.layers[0].self_attn.q_b_proj, nn.Linear)
    assert isinstance(kept.layers[0].self_attn.q_a_proj, FP8Linear)
    assert type(kept.layers[1].mlp.experts) is Experts and isinstance(kept.mtp[0].mlp.experts, FP8Experts)
    layout = disk_layout(kept)
    sd = kept.state_dict()
    for disk, slot in layout.items():
        mem = sd[slot.param] if slot.expert is None else sd[slot.param][slot.expert]
        if mem.dtype == torch.float8_e4m3fn or disk.endswith("_scale_inv"):
            assert same_bits(mem, t[disk]), disk  # kept: the file's bytes
        elif t[disk].dtype == torch.float8_e4m3fn:  # dense module: dequantised
            assert torch.equal(mem, weight_dequant(t[disk], t[disk + "_scale_inv"], torch.float32)), disk
    # all 48 FP8 tensors but q_b_proj and layer 1's 4 x 3 expert matrices
    assert len([d for d in layout if d.endswith("_scale_inv")]) == 48 - 1 - 12


@pytest.mark.parametrize("keep", [False, True])
def test_block_scales_of_other_dtypes_are_refused_however_loaded(dense, tmp_path, keep):
    """An integer weight_scale_inv is refused by name whether the weight loads FP8 or dequantised (the dense load
    multiplied the e4m3 bytes by the integers: other numbers, silently)."""
    save_pretrained(dense, tmp_path, fp8=True)
    t = load_file(tmp_path / "model.safetensors")
    s = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    t[s] = torch.full_like(t[s], 3, dtype=torch.int32)
    save_file(t, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensors of other dtypes .*\(1\):\n    {s}: I32"):
        load_pretrained(tmp_path, keep_fp8=keep)


def test_swap_to_fp8_refuses_other_modules(dense):
    with pytest.raises(ValueError, match="cannot store"):
        swap_to_fp8(copy.deepcopy(dense), ["embed_tokens.weight"])


# ------------------------------------------------------------------------------------------------
# dsv3 quantize

def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_quantize_cli(dense, fp8, ids, tmp_path):
    src = tmp_path / "src"
    save_pretrained(dense, src)  # fp32 checkpoint + a tokenizer file
    (src / "tokenizer.json").write_text('{"model": "stand-in"}')
    (src / "chat_template.jinja").write_text("{{ messages }}")  # where transformers 5 saves the chat template

    rc, out, err = run_cli("quantize", str(src), str(tmp_path / "q32"), "--dtype", "float32")
    assert rc == 0, err
    assert "26 FP8 modules" in out and "tokenizer.json" in out
    q32 = tmp_path / "q32"
    assert (q32 / "tokenizer.json").read_text() == '{"model": "stand-in"}'
    assert (q32 / "chat_template.jinja").read_text() == "{{ messages }}"
    assert json.loads((q32 / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    kept = load_pretrained(q32, keep_fp8=True).eval()
    with torch.no_grad():
        assert torch.equal(kept(ids).logits, fp8(ids).logits)  # = quantize_model_fp8 in memory

    # an FP8 checkpoint as input: its FP8 tensors are copied bit for bit; the rest goes to bf16 (default)
    (tmp_path / "q16").mkdir()  # an empty output directory is fine
    rc, out, err = run_cli("quantize", str(q32), str(tmp_path / "q16"))
    assert rc == 0, err
    a, b = load_file(q32 / "model.safetensors"), load_file(tmp_path / "q16" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        if a[k].dtype == torch.float8_e4m3fn or k.endswith(("_scale_inv", "e_score_correction_bias")):
            assert same_bits(a[k], b[k]), k
        else:
            assert b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].bfloat16()), k
    assert (tmp_path / "q16" / "tokenizer.json").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # no temporary directory left


def test_quantize_cli_errors(dense, tmp_path):
    src = tmp_path / "src"
    save_pretrained(dense, src)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    (tmp_path / "file").write_text("")
    for out in ("full", "file"):
        rc, _, err = run_cli("quantize", str(src), str(tmp_path / out))
        assert rc == 2 and "already exists and is not an empty directory" in err
    assert (tmp_path / "full" / "x").read_text() == "keep me"

    rc, _, err = run_cli("quantize", str(tmp_path / "nowhere"), str(tmp_path / "o1"))
    assert rc == 2 and "neither a checkpoint directory" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text(json.dumps(fp8_cfg().to_dict()))
    rc, _, err = run_cli("quantize", str(tmp_path / "junk"), str(tmp_path / "o2"))
    assert rc == 2 and "no model.safetensors" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_engine_serves_fp8_weights_as_fp8(fp8, tmp_path):
    """load_engine keeps an FP8 checkpoint's weights in FP8 and decodes with them (absorbed MLA dequantises
    kv_b_proj; FP8 experts; the MTP module drafts): greedy output equals the same FP8 model run uncached."""
    from dsv3.inference.engine import SamplingParams, load_engine
    from dsv3.inference.naive import generate_naive
    from dsv3.tokenizer import DSTokenizer

    save_pretrained(fp8, tmp_path)
    DSTokenizer.train(["abc def ghi " * 40], 300).save(tmp_path)
    for k in (0, 2):
        engine, _ = load_engine(str(tmp_path), device="cpu", speculative_k=k)
        assert sum(isinstance(m, (FP8Linear, FP8Experts)) for m in engine.model.modules()) > 0
        prompt = [3, 17, 42, 5, 9]
        # W_UK / W_UV dequantised once when the engine is built (MLA.cache_absorbed_weights), not per step
        kv_b = [m.self_attn.kv_b_proj for m in engine.model.modules() if hasattr(m, "self_attn")]
        assert kv_b and all(isinstance(lin, FP8Linear) for lin in kv_b)
        calls = []
        orig = FP8Linear.dequantized_weight
        FP8Linear.dequantized_weight = lambda self, *a, **kw: calls.append(self) or orig(self, *a, **kw)
        try:
            out = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0]
        finally:
            FP8Linear.dequantized_weight = orig
        assert not any(c in kv_b for c in calls)
        assert out.token_ids == generate_naive(fp8, prompt, 8, temperature=0)


@pytest.mark.parametrize("dim, lo, hi", [(0, 128, 256), (0, 256, 300), (1, 0, 128), (1, 128, 200),  # on blocks
                                         (0, 64, 192), (1, 100, 228)])  # cutting blocks: dequantised
def test_attention_tp_slices_fp8_linears_exactly(dim, lo, hi):
    """Tensor-parallel serving (dsv3/distributed/attention_tp.py) cuts FP8 projections in their 128x128
    scale blocks where the cut falls on block boundaries (the slice stays FP8, bytes and scales unchanged),
    else dequantises first: either way the slice's weight is exactly the dense weight's slice."""
    from dsv3.distributed.attention_tp import _slice_linear
    from dsv3.model.fp8 import FP8Linear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(260, 300, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(300, 260, generator=g) * 0.05)
    q = FP8Linear.from_linear(lin)
    dense = q.dequantized_weight(torch.float32)
    part = _slice_linear(q, dim, lo, hi, torch.float32)
    on_blocks = lo % 128 == 0 and (hi % 128 == 0 or hi == dense.shape[dim])
    assert isinstance(part, FP8Linear) == on_blocks
    w = part.dequantized_weight(torch.float32) if on_blocks else part.weight
    assert torch.equal(w, dense.narrow(dim, lo, hi - lo))
    x = torch.randn(3, part.in_features if on_blocks else w.shape[1], generator=g)
    assert torch.allclose(part(x), x @ w.T, atol=1e-5)


def test_absorbed_weights_cached_once_and_dropped_on_move(dense, fp8):
    """MLA.cache_absorbed_weights: FP8 kv_b_proj dequantised once into W_UK / W_UV, which kv_b_weights then
    returns (equal to dequantising anew); a move or cast drops the copy; 16-bit weights need none."""
    from dsv3.model.mla import MLA

    m = copy.deepcopy(fp8)
    attn = next(x for x in m.modules() if isinstance(x, MLA))
    fresh = attn.kv_b_weights(torch.float32)
    assert attn.cache_absorbed_weights(torch.float32)
    uk, uv = attn.kv_b_weights(torch.float32)
    assert uk is attn._absorbed[1] and torch.equal(uk, fresh[0]) and torch.equal(uv, fresh[1])
    assert attn.kv_b_weights(torch.float64)[0] is not uk  # another dtype: dequantised anew
    assert attn.cache_absorbed_weights(torch.float32) and attn.kv_b_weights(torch.float32)[0] is uk  # kept
    key = attn._absorbed[0]
    attn._absorbed = ((*key[:2], key[2] + 1, key[3]), uk, uv)  # made for another head count (attention TP)
    assert attn.kv_b_weights(torch.float32)[0] is not uk  # not used
    assert attn.cache_absorbed_weights(torch.float32) and attn._absorbed[0] == key  # rebuilt
    attn.load_state_dict(attn.state_dict())
    assert attn._absorbed is None  # a load: new weights
    assert attn.cache_absorbed_weights(torch.float32)
    m.to(torch.float32)
    assert attn._absorbed is None
    assert not next(x for x in copy.deepcopy(dense).modules() if isinstance(x, MLA)).cache_absorbed_weights(
        torch.float32)

"""Shared tiny configs and helpers for the CPU model/checkpoint tests.

Run: python -m pytest tests/ -q
Everything here is fp32 on the CPU and small enough that each test takes at most a few seconds.
"""

from __future__ import annotations

import contextlib
import io
import os
import random

import pytest
import torch

from dsv3.config import ModelConfig
from dsv3.model import Transformer, build_model
from dsv3.model.moe import Router

# The tensors here are tiny: intra-op threading only adds synchronisation, and on a loaded 2-core
# machine OpenMP spin-waits make a 3 ms forward take ~1 s. One thread keeps the suite fast everywhere.
torch.set_num_threads(1)


def tiny_cfg(**overrides) -> ModelConfig:
    """1 dense layer then 2 MoE layers, 8 experts in 4 groups (top-2 groups, top-2 experts), q-LoRA,
    one MTP module, plain RoPE. Large init std so that routing and attention are non-trivial."""
    base = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, max_position_embeddings=256, rope_scaling=None,
        num_nextn_predict_layers=1, initializer_range=0.1, torch_dtype="float32",
    )
    base.update(overrides)
    return ModelConfig(**base).validate()


def yarn(factor: float = 4.0, original: int = 32, mscale: float = 1.0, mscale_all_dim: float = 1.0,
         beta_fast: float = 32, beta_slow: float = 1) -> dict:
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": beta_fast, "beta_slow": beta_slow, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


def randomize_bias(model: Transformer, std: float, seed: int = 123) -> None:
    """Random e_score_correction_bias in every router (including MTP ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in model.routers():
            r.e_score_correction_bias.copy_(torch.randn(r.e_score_correction_bias.shape, generator=g) * std)


def make_model(cfg: ModelConfig, seed: int = 0, bias_std: float = 0.0) -> Transformer:
    model = build_model(cfg, seed=seed)
    if bias_std:
        randomize_bias(model, bias_std, seed + 1000)
    return model.eval()


def decode_step(model, prompts=((1, 2, 3, 4, 5), (7, 8, 9)), after_prefill=None, **engine_kw):
    """Prefill `prompts` (one engine step), then one teacher-forced static decode step (bucketed: what a CUDA graph
    records; run eagerly on the CPU) -> (its logits (B, V) in fp32, the engine). `after_prefill` runs between the
    two; engine_kw go to Engine (max_batch_size: len(prompts) unless given)."""
    from dsv3.inference.engine import Engine, SamplingParams

    eng = Engine(model, None, **{"max_batch_size": len(prompts), "cuda_graphs": True, **engine_kw})
    for p in prompts:
        eng.add_request(list(p), SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    eng.step()  # prefill
    if after_prefill is not None:
        after_prefill()
    reqs = eng.running
    args = ([[r.tokens[-1]] for r in reqs], [r.main_len for r in reqs], [r.blocks for r in reqs])
    return eng._graphs.main(*args)[0][:, 0].float().clone(), eng


def random_experts(fp8: bool = False, dtype: torch.dtype = torch.float32):
    """The routed experts of tiny_cfg() with N(0, 0.1) weights (seed 1), in `dtype` or as FP8Experts ->
    (module, cfg)."""
    from dsv3.model.fp8 import FP8Experts
    from dsv3.model.moe import Experts

    cfg = tiny_cfg()
    m = Experts(cfg)
    g = torch.Generator().manual_seed(1)
    for p in m.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    return (FP8Experts.from_experts(m) if fp8 else m.to(dtype)), cfg


def rand_ids(cfg: ModelConfig, B: int = 2, T: int = 16, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


@contextlib.contextmanager
def capture_router_io(model: Transformer):
    """Yields a list that fills with (router, input x_ND, (w_NK, idx_NK, s_NE)) per router call."""
    calls = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp[0].detach(), out)))
             for m in model.modules() if isinstance(m, Router)]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture
def cfg() -> ModelConfig:
    return tiny_cfg()


@pytest.fixture
def model(cfg) -> Transformer:
    return make_model(cfg, seed=0, bias_std=0.3)


def _interpreter_available() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Triton kernels run on CPU tensors under the interpreter: TRITON_INTERPRET=1 python -m pytest ...
needs_interpreter = pytest.mark.skipif(not _interpreter_available(),
                                       reason="needs triton and TRITON_INTERPRET=1 (the Triton CPU interpreter)")


def weakrefs_of_outputs(f, made: list):
    """f wrapped to append a weakref to each tensor it returns to `made` (tests that check what a backward has freed
    by some point)."""
    import weakref

    def g(*a, **k):
        out = f(*a, **k)
        made.extend(weakref.ref(t) for t in out)
        return out
    return g


def bench_module(name: str):
    """bench/<name>.py imported as a module (the bench scripts are not a package) -> the module."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(argv) -> tuple[int, str, str]:
    """`dsv3 ARGV` in this process -> (exit status, stdout, stderr)."""
    from dsv3.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def write_corpus(root, n_files: int = 40, seed: int = 0) -> str:
    """A deterministic directory of small Python-like files (training data for the CLI tests)."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "count", "total", "items", "index", "result"]
    os.makedirs(root, exist_ok=True)
    for i in range(n_files):
        lines = [f"def {rng.choice(names)}_{j}(x):\n    return x + {rng.randint(0, 99)}\n" for j in range(30)]
        with open(os.path.join(root, f"f{i:02d}.py"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
    return str(root)


def sweep_on_cpu(monkeypatch, *modules) -> None:
    """Run the GEMV sweep benches (bench/fp8_gemv_sweep.py, bench/dense_gemv_sweep.py) on the CPU to check their
    plumbing: in each module DEVICE "cpu", ACT float16 (the interpreter lacks bf16), one plain call per timing
    instead of a CUDA graph; and a stub for the copy-bandwidth measurement. The caller sets tiny shapes."""
    import sys
    import time
    import types

    import torch

    def plain_us(fn, calls, reps):
        t = time.perf_counter()
        fn(calls - 1)
        return (time.perf_counter() - t) * 1e6

    for m in modules:
        monkeypatch.setattr(m, "DEVICE", "cpu")
        monkeypatch.setattr(m, "ACT", torch.float16)
        monkeypatch.setattr(m, "graph_us", plain_us)
    monkeypatch.setitem(sys.modules, "bandwidth", types.SimpleNamespace(
        copy_bandwidth=lambda device: dict(bytes_per_s=1e10, caption="stub bandwidth")))

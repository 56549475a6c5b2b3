"""Absurd configs fail fast and in one line (issue 13, "Absurd configs"): validation and `dsv3 info` are
arithmetic in the config's sizes (no loop over layers or experts, no model built); the loader compares
the config with the file before any per-layer or per-expert work; loading, building and training
compare the memory they need with what the device has; the tokenizer trainer refuses a vocabulary it
cannot (or must not) learn before training. Each test would hang, abort the process or fail on the
code before these checks; the per-layer work is caught by monkeypatching it to raise, the time bound
is a second guard.

Run: python -m pytest tests/test_absurd_configs.py -q
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import dsv3.memory
from dsv3.checkpoints import hf
from dsv3.checkpoints.hf import CheckpointError, load_pretrained, save_pretrained
from dsv3.cli import main
from dsv3.config import ConfigError, ModelConfig
from dsv3.info import model_info
from dsv3.memory import InsufficientMemoryError
from dsv3.model import build_model
from dsv3.model.moe import Experts
from dsv3.model.transformer import Transformer
from conftest import tiny_cfg

FAST = 2.0  # seconds; the old code took minutes (or forever) on these configs


def _no_model(*args, **kwargs):
    raise AssertionError("a model skeleton was built")


def _no_tokenizer_training(*args, **kwargs):
    raise AssertionError("the tokenizer trainer was called")


# ------------------------------------------------------------------------------------------------
# validation and `dsv3 info`: O(1) in the sizes

def test_num_moe_layers_matches_the_layer_walk():
    for L in range(1, 8):
        for k in range(L + 1):
            for f in (1, 2, 3):
                for E in (0, 8):
                    cfg = SimpleNamespace(num_hidden_layers=L, first_k_dense_replace=k, moe_layer_freq=f,
                                          n_routed_experts=E)
                    for a in range(L + 2):
                        for b in range(a, L + 3):
                            want = sum(ModelConfig.is_moe_layer(cfg, i) for i in range(a, min(b, L)))
                            assert ModelConfig.num_moe_layers(cfg, a, b) == want, (L, k, f, E, a, b)


@pytest.mark.parametrize("changes", [
    dict(num_hidden_layers=10**12, first_k_dense_replace=0),  # all MoE: the old "any dense layer?" walked them all
    dict(num_hidden_layers=10**12, first_k_dense_replace=10**12, n_routed_experts=0, num_nextn_predict_layers=0),
    dict(num_hidden_layers=10**12, first_k_dense_replace=0, moe_layer_freq=7),
])
def test_validation_does_not_walk_the_layers(monkeypatch, changes):
    monkeypatch.setattr(ModelConfig, "is_moe_layer", lambda self, i: pytest.fail("validation walked the layers"))
    t0 = time.perf_counter()
    cfg = tiny_cfg(**changes)
    assert time.perf_counter() - t0 < FAST
    assert cfg.num_hidden_layers == 10**12


def _meta_counts(cfg: ModelConfig) -> dict:
    """Parameter counts of a model built on the meta device (what dsv3 info counted before)."""
    with torch.device("meta"):
        m = Transformer(cfg)

    def numel(mod):
        return sum(p.numel() for p in mod.parameters()) + sum(
            b.numel() for n, b in mod.named_buffers() if n.endswith("e_score_correction_bias"))

    def inactive(blocks):  # the routed experts a token does not use
        return sum(numel(b.mlp.experts) // cfg.n_routed_experts * (cfg.n_routed_experts - cfg.num_experts_per_tok)
                   for b in blocks if isinstance(getattr(b.mlp, "experts", None), Experts))

    mtp = sum(numel(b) for b in m.mtp)
    total = numel(m) - mtp
    return {"total": total, "mtp_unique": mtp, "activated": total - inactive(m.layers),
            "mtp_activated": mtp - inactive(m.mtp), "n_moe_layers": sum(isinstance(getattr(b.mlp, "experts", None), Experts) for b in m.layers)}


@pytest.mark.parametrize("changes", [
    {},
    dict(q_lora_rank=None),
    dict(n_routed_experts=0, first_k_dense_replace=3),  # all dense, the MTP block dense too
    dict(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2, num_nextn_predict_layers=2),
    dict(n_shared_experts=0, first_k_dense_replace=0, num_nextn_predict_layers=0),
    dict(n_shared_experts=3, intermediate_size=0, first_k_dense_replace=0),
])
def test_info_arithmetic_matches_the_built_modules(changes):
    cfg = tiny_cfg(**changes)
    i = model_info(cfg)
    for k, v in _meta_counts(cfg).items():
        assert getattr(i, k) == v, k


@pytest.mark.parametrize("layers", [1_000_000, 10**12])
def test_info_of_a_huge_config_builds_no_model(tmp_path, monkeypatch, capsys, layers):
    cfg = tiny_cfg(num_hidden_layers=layers, first_k_dense_replace=0)
    cfg.to_json(tmp_path / "config.json")
    monkeypatch.setattr(Transformer, "__init__", _no_model)
    t0 = time.perf_counter()
    assert main(["info", "--config", str(tmp_path / "config.json")]) == 0
    assert time.perf_counter() - t0 < FAST
    assert f"{layers} (0 dense, {layers} MoE)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# the loader: config.json against the file, before any per-layer or per-expert work

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint: 3 layers + 1 MTP module (layers 0..3 on disk), 8 experts, vocab 128, width 32."""
    d = tmp_path_factory.mktemp("ckpt")
    save_pretrained(build_model(tiny_cfg(), seed=0), d)
    return d


def _with_config(ckpt, dst, sharded: bool = False, **changes):
    """A copy of checkpoint `ckpt` in `dst` whose config.json claims `changes` (written unvalidated)."""
    dst.mkdir()
    for f in ckpt.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if sharded:  # the same tensors under an index naming one shard
        (dst / "model.safetensors").rename(dst / "model-00001-of-00001.safetensors")
        with safe_open(str(dst / "model-00001-of-00001.safetensors"), "pt") as f:
            names = list(f.keys())
        (dst / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    d = json.loads((dst / "config.json").read_text())
    d.update(changes)
    (dst / "config.json").write_text(json.dumps(d))
    return dst


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("changes, message", [
    (dict(num_hidden_layers=1_000_000), "config.json says num_hidden_layers=1000000 but {src} holds layers 0..3"),
    (dict(n_routed_experts=10**9), "config.json says n_routed_experts=1000000000 but {src} holds routed experts 0..7"),
    (dict(num_nextn_predict_layers=10**9),
     "config.json says num_nextn_predict_layers=1000000000 (MTP layers 3..1000000002) but {src} holds layers 0..3"),
    (dict(vocab_size=10**12), "config.json says vocab_size=1000000000000, hidden_size=32 but {src} holds "
                              "model.embed_tokens.weight of shape [128, 32]"),
    (dict(hidden_size=10**9), "config.json says vocab_size=128, hidden_size=1000000000 but {src} holds "
                              "model.embed_tokens.weight of shape [128, 32]"),
])
def test_loader_compares_sizes_with_the_file_first(ckpt, tmp_path, monkeypatch, changes, message, sharded):
    path = _with_config(ckpt, tmp_path / "c", sharded, **changes)
    src = "model.safetensors.index.json" if sharded else "model.safetensors"
    monkeypatch.setattr(hf, "_meta_model", _no_model)
    monkeypatch.setattr(hf, "disk_layout", _no_model)  # no list of expected names either
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    assert time.perf_counter() - t0 < FAST
    assert message.format(src=src) in str(e.value)
    assert "\n" not in str(e.value)


def test_loader_still_loads_a_consistent_checkpoint(ckpt):
    """The size check lets a checkpoint that matches its config through."""
    m = load_pretrained(ckpt)
    assert m.config.num_hidden_layers == 3 and m.config.n_routed_experts == 8


def test_loader_refuses_a_model_the_device_cannot_hold(ckpt, monkeypatch):
    monkeypatch.setattr(dsv3.memory, "available_bytes", lambda device: 1000)
    monkeypatch.setattr(hf, "_meta_model", _no_model)  # refused before the skeleton
    with pytest.raises(InsufficientMemoryError) as e:
        load_pretrained(ckpt)
    msg = str(e.value)
    assert "\n" not in msg and "this CPU has 1.0 kB available" in msg and "DSV3_SKIP_MEMORY_CHECK=1" in msg
    monkeypatch.undo()
    monkeypatch.setattr(dsv3.memory, "available_bytes", lambda device: 1000)
    monkeypatch.setenv("DSV3_SKIP_MEMORY_CHECK", "1")  # the escape hatch
    assert load_pretrained(ckpt).config.num_hidden_layers == 3


# ------------------------------------------------------------------------------------------------
# memory: building and training refuse in one line

def test_build_model_refuses_before_allocating(monkeypatch):
    monkeypatch.setattr(dsv3.memory, "available_bytes", lambda device: 10**9)
    monkeypatch.setattr(Transformer, "__init__", _no_model)
    with pytest.raises(InsufficientMemoryError, match=r"the model needs [\d.,]+ [kMGTPE]?B for its float32 weights \([\d,]+ parameters\); "
                                                      r"this CPU has 1\.0 GB available"):
        build_model(tiny_cfg(hidden_size=10**9))


def _train_cli(tmp_path, monkeypatch, **changes):
    import dsv3.tokenizer

    monkeypatch.setattr(dsv3.tokenizer, "train_tokenizer", _no_tokenizer_training)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("def f(x):\n    return x + 1\n" * 50)
    cfg = tmp_path / "absurd.json"
    d = tiny_cfg().to_dict()
    d.update(changes)
    cfg.write_text(json.dumps(d))
    out = tmp_path / "run"
    t0 = time.perf_counter()
    rc = main(["train", "--config", str(cfg), "--data", str(data), "--out", str(out), "--cache-dir",
               str(tmp_path / "cache"), "--no-progress", "--steps", "1"])
    assert time.perf_counter() - t0 < 10 * FAST
    assert not out.exists()  # refused before the run directory, the tokenizer or the data
    return rc


@pytest.mark.parametrize("changes", [dict(hidden_size=10**9), dict(vocab_size=10**12)])
def test_train_refuses_what_memory_cannot_hold(tmp_path, monkeypatch, capsys, changes):
    monkeypatch.setattr(dsv3.memory, "available_bytes", lambda device: 21_300_000_000)
    assert _train_cli(tmp_path, monkeypatch, **changes) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("dsv3 train: error: the model needs ")
    assert "for fp32 weights + gradients + AdamW state" in err and err.endswith(
        "this CPU has 21.3 GB available (set DSV3_SKIP_MEMORY_CHECK=1 to try anyway)")


def test_train_memory_needs_optimizer_state_or_sharding_weights(monkeypatch):
    from dsv3.training.config import TrainConfig
    from dsv3.training.pretrain import check_memory

    cfg = tiny_cfg()
    n = model_info(cfg).total + model_info(cfg).mtp_unique
    tc0 = TrainConfig()
    # plus the logits of one micro-batch with their gradients, main head and each MTP depth (fp32)
    n_logits = tc0.batch_size * tc0.seq_len * cfg.vocab_size * 4 * 2 * (1 + cfg.num_nextn_predict_layers)
    cpu = torch.device("cpu")
    for avail, world, state, ok in ((16 * n + n_logits, 1, "fp32", True), (16 * n + n_logits - 1, 1, "fp32", False),
                                    (12 * n + n_logits, 1, "bf16", True), (12 * n + n_logits - 1, 1, "bf16", False),
                                    (4 * n, 2, "fp32", True), (4 * n - 1, 2, "fp32", False)):
        monkeypatch.setattr(dsv3.memory, "available_bytes", lambda device, a=avail: a)
        run = lambda: check_memory(cfg, TrainConfig(optim_state_dtype=state),  # noqa: E731
                                   SimpleNamespace(world_size=world, device=cpu))
        if ok:
            run()
        else:
            with pytest.raises(InsufficientMemoryError, match="every rank" if world > 1 else "AdamW"):
                run()


# ------------------------------------------------------------------------------------------------
# the tokenizer trainer: no absurd vocabulary reaches it

def test_train_tokenizer_refuses_an_absurd_vocabulary_before_training():
    from dsv3.tokenizer import train_tokenizer

    def texts():
        raise AssertionError("the corpus was read")
        yield ""

    with pytest.raises(ConfigError, match=r"vocab_size=1,000,000,000,000 is more than dsv3 trains a BPE for"):
        train_tokenizer(texts(), 10**12)


@pytest.mark.parametrize("vocab, message", [
    (2_000_000, "vocab_size=2,000,000 is more than dsv3 trains a BPE for (1,048,576 tokens at most)"),
    (5000, "vocab_size=5,000 cannot be learned from directory"),
])
def test_get_tokenizer_refuses_before_training(tmp_path, monkeypatch, vocab, message):
    import dsv3.tokenizer
    from dsv3.training.config import TrainConfig
    from dsv3.training.pretrain import get_tokenizer

    monkeypatch.setattr(dsv3.tokenizer, "train_tokenizer", _no_tokenizer_training)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("x = 1\n" * 200)  # 1,200 bytes: at most 274 + 600 tokens
    tc = TrainConfig(data=str(data), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as e:
        get_tokenizer(tc, tiny_cfg(vocab_size=vocab), log=lambda s: None)
    assert message in str(e.value)
    if vocab == 5000:
        assert "(1,200 bytes)" in str(e.value) and "874 tokens in all" in str(e.value)

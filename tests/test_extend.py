"""`dsv3 train --init-from` (dsv3/training/extend.py): a new run from a trained checkpoint's weights, and the
paper's context extension with YaRN (§4.3). A ~0.3M-parameter model trained at seq len 32 is extended with
--rope-factor 4 to 128: every tensor arrives exactly, the new run's checkpoints carry the official YaRN
rope_scaling, transformers reads them with the same logits beyond the original context, and bad
combinations end in one line. CPU, fp32; about ten seconds.

Run: python -m pytest tests/test_extend.py -q
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3.checkpoints.hf import load_pretrained
from dsv3.checkpoints.rundir import latest_checkpoint
from dsv3.config import ModelConfig, softmax_scale
from dsv3.tokenizer import DSTokenizer
from dsv3.training import extend
from dsv3.training.config import TrainConfig
from dsv3.training.optim import Schedule
from dsv3.training.pretrain import train
from conftest import run_cli, write_corpus

MICRO = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
    max_position_embeddings=64, rope_scaling=None, num_nextn_predict_layers=1, torch_dtype="float32",
)
YARN4 = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
         "mscale": 1.0, "mscale_all_dim": 1.0}


def tcfg(env, out, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), data=env["data"], cache_dir=env["cache"], steps=3, seq_len=32, batch_size=4,
                lr=3e-3, val_permille=200, eval_every=0, save_every=0, progress=False, plots=False)
    base.update(kw)
    return TrainConfig(**base)


def quiet(*args) -> None:
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A base run (plain RoPE, seq len 32, its own tokenizer) and its extension to 128 with YaRN factor 4,
    trained at a learning rate too small to move any fp32 weight (so the saved weights are the loaded ones)."""
    base = tmp_path_factory.mktemp("extend")
    env = {"data": write_corpus(base / "corpus"), "cache": str(base / "cache"), "base": base}
    tok = DSTokenizer.train((open(os.path.join(env["data"], n), encoding="utf-8").read()
                             for n in sorted(os.listdir(env["data"]))), 512)
    env["tokenizer"] = str(tok.save(base / "tokenizer"))
    train(ModelConfig(**MICRO).validate(), tcfg(env, base / "run", tokenizer=env["tokenizer"], steps=4), log=quiet)
    env["base_ckpt"] = latest_checkpoint(str(base / "run" / "checkpoints"))
    logs = []
    env["summary"] = train(None, tcfg(env, base / "ext", init_from=str(base / "run"), rope_factor=4, seq_len=128,
                                      steps=2, lr=1e-30, schedule="constant", warmup_steps=0, bias_gamma=0.0),
                           log=logs.append)
    env["ext_ckpt"] = latest_checkpoint(str(base / "ext" / "checkpoints"))
    env["logs"] = logs
    return env


def test_init_from_loads_every_tensor_and_saves_yarn(env):
    base, ext = load_pretrained(env["base_ckpt"]), load_pretrained(env["ext_ckpt"])
    a, b = base.state_dict(), ext.state_dict()
    assert a.keys() == b.keys()
    assert any(k.startswith("mtp.") for k in a)
    biases = [k for k in a if k.endswith("e_score_correction_bias")]
    assert biases and all(a[k].abs().sum() > 0 for k in biases)  # trained biases, not the zero init
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with open(os.path.join(env["ext_ckpt"], "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["rope_scaling"] == YARN4 and cfg["max_position_embeddings"] == 128
    with open(os.path.join(env["base_ckpt"], "config.json"), encoding="utf-8") as f:
        old = json.load(f)
    # the architecture is the checkpoint's: only the positions changed
    assert {k: v for k, v in cfg.items() if k not in ("rope_scaling", "max_position_embeddings")} == \
           {k: v for k, v in old.items() if k not in ("rope_scaling", "max_position_embeddings")}
    # a new run: its own step count, the checkpoint's tokenizer copied in, the log line says so
    st = json.load(open(os.path.join(env["ext_ckpt"], "trainer_state.json"), encoding="utf-8"))
    assert st["step"] == 2 and env["summary"]["step"] == 2
    assert open(os.path.join(env["ext_ckpt"], "tokenizer.json"), "rb").read() == \
           open(os.path.join(env["base_ckpt"], "tokenizer.json"), "rb").read()
    line = next(s for s in env["logs"] if s.startswith("initialised from"))
    assert "start fresh" in line and "YaRN factor 4 over original 32" in line and "64 -> 128" in line
    # YaRN is on in the loaded model: interpolated low frequencies and the mscale² softmax scale
    assert ext.config.yarn and softmax_scale(ext.config) > softmax_scale(base.config)
    assert not torch.equal(ext.rope_inv_freq, base.rope_inv_freq)


def test_extension_trains(env, tmp_path):
    """A real learning rate: the loss is finite and the weights move."""
    s = train(None, tcfg(env, tmp_path / "ext", init_from=env["base_ckpt"], rope_factor=4, seq_len=128, steps=2,
                         lr=1e-3, schedule="constant", warmup_steps=0), log=quiet)
    assert s["step"] == 2
    rec = [json.loads(x) for x in open(tmp_path / "ext" / "metrics.jsonl", encoding="utf-8") if '"main"' in x]
    assert len(rec) == 2 and all(r["lr"] == 1e-3 for r in rec) and all(r["loss"] < 20 for r in rec)


def test_default_original_length_and_stacked_stages(env):
    # plain-RoPE checkpoint: L0 = the seq len its run trained at (32), not its max_position_embeddings (64)
    mc = extend.init_model_config(env["base_ckpt"], TrainConfig(init_from="x", rope_factor=8, seq_len=32))
    assert mc.rope_scaling["original_max_position_embeddings"] == 32 and mc.max_position_embeddings == 256
    # a YaRN checkpoint: the second stage keeps L0 (the paper: s = 40, L0 = 4096 for 32K and 128K) ...
    mc = extend.init_model_config(env["ext_ckpt"], TrainConfig(init_from="x", rope_factor=8, seq_len=256))
    assert mc.rope_scaling == {**YARN4, "factor": 8} and mc.max_position_embeddings == 256
    # ... and --rope-factor 0 keeps the checkpoint's rope settings
    mc = extend.init_model_config(env["ext_ckpt"], TrainConfig(init_from="x", seq_len=128))
    assert mc.rope_scaling == YARN4 and mc.max_position_embeddings == 128
    with pytest.raises(ValueError, match="seq_len 256 > max_position_embeddings 128"):
        extend.init_model_config(env["ext_ckpt"], TrainConfig(init_from="x", seq_len=256))
    mc = extend.init_model_config(env["base_ckpt"], TrainConfig(init_from="x", rope_factor=2.5,
                                                                rope_original_len=20, seq_len=32))
    assert mc.rope_scaling["factor"] == 2.5 and mc.max_position_embeddings == 50


def test_init_from_a_checkpoint_without_mtp_tensors(env, tmp_path):
    """A model directory written by transformers keeps num_nextn_predict_layers in config.json but drops the MTP
    layer's tensors: the new run starts without MTP modules (as load_pretrained loads it, with a warning) and every
    main tensor arrives exactly, instead of the run being refused for the missing MTP tensors."""
    src = tmp_path / "no-mtp"
    src.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes(open(os.path.join(env["base_ckpt"], f), "rb").read())
    n = MICRO["num_hidden_layers"]
    tensors = load_file(os.path.join(env["base_ckpt"], "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith(f"model.layers.{n}.")}, src / "model.safetensors")
    said = []
    with pytest.warns(UserWarning, match="holds no MTP tensors"):
        s = train(None, tcfg(env, tmp_path / "run", init_from=str(src), steps=1, lr=1e-30, schedule="constant",
                             warmup_steps=0, bias_gamma=0.0), log=said.append)
    assert s["step"] == 1
    line = next(x for x in said if x.startswith("initialised from"))
    assert "no MTP modules: the checkpoint holds none" in line and "MTP and correction" not in line
    out = load_pretrained(latest_checkpoint(str(tmp_path / "run" / "checkpoints")))
    assert out.config.num_nextn_predict_layers == 0 and len(out.mtp) == 0
    base = load_pretrained(env["base_ckpt"]).state_dict()
    for k, v in out.state_dict().items():
        assert torch.equal(v, base[k]), k


def test_constant_schedule():
    s = Schedule(total_steps=100, peak_lr=7.3e-6, warmup_steps=0, mtp_lambda=0.1, bias_gamma=0.0, kind="constant")
    assert {s.lr(i) for i in range(100)} == {7.3e-6}
    assert {s.mtp_weight(i) for i in range(100)} == {0.1} and {s.gamma(i) for i in range(100)} == {0.0}


def test_extended_checkpoint_in_transformers(env):
    """transformers reads the new config.json's YaRN and gives the same logits past the original context."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    model = load_pretrained(env["ext_ckpt"]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(env["ext_ckpt"], dtype=torch.float32).eval()
    rp = hf.config.rope_parameters
    assert rp["rope_type"] == "yarn" and {k: rp[k] for k in YARN4 if k != "type"} == \
           {k: v for k, v in YARN4.items() if k != "type"}
    assert torch.allclose(hf.model.rotary_emb.inv_freq, model.rope_inv_freq, rtol=1e-6)
    assert hf.model.layers[0].self_attn.scaling == pytest.approx(model.layers[0].self_attn.scale, rel=1e-9)
    ids = torch.randint(0, 512, (1, 100), generator=torch.Generator().manual_seed(0))  # positions 0..99 > 32
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(input_ids=ids).logits
        plain = load_pretrained(env["base_ckpt"]).eval()(ids).logits  # the same weights without YaRN
    diff = (ours - theirs).abs().max()
    assert diff <= 1e-5 * ours.abs().max()
    assert (ours - plain).abs().max() > 100 * diff  # YaRN changed the logits; transformers applied it too


@pytest.mark.parametrize("extra, match", [
    (["--init-from", "{missing}"], "checkpoint not found: "),
    (["--init-from", "{base}", "--resume"], "give one of them"),
    (["--init-from", "{base}", "--preset", "tiny"], "its vocab_size is 512 but --preset/--config says 4096"),
    (["--rope-factor", "4"], "needs init_from (--init-from)"),
    (["--init-from", "{base}", "--rope-factor", "4", "--seq-len", "256"], "seq_len 256 > max_position_embeddings 128"),
    (["--init-from", "{base}", "--tokenizer", "{tok}"], "drop --tokenizer"),
    (["--init-from", "{base}", "--out", "{base}"], "--init-from starts a new run, give another --out"),
])
def test_bad_inputs_one_line(env, tmp_path, extra, match):
    fill = {"missing": tmp_path / "nope", "base": env["base"] / "run", "tok": env["tokenizer"]}
    argv = ["train", "--data", env["data"], "--cache-dir", env["cache"], "--seq-len", 32, "--batch-size", 4,
            "--steps", 1, "--no-progress", "--no-plots", "--samples", 0]
    argv += [str(a).format(**{k: str(v) for k, v in fill.items()}) for a in extra]
    if "--out" not in extra:
        argv += ["--out", tmp_path / "out"]
    rc, _, err = run_cli(argv)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("dsv3 train: error: "), err
    assert match in err, err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_init_from_needs_out(env):
    rc, _, err = run_cli(["train", "--init-from", env["base"] / "run"])
    assert rc == 2 and "give its directory with --out" in err

"""AdamW with bf16-stored moments (dsv3/training/optim.py AdamW).

With fp32 storage the class must reproduce torch.optim.AdamW (same rule: decoupled decay, bias
corrections); with bf16 storage it must stay close to it, keep its moments in bf16, and survive a
checkpoint round trip with the dtype intact.
"""

from __future__ import annotations

import torch

from dsv3.checkpoints import rundir as ckpt
from dsv3.training.optim import AdamW, make_optimizer, param_groups
from conftest import make_model, rand_ids, tiny_cfg


def _run(model, opt, steps=5, seed=0):
    x = rand_ids(model.config, 2, 9, seed=seed)
    for _ in range(steps):
        out = model(x[:, :-1])
        torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_fp32_storage_equals_torch_adamw():
    cfg = tiny_cfg()
    a, b = make_model(cfg, seed=2), make_model(cfg, seed=2)
    _run(a, torch.optim.AdamW(param_groups(a, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False))
    _run(b, AdamW(param_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                   state_dtype=torch.float32))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-6, msg=n)


def test_bf16_states_close_to_fp32_and_stored_in_bf16():
    cfg = tiny_cfg()
    a, b = make_model(cfg, seed=2), make_model(cfg, seed=2)
    _run(a, make_optimizer(a, 1e-2))
    opt = make_optimizer(b, 1e-2, state_dtype=torch.bfloat16)
    assert isinstance(opt, AdamW)
    _run(b, opt)
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in opt.state.values())
    # 5 steps of lr 1e-2: parameters move by ~5e-2; bf16 moments (8-bit mantissa) change that by < 1%
    moved = max((p - q).abs().max().item() for p, q in zip(make_model(cfg, seed=2).parameters(), a.parameters()))
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert moved > 1e-2 and diff < 0.02 * moved, (moved, diff)


def test_bf16_state_checkpoint_round_trip(tmp_path):
    cfg = tiny_cfg()
    m = make_model(cfg, seed=3)
    opt = make_optimizer(m, 1e-2, state_dtype=torch.bfloat16)
    _run(m, opt, steps=2)
    tensors, meta = ckpt.optimizer_tensors(m, opt)
    m2 = make_model(cfg, seed=3)
    m2.load_state_dict(m.state_dict())
    opt2 = make_optimizer(m2, 1e-2, state_dtype=torch.bfloat16)
    ckpt.load_optimizer(m2, opt2, tensors, meta)
    assert len(opt2.state) == len(opt.state) > 0
    for p, q in zip(m.parameters(), m2.parameters()):
        if p not in opt.state:  # no gradient reached it (the MTP module: this loss uses main logits only)
            continue
        s, s2 = opt.state[p], opt2.state[q]
        assert s2["exp_avg"].dtype == torch.bfloat16 and torch.equal(s["exp_avg"], s2["exp_avg"])
        assert torch.equal(s["exp_avg_sq"], s2["exp_avg_sq"]) and float(s["step"]) == float(s2["step"])
    _run(m, opt, steps=2, seed=5)
    _run(m2, opt2, steps=2, seed=5)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_train_loop_options_recompute_and_bf16_state(tmp_path):
    """`dsv3 train --recompute selective --optim-state bf16`: the loop runs, the moments are bf16 in the
    checkpoint, and bad values are refused by name."""
    import pytest
    from safetensors.torch import load_file

    from dsv3.config import preset
    from dsv3.checkpoints.rundir import latest_checkpoint
    from dsv3.training.config import TrainConfig
    from dsv3.training.pretrain import train

    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"f{i}.py").write_text("def f(x):\n    return x * %d + 1\n" % i * 40)
    mc = preset("tiny").replace(vocab_size=300, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                moe_intermediate_size=16, num_attention_heads=2, num_key_value_heads=2,
                                q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    tc = TrainConfig(out_dir=str(tmp_path / "run"), data=str(data), cache_dir=str(tmp_path / "cache"), steps=3,
                     seq_len=32, batch_size=2, eval_every=0, save_every=3, progress=False, plots=False, device="cpu",
                     recompute="selective", optim_state_dtype="bf16", val_permille=200)
    out = train(mc, tc, log=lambda *a, **k: None)
    assert out["step"] == 3
    ck = out["checkpoint"]
    assert ck == latest_checkpoint(str(tmp_path / "run" / "checkpoints"))
    import glob
    import os
    opt_files = [f for f in glob.glob(os.path.join(ck, "*.safetensors")) if "optim" in os.path.basename(f)]
    assert opt_files
    t = load_file(opt_files[0])
    moments = [v for k, v in t.items() if k.endswith(".exp_avg") or k.endswith(".exp_avg_sq")]
    assert moments and all(v.dtype == torch.bfloat16 for v in moments)
    for bad in (dict(recompute="some"), dict(optim_state_dtype="fp16")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad).validate()


def test_resume_with_the_other_state_dtype_converts_the_moments():
    """Moments saved by one --optim-state load into the other converted (not kept), and steps run."""
    cfg = tiny_cfg()
    for saved, loaded in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        m = make_model(cfg, seed=3)
        opt = make_optimizer(m, 1e-2, state_dtype=saved)
        _run(m, opt, steps=2)
        tensors, meta = ckpt.optimizer_tensors(m, opt)
        opt2 = make_optimizer(m, 1e-2, state_dtype=loaded)
        ckpt.load_optimizer(m, opt2, tensors, meta)
        st = next(iter(opt2.state.values()))
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == loaded
        _run(m, opt2, steps=1)
        assert all(torch.isfinite(p).all() for p in m.parameters())


def test_grad_scale_equals_clipping_first_and_clip_and_step_matches_torch():
    """AdamW.step(grad_scale=c) (the foreach reference of the fused kernel's in-kernel clip) equals clipping
    the gradients by c and stepping; clip_and_step returns torch's pre-clip norm and applies torch's clip."""
    from dsv3.training.optim import clip_and_step, grad_norm

    cfg = tiny_cfg()
    a, b, c = make_model(cfg, seed=4), make_model(cfg, seed=4), make_model(cfg, seed=4)
    oa = AdamW(param_groups(a, 0.1), lr=1e-2, state_dtype=torch.float32)
    ob = AdamW(param_groups(b, 0.1), lr=1e-2, state_dtype=torch.float32)
    oc = make_optimizer(c, 1e-2)  # CPU: torch.optim.AdamW (foreach), clip through clip_grad_norm_
    assert not oa.fused
    x = rand_ids(cfg, 2, 9, seed=1)
    for _ in range(3):
        out = a(x[:, :-1])
        (torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()) * 100).backward()
        for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
            r.grad = None if p.grad is None else p.grad.clone()
        norm = grad_norm(list(a.parameters()))
        ref = torch.nn.utils.clip_grad_norm_(list(b.parameters()), 0.5)
        assert norm.item() > 0.5 and torch.allclose(norm, ref, rtol=1e-6)
        oa.step(grad_scale=(0.5 / (norm + 1e-6)).clamp(max=1.0))
        ob.step()
        nc = clip_and_step(oc, 0.5)
        assert torch.allclose(nc, ref, rtol=1e-6)
        for o in (oa, ob, oc):
            o.zero_grad(set_to_none=True)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
        torch.testing.assert_close(p, r, rtol=0, atol=2e-6, msg=n)


def test_state_dtype_and_fused_validation():
    m = make_model(tiny_cfg(), seed=0)
    import pytest

    with pytest.raises(ValueError, match="state_dtype"):
        AdamW(m.parameters(), lr=1e-3, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="fused=True"):
        AdamW(m.parameters(), lr=1e-3, fused=True)  # CPU parameters

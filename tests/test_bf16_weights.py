"""bf16 working weights with fp32 masters in the optimizer (`dsv3 train --precision bf16 --bf16-weights`;
dsv3/training/optim.py AdamW(masters=...)): which parameters go bf16, the master step (bitwise an fp32
AdamW step then a bf16 cast), training that tracks the fp32-weight + autocast reference, checkpoints that
hold the fp32 masters, exact resume, and the refusals. CPU (bf16 autocast on the CPU), the micro model of
tests/test_training.py; the file takes under 10 s on 2 cores.

Run: python -m pytest tests/test_bf16_weights.py -q
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from conftest import make_model, rand_ids, tiny_cfg
from dsv3.checkpoints.hf import load_pretrained
from dsv3.checkpoints.rundir import latest_checkpoint
from dsv3.model import build_model
from dsv3.model.moe import Experts, Router
from dsv3.training.config import TrainConfig, resumed_config
from dsv3.training import optim
from dsv3.training.optim import AdamW, bf16_weight_params, make_optimizer, tensor_norms
from dsv3.training.pretrain import train
from dsv3.training.strategy import Strategy, global_norm, precision_recipe
from test_training import assert_same_weights, env, micro_config, quiet, read_steps, tcfg, trainer_state  # noqa: F401


def _step(model, opt, x, autocast):
    with autocast():
        out = model(x[:, :-1])
    torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
    norm = global_norm(model.parameters())
    opt.step(grad_scale=(1.0 / (norm + 1e-6)).clamp(max=1.0))
    opt.zero_grad(set_to_none=True)


def test_bf16_storage_for_the_gemm_weights_masters_fp32_and_exact():
    """After make_optimizer(bf16_weights=True): the Linear and expert weights are bf16 (the same Parameter
    objects), their masters the exact fp32 values they had; embedding, router gate, norm gains and the
    correction biases stay fp32; the optimizer's state_dict holds no masters (its format is unchanged)."""
    cfg = tiny_cfg()
    model = make_model(cfg, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    opt = make_optimizer(model, 1e-2, bf16_weights=True)
    chosen = {id(p) for p in bf16_weight_params(model)}
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    n_bf16 = 0
    for name, p in model.named_parameters():
        if id(p) in chosen:
            n_bf16 += 1
            assert p.dtype == torch.bfloat16 and p.requires_grad, name
            master = opt.masters[p]
            assert master.dtype == torch.float32 and torch.equal(master, before[name]), name
            assert torch.equal(p.detach(), before[name].bfloat16()), name
        else:
            assert p.dtype == torch.float32 and p not in opt.masters, name
    assert n_bf16 == len(opt.masters) > 0
    kinds = {type(m).__name__ for m in model.modules() for p in m.parameters(recurse=False) if id(p) in chosen}
    assert kinds == {"Linear", "Experts"}
    assert model.embed_tokens.weight.dtype == torch.float32
    for m in model.modules():
        if isinstance(m, Router):
            assert m.weight.dtype == m.e_score_correction_bias.dtype == torch.float32
        if isinstance(m, Experts):
            assert m.gate_proj.dtype == m.down_proj.dtype == torch.bfloat16
    x = rand_ids(cfg, 2, 9)
    _step(model, opt, x, precision_recipe("bf16", torch.device("cpu")))
    assert all(p.dtype == torch.bfloat16 for p in opt.masters)
    assert "masters" not in str(opt.state_dict().keys()) and set(opt.state_dict()) == {"state", "param_groups"}


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_master_step_is_fp32_adamw_then_bf16_cast(state_dtype):
    """On random tensors, 5 steps (a grad_scale on some, a skipped one of NaN gradients): each master is
    bitwise the fp32 parameter of a plain AdamW fed the same (bf16-valued) gradients, and each working
    weight bitwise that master cast to bf16; the moments are the same bits."""
    g = torch.Generator().manual_seed(0)
    shapes = [(33, 17), (8, 5, 3)]
    plain = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    work = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    ref = AdamW([{"params": plain, "weight_decay": 0.1}], lr=3e-2, state_dtype=state_dtype)
    opt = AdamW([{"params": work, "weight_decay": 0.1}], lr=3e-2, state_dtype=state_dtype, masters=work)
    for t in range(5):
        grads = [torch.randn(s, generator=g).bfloat16() for s in shapes]
        if t == 3:
            grads = [torch.full(s, float("nan"), dtype=torch.bfloat16) for s in shapes]
        for p, q, gr in zip(plain, work, grads):
            p.grad, q.grad = gr.float(), gr.clone()
        scale = torch.tensor(0.4) if t % 2 else None
        skip = torch.tensor(t == 3)
        ref.step(grad_scale=scale, skip=skip)
        opt.step(grad_scale=scale, skip=skip)
        for p, q in zip(plain, work):
            assert q.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16
            assert torch.equal(opt.masters[q], p.detach())
            assert torch.equal(q.detach(), p.detach().bfloat16())
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[q][k], ref.state[p][k]), k
    assert float(opt.state[work[0]]["step"]) == 4.0  # the skipped step did not count


def test_fp32_gradients_make_the_steps_bitwise_the_autocast_reference():
    """fp32_grads (grad_dtype fp32 on the bf16 weights): 3 steps of 2 micro-batches under CPU bf16 autocast
    are bitwise those of fp32 weights + autocast (losses, masters = the reference's weights, the other
    parameters): autocast's forward cast is the rounded master, its gradient's cast back to fp32 is
    AccumulateGrad's. With bf16 gradients (the default) the second micro-batch's sum is rounded to bf16,
    so the runs part after the first step."""
    cfg = tiny_cfg()
    autocast = precision_recipe("bf16", torch.device("cpu"))
    runs = {}
    for mode in ("ref", "fp32g", "bf16g"):
        m = make_model(cfg, seed=1).train()
        opt = make_optimizer(m, 1e-2, bf16_weights=mode != "ref", fp32_grads=mode == "fp32g")
        losses = []
        for s in range(3):
            for mb in range(2):
                x = rand_ids(cfg, 2, 9, seed=10 * s + mb)
                with autocast():
                    out = m(x[:, :-1])
                loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
                (loss / 2).backward()
                losses.append(loss.item())
            if mode == "fp32g":
                got = [p.grad.dtype for p in opt.masters if p.grad is not None]  # (MTP: no gradient here)
                assert got and set(got) == {torch.float32}
            norm = global_norm(list(m.parameters()))
            opt.step(grad_scale=(1.0 / (norm + 1e-6)).clamp(max=1.0))
            opt.zero_grad(set_to_none=True)
        weights = [opt.masters.get(p, p).detach() for p in m.parameters()] if mode != "ref" else \
            [p.detach() for p in m.parameters()]
        runs[mode] = (losses, weights)
    assert runs["fp32g"][0] == runs["ref"][0]
    assert all(torch.equal(a, b) for a, b in zip(runs["fp32g"][1], runs["ref"][1]))
    assert runs["bf16g"][0][:2] == runs["ref"][0][:2] and runs["bf16g"][0] != runs["ref"][0]


def test_masters_refuse_what_they_cannot_hold():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="one of the optimised ones"):
        AdamW([torch.nn.Parameter(torch.randn(2))], lr=1e-3, masters=[p])
    q = torch.nn.Parameter(torch.randn(4, 4).bfloat16())
    with pytest.raises(ValueError, match="plain fp32 parameters"):
        AdamW([q], lr=1e-3, masters=[q])


def test_global_norm_of_bf16_gradients_is_fp32():
    """bf16 gradients: the norm is accumulated and returned in fp32 (a bf16 result would be rounded to 8
    bits), equal to the norm of the same values held in fp32."""
    g = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.zeros(300, 70, dtype=torch.bfloat16)), torch.nn.Parameter(torch.zeros(129))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)  # one bf16, one fp32: a mixed list
    n = global_norm(ps)
    want = torch.linalg.vector_norm(torch.cat([p.grad.float().flatten() for p in ps]))
    assert n.dtype == torch.float32
    torch.testing.assert_close(n, want, rtol=1e-6, atol=0)
    assert n != n.bfloat16().float()  # not rounded to bf16


def test_tensor_norms_one_foreach_call_per_dtype(monkeypatch):
    """The per-tensor norms of a mixed bf16 / fp32 list: one torch._foreach_norm call per dtype (a mixed call takes
    CUDA's per-tensor fallback), each norm fp32 and in the list's order, equal to the tensor's own norm."""
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(s, generator=g).to(dt) for s, dt in
          (((40, 9), torch.bfloat16), ((7,), torch.float32), ((3, 5), torch.bfloat16), ((11,), torch.float32))]
    calls = []
    real = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm",
                        lambda xs, *a, **k: calls.append([x.dtype for x in xs]) or real(xs, *a, **k))
    norms = tensor_norms(ts)
    assert sorted(calls, key=str) == sorted([[torch.bfloat16] * 2, [torch.float32] * 2], key=str)
    for n, t in zip(norms, ts):
        assert n.dtype == torch.float32
        torch.testing.assert_close(n, torch.linalg.vector_norm(t.float()), rtol=1e-6, atol=0)
    # tensors of NORM_ALONE elements or more: a reduction of their own (the same values), the rest still grouped
    calls.clear()
    monkeypatch.setattr(optim, "NORM_ALONE", 300)
    alone = tensor_norms(ts)
    assert sorted(map(len, calls)) == [1, 2] and all(torch.equal(a, b) for a, b in zip(alone, norms))  # (40, 9) alone
    # fp64 tensors (a float64 model) beside fp32 ones: their norms in fp64, returned in fp32 like the others
    d = torch.randn(6, generator=g, dtype=torch.float64)
    n64 = tensor_norms([d, ts[1]])[0]
    assert n64.dtype == torch.float32 and n64 == torch.linalg.vector_norm(d).float()


def test_save_writes_the_masters_and_load_restores_them(tmp_path):
    """Strategy.save in the mode writes the fp32 masters (load_pretrained gives them bitwise, in fp32) and
    leaves the bf16 weights as they were; Strategy.load into a fresh model + optimizer restores masters and
    moments bit for bit and re-derives the bf16 copies, and the next steps match the original's."""
    cfg = tiny_cfg()
    autocast = precision_recipe("bf16", torch.device("cpu"))
    model = make_model(cfg, seed=4).train()
    opt = make_optimizer(model, 1e-2, bf16_weights=True)
    strat = Strategy.of(model)
    for s in range(3):
        _step(model, opt, rand_ids(cfg, 2, 9, seed=s), autocast)
    work = {n: p.detach().clone() for n, p in model.named_parameters()}
    path = strat.save(str(tmp_path / "ck"), 3, opt, {"tokens": 0, "sampler": {}})
    names = {id(p): n for n, p in model.named_parameters()}
    masters = {names[id(p)]: m for p, m in opt.masters.items()}
    assert all(torch.equal(p.detach(), work[n]) and p.dtype == work[n].dtype for n, p in model.named_parameters())

    disk = load_pretrained(path, device="cpu", dtype=torch.float32).state_dict()
    for name, p in model.named_parameters():
        assert disk[name].dtype == torch.float32
        want = masters.get(name, p.detach())
        assert torch.equal(disk[name], want), name
    assert any(not torch.equal(disk[n], work[n].float()) for n in masters)  # masters, not the bf16 copies

    fresh = make_model(cfg, seed=99).train()
    opt2 = make_optimizer(fresh, 1e-2, bf16_weights=True)
    Strategy.of(fresh).load(path, opt2)
    names2 = {id(p): n for n, p in fresh.named_parameters()}
    for p, m in opt2.masters.items():
        assert torch.equal(m, masters[names2[id(p)]]) and p.dtype == torch.bfloat16
        assert torch.equal(p.detach(), m.bfloat16())
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p.detach(), q.detach()), n
        if p in opt.state:
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[p][k], opt2.state[q][k]), (n, k)
    for s in range(3, 5):
        _step(model, opt, rand_ids(cfg, 2, 9, seed=s), autocast)
        _step(fresh, opt2, rand_ids(cfg, 2, 9, seed=s), autocast)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p.detach(), q.detach()), n


# --- the training loop -------------------------------------------------------------------------------

N = 6


def test_training_tracks_the_fp32_weight_autocast_reference(env, tmp_path):
    """The same run with fp32 weights under bf16 autocast (the default bf16) and with --bf16-weights: the
    forward arithmetic is the same (autocast's cast of an fp32 weight is the rounded master, which is the
    stored copy), so the curves agree closely; not bitwise, since the bf16 gradients are summed over the
    two micro-batches in bf16 and their norms are taken from bf16 tensors."""
    mc = micro_config()
    a_out, b_out = tmp_path / "ref", tmp_path / "bf16w"
    kw = dict(steps=N, precision="bf16", micro_batch_size=2)
    train(mc, tcfg(env, a_out, **kw), log=quiet)
    logs = []
    train(mc, tcfg(env, b_out, bf16_weights=True, **kw), log=logs.append)
    assert any("bf16 weights + fp32 masters" in str(line) for line in logs)
    a, b = read_steps(a_out), read_steps(b_out)
    assert sorted(a) == sorted(b) == list(range(1, N + 1))
    assert a[N]["main"] < a[1]["main"] - 0.3  # it learns
    for s in a:
        assert abs(a[s]["main"] - b[s]["main"]) < 0.02 * a[s]["main"], (s, a[s]["main"], b[s]["main"])
        # (one flipped routing choice moves a step's gradient norm: measured 11% at step 6 of this seed, 1.4% and
        # 0.1% at seeds 1 and 2, with the losses within 1e-4, once routing became fp32 under autocast)
        assert abs(a[s]["grad_norm"] - b[s]["grad_norm"]) < 0.15 * a[s]["grad_norm"], s
    assert a[1]["main"] == b[1]["main"]  # the first forward: the same weights, the same arithmetic
    ra = load_pretrained(latest_checkpoint(a_out / "checkpoints"), device="cpu", dtype=torch.float32).state_dict()
    rb = load_pretrained(latest_checkpoint(b_out / "checkpoints"), device="cpu", dtype=torch.float32).state_dict()
    init = build_model(mc, seed=0).state_dict()  # tcfg's seed
    # each weight's distance between the runs, against how far training moved it; a routing choice that flips
    # between the runs moves the router gates and expert weights it touches (measured with the per-tensor
    # initialisation, worst weight at seeds 0-3: 0.18 (seed 0, the MTP router gate), 0.08, 0.06, 0.17; losses
    # within 1e-4 relative at every seed); the correction biases, ±γ steps, flip on one token
    for k in ra:
        assert rb[k].dtype == torch.float32
        if not k.endswith("e_score_correction_bias"):
            assert (ra[k] - rb[k]).norm() <= 0.25 * (ra[k] - init[k]).norm(), k


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_exact_resume_with_bf16_weights(env, tmp_path, precision):
    """--bf16-weights (under bf16 and under fp8): N steps in one go == a copy of the N/2 periodic checkpoint resumed in a fresh run
    directory (the checkpoint alone: fp32 masters, moments, sampler, RNG) for N/2 more, bitwise; and a
    resume keeps the setting from the checkpoint's train_config where the command line does not give it."""
    mc = micro_config()
    a_out, c_out = tmp_path / "a", tmp_path / "c"
    kw = dict(steps=N, save_every=N // 2, keep=0, precision=precision)
    train(mc, tcfg(env, a_out, bf16_weights=True, **kw), log=quiet)
    mid = os.path.join(a_out, "checkpoints", f"step_{N // 2:08d}")
    shutil.copytree(mid, c_out / "checkpoints" / os.path.basename(mid))
    train(mc, tcfg(env, c_out, bf16_weights=True, resume=True, **kw), log=quiet)
    a, c = read_steps(a_out), read_steps(c_out)
    assert sorted(c) == list(range(N // 2 + 1, N + 1))
    for s in c:
        for k in ("loss", "main", "mtp", "grad_norm", "maxvio"):
            assert c[s][k] == a[s][k], (s, k)
    assert_same_weights(latest_checkpoint(a_out / "checkpoints"), latest_checkpoint(c_out / "checkpoints"))
    saved = trainer_state(mid)["train_config"]
    assert saved["bf16_weights"] is True
    assert resumed_config(TrainConfig(out_dir=str(c_out), resume=True), saved, {"out_dir", "resume"})[0].bf16_weights


@pytest.mark.parametrize("kw, match", [
    (dict(precision="fp32"), "needs --precision bf16 or fp8"),
    (dict(precision="auto"), "auto means fp32 on the CPU"),
])
def test_refused_outside_bf16(env, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        train(micro_config(), tcfg(env, tmp_path / "x", bf16_weights=True, device="cpu", **kw), log=quiet)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind, pcfg, fsdp_form", [
    ("sharded", dict(dp_shard=2, ep=1), True),  # FSDP2's own form: the fp32 shards are the masters
    ("sharded", dict(dp_shard=1, ep=2), True),  # + expert slices outside FSDP: masters in the optimizer
    ("sharded", dict(dp_shard=2, ep=1, fsdp=False), False),  # replicated: every master in the optimizer
    ("pipeline", dict(pp=2, dp_shard=1, ep=1), False), ("pipeline", dict(pp=2, dp_shard=2, ep=1, fsdp=False), False)])
def test_every_torchrun_layout_takes_it(kind, pcfg, fsdp_form):
    """In-process (a rank of the layout's world, no process group: check_settings is collective-free); the runs
    themselves against autocast: tests/distributed/test_compose.py (BF16W), test_pipeline_dp.py."""
    from dsv3.distributed.mesh import DistEnv, ParallelConfig
    from dsv3.distributed.strategy import PipelineStrategy, ShardedStrategy

    world = pcfg.get("pp", 1) * pcfg["dp_shard"] * pcfg["ep"]
    env_ = DistEnv(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"), backend="gloo")
    strategy = (PipelineStrategy if kind == "pipeline" else ShardedStrategy)(env_, ParallelConfig(**pcfg))
    strategy.check_settings(TrainConfig(out_dir="unused", batch_size=8, precision="bf16", bf16_weights=True), "bf16")
    if kind == "sharded":
        assert strategy.bf16_params == fsdp_form


def test_make_optimizer_leaves_fsdp_shards_their_own_masters():
    """bf16_weights over a model holding DTensor (FSDP2) parameters: AdamW keeps masters of the plain weights
    only; the DTensors stay fp32 (their shards are the masters, gathered in bf16 by FSDP2)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
        model[0].weight = torch.nn.Parameter(DTensor.from_local(model[0].weight.detach(), mesh, [Replicate()]))
        opt = make_optimizer(model, 1e-3, bf16_weights=True)
        assert list(opt.masters) == [model[1].weight] and model[1].weight.dtype == torch.bfloat16
        assert model[0].weight.dtype == torch.float32
    finally:
        if mine:
            dist.destroy_process_group()


# --- with FP8 training (--precision fp8 --bf16-weights) ---------------------------------------------------------

def test_fp8_gemms_take_bf16_weights_as_their_fp32_values():
    """The FP8 linear and grouped-expert GEMMs (the emulation: the contract of the GPU kernels) given a bf16 weight
    compute what they compute from an fp32 weight holding the same values (the quantiser reads values, not
    storage): the same output and input gradient, and the weight gradient rounded to bf16 (written in W's dtype)."""
    from dsv3.training.fp8 import fp8_grouped_linear, fp8_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 256, generator=g)
    w32 = torch.randn(160, 256, generator=g).bfloat16().float()  # bf16-representable fp32 values
    gy = torch.randn(48, 160, generator=g)
    outs = {}
    for dt in (torch.float32, torch.bfloat16):
        xi, wi = x.clone().requires_grad_(), w32.to(dt, copy=True).requires_grad_()
        y = fp8_linear(xi, wi, backend="emulate")
        y.backward(gy)
        outs[dt] = (y, xi.grad, wi.grad)
    (y32, dx32, dw32), (y16, dx16, dw16) = outs[torch.float32], outs[torch.bfloat16]
    assert dw16.dtype == torch.bfloat16 and dw32.dtype == torch.float32
    assert torch.equal(y16, y32) and torch.equal(dx16, dx32) and torch.equal(dw16, dw32.bfloat16())

    offs = torch.tensor([16, 16, 48], dtype=torch.int32)  # an expert without rows, too
    ws32 = [torch.randn(3, 64, 256, generator=g).bfloat16().float() for _ in range(2)]
    gy = torch.randn(48, 128, generator=g)
    outs = {}
    for dt in (torch.float32, torch.bfloat16):
        xi, wi = x.clone().requires_grad_(), [w.to(dt, copy=True).requires_grad_() for w in ws32]
        y = fp8_grouped_linear(xi, tuple(wi), offs, backend="emulate")
        y.backward(gy)
        outs[dt] = (y, xi.grad, [w.grad for w in wi])
    (y32, dx32, dws32), (y16, dx16, dws16) = outs[torch.float32], outs[torch.bfloat16]
    assert torch.equal(y16, y32) and torch.equal(dx16, dx32)
    for a, b in zip(dws16, dws32):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.bfloat16())


def test_fp8_training_with_bf16_weights(env, tmp_path):
    """--precision fp8 --bf16-weights (routed experts in FP8 too) on the CPU: under bf16 autocast (the arithmetic of
    a GPU run), it learns and tracks the bf16 --bf16-weights run (the FP8 GEMMs' error only), the GEMM weights are
    stored in bf16 with fp32 masters and the checkpoint holds the masters in fp32."""
    mc = micro_config()
    a_out, b_out = tmp_path / "bf16", tmp_path / "fp8"
    kw = dict(steps=N, bf16_weights=True, micro_batch_size=2)
    train(mc, tcfg(env, a_out, precision="bf16", **kw), log=quiet)
    logs = []
    train(mc, tcfg(env, b_out, precision="fp8", fp8_experts=True, **kw), log=logs.append)
    assert any("bf16 weights + fp32 masters" in str(line) for line in logs)
    assert any("routed experts" in str(line) for line in logs)  # the FP8 modules were swapped in
    a, b = read_steps(a_out), read_steps(b_out)
    assert sorted(b) == list(range(1, N + 1)) and b[N]["main"] < b[1]["main"] - 0.3  # it learns
    for s in a:  # measured, largest over the steps at seeds 0-3: 3.8%, 0.2%, 1.9%, 2.8%
        assert abs(a[s]["main"] - b[s]["main"]) < 0.05 * a[s]["main"], (s, a[s]["main"], b[s]["main"])
    assert a[1]["main"] != b[1]["main"]  # the FP8 GEMMs ran
    sd = load_pretrained(latest_checkpoint(b_out / "checkpoints"), device="cpu", dtype=None).state_dict()
    assert all(t.dtype == torch.float32 for t in sd.values())

"""Expert parallelism and FSDP2 on the CPU with gloo: the sharded run equals one process.

Run: python -m pytest tests/distributed -q      (spawns 2 and 4 processes on 127.0.0.1; ~30 s on 2 cores)

Each spawned rank builds the same tiny model twice (seed 0): a reference that runs the whole global
batch in-process, and a copy that `parallelize` turns into the rank's part and that reads only the
rank's rows. Checked, as max |distributed - reference| over ranks and tensors (fp32):
  * forward logits (the rank's rows), the gradient of every parameter after one backward (FSDP
    shards gathered with full_tensor(); an EP rank's expert slice against the same slice),
  * then STEPS AdamW steps with clipping, the sequence-wise balance loss, MTP, and bias updates
    from all-reduced loads: the global losses, all parameters and the correction biases.
Tolerances (absolute, fp32; the differences come only from the order of fp32 sums: per-rank means
vs one mean, reduce-scatter vs one sum, all-to-all permutations):
  TOL = 1e-5 for logits, gradients, losses and biases (measured: logits <= 4e-7, gradients <= 6e-8,
  losses <= 1e-6, biases exactly equal);
  PARAM_TOL = 1e-4 (1% of the learning rate) for parameters after the AdamW steps: Adam's update
  g/(sqrt(v)+eps) turns a 1e-9 rounding difference of a gradient entry of size ~eps = 1e-8 into a
  visible one, so a handful of single entries differ by up to ~5e-5 (measured); all others by < 1e-6.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from dsv3.distributed import ParallelConfig, ParallelConfigError
from tests.distributed.harness import results_by_world, tiny_cfg

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TOL = 1e-5  # logits, gradients, losses, biases
PARAM_TOL = 1e-4  # parameters after AdamW steps: see the module docstring
STEPS = 3
B, T = 4, 12  # global batch: 4 sequences of 12 (+1) tokens
HP = dict(mtp_lambda=0.3, balance_alpha=1e-2, gamma=1e-2, grad_clip=1.0)
LR = 1e-2

# name -> (world size, ParallelConfig kwargs, experts impl)
SCENARIOS = {
    "ep2": (2, dict(dp_shard=1, ep=2, fsdp=False), "auto"),
    "fsdp2": (2, dict(dp_shard=2, ep=1, fsdp=True), "auto"),
    "ep2_fsdp": (2, dict(dp_shard=1, ep=2, fsdp=True), "auto"),
    "ep4": (4, dict(dp_shard=1, ep=4, fsdp=False), "grouped"),
    "dp2xep2": (4, dict(dp_shard=2, ep=2, fsdp=True, node_groups=2), "auto"),
}


# --------------------------------------------------------------------------------------------------
# worker (runs in each spawned process)

def _ref_step(model, opt, batch):
    from dsv3.model import update_expert_bias
    from dsv3.training.loss import compute_loss

    out = model(batch[:, :-1], with_balance=True)
    parts = compute_loss(out, batch[:, 1:], HP["mtp_lambda"], HP["balance_alpha"])
    parts.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), HP["grad_clip"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_expert_bias(model.routers(), out.expert_counts, HP["gamma"])
    return float(parts.total.detach())


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _scenario(rank: int, world: int, pcfg: ParallelConfig, impl: str) -> dict:
    from dsv3.distributed import build_mesh, parallelize, train_step
    from dsv3.training.optim import make_optimizer
    from dsv3.model import build_model
    from dsv3.training.loss import compute_loss
    from dsv3.training.optim import make_optimizer as make_ref_optimizer

    cfg = tiny_cfg()
    ref = build_model(cfg, seed=0)
    model = build_model(cfg, seed=0)
    ref.set_experts_impl(impl)
    model.set_experts_impl(impl)
    mesh = build_mesh(pcfg, "cpu")
    ps = parallelize(model, pcfg, mesh)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g) for _ in range(STEPS + 1)]
    b = B // world
    rows = slice(rank * b, (rank + 1) * b)  # the data are sharded over all ranks (global rank order)
    E, L = cfg.n_routed_experts, cfg.n_routed_experts // pcfg.ep
    lo = ps.ep_rank * L
    diff = {}

    def put(key, a, r):
        diff[key] = max(diff.get(key, 0.0), float((a.detach() - r.detach()).abs().max()) if a.numel() else 0.0)

    def expert_slice(name, t):
        if pcfg.ep > 1 and name.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") and t.shape[0] == E:
            return t[lo:lo + L]
        return t

    # forward + backward on batch 0, before any step
    x, y = batches[0][:, :-1], batches[0][:, 1:]
    out_r = ref(x, with_balance=True)
    compute_loss(out_r, y, HP["mtp_lambda"], HP["balance_alpha"]).total.backward()
    out = model(x[rows], with_balance=True)
    compute_loss(out, y[rows], HP["mtp_lambda"], HP["balance_alpha"]).total.backward()
    from dsv3.distributed import finish_grad_sync

    finish_grad_sync(ps)
    put("logits", out.logits, out_r.logits[rows])
    put("mtp_logits", out.mtp_logits[0], out_r.mtp_logits[0][rows])
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        put("grad", _full(p.grad), expert_slice(name, ref_params[name].grad))
    ref.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)

    # STEPS optimizer steps
    opt_r = make_ref_optimizer(ref, LR)
    opt = make_optimizer(model, LR)
    losses, losses_r = [], []
    for s in range(1, STEPS + 1):
        losses_r.append(_ref_step(ref, opt_r, batches[s]))
        r = train_step(model, opt, [batches[s][rows]], ps, **HP)
        losses.append(r["loss"])
    put("loss", torch.tensor(losses, dtype=torch.float64), torch.tensor(losses_r, dtype=torch.float64))
    for name, p in model.named_parameters():
        put("param", _full(p), expert_slice(name, ref_params[name]))
    for r_m, r_r in zip(model.routers(), ref.routers()):
        put("bias", r_m.e_score_correction_bias, r_r.e_score_correction_bias)
    # the biases moved (the update is active), and the run trained
    diff["bias_moved"] = float(ref.routers()[0].e_score_correction_bias.abs().max())
    diff["loss_first"], diff["loss_last"] = losses_r[0], losses_r[-1]
    return diff


def _run_one(rank: int, world: int, name: str) -> dict:
    _, kw, impl = SCENARIOS[name]
    return _scenario(rank, world, ParallelConfig(**kw), impl)


@pytest.fixture(scope="module")
def results():
    return results_by_world(SCENARIOS, _run_one)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sharded_equals_single_process(results, name):
    r = results(name)
    print(name, {k: f"{v:.2e}" for k, v in r.items()})
    for key in ("logits", "mtp_logits", "grad", "loss", "bias", "param"):
        tol = PARAM_TOL if key == "param" else TOL
        assert r[key] <= tol, f"{name}: max |diff| of {key} = {r[key]:.3g} > {tol}"
    assert r["bias_moved"] > 0  # the bias update ran (γ = 1e-2)
    assert r["loss_last"] < r["loss_first"]


# --------------------------------------------------------------------------------------------------
# configuration errors (no processes)

@pytest.mark.parametrize("kw, world, model_kw, match", [
    (dict(dp_shard=2, ep=2), 2, {}, r"dp_shard \(2\) x ep \(2\) = 4 ranks, but the world size is 2"),
    (dict(ep=3, dp_shard=1), 3, {}, r"ep \(3\) does not divide n_routed_experts \(8\)"),
    (dict(ep=0), None, {}, r"ep must be an integer >= 1"),
    (dict(ep=2, node_groups=4), 2, {}, r"ep \(2\) is not a multiple of node_groups \(4\)"),
    (dict(ep=4, node_groups=2), 4, dict(n_group=4, topk_group=2), r"needs the model's n_group = 2"),
    (dict(ep=2, node_groups=2), 2, dict(n_group=2, topk_group=2), r"topk_group \(M\) < n_group"),
    (dict(ep=2), 2, dict(n_routed_experts=0, first_k_dense_replace=3), r"no routed experts"),
])
def test_config_errors_name_the_conflict(kw, world, model_kw, match):
    with pytest.raises(ParallelConfigError, match=match):
        ParallelConfig(**kw).validate(world, tiny_cfg(**model_kw))


def test_node_limited_layout_accepted():
    # the paper's shape: 256 experts on 64 EP ranks over 8 nodes, n_group = 8, M = topk_group = 4
    from dsv3.config import preset

    ParallelConfig(dp_shard=2, ep=64, node_groups=8).validate(128, preset("671b"))


def _bf16_params_worker(rank: int, world: int, name: str) -> dict:
    """FSDP2's --bf16-weights: what the forward computes with and what the optimizer holds."""
    from torch import nn

    from dsv3.distributed import build_mesh, parallelize
    from dsv3.model import build_model
    from dsv3.model.moe import Router
    from dsv3.training.loss import compute_loss

    from dsv3.model.moe import Experts
    from dsv3.training.optim import make_optimizer

    ep = 2 if name == "bf16_ep" else 1
    pcfg = ParallelConfig(dp_shard=world // ep, ep=ep, fsdp=True)
    cfg = tiny_cfg()
    model = build_model(cfg, seed=0)
    parallelize(model, pcfg, build_mesh(pcfg, "cpu"), bf16_params=True)
    experts = [p for m in model.modules() if isinstance(m, Experts) for p in m.parameters()]
    opt = make_optimizer(model, 1e-3, bf16_weights=True)  # EP: the optimizer keeps the expert slices' masters
    seen = {"linear": set(), "router": set(), "head": set()}
    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_pre_hook(lambda mod, a: seen["router"].add(mod.weight.dtype))
        elif isinstance(m, nn.Linear):
            key = "head" if m is model.lm_head else "linear"
            m.register_forward_pre_hook(lambda mod, a, key=key: seen[key].add(mod.weight.dtype))
    x = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(rank))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x[:, :-1])
    compute_loss(out, x[:, 1:], 0.3).total.backward()
    params = list(model.parameters())
    ok = {"linear_bf16": seen["linear"] == {torch.bfloat16}, "router_fp32": seen["router"] == {torch.float32},
          "head_fp32": seen["head"] == {torch.float32},
          "shards_fp32": all(p.dtype == torch.float32 for p in params if all(p is not e for e in experts)),
          "grads_fp32": all(p.grad.dtype == torch.float32 for p in params
                            if p.grad is not None and all(p is not e for e in experts)),
          "experts_bf16_with_fp32_masters": (all(p.dtype == torch.bfloat16 and opt.masters[p].dtype == torch.float32
                                                 for p in experts) and len(opt.masters) == len(experts))
          if ep > 1 else not opt.masters,
          "some_grads": any(p.grad is not None for p in params),
          "finite": bool(torch.isfinite(out.logits).all())}
    return {f"fails_{k}": float(not v) for k, v in ok.items()}  # the harness keeps the worst (max) rank


def test_fsdp_bf16_params_gather_bf16_and_keep_fp32_masters():
    """--bf16-weights under FSDP2: every block's Linear computes with a bf16 all-gathered weight, the
    routers and the root (head) with fp32, and the shards (the masters the optimizer steps) and their
    reduce-scattered gradients stay fp32; under EP (bf16_ep) the expert slices, outside FSDP, are stored in bf16
    with their fp32 masters in the optimizer."""
    from tests.distributed.harness import spawn_scenarios

    for name, r in spawn_scenarios(2, _bf16_params_worker, ["bf16", "bf16_ep"]).items():
        assert len(r) == 8 and not any(r.values()), (name, r)


def _replicated_tokens_worker(rank: int, world: int, name: str) -> dict:
    """Inference EP with the same tokens on every rank: outputs equal one process's experts; each
    (token, expert) row computed once over all ranks."""
    from dsv3.distributed.expert_parallel import ReplicatedTokensDispatcher, shard_experts
    from dsv3.model.moe import Experts

    cfg = tiny_cfg()
    torch.manual_seed(0)
    full = Experts(cfg)
    for w in (full.gate_proj, full.up_proj, full.down_proj):
        torch.nn.init.normal_(w, std=0.2)
    local = Experts(cfg)
    local.load_state_dict(full.state_dict())
    shard_experts(local, rank, world)
    rows = []
    orig = local.forward
    local.forward = lambda x, *a, **k: (rows.append(x.shape[0]), orig(x, *a, **k))[1]
    d = ReplicatedTokensDispatcher(dist.group.WORLD, cfg.n_routed_experts)
    worst, counted = 0.0, 0.0
    for N in (1, 3, 17):  # fewer tokens than ranks, uneven slices
        g = torch.Generator().manual_seed(N)
        x = torch.randn(N, cfg.hidden_size, generator=g)
        idx = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:2] for _ in range(N)])
        w = torch.rand(N, 2, generator=g)
        rows.clear()
        with torch.no_grad():
            y = d(local, x, idx, w, "loop")
            ref = full(x, idx, w, "loop")
        worst = max(worst, float((y - ref).abs().max()))
        n = torch.tensor([float(sum(rows))])
        dist.all_reduce(n)
        counted = max(counted, abs(float(n) - N * 2))  # rows over all ranks - N·K
    return {"max_diff": worst, "extra_rows": counted}


@pytest.mark.parametrize("world", [2, 4])
def test_replicated_tokens_dispatcher_computes_each_row_once(world):
    from tests.distributed.harness import spawn_scenarios

    r = spawn_scenarios(world, _replicated_tokens_worker, ["x"])["x"]
    assert r["max_diff"] < 1e-6 and r["extra_rows"] == 0, r

"""Sharded (DCP) checkpoints and `dsv3 train` under torchrun, on the CPU with gloo.

Run: python -m pytest tests/distributed/test_dcp.py -q     (spawns 1, 2 and 4 processes; ~15 s on 2 cores)

Resharding: two runs of 2 processes (dp_shard 2 with FSDP; ep 2 with FSDP) train STEPS_BEFORE steps
on fixed global batches, save, and go on for STEPS_AFTER more steps (the uninterrupted reference).
Their checkpoints are resumed by 4 processes (ep 4; dp 2 x ep 2) and by 1 process. Checked:
  * the resumed model parameters and AdamW moments, gathered to full tensors, equal the saved ones
    exactly (loading copies bytes; expert e comes back as expert e whatever the ep degree),
  * the losses of the continued training equal the uninterrupted run's within TOL = 1e-5 (fp32;
    a different world size only changes the order of sums, as in test_gloo.py),
  * the Hugging Face export (`to_hf`) loads with load_pretrained and gives the saved model's logits,
  * a save that fails on rank 0 leaves no checkpoint and no temporary directory behind.
CLI: `python -m dsv3.cli train` launched as torchrun does (the env vars RANK, WORLD_SIZE, ...) with
2 processes for a few steps of a micro model, then `--resume` with 2 more steps: the loss falls,
metrics and plots exist, the final checkpoint loads with load_pretrained, the resume continues.
"""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest
import torch
import torch.distributed as dist

from dsv3.distributed import ParallelConfig
from tests.distributed.harness import free_port as _free_port
from tests.distributed.harness import start_ranks, tiny_cfg, torchrun_cli

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TOL = 1e-5
STEPS_BEFORE, STEPS_AFTER = 2, 2
B, T = 4, 12
HP = dict(mtp_lambda=0.3, balance_alpha=1e-2, gamma=1e-2, grad_clip=1.0)
LR = 1e-2

SAVES = {"fsdp2": dict(dp_shard=2, ep=1, fsdp=True), "ep2": dict(dp_shard=1, ep=2, fsdp=True)}
RESUMES = {4: {"fsdp2": dict(dp_shard=1, ep=4, fsdp=True), "ep2": dict(dp_shard=2, ep=2, fsdp=True)},
           1: {"fsdp2": dict(dp_shard=1, ep=1, fsdp=True), "ep2": dict(dp_shard=1, ep=1, fsdp=False)}}


# --------------------------------------------------------------------------------------------------
# worker

def _batches(cfg):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g) for _ in range(STEPS_BEFORE + STEPS_AFTER)]


def gather_full(model, opt, ps) -> dict[str, torch.Tensor]:
    """Every parameter and AdamW moment as a full tensor (collective)."""
    from torch.distributed.tensor import DTensor

    experts = {id(p) for p in ps.expert_params}
    out = {}

    def full(t, is_expert):
        if isinstance(t, DTensor):
            return t.full_tensor()
        if is_expert:
            parts = [torch.empty_like(t) for _ in range(ps.pcfg.ep)]
            dist.all_gather(parts, t.contiguous(), group=ps.ep_group)
            return torch.cat(parts)
        return t

    for name, p in model.named_parameters():
        out[name] = full(p.detach(), id(p) in experts).clone()
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{k}"] = full(opt.state[p][k], id(p) in experts).clone()
        out[f"{name}.step"] = opt.state[p]["step"].clone().float().reshape(())
    for name, b in model.named_buffers():
        if name != "rope_inv_freq":
            out[name] = b.clone()
    return out


def local_parts(model, opt, ps) -> dict:
    """Like gather_full, without communication: each rank's part and the rows of the full tensor it is."""
    from torch.distributed.tensor import DTensor, Shard

    experts = {id(p) for p in ps.expert_params}
    out = {}

    def part(t, is_expert):
        if isinstance(t, DTensor):  # FSDP2: Shard(0) over the flat mesh, torch.chunk's split
            assert t.device_mesh.ndim == 1 and t.placements == (Shard(0),)
            n, r = t.device_mesh.size(), t.device_mesh.get_local_rank()
            size = -(-t.shape[0] // n)
            return t.to_local(), slice(r * size, r * size + t.to_local().shape[0])
        if is_expert:
            return t, slice(ps.ep_rank * t.shape[0], (ps.ep_rank + 1) * t.shape[0])
        return t, ...

    for name, p in model.named_parameters():
        out[name] = part(p.detach(), id(p) in experts)
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{k}"] = part(opt.state[p][k], id(p) in experts)
        out[f"{name}.step"] = (opt.state[p]["step"].float().reshape(()), ...)
    for name, b in model.named_buffers():
        if name != "rope_inv_freq":
            out[name] = (b, ...)
    return out


def _setup(pcfg):
    from dsv3.distributed import build_mesh, parallelize
    from dsv3.training.optim import make_optimizer
    from dsv3.model import build_model

    cfg = tiny_cfg()
    model = build_model(cfg, seed=0)
    ps = parallelize(model, pcfg, build_mesh(pcfg, "cpu"))
    return cfg, model, ps, make_optimizer(model, LR)


def _run(model, opt, ps, batches, rank, world):
    from dsv3.distributed import train_step

    b = B // world
    return [train_step(model, opt, [x[rank * b:(rank + 1) * b]], ps, **HP)["loss"] for x in batches]


def _save_job(rank, world, d, name):
    from dsv3.checkpoints.dcp import save_dcp

    cfg, model, ps, opt = _setup(ParallelConfig(**SAVES[name]))
    batches = _batches(cfg)
    before = _run(model, opt, ps, batches[:STEPS_BEFORE], rank, world)
    root = os.path.join(d, name, "checkpoints")
    path = save_dcp(root, STEPS_BEFORE, model, opt, ps, {"sampler": {"pos": STEPS_BEFORE}, "tokens": 0},
                    export_hf=(name == "ep2"))
    full = gather_full(model, opt, ps)
    failed = False
    try:  # a failing save (rank 0 cannot write its JSON) must leave nothing behind
        save_dcp(root, 99, model, opt, ps, {"bad": object()})
    except Exception:
        failed = True
    after = _run(model, opt, ps, batches[STEPS_BEFORE:], rank, world)
    if rank == 0:
        torch.save({"full": full, "before": before, "after": after, "path": path, "failed": failed,
                    "listing": sorted(os.listdir(root))}, os.path.join(d, f"{name}_saved.pt"))


def _resume_job(rank, world, d, name):
    from dsv3.checkpoints.dcp import load_dcp

    cfg, model, ps, opt = _setup(ParallelConfig(**RESUMES[world][name]))
    ref = torch.load(os.path.join(d, f"{name}_saved.pt"))
    state = load_dcp(ref["path"], model, opt, ps)
    local = local_parts(model, opt, ps)
    diff = torch.tensor([max(float((t - ref["full"][k][rows]).abs().max()) if t.numel() else 0.0
                             for k, (t, rows) in local.items())])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    diff = float(diff)
    missing = sorted(set(ref["full"]) ^ set(local))
    after = _run(model, opt, ps, _batches(cfg)[STEPS_BEFORE:], rank, world)
    if rank == 0:
        with open(os.path.join(d, f"{name}_resumed_{world}.json"), "w") as f:
            json.dump({"state_diff": diff, "missing": missing, "after": after, "ref_after": ref["after"],
                       "sampler": state["sampler"]}, f)


def _worker(rank, world, port, d, job):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name in SAVES:
            (_save_job if job == "save" else _resume_job)(rank, world, d, name)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dcp"))
    start_ranks(_worker, (2, _free_port(), d, "save"), 2)
    for world in (4, 1):
        start_ranks(_worker, (world, _free_port(), d, "resume"), world)
    return d


# --------------------------------------------------------------------------------------------------
# tests

@pytest.mark.parametrize("name", list(SAVES))
@pytest.mark.parametrize("world", [4, 1])
def test_resume_under_another_layout(ckpt_dir, name, world):
    with open(os.path.join(ckpt_dir, f"{name}_resumed_{world}.json")) as f:
        r = json.load(f)
    print(name, world, r)
    assert r["missing"] == []
    assert r["state_diff"] == 0.0, "resumed parameters / moments differ from the saved ones"
    assert r["sampler"] == {"pos": STEPS_BEFORE}
    for a, b in zip(r["after"], r["ref_after"]):
        assert abs(a - b) <= TOL, f"continued losses {r['after']} != uninterrupted {r['ref_after']}"


@pytest.mark.parametrize("name", list(SAVES))
def test_failed_save_leaves_nothing(ckpt_dir, name):
    saved = torch.load(os.path.join(ckpt_dir, f"{name}_saved.pt"))
    assert saved["failed"]
    assert saved["listing"] == [f"step_{STEPS_BEFORE:08d}"]  # no step_00000099, no .tmp-*


def test_hf_export_and_conversion_give_the_same_logits(ckpt_dir, tmp_path):
    from dsv3.checkpoints.hf import load_pretrained
    from dsv3.checkpoints.dcp import load_full_model, to_hf
    from dsv3.model import build_model

    saved = torch.load(os.path.join(ckpt_dir, "ep2_saved.pt"))
    cfg = tiny_cfg()
    ref = build_model(cfg, seed=0)
    ref.load_state_dict({k: v for k, v in saved["full"].items() if not k.endswith(("exp_avg", "exp_avg_sq", ".step"))})
    x = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    want = ref(x)
    exported = load_pretrained(saved["path"])  # the save's own export (export_hf=True)
    converted = load_pretrained(to_hf(os.path.join(ckpt_dir, "ep2"), str(tmp_path / "hf")))  # run dir -> latest
    for m in (exported, converted, load_full_model(saved["path"])):
        out = m(x)
        assert torch.equal(out.logits, want.logits)
        assert torch.equal(out.mtp_logits[0], want.mtp_logits[0])
    fsdp = load_pretrained(to_hf(saved["path"].replace("ep2", "fsdp2"), str(tmp_path / "hf2")))
    assert fsdp(x).logits.shape == want.logits.shape
    with pytest.raises(ValueError, match="not empty"):
        to_hf(saved["path"], str(tmp_path / "hf"))


# --------------------------------------------------------------------------------------------------
# dsv3 train under torchrun (2 processes, gloo)

MICRO = dict(
    vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
    max_position_embeddings=128, rope_scaling=None, num_nextn_predict_layers=1, torch_dtype="float32",
)


def _torchrun(world: int, argv: list[str], cwd: str) -> subprocess.CompletedProcess:
    """`python -m dsv3.cli ARGV` on `world` ranks with the variables torchrun sets (no torchrun binary needed),
    forked from the fork server (tests/distributed/harness.py: torch and dsv3 imported once, not per rank)."""
    return torchrun_cli(world, argv, cwd, timeout=300)


def test_dsv3_train_under_torchrun(tmp_path):
    from dsv3.checkpoints.hf import load_pretrained
    from dsv3.config import ModelConfig
    from dsv3.training.data import split_of
    from dsv3.tokenizer import DSTokenizer

    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    names = ["alpha", "beta", "gamma", "delta", "value", "count"]
    for i in range(24):
        with open(corpus / f"f{i:02d}.py", "w") as f:
            f.write("\n".join(f"def {rng.choice(names)}_{j}(x):\n    return x + {rng.randint(0, 9)}\n"
                              for j in range(30)))
    val = [n for n in (f"v{i}.py" for i in range(2000)) if split_of(n, 10) == "val"][:3]  # held-out files
    for n in val:
        with open(corpus / n, "w") as f:
            f.write("\n".join(f"def {rng.choice(names)}_{j}(x):\n    return x * {j}\n" for j in range(40)))
    tok = DSTokenizer.train((p.read_text() for p in sorted(corpus.iterdir())), 512)
    tok_dir = str(tok.save(tmp_path / "tok"))
    cfg = tmp_path / "micro.json"
    ModelConfig(**MICRO).validate().to_json(cfg)
    out = tmp_path / "run"
    common = ["train", "--config", cfg, "--data", corpus, "--tokenizer", tok_dir, "--out", out, "--seq-len", 32,
              "--batch-size", 4, "--lr", 1e-2, "--eval-every", 3, "--save-every", 3, "--cache-dir", tmp_path / "cache",
              "--no-progress", "--samples", 1, "--device", "cpu"]
    common = [str(a) for a in common]
    r = _torchrun(2, common + ["--ep", "2", "--steps", "6"], str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 ranks (dp_shard 1 x ep 2" in r.stdout and "samples from" in r.stdout
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [x for x in recs if "main" in x]
    assert [x["step"] for x in steps] == list(range(1, 7))
    assert steps[-1]["main"] < steps[0]["main"]
    assert any("val_loss" in x for x in recs) and os.path.exists(out / "summary.json")
    assert os.path.exists(out / "loss.png")
    final = out / "checkpoints" / "step_00000006"
    m = load_pretrained(str(final))  # the final checkpoint holds the HF export
    assert m.config.n_routed_experts == 4

    # resumed under another layout from the command line: tests/distributed/test_train_pp.py (pipeline ->
    # DualPipeV -> FSDP2) and test_faults_dist.py (torchrun restarts); in the library: test_compose.py

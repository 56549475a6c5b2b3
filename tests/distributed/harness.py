"""What the gloo equivalence tests share: a free port, starting `world` processes quickly, and spawning
processes that each run named scenarios and report, per scenario, the worst value of every metric over
the ranks.

    start_ranks(fn, args, world)                  fn(rank, *args) in `world` fresh processes, joined
    spawn_scenarios(world, run_one, names) -> {name: {metric: worst over ranks}}

`run_one(rank, world, name) -> {metric: float}` (and `fn`) must be module-level functions of the test
module (torch.multiprocessing pickles them by reference).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import tempfile

import torch
import torch.distributed as dist

from dsv3.config import ModelConfig


def tiny_cfg(**kw) -> ModelConfig:
    """The distributed tests' model: 3 layers (1 dense + 2 MoE of 8 experts top-2 in 2 groups), MTP."""
    base = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, max_position_embeddings=64, rope_scaling=None,
        num_nextn_predict_layers=1, initializer_range=0.1, torch_dtype="float32",
    )
    base.update(kw)
    return ModelConfig(**base).validate()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A port that is free now and is not in the kernel's ephemeral range. A port the OS hands out for
    port 0 can be taken again, between our check and the server's bind, by any outgoing connection or
    port-0 listener, and gloo opens many of those (a CI run lost `dsv3 serve --ep 2`'s port that way)."""
    import random

    lo, hi = _ephemeral_range()
    rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    for _ in range(200):
        port = rng.randrange(20000, lo) if lo > 21000 else rng.randrange(hi + 1, 65535)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every draw was taken: fall back to the OS's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_one, names: list[str], out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for name in names:
            d = run_one(rank, world, name)
            keys = sorted(d)
            v = torch.tensor([d[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(v, op=dist.ReduceOp.MAX)  # worst rank
            results[name] = dict(zip(keys, v.tolist()))
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
        # every rank past its last collective before any tears its gloo pairs down (a rank aborted, rarely, with
        # "terminate called without an active exception" at teardown; not reached after an error, which would
        # hang here)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# The ranks start from a fork server: one fresh interpreter, started at the first launch, imports these
# modules once and forks a process per rank. A spawned rank (mp.spawn) imports torch and dsv3 itself, about
# 1.2 s of a core: 10 s of wall time for an 8-rank launch on 2 cores, more than the ranks' work in most of
# these tests. A forked rank is the same fresh interpreter (the server runs no test code); it gets the test
# process's environment as it is at the launch (_in_env: the server keeps the one it started with) and its
# sys.path and working directory (multiprocessing sends them). A module missing from the list is imported
# by the rank itself, as before. tests/distributed/compose.py starts its ranks from the same server.
FORK_SERVER_PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.fsdp",
                       "torch.distributed.tensor", "torch.distributed.pipelining", "pytest", "dsv3.model",
                       "dsv3.distributed", "dsv3.distributed.pipeline", "dsv3.training.pretrain",
                       "dsv3.checkpoints.dcp", "dsv3.checkpoints.hf", "dsv3.inference.engine", "dsv3.ep_serve",
                       "tests.distributed.harness"]


def _in_env(rank: int, env: dict, fn, *args) -> None:
    os.environ.clear()
    os.environ.update(env)
    fn(rank, *args)


def fork_context():
    """multiprocessing's fork-server context with FORK_SERVER_PRELOAD (which takes effect when the server starts:
    the first process started through it)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
    return ctx


def start_ranks(fn, args: tuple, world: int) -> None:
    """fn(rank, *args) in `world` new processes (rank 0 .. world - 1), joined; an exception in any of
    them raises here (torch.multiprocessing's ProcessRaisedException, as mp.spawn does)."""
    import torch.multiprocessing as mp

    fork_context()
    mp.start_processes(_in_env, args=(dict(os.environ), fn, *args), nprocs=world, join=True,
                       start_method="forkserver")


def spawn_scenarios(world: int, run_one, names: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "results.json")
        start_ranks(_worker, (world, free_port(), run_one, names, path), world)
        with open(path) as f:
            return json.load(f)


def results_by_world(scenarios: dict, run_one):
    """A getter name -> that scenario's worst-over-ranks metrics; the scenarios of one world size
    (scenarios[name][0]) run together in one spawn, the first time one of them is asked for."""
    cache: dict[int, dict] = {}

    def get(name: str) -> dict:
        world = scenarios[name][0]
        if world not in cache:
            cache[world] = spawn_scenarios(world, run_one, [n for n, v in scenarios.items() if v[0] == world])
        return cache[world][name]

    return get

"""What the gloo equivalence tests share: a free port, and spawning `world` processes that each run
named scenarios and report, per scenario, the worst value of every metric over the ranks.

    spawn_scenarios(world, run_one, names) -> {name: {metric: worst over ranks}}

`run_one(rank, world, name) -> {metric: float}` must be a module-level function of the test module
(torch.multiprocessing pickles it by reference).
"""

from __future__ import annotations

import json
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


def spawn_scenarios(world: int, run_one, names: list[str]) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "results.json")
        mp.spawn(_worker, args=(world, free_port(), run_one, names, path), nprocs=world, join=True)
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

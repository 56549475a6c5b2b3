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


def free_port() -> int:
    with socket.socket() as s:
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
    finally:
        dist.destroy_process_group()


def spawn_scenarios(world: int, run_one, names: list[str]) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "results.json")
        mp.spawn(_worker, args=(world, free_port(), run_one, names, path), nprocs=world, join=True)
        with open(path) as f:
            return json.load(f)

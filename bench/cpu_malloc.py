"""A CPU training step with glibc's malloc defaults against freed host memory kept
(dsv3.memory.retain_freed_host_memory, which the CLI sets where a model runs on the CPU): step time, minor page
faults a step and the resident set, each mode in a fresh process (the setting is process-wide).

    PYTHONPATH=. python bench/cpu_malloc.py                       # tiny, then width 512 (vocabulary 16,384)
    PYTHONPATH=. python bench/cpu_malloc.py --only tiny --steps 40 --rounds 2

A step: the model's forward, compute_loss (MTP weight 0.3), backward, clip_and_step, zero_grad, on a fixed batch of
8 x 256 tokens in fp32 (the main job's shape), after 3 warm-up steps. Reported: the median step, the median and
largest minor page faults of a step (getrusage), the resident set after the last step (/proc/self/statm), the
last loss (the same in both modes: the setting changes where memory comes from, not the arithmetic). --rounds
alternates the modes that many times (this VM's timings drift between processes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHAPES = {"tiny": {}, "w512": {"hidden_size": 512, "intermediate_size": 1536, "moe_intermediate_size": 256,
                               "vocab_size": 16384}}

_CHILD = """
import json, resource, sys, time
import torch, dsv3
from dsv3.memory import retain_freed_host_memory
from dsv3.training.loss import compute_loss
from dsv3.training.optim import clip_and_step, make_optimizer
mode, shape, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
took = retain_freed_host_memory() if mode == "kept" else False
torch.manual_seed(0)
cfg = dsv3.preset("tiny").replace(**shape)
model = dsv3.build_model(cfg, device="cpu", dtype=torch.float32)
opt = make_optimizer(model, 1e-4)
x = torch.randint(0, cfg.vocab_size, (8, 257))
def step():
    loss = compute_loss(model(x[:, :-1]), x[:, 1:], 0.3).total
    loss.backward()
    clip_and_step(opt, 1.0)
    opt.zero_grad(set_to_none=True)
    return loss.item()
for _ in range(3):
    step()
times, faults = [], []
for _ in range(steps):
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
print(json.dumps({"took": took, "times": times, "faults": faults, "rss_mb": rss, "loss": loss}))
"""


def run(mode: str, shape: dict, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DSV3_MALLOC", None)
    r = subprocess.run([sys.executable, "-c", _CHILD, mode, json.dumps(shape), str(steps)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"cpu_malloc: the {mode} run failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(SHAPES), help="one shape (default: both)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps a run (default 20)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each mode, alternating (default 1)")
    args = ap.parse_args()
    if args.steps < 1 or args.rounds < 1:
        ap.error("--steps and --rounds must be >= 1")
    print(f"torch {__import__('torch').__version__}, {os.cpu_count()} CPUs")
    print("| shape | malloc | step (median s) | faults a step (median / max) | resident (MB) | loss |")
    print("|---|---|---|---|---|---|")
    for name in [args.only] if args.only else list(SHAPES):
        rows = {"defaults": [], "kept": []}
        for _ in range(args.rounds):
            for mode in rows:
                rows[mode].append(run(mode, SHAPES[name], args.steps))
        for mode, runs in rows.items():
            if mode == "kept" and not runs[0]["took"]:
                print(f"| {name} | kept | (not glibc: the setting did not take) | | | |")
                continue
            for r in runs:
                print(f"| {name} | {mode} | {median(r['times']):.3f} | {median(r['faults']):,} / {max(r['faults']):,} "
                      f"| {r['rss_mb']:,.0f} | {r['loss']:.6f} |")
        t = [median(r["times"]) for r in rows["defaults"]], [median(r["times"]) for r in rows["kept"]]
        print(f"{name}: kept / defaults step speed {median(t[0]) / median(t[1]):.2f}x (median over rounds)")


if __name__ == "__main__":
    main()

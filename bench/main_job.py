"""Choosing the main job's default run (issue 20): quality per CPU-minute of `dsv3 train` candidates.

Two steps, because the CPU is slow and the GPU is not the machine the default runs on:

    # 1. on the 2-core CPU machine: each candidate shape's training tokens/s (fp32, the default threads)
    PYTHONPATH=. python bench/main_job.py probe --out bench/results/main_job_probe.json
    # 2. anywhere (a GPU runs many at once): each candidate trained for the tokens the CPU would get in
    #    --train-seconds, then the default run's closing table (stdlib held-out split, pip's sample)
    PYTHONPATH=. python bench/main_job.py sweep --probe bench/results/main_job_probe.json \
        --train-seconds 450 --device cuda --parallel 12 --out $OUT/sweep.json

A candidate = model-config overrides of the `tiny` preset + `dsv3 train` settings. Its CPU cost comes from
the probe (random tokens, the real step: forward with MTP, loss, backward, clip, AdamW; median of timed
steps), so the sweep compares candidates at equal CPU wall time, which is what the default run spends.
The sweep trains in fp32 on every device (the CPU path's precision), with the run's own data pipeline,
tokenizer training and evaluation (dsv3.training.pretrain.train + evaluate.default_run_report).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# shape: model overrides of `tiny` and (batch, seq): what the CPU cost depends on
SHAPES = {
    "base": ({}, 16, 256),
    "v4k": ({"vocab_size": 4096}, 16, 256),
    "v16k": ({"vocab_size": 16384}, 16, 256),
    "b8": ({}, 8, 256),
    "b32": ({}, 32, 256),
    "s512": ({}, 8, 512),
    "s128": ({}, 32, 128),
    "h192": ({"hidden_size": 192, "intermediate_size": 576, "moe_intermediate_size": 96, "q_lora_rank": 96,
              "num_attention_heads": 3, "num_key_value_heads": 3}, 16, 256),
    "h384": ({"hidden_size": 384, "intermediate_size": 1152, "moe_intermediate_size": 192, "q_lora_rank": 192,
              "kv_lora_rank": 96, "num_attention_heads": 6, "num_key_value_heads": 6}, 16, 256),
    "L6": ({"num_hidden_layers": 6}, 16, 256),
    "L3": ({"num_hidden_layers": 3}, 16, 256),
    "e8": ({"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
            "moe_intermediate_size": 256}, 16, 256),
    "v4k-b8": ({"vocab_size": 4096}, 8, 256),
    # round 2: the winners of round 1 combined (smaller batches, cheaper shapes)
    "b4": ({}, 4, 256),
    "L3-b8": ({"num_hidden_layers": 3}, 8, 256),
    "e8-b8": ({"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
               "moe_intermediate_size": 256}, 8, 256),
    "h192-b8": ({"hidden_size": 192, "intermediate_size": 576, "moe_intermediate_size": 96, "q_lora_rank": 96,
                 "num_attention_heads": 3, "num_key_value_heads": 3}, 8, 256),
    "v4k-L3-b8": ({"vocab_size": 4096, "num_hidden_layers": 3}, 8, 256),
    "b16s128": ({}, 16, 128),
    # round 3
    "h192-v4k-b8": ({"vocab_size": 4096, "hidden_size": 192, "intermediate_size": 576, "moe_intermediate_size": 96,
                     "q_lora_rank": 96, "num_attention_heads": 3, "num_key_value_heads": 3}, 8, 256),
    "h192-v4k-b16s128": ({"vocab_size": 4096, "hidden_size": 192, "intermediate_size": 576,
                          "moe_intermediate_size": 96, "q_lora_rank": 96, "num_attention_heads": 3,
                          "num_key_value_heads": 3}, 16, 128),
    "h192-b16s128": ({"hidden_size": 192, "intermediate_size": 576, "moe_intermediate_size": 96, "q_lora_rank": 96,
                      "num_attention_heads": 3, "num_key_value_heads": 3}, 16, 128),
}

# candidate: (shape, train settings); the default run's other settings stay
CANDIDATES = {
    "base": ("base", {}),
    "base-lr1.5e-3": ("base", {"lr": 1.5e-3}),
    "base-lr6e-3": ("base", {"lr": 6e-3}),
    "base-lr1e-2": ("base", {"lr": 1e-2}),
    "base-init.02": ("base", {"init": 0.02}),
    "base-init.02-lr6e-3": ("base", {"init": 0.02, "lr": 6e-3}),
    "base-init.02-lr1.5e-3": ("base", {"init": 0.02, "lr": 1.5e-3}),
    "base-mtp.1": ("base", {"mtp_lambda": 0.1}),
    "base-wd0": ("base", {"weight_decay": 0.0}),
    "base-fim0": ("base", {"fim_rate": 0.0}),
    "base-warm2": ("base", {"warmup_steps": 2}),
    "b8": ("b8", {}),
    "b8-lr2e-3": ("b8", {"lr": 2e-3}),
    "b8-init.02": ("b8", {"init": 0.02}),
    "b32": ("b32", {}),
    "b32-lr6e-3": ("b32", {"lr": 6e-3}),
    "s512": ("s512", {}),
    "s128": ("s128", {}),
    "v4k": ("v4k", {}),
    "v4k-lr6e-3": ("v4k", {"lr": 6e-3}),
    "v4k-b8": ("v4k-b8", {}),
    "v16k": ("v16k", {}),
    "h192": ("h192", {}),
    "h192-lr6e-3": ("h192", {"lr": 6e-3}),
    "h384": ("h384", {}),
    "h384-lr1.5e-3": ("h384", {"lr": 1.5e-3}),
    "L6": ("L6", {}),
    "L3": ("L3", {}),
    "e8": ("e8", {}),
    # round 2
    "b8-init.02-seed1": ("b8", {"init": 0.02, "seed": 1}),
    "b8-init.04": ("b8", {"init": 0.04}),
    "b8-init.02-lr2e-3": ("b8", {"init": 0.02, "lr": 2e-3}),
    "b8-init.02-lr4e-3": ("b8", {"init": 0.02, "lr": 4e-3}),
    "v4k-b8-init.02": ("v4k-b8", {"init": 0.02}),
    "v4k-b8-init.02-lr4e-3": ("v4k-b8", {"init": 0.02, "lr": 4e-3}),
    "L3-b8-init.02": ("L3-b8", {"init": 0.02}),
    "e8-b8-init.02": ("e8-b8", {"init": 0.02}),
    "h192-b8-init.02": ("h192-b8", {"init": 0.02}),
    "v4k-L3-b8-init.02": ("v4k-L3-b8", {"init": 0.02}),
    "b16s128-init.02": ("b16s128", {"init": 0.02}),
    "b4-init.02": ("b4", {"init": 0.02}),
    "b8-init.02-mtp.1": ("b8", {"init": 0.02, "mtp_lambda": 0.1}),
    "b8-init.02-warm0": ("b8", {"init": 0.02, "warmup_steps": 0}),
    "b8-init.02": ("b8", {"init": 0.02}),
    "h192-b8-init.02-lr5e-3": ("h192-b8", {"init": 0.02, "lr": 5e-3}),
    # round 3
    "h192-v4k-b8-init.02": ("h192-v4k-b8", {"init": 0.02}),
    "h192-v4k-b8-init.04": ("h192-v4k-b8", {"init": 0.04}),
    "h192-b8-init.04": ("h192-b8", {"init": 0.04}),
    "v4k-b8-init.04": ("v4k-b8", {"init": 0.04}),
    "v4k-L3-b8-init.04": ("v4k-L3-b8", {"init": 0.04}),
    "h192-v4k-b16s128-init.04": ("h192-v4k-b16s128", {"init": 0.04}),
    "h192-b16s128-init.04": ("h192-b16s128", {"init": 0.04}),
    "h192-v4k-b8-init.04-lr2e-3": ("h192-v4k-b8", {"init": 0.04, "lr": 2e-3}),
    # round 4: the new default (850 steps: 8:30-9 minutes on the CPU, measured) and its neighbours
    "d850": ("h192-v4k-b8", {"init": 0.04, "steps": 850}),
    "d850-seed1": ("h192-v4k-b8", {"init": 0.04, "steps": 850, "seed": 1}),
    "d850-init.06": ("h192-v4k-b8", {"init": 0.06, "steps": 850}),
    "d850-init.08": ("h192-v4k-b8", {"init": 0.08, "steps": 850}),
    "d850-lr2e-3": ("h192-v4k-b8", {"init": 0.04, "steps": 850, "lr": 2e-3}),
    "d850-init.06-lr2e-3": ("h192-v4k-b8", {"init": 0.06, "steps": 850, "lr": 2e-3}),
    "d850-s128": ("h192-v4k-b16s128", {"init": 0.04, "steps": 850}),
    "d850-mtp.1": ("h192-v4k-b8", {"init": 0.04, "steps": 850, "mtp_lambda": 0.1}),
}


def shape_config(name: str):
    import dsv3

    over, b, t = SHAPES[name]
    return dsv3.preset("tiny").replace(**over), b, t


def probe(args) -> None:
    import torch

    import dsv3
    from dsv3.training.loss import compute_loss
    from dsv3.training.optim import clip_and_step, make_optimizer

    rows = {}
    names = args.shapes.split(",") if args.shapes else list(SHAPES)
    for name in names:
        cfg, b, t = shape_config(name)
        torch.manual_seed(0)
        model = dsv3.build_model(cfg, device="cpu", dtype=torch.float32)
        opt = make_optimizer(model, 1e-3)
        x = torch.randint(0, cfg.vocab_size, (b, t + 1))
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            out = model(x[:, :-1])
            compute_loss(out, x[:, 1:], 0.3).total.backward()
            clip_and_step(opt, 1.0)
            opt.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        step = min(times)  # the least disturbed step: the machine may be shared
        rows[name] = {"tokens_per_s": b * t / step, "step_s": step, "batch": b, "seq": t}
        print(f"{name:8s} {b}x{t}: {step:.3f} s/step, {b * t / step:,.0f} tokens/s", flush=True)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "machine": os.uname().machine, "cpu": _cpu_name()}
    old = json.load(open(args.out)) if os.path.exists(args.out) else {"shapes": {}}
    for k, r in rows.items():  # the fastest probe of a shape over runs: the idle machine's figure
        if k not in old["shapes"] or r["tokens_per_s"] > old["shapes"][k]["tokens_per_s"]:
            old["shapes"][k] = r
    old["meta"] = meta
    with open(args.out, "w") as f:
        json.dump(old, f, indent=1)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def run_one(args_json: str) -> None:
    """One candidate in this process (the sweep's worker): train, then the closing table; JSON on stdout."""
    import dataclasses

    from dsv3.training.config import TrainConfig
    from dsv3.training.evaluate import default_run_report
    from dsv3.training.pretrain import train

    a = json.loads(args_json)
    cfg, b, t = shape_config(a["shape"])
    tr = dict(a["train"])
    if "init" in tr:
        cfg = cfg.replace(initializer_range=tr.pop("init"))
    tc = dataclasses.replace(TrainConfig(), out_dir=a["out_dir"], batch_size=b, seq_len=t, steps=a["steps"],
                             device=a["device"], precision="fp32", eval_every=0, save_every=0, progress=False,
                             plots=False, cache_dir=a["cache_dir"], **tr)
    t0 = time.perf_counter()
    summary = train(cfg, tc, log=lambda *x, **k: None)
    t_train = time.perf_counter() - t0
    rows = default_run_report(summary["checkpoint"], tc)
    print("RESULT " + json.dumps({"train_s": t_train, "final_loss": summary.get("final_loss"),
                                  "rows": [{"name": r["name"], "bpb": r["val_bpb"], "bytes": r["val_bytes"],
                                            **r["compressors"]} for r in rows]}))


def sweep(args) -> None:
    probe_rows = json.load(open(args.probe))["shapes"]
    names = args.only.split(",") if args.only else list(CANDIDATES)
    work = tempfile.mkdtemp(prefix="main_job_")
    cache = os.path.join(work, "cache")
    jobs = []
    for name in names:
        shape, tr = CANDIDATES[name]
        p = probe_rows[shape]
        steps = max(1, math.floor(p["tokens_per_s"] * args.train_seconds / (p["batch"] * p["seq"])))
        if "steps" in tr:  # a fixed length (the default's, measured on the CPU itself)
            tr = dict(tr)
            steps = tr.pop("steps")
        jobs.append((name, {"shape": shape, "train": tr, "steps": steps, "device": args.device, "cache_dir": cache,
                            "out_dir": os.path.join(work, name)}))
    # tokenizers and token caches first, one process per vocabulary (concurrent writers would race)
    vocabs = {}
    for name, j in jobs:
        vocabs.setdefault(shape_config(j["shape"])[0].vocab_size, (name, j))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def launch(name, j, warm=False):
        j = dict(j, steps=1, out_dir=j["out_dir"] + "-warm") if warm else j
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "_one", json.dumps(j)], capture_output=True, text=True,
                           env=env)
        res = next((json.loads(line[7:]) for line in r.stdout.splitlines() if line.startswith("RESULT ")), None)
        if res is None:
            return name, j, {"error": (r.stderr or r.stdout)[-2000:]}
        return name, j, dict(res, wall_s=time.perf_counter() - t0)

    with cf.ThreadPoolExecutor(len(vocabs)) as ex:
        for name, j, res in ex.map(lambda nj: launch(*nj, warm=True), vocabs.values()):
            print(f"warm-up (vocab {shape_config(j['shape'])[0].vocab_size}): {res.get('wall_s', 0):.0f} s"
                  f"{' ERROR ' + res['error'] if 'error' in res else ''}", flush=True)
    results = []
    with cf.ThreadPoolExecutor(args.parallel) as ex:
        for name, j, res in ex.map(lambda nj: launch(*nj), jobs):
            row = {"name": name, "shape": j["shape"], "train": j["train"], "steps": j["steps"], **res}
            results.append(row)
            if "error" in res:
                print(f"{name}: ERROR {res['error']}", flush=True)
                continue
            bp = " | ".join(f"{r['bpb']:.3f} (gzip {r['gzip -9']:.3f}, xz {r['xz -9e']:.3f})" for r in res["rows"])
            print(f"{name:24s} {j['steps']:5d} steps  {bp}  [{res['wall_s']:.0f} s]", flush=True)
            with open(args.out, "w") as f:
                json.dump({"train_seconds": args.train_seconds, "device": args.device, "results": results}, f,
                          indent=1)
    print("\n| candidate | shape | settings | steps | stdlib held-out | pip sample |\n|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: r["rows"][-1]["bpb"] if "rows" in r else 9):
        if "rows" in r:
            cells = " | ".join(f"{x['bpb']:.3f}" for x in r["rows"])
            print(f"| {r['name']} | {r['shape']} | {r['train'] or '-'} | {r['steps']} | {cells} |")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_one":
        return run_one(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="CPU tokens/s of each shape")
    p.add_argument("--shapes", default=None, help="comma list (default: all)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="bench/results/main_job_probe.json")
    s = sub.add_parser("sweep", help="train each candidate for the CPU's --train-seconds worth of tokens")
    s.add_argument("--probe", default="bench/results/main_job_probe.json")
    s.add_argument("--train-seconds", type=float, default=450)
    s.add_argument("--device", default="cpu")
    s.add_argument("--parallel", type=int, default=1)
    s.add_argument("--only", default=None, help="comma list of candidates (default: all)")
    s.add_argument("--out", default="main_job_sweep.json")
    args = ap.parse_args()
    probe(args) if args.cmd == "probe" else sweep(args)


if __name__ == "__main__":
    main()

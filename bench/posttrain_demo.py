"""Issue 7's demonstration: pre-train a small model, then SFT, then GRPO on arithmetic word problems
with a checkable answer, and measure greedy held-out accuracy after each stage. One command:

    python bench/posttrain_demo.py --profile gpu --out runs/posttrain_gpu     # one GPU, ~5-10 min
    python bench/posttrain_demo.py --profile cpu --out runs/posttrain_cpu --threads 1   # ~12 min on 2 cores
    python bench/posttrain_demo.py --profile test --out /tmp/pt_test          # seconds (tests/test_posttrain_demo.py)

Stages (each writes its own directory under --out):
1. data: the task (dsv3.posttrain.tasks.arithmetic_task at --seed: train prompts for GRPO and a
   held-out set), solved SFT chats and plain-text pre-training documents of worked calculations. The
   profiles use single-digit operands (+, -, *), where all 243 calculations recur, so the held-out
   problems are new questions (name, object, wording), never the text of a train prompt, SFT chat or
   corpus line (`task.disjoint=text`); with more digits `task.disjoint=expr` keeps the calculations
   themselves apart (e.g. no held-out "23 + 45" anywhere in training).
2. base/: pre-training with the project's loop (dsv3.training.pretrain.train) on the Python standard
   library plus the arithmetic documents as training-only extra data (`test`: the arithmetic
   documents alone, a 512-token BPE). A real pre-trained LM: it has never seen the chat template.
3. sft/: SFT on a deliberately small number of solved chats (few steps), so it is imperfect.
4. grpo/: GRPO from the SFT checkpoint on the train prompts (exact-match reward + 0.1 format bonus).
5. greedy held-out accuracy of base, SFT and GRPO checkpoints with one function (the inference Engine,
   temperature 0) on the same held-out problems; summary.json, grpo_reward.png, grpo_kl.png, and a
   markdown row for bench/RESULTS.md.

`--base DIR` skips stage 2 and starts from an existing pre-trained checkpoint/run (for tuning).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from dsv3.checkpoints.hf import load_pretrained  # noqa: E402
from dsv3.config import ModelConfig, preset  # noqa: E402
from dsv3.inference.engine import Engine  # noqa: E402
from dsv3.posttrain import grpo, sft, tasks  # noqa: E402
from dsv3.checkpoints import rundir as ckpt  # noqa: E402
from dsv3.training.config import TrainConfig, resolve_device  # noqa: E402
from dsv3.training.pretrain import train  # noqa: E402
from dsv3.tokenizer import DSTokenizer  # noqa: E402


def _micro() -> ModelConfig:
    return ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        max_position_embeddings=512, rope_scaling=None, num_nextn_predict_layers=1,
    ).validate()


# Every profile has the same recipe; only sizes change. Keys:
#   task: digits / train prompts / held-out problems; corpus: arithmetic pre-training documents
#   pretrain: TrainConfig fields; sft: SFTConfig fields + n_chats; grpo: GRPOConfig fields
PROFILES: dict[str, dict] = {
    "test": {
        "model": "micro", "stdlib": False,
        "task": {"max_digits": 1, "disjoint": "text", "n_train": 200, "n_heldout": 16},
        "corpus": {"n_docs": 150, "lines_per_doc": 16},
        "pretrain": {"steps": 12, "seq_len": 128, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2},
        "sft": {"n_chats": 64, "steps": 6, "seq_len": 256, "batch_size": 4, "lr": 1e-3, "min_lr": 1e-4},
        "grpo": {"iterations": 3, "prompts_per_iter": 2, "group_size": 4, "max_new_tokens": 12, "ppo_epochs": 1,
                 "micro_batch_size": 8, "lr": 1e-4, "beta": 0.02, "eval_every": 2, "eval_max_examples": 8},
    },
    "cpu": {
        "model": "mini", "stdlib": True,
        "task": {"max_digits": 1, "disjoint": "text", "n_train": 4000, "n_heldout": 300},
        "corpus": {"n_docs": 6000, "lines_per_doc": 32},
        "pretrain": {"steps": 250, "seq_len": 128, "batch_size": 16, "lr": 3e-3, "warmup_steps": 10,
                     "save_every": 50, "keep": 1},  # benchmarks keep one checkpoint at most
        "sft": {"n_chats": 3000, "steps": 40, "seq_len": 512, "batch_size": 8, "lr": 2e-3, "min_lr": 2e-4},
        "grpo": {"iterations": 60, "prompts_per_iter": 16, "group_size": 8, "max_new_tokens": 20, "ppo_epochs": 1,
                 "micro_batch_size": 64, "lr": 1e-4, "beta": 0.01, "eval_every": 10, "eval_max_examples": 100},
    },
    "gpu": {
        "model": "tiny", "stdlib": True,
        "task": {"max_digits": 1, "disjoint": "text", "n_train": 8000, "n_heldout": 500},
        "corpus": {"n_docs": 6000, "lines_per_doc": 32},
        "pretrain": {"steps": 600, "seq_len": 256, "batch_size": 32, "lr": 3e-3, "warmup_steps": 30},
        "sft": {"n_chats": 3000, "steps": 40, "seq_len": 512, "batch_size": 8, "lr": 1e-3, "min_lr": 1e-4},
        "grpo": {"iterations": 150, "prompts_per_iter": 32, "group_size": 16, "max_new_tokens": 20, "ppo_epochs": 1,
                 "micro_batch_size": 256, "lr": 5e-5, "beta": 0.01, "eval_every": 10, "eval_max_examples": 200},
    },
}


def _mini() -> ModelConfig:
    # ~3.5M parameters with the tiny preset's 8K vocabulary (so the stdlib BPE is shared): 1 dense + 2 MoE
    # layers of 8 routed experts (top-2) + 1 shared, MLA, one MTP module. A few minutes of CPU pre-training.
    return preset("tiny").replace(
        hidden_size=128, intermediate_size=384, moe_intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)


def model_config(name: str) -> ModelConfig:
    return {"micro": _micro, "mini": _mini}.get(name, lambda: preset(name))()


def write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@torch.no_grad()
def evaluate(checkpoint: str, task: tasks.Task, max_new_tokens: int, device: torch.device) -> dict:
    """Greedy held-out accuracy of a checkpoint (grpo.evaluate_task on the whole held-out set)."""
    path = ckpt.resolve_checkpoint(checkpoint)
    tok = DSTokenizer.load(path)
    model = load_pretrained(path, device=device, dtype=torch.float32).eval()
    max_prompt = max(len(grpo._prompt_ids(tok, e)) for e in task.heldout)
    per_seq = max_prompt + max_new_tokens + 1
    bs = min(256, len(task.heldout))
    engine = Engine(model, tok, max_batch_size=bs, cache_tokens=bs * (per_seq + 16), max_model_len=per_seq)
    t0 = time.perf_counter()
    r = grpo.evaluate_task(engine, tok, task, max_new_tokens, len(task.heldout))
    # a few sample replies, for the log
    outs = engine.generate([grpo._prompt_ids(tok, e) for e in task.heldout[:3]],
                           [grpo.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)] * 3)
    r["samples"] = [{"question": e["messages"][-1]["content"], "answer": e["answer"], "reply": o.text}
                    for e, o in zip(task.heldout[:3], outs)]
    r["eval_s"] = time.perf_counter() - t0
    del engine, model
    return r


def plot_grpo(grpo_dir: str, out_dir: str, log=print) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    with open(os.path.join(grpo_dir, "metrics.jsonl"), encoding="utf-8") as f:
        allrecs = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(grpo_dir, "train_config.json"), encoding="utf-8") as f:
        per_it = json.load(f)["grpo"]["ppo_epochs"]  # optimizer steps per iteration
    recs = [r for r in allrecs if "reward_mean" in r]  # one per optimizer step
    it = [r["step"] / per_it for r in recs]
    ev = [dict(r, step=r["step"] / per_it) for r in allrecs if "heldout_acc" in r]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(it, [r["reward_mean"] for r in recs], alpha=0.5, label="train reward (mean over P x G samples, T=1)")
    ax.plot(it, [r["accuracy"] for r in recs], alpha=0.5, label="train sample accuracy (T=1)")
    if ev:
        ax.plot([r["step"] for r in ev], [r["heldout_acc"] for r in ev], "o-", label="held-out greedy accuracy")
    ax.set_xlabel("GRPO iteration"), ax.set_ylabel("reward / accuracy"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    ax.set_title("GRPO: reward (exact match 1.0 + format 0.1)")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "grpo_reward.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(it, [r["kl"] for r in recs], color="tab:red")
    ax.set_xlabel("GRPO iteration"), ax.set_ylabel("KL(policy || SFT reference), k3, per token")
    ax.grid(alpha=0.3)
    ax.set_title("GRPO: KL to the reference")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "grpo_kl.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--out", default=None, help="output directory (default runs/posttrain_<profile>); replaced")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--base", default=None, help="skip pre-training: start from this checkpoint or run directory")
    ap.add_argument("--cache-dir", default=None, help="tokenizer/token cache (default: the loop's, ~/.cache/dsv3; "
                                                      "test profile: OUT/cache)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 is much "
                                                            "faster on a CPU shared with other jobs")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a profile value, e.g. --set grpo.lr=1e-4 (JSON values)")
    args = ap.parse_args(argv)

    prof = copy.deepcopy(PROFILES[args.profile])
    for kv in args.set:
        key, _, val = kv.partition("=")
        sec, _, k = key.partition(".")
        try:
            v = json.loads(val)
        except json.JSONDecodeError:
            v = val
        if sec not in prof or not isinstance(prof[sec], dict):
            raise SystemExit(f"--set {kv}: unknown section {sec!r}")
        prof[sec][k] = v
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = args.out or f"runs/posttrain_{args.profile}"
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    device = resolve_device(args.device)
    seed = args.seed
    logf = open(os.path.join(out, "log.txt"), "w", encoding="utf-8")

    def log(*a):
        msg = " ".join(str(x) for x in a)
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    quiet = lambda *a: logf.write(" ".join(str(x) for x in a) + "\n")  # noqa: E731
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    log(f"posttrain demo: profile {args.profile}, device {device}, seed {seed}, out {out}")

    # 1. data ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    tp = prof["task"]
    task = tasks.arithmetic_task(tp["n_train"], tp["n_heldout"], seed=seed, max_digits=tp["max_digits"],
                                 disjoint=tp.get("disjoint", "expr"))
    # nothing trained on holds a held-out calculation ("expr") / a held-out question ("text")
    held = {tasks._key(e, task.meta["disjoint"]) for e in task.heldout}
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir)
    corpus_path = os.path.join(data_dir, "arithmetic_corpus.jsonl")
    docs = tasks.arithmetic_corpus(prof["corpus"]["n_docs"], prof["corpus"]["lines_per_doc"], seed=seed,
                                   max_digits=tp["max_digits"], exclude=held)
    write_jsonl(corpus_path, ({"text": d} for d in docs))
    sp = dict(prof["sft"])
    chats_path = os.path.join(data_dir, "sft_chats.jsonl")
    write_jsonl(chats_path, tasks.arithmetic_sft_chats(sp.pop("n_chats"), seed=seed, max_digits=tp["max_digits"],
                                                       exclude=held))
    write_jsonl(os.path.join(data_dir, "heldout.jsonl"), task.heldout)
    times["data_s"] = time.perf_counter() - t0

    # 2. pre-training ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    mc = model_config(prof["model"])
    if args.base:
        base = ckpt.resolve_checkpoint(args.base)
        log(f"base: using {base} (no pre-training)")
        pre_summary = {"checkpoint": base, "reused": True}
    else:
        cache_dir = args.cache_dir or (os.path.join(out, "cache") if not prof["stdlib"] else None)
        tc = TrainConfig(out_dir=os.path.join(out, "base"), data=None if prof["stdlib"] else corpus_path,
                         extra_data=[corpus_path] if prof["stdlib"] else [], device=args.device, seed=seed,
                         eval_every=0, progress=False, log_every=10, **{"save_every": 0, **prof["pretrain"]},
                         **({"cache_dir": cache_dir} if cache_dir else {}))
        log(f"pre-training {prof['model']} for {tc.steps} steps of {tc.batch_size} x {tc.seq_len} tokens ...")
        pre_summary = train(mc, tc, log=quiet)
        base = ckpt.resolve_checkpoint(tc.out_dir)
        log(f"pre-training done: train loss {pre_summary.get('train_loss')}, val {pre_summary.get('val_loss')}")
    times["pretrain_s"] = time.perf_counter() - t0

    mnt = prof["grpo"]["max_new_tokens"]
    accs: dict[str, dict] = {}
    t0 = time.perf_counter()
    accs["base"] = evaluate(base, task, mnt, device)
    times["eval_base_s"] = time.perf_counter() - t0
    log(f"base held-out greedy accuracy {accs['base']['heldout_acc']:.3f}; e.g. {accs['base']['samples'][0]}")

    # 3. SFT -------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    scfg = sft.SFTConfig(device=args.device, seed=seed, save_every=0, keep=1, progress=False, **sp)
    sft_summary = sft.train_sft(base, chats_path, os.path.join(out, "sft"), scfg, log=quiet)
    times["sft_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    accs["sft"] = evaluate(sft_summary["checkpoint"], task, mnt, device)
    times["eval_sft_s"] = time.perf_counter() - t0
    log(f"SFT ({scfg.steps} steps): loss {sft_summary['train_loss']:.3f}, held-out greedy accuracy "
        f"{accs['sft']['heldout_acc']:.3f}; e.g. {accs['sft']['samples'][0]}")

    # 4. GRPO ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    gcfg = grpo.GRPOConfig(device=args.device, seed=seed, save_every=0, keep=1, progress=False, **prof["grpo"])
    every = max(1, gcfg.iterations // 10)
    grpo_log = lambda m: (quiet(m), (m.startswith("iter ") and int(m.split(":")[0][5:]) % every == 0)  # noqa: E731
                          and print(m, flush=True))
    grpo_summary = grpo.train_grpo(sft_summary["checkpoint"], task, os.path.join(out, "grpo"), gcfg, log=grpo_log)
    times["grpo_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    accs["grpo"] = evaluate(grpo_summary["checkpoint"], task, mnt, device)
    times["eval_grpo_s"] = time.perf_counter() - t0
    log(f"GRPO ({gcfg.iterations} iterations): held-out greedy accuracy {accs['grpo']['heldout_acc']:.3f}; "
        f"e.g. {accs['grpo']['samples'][0]}")

    # 5. report ----------------------------------------------------------------------------------
    plots = plot_grpo(os.path.join(out, "grpo"), out, log)
    times["total_s"] = time.perf_counter() - t_all
    n = len(task.heldout)
    a = {k: v["heldout_acc"] for k, v in accs.items()}
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    summary = {
        "profile": args.profile, "seed": seed, "device": dev_name, "torch": torch.__version__,
        "python": platform.python_version(), "heldout_n": n,
        "accuracy": a, "grpo_minus_sft": a["grpo"] - a["sft"],
        "heldout_reward": {k: v["heldout_reward"] for k, v in accs.items()},
        "samples": {k: v["samples"] for k, v in accs.items()},
        "timings_s": {k: round(v, 1) for k, v in times.items()},
        "model": prof["model"], "model_params": sum(p.numel() for p in load_pretrained(base).parameters()),
        "config": prof, "pretrain": {k: v for k, v in pre_summary.items() if isinstance(v, (int, float, str))},
        "sft": sft_summary, "grpo": {k: v for k, v in grpo_summary.items()}, "plots": plots,
    }
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    row = (f"| {args.profile} ({prof['model']}, {dev_name}) | {n} | {a['base']:.1%} | {a['sft']:.1%} | "
           f"{a['grpo']:.1%} | {100 * (a['grpo'] - a['sft']):+.1f} pts | {times['total_s'] / 60:.1f} min |")
    log("\n| run | held-out problems | base | after SFT | after GRPO | GRPO - SFT | wall time |\n|---|---|---|---|---|---|---|")
    log(row)
    log(f"summary: {os.path.join(out, 'summary.json')}; plots: {', '.join(plots) or 'none'}")
    logf.close()
    return summary


if __name__ == "__main__":
    main()

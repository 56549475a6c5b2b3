"""FP8 vs bf16 training loss on real text, through `dsv3 train` itself, with seeds and the run-to-run noise
(issue 15 item 4). Every run has the same preset, data, tokenizer, schedule and flags; runs differ in
--precision and --seed. A run listed twice (the same precision and seed) measures how reproducible a run is.

    PYTHONPATH=. python bench/fp8_loss_text.py --preset small --steps 1200 --batch-size 4 --seq-len 1024 \\
        --bf16-moments --runs bf16:0,bf16:1,bf16:2,fp8:0,fp8:1,fp8:2,bf16:0 --deadline-min 8 --out /tmp/fp8text

Reported (table on stdout, summary.json):
- each run's validation loss (the whole held-out split: --eval-batches covers it) at the last evaluation
  step that every run reached (the final one when all finished; a run stopped at --deadline-min still counts);
- per precision: mean and sample standard deviation over seeds;
- the paired FP8 effect: for each seed trained in both precisions (same initialisation and data order),
  fp8 / bf16 - 1, and the mean with a 95% Student-t interval (measured on `small`: even with --deterministic an
  FP8 run and a bf16 run of one seed part within 100 steps and end as far apart as two seeds do, so pairing
  narrows nothing there; bench/RESULTS.md, twenty-eighth session);
- the unpaired FP8 effect over every run of each precision, repeats included, with a 95% Welch interval (on
  a GPU two runs of one seed part after a few steps unless --deterministic, so the pairing is loose);
- for each repeated run (same precision, seed and --deterministic): whether the training-loss curves are
  identical bit for bit, the first step where they differ, and the validation-loss difference (the noise floor
  of the paired comparison).

Calls that hold only a few runs each (four `small` runs of 4 x 1024 with bf16 moments fit an 80 GB H100) pool
afterwards: `--combine A/summary.json B/summary.json` compares every run of calls with the same settings (other
seeds) at their last common validation step. A deterministic run that a deadline stopped can be run again in a
later call: the pooled comparison counts its furthest copy once, and checks that the copies agree.

The runs can share one GPU (--parallel): small batches leave it idle between kernels, and N processes
compile at once. Disk: no run writes a checkpoint (--no-checkpoints; a `small` checkpoint with its AdamW
state is ~12 GB); the data's tokenizer and token cache are built once, before the runs, in OUT/cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

# two-sided 95% Student-t quantiles by degrees of freedom, 1..30; beyond, the value at 30 (errs wide by <= 4%)
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: float) -> float:
    """The 95% two-sided t quantile at floor(df) degrees of freedom (floor: errs wide); df < 1 is taken as 1."""
    return T95[min(max(1, math.floor(df)), len(T95)) - 1] if math.isfinite(df) else T95[-1]


def parse_runs(spec: str, deterministic: bool = False) -> list[tuple[str, int, bool, str]]:
    """'bf16:0,fp8:0,bf16:0,bf16:0:det' -> [(precision, seed, deterministic, name)]. A third field `det` gives
    that run --deterministic (`deterministic`: every run); a repeated entry gets the name suffix _r2, _r3, ..."""
    out, seen = [], {}
    for item in spec.split(","):
        parts = item.split(":")
        try:
            prec, seed_i = parts[0], int(parts[1])
            if len(parts) > 3 or (len(parts) == 3 and parts[2] != "det"):
                raise ValueError
        except (ValueError, IndexError):
            raise SystemExit(f"--runs: {item!r} is not PRECISION:SEED[:det] (for example bf16:0)") from None
        if prec not in ("bf16", "fp8", "fp32"):
            raise SystemExit(f"--runs: precision {prec!r} must be bf16, fp8 or fp32")
        det = deterministic or len(parts) == 3
        k = seen[(prec, seed_i, det)] = seen.get((prec, seed_i, det), 0) + 1
        name = f"{prec}_seed{seed_i}" + ("_det" if det and not deterministic else "") + (f"_r{k}" if k > 1 else "")
        out.append((prec, seed_i, det, name))
    return out


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run's metrics.jsonl; a missing or truncated file
    gives what was written (a run killed at the deadline may end in half a line)."""
    train, val = [], []
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return train, val
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "val_loss" in r:
                val.append(r)
            elif "loss" in r and "step" in r:
                train.append(r)
    return train, val


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def t_interval(xs: list[float]) -> float:
    """Half-width of the 95% Student-t interval of the mean of xs (nan for fewer than 2)."""
    if len(xs) < 2:
        return float("nan")
    return t95(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def welch(a: list[float], b: list[float]) -> dict:
    """mean(b) / mean(a) - 1 with a 95% Welch interval (unequal variances; the t quantile at the floor of the
    Welch-Satterthwaite degrees of freedom, which errs wide), relative to mean(a)."""
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    # no spread at all (e.g. deterministic repeats only): a zero-width interval at "infinite" df
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else float("inf")
    return {"n": [len(a), len(b)], "mean": mb / ma - 1, "ci95": t95(df) * math.sqrt(va + vb) / ma, "df": df}


def analyse(runs: list[tuple[str, int, bool, str]], metrics: dict[str, tuple[list[dict], list[dict]]]) -> dict:
    """The comparison of runs (parse_runs) from their metrics ({name: read_metrics(...)}). A run without any
    validation (it failed; its log.txt says why) is listed under "failed" and left out."""
    failed = [n for *_, n in runs if not metrics[n][1]]
    runs = [r for r in runs if r[3] not in failed]
    vals = {n: {r["step"]: r for r in metrics[n][1]} for *_, n in runs}
    common = set.intersection(*(set(v) for v in vals.values())) if vals else set()
    if not common:
        raise SystemExit("no validation step that every run reached: nothing to compare (see each run's log.txt)")
    step = max(common)
    rows = []
    for prec, seed, det, name in runs:
        train = metrics[name][0]
        v = vals[name][step]
        rates = [r["tok_per_s"] for r in train[1:] if "tok_per_s" in r]
        rows.append({"run": name, "precision": prec, "seed": seed, "deterministic": det, "val_loss": v["val_loss"],
                     "val_bpb": v["val_bpb"], "steps_done": train[-1]["step"] if train else 0,
                     "tok_per_s": statistics.median(rates) if rates else None,
                     "val_curve": [(k, vals[name][k]["val_loss"]) for k in sorted(vals[name])]})
    out: dict = {"step": step, "rows": rows, "failed": failed, **compare(rows), "repeats": []}
    by_key: dict = {}
    for prec, seed, det, name in runs:
        by_key.setdefault((prec, seed, det), []).append(name)
    for names in by_key.values():
        a = names[0]
        for b in names[1:]:
            ta = {r["step"]: r["loss"] for r in metrics[a][0]}
            tb = {r["step"]: r["loss"] for r in metrics[b][0]}
            both = sorted(set(ta) & set(tb))
            diff = [s for s in both if ta[s] != tb[s]]
            out["repeats"].append({
                "runs": [a, b], "steps_compared": len(both), "identical": not diff and bool(both),
                "first_diff_step": diff[0] if diff else None,
                "max_rel_train_diff": max((abs(ta[s] / tb[s] - 1) for s in both), default=0.0),
                "val_rel_diff": vals[b][step]["val_loss"] / vals[a][step]["val_loss"] - 1})
    return out


def compare(rows: list[dict]) -> dict:
    """The statistics over rows (each with precision, seed, deterministic, val_loss): per precision, mean and std
    over seeds; the paired effect by seed; the unpaired (Welch) effect. A repeated (precision, seed, deterministic)
    counts once (its first row) except in the unpaired pool of non-deterministic runs."""
    out: dict = {"precisions": {}, "paired": {}, "unpaired": {}}
    firsts = {}  # (prec, seed, det) -> its first run (repeats are the noise floor, not more samples)
    for row in rows:
        firsts.setdefault((row["precision"], row["seed"], row["deterministic"]), row)
    kinds = list(dict.fromkeys((r["precision"], r["deterministic"]) for r in rows))
    for prec, det in kinds:
        xs = [r["val_loss"] for (p, _, d), r in firsts.items() if (p, d) == (prec, det)]
        m, s = mean_std(xs)
        out["precisions"][prec + (" deterministic" if det else "")] = {"n": len(xs), "mean": m, "std": s,
                                                                       "rel_std": s / m}
    for other, det in (k for k in kinds if k[0] != "bf16"):
        seeds = sorted(s for (p, s, d) in firsts if (p, d) == (other, det) and ("bf16", s, det) in firsts)
        d = [firsts[(other, s, det)]["val_loss"] / firsts[("bf16", s, det)]["val_loss"] - 1 for s in seeds]
        if d:
            out["paired"][other + (" deterministic" if det else "")] = {
                "seeds": seeds, "rel_diff": d, "mean": statistics.fmean(d), "ci95": t_interval(d)}
    # unpaired: every run of a precision is a sample, repeats included (two runs of one seed differ on a GPU
    # unless --deterministic: the same seed does not make the same run, so pairing by seed is only a start);
    # deterministic repeats are copies of their first run, so only first runs count there
    for other, det in (k for k in kinds if k[0] != "bf16"):
        pool = list(firsts.values()) if det else rows
        a = [r["val_loss"] for r in pool if (r["precision"], r["deterministic"]) == ("bf16", det)]
        b = [r["val_loss"] for r in pool if (r["precision"], r["deterministic"]) == (other, det)]
        if len(a) > 1 and len(b) > 1:
            out["unpaired"][other + (" deterministic" if det else "")] = welch(a, b)
    return out


def report(res: dict, header: str) -> str:
    lines = [header, "", f"validation at step {res['step']} (the last one every run reached)", "",
             "| run | val loss | bits/byte | vs first run | steps done | tok/s (median) |", "|---|---|---|---|---|---|"]
    base = res["rows"][0]["val_loss"]
    for r in res["rows"]:
        tps = f"{r['tok_per_s']:,.0f}" if r["tok_per_s"] else "-"
        lines.append(f"| {r['run']} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['val_loss'] / base - 1:+.2%} | "
                     f"{r['steps_done']} | {tps} |")
    steps = sorted({k for r in res["rows"] for k, _ in r["val_curve"]})
    lines += ["", "validation loss by step", "", "| step | " + " | ".join(r["run"] for r in res["rows"]) + " |",
              "|---" * (len(res["rows"]) + 1) + "|"]
    for k in steps:
        cells = [dict(r["val_curve"]).get(k) for r in res["rows"]]
        lines.append(f"| {k} | " + " | ".join(f"{c:.4f}" if c is not None else "" for c in cells) + " |")
    lines += ["", "| precision | seeds | mean val loss | std | std / mean |", "|---|---|---|---|---|"]
    for p, s in res["precisions"].items():
        lines.append(f"| {p} | {s['n']} | {s['mean']:.4f} | {s['std']:.4f} | {s['rel_std']:.2%} |")
    for p, s in res["paired"].items():
        per = ", ".join(f"seed {sd}: {d:+.2%}" for sd, d in zip(s["seeds"], s["rel_diff"]))
        lines.append(f"\npaired {p} / bf16 - 1 (same seed): {per}; mean {s['mean']:+.3%} +- {s['ci95']:.3%} "
                     f"(95% t interval, {len(s['seeds'])} seeds)")
    for p, s in res.get("unpaired", {}).items():
        lines.append(f"unpaired {p} / bf16 - 1 (every run, repeats included; {s['n'][0]} bf16, {s['n'][1]} {p}): "
                     f"{s['mean']:+.3%} +- {s['ci95']:.3%} (95% Welch interval, {s['df']:.1f} degrees of freedom)")
    for r in res["repeats"]:
        if r.get("what") == "validation":  # a deterministic run in two calls (--combine): the furthest one counts
            what = ("identical validation losses bit for bit" if r["identical"] else
                    f"validation losses differ from step {r['first_diff_step']} (max {r['max_rel_diff']:.2%})")
            lines.append(f"{r['runs'][1]} is a copy of {r['runs'][0]}, which counts in its place: {what} over "
                         f"{r['steps_compared']} validation steps")
            continue
        what = ("identical training losses bit for bit" if r["identical"] else
                f"training losses differ from step {r['first_diff_step']} (max {r['max_rel_train_diff']:.2%})")
        lines.append(f"repeat {r['runs'][1]} of {r['runs'][0]}: {what} over {r['steps_compared']} logged steps; "
                     f"val loss {r['val_rel_diff']:+.3%}")
    for n, how in res.get("ended", {}).items():
        if how != "exit 0":
            lines.append(f"{n}: {how}" + (" (see its log.txt)" if how.startswith("exit") else ""))
    for n in res["failed"]:
        lines.append(f"left out, no validation: {n}")
    return "\n".join(lines)


def train_command(args, prec: str, seed: int, det: bool, run_dir: str) -> list[str]:
    cmd = [sys.executable, "-m", "dsv3.cli", "train", "--preset", args.preset,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--precision", prec, "--seed", str(seed), "--samples", "0",
           "--no-progress", "--no-plots", "--out", run_dir, "--cache-dir", os.path.join(args.out, "cache"),
           "--no-checkpoints", "--eval-every", str(args.eval_every), "--eval-batches", str(args.eval_batches)]
    for flag, on in (("--compile", args.compile), ("--deterministic", det),
                     ("--bf16-weights", args.bf16_weights and prec == "bf16")):
        if on:
            cmd.append(flag)
    if args.bf16_moments:
        cmd += ["--optim-state", "bf16"]
    if args.lr is not None:
        cmd += ["--lr", str(args.lr)]
    return cmd + data_args(args)


def data_args(args) -> list[str]:
    """--data / --extra-data as given (the runs and the preparation read the same data)."""
    return (["--data", args.data] if args.data is not None else []) + [a for x in args.extra_data
                                                                      for a in ("--extra-data", x)]


def prep_command(args, run_dir: str) -> list[str]:
    """One eager step of batch 1, which builds the tokenizer and the token caches in OUT/cache."""
    cmd = [sys.executable, "-m", "dsv3.cli", "train", "--preset", args.preset, "--steps", "1", "--batch-size", "1",
           "--seq-len", str(args.seq_len), "--samples", "0", "--no-progress", "--no-plots", "--out", run_dir,
           "--cache-dir", os.path.join(args.out, "cache"), "--no-checkpoints", "--eval-every", "0"]
    return cmd + data_args(args)


def run_all(args, runs) -> dict[str, str]:
    """Launch the runs, at most --parallel at a time; past --deadline-min, stop the ones still running
    (SIGTERM: `dsv3 train` ends after its current step; --grace-s for all of them together, then SIGKILL).
    Returns {name: how it ended}: "exit 0", "exit N", "stopped at the deadline" or "not started"."""
    deadline = time.time() + args.deadline_min * 60 if args.deadline_min else None
    todo, live, ended = list(runs), [], {}
    try:
        while todo or live:
            while todo and len(live) < args.parallel:
                prec, seed, det, name = todo.pop(0)
                d = os.path.join(args.out, name)
                if os.path.exists(d) and os.listdir(d):  # dsv3 train --no-checkpoints would append to its metrics
                    raise SystemExit(f"{d} exists and is not empty (an earlier run's metrics would mix with this "
                                     "one's): give another --out or remove it")
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, "log.txt"), "w") as log:
                    cmd = train_command(args, prec, seed, det, d)
                    live.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
            time.sleep(args.poll_s)
            for name, p in list(live):
                if p.poll() is not None:
                    live.remove((name, p))
                    ended[name] = f"exit {p.returncode}"
                    print(f"{name}: {ended[name]}", flush=True)
            if deadline and time.time() > deadline and (live or todo):
                print(f"deadline: stopping {[n for n, _ in live]}; not started {[r[3] for r in todo]}", flush=True)
                ended.update({r[3]: "not started" for r in todo})
                todo = []
                for name, p in live:
                    p.send_signal(signal.SIGTERM)
                    ended[name] = "stopped at the deadline"
                grace = time.time() + args.grace_s
                for _, p in live:
                    try:
                        p.wait(timeout=max(0.0, grace - time.time()))
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                live = []
    finally:  # the bench itself stopped (Ctrl-C, an error): no run outlives it
        for _, p in live:
            if p.poll() is None:
                p.kill()
                p.wait()
    return ended


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--data", default=None, help="dsv3 train --data (default: the Python standard library)")
    ap.add_argument("--extra-data", action="append", default=[], help="dsv3 train --extra-data (repeatable)")
    ap.add_argument("--out", default="runs/fp8_loss_text")
    ap.add_argument("--runs", default="bf16:0,bf16:1,bf16:2,fp8:0,fp8:1,fp8:2,bf16:0",
                    help="precision:seed[:det] list; the first is the baseline; a repeated entry measures "
                         "reproducibility; :det runs with dsv3 train --deterministic")
    ap.add_argument("--parallel", type=int, default=0, help="runs at a time (0: all)")
    ap.add_argument("--deadline-min", type=float, default=0.0, help="stop runs still going after this many minutes "
                                                                     "(0: none); the last common validation counts")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-batches", type=int, default=64, help="batches per validation (enough for the whole "
                                                                 "held-out split makes every validation exact)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--deterministic", action="store_true", help="dsv3 train --deterministic for every run")
    ap.add_argument("--bf16-weights", action="store_true", help="dsv3 train --bf16-weights for the bf16 runs")
    ap.add_argument("--bf16-moments", action="store_true", help="dsv3 train --optim-state bf16 (the paper's "
                                                                "AdamW moments; ~4 GB less per `small` run)")
    ap.add_argument("--poll-s", type=float, default=5.0)
    ap.add_argument("--grace-s", type=float, default=90.0)
    ap.add_argument("--combine", nargs="+", metavar="SUMMARY", default=None,
                    help="pool the runs of earlier calls' summary.json files (same settings, other seeds) into one "
                         "comparison at their last common validation step; writes OUT/combined.json and .md")
    return ap


# the flags that only schedule a call (which runs, where, how long): calls that differ in these alone pool
SCHEDULING = ("runs", "out", "deadline_min", "grace_s", "parallel", "poll_s", "combine")


def settings_text(args) -> str:
    return (f"{args.preset}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
            f"{'compiled' if args.compile else 'eager'}{', deterministic' if args.deterministic else ''}"
            f"{', bf16 AdamW moments' if args.bf16_moments else ''}{f', lr {args.lr:g}' if args.lr else ''}")


def combine(paths: list[str]) -> dict:
    """The runs of several calls' summary.json pooled (for example seeds 0-1 in one device call, 2-3 in the next,
    when one call's time or the card's memory holds only four runs). The calls must agree on every
    setting but the scheduling ones (SCHEDULING); the comparison is at the last validation step that every run
    reached. A run's name gets @K, K its summary's place in `paths` (from 1).

    A deterministic run (same precision and seed) in more than one call, for example one a deadline stopped and a
    later call ran again, counts once: the copy that reached the furthest validation step stands for it, and the
    copies' validation losses at their common steps are compared (res["repeats"]: equal, or where they part)."""
    rows, ref = [], None
    for k, path in enumerate(paths, 1):
        try:
            with open(path) as f:
                res = json.load(f)
            cmd = res["command"].split()[1:]  # [0]: the script's path
            res["rows"][0]["val_curve"]
        except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise SystemExit(f"--combine: {path} is not a summary.json of this bench with runs in it ({e!r})") from None
        args = build_parser().parse_args(cmd)
        cfg = {key: v for key, v in vars(args).items() if key not in SCHEDULING}
        if ref is None:
            ref = (path, cfg, settings_text(args))
        elif cfg != ref[1]:
            diff = ", ".join("--" + key.replace("_", "-") for key in sorted(cfg) if cfg[key] != ref[1][key])
            raise SystemExit(f"--combine: {path} and {ref[0]} ran with other settings ({diff}): their runs do "
                             "not pool")
        rows += [{**r, "run": f"{r['run']}@{k}", "val_curve": [tuple(c) for c in r["val_curve"]]}
                 for r in res["rows"]]
    rows, repeats = _merge_deterministic_copies(rows)
    step = max(set.intersection(*({s for s, _ in r["val_curve"]} for r in rows)), default=None)
    if step is None:
        raise SystemExit("--combine: no validation step that every run reached: nothing to compare")
    for r in rows:
        # bits per byte are the loss times a constant of the held-out split (its tokens per byte, / ln 2)
        bpb_per_loss = r["val_bpb"] / r["val_loss"]
        r["val_loss"] = dict(r["val_curve"])[step]
        r["val_bpb"] = r["val_loss"] * bpb_per_loss
    return {"step": step, "rows": rows, "failed": [], **compare(rows), "repeats": repeats, "sources": list(paths),
            "settings": ref[2]}


def _merge_deterministic_copies(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows with each deterministic (precision, seed) once: its copy with the furthest validation step, in the
    first copy's place; one repeat record per dropped copy: does its validation curve equal the kept one's?)"""
    groups: dict = {}
    for r in rows:
        key = (r["precision"], r["seed"]) if r["deterministic"] else id(r)
        groups.setdefault(key, []).append(r)
    kept, repeats = [], []
    for copies in groups.values():
        best = max(copies, key=lambda r: (max((s for s, _ in r["val_curve"]), default=-1), -copies.index(r)))
        kept.append(best)
        for other in (r for r in copies if r is not best):
            a, b = dict(best["val_curve"]), dict(other["val_curve"])
            both = sorted(set(a) & set(b))
            diff = [s for s in both if a[s] != b[s]]
            repeats.append({"runs": [best["run"], other["run"]], "steps_compared": len(both), "what": "validation",
                            "identical": not diff and bool(both), "first_diff_step": diff[0] if diff else None,
                            "max_rel_diff": max((abs(b[s] / a[s] - 1) for s in both), default=0.0)})
    return kept, repeats


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.combine:
        res = combine(args.combine)
        text = report(res, f"{len(res['rows'])} runs pooled from {len(args.combine)} calls: {res['settings']}")
        print(text, flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "combined.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(args.out, "combined.md"), "w") as f:
            f.write(text + "\n")
        return
    runs = parse_runs(args.runs, args.deterministic)
    args.parallel = args.parallel or len(runs)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    # the tokenizer and token caches, once: N runs starting together would each build them
    prep = os.path.join(args.out, "prep")
    subprocess.run(prep_command(args, prep), check=True, stdout=subprocess.DEVNULL)
    print(f"data prepared in {time.time() - t0:.0f} s", flush=True)
    ended = run_all(args, runs)
    res = analyse(runs, {n: read_metrics(os.path.join(args.out, n)) for *_, n in runs})
    res["ended"] = ended
    res["minutes"] = (time.time() - t0) / 60
    res["command"] = " ".join(sys.argv)
    header = f"{settings_text(args)}; {len(runs)} runs, {args.parallel} at a time, {res['minutes']:.1f} min"
    text = report(res, header)
    print(text, flush=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()

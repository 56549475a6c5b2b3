"""Where FP8 training's memory goes, beside bf16 (issue 15 item 3: FP8 must use less memory than bf16; on the
H200 the 671b-slice peaked at 45.0 GiB in FP8 against 33.5 in bf16).

    PYTHONPATH=. python bench/fp8_memory.py                                  # CPU: a 3-layer `small` cut
    PYTHONPATH=. python bench/fp8_memory.py --device cuda --preset 671b-slice --vocab 0 --batch 2 --seq-len 2048 --compile

--preset 671b-slice is bench/train_speed.py's slice (the 671B's layer widths, 3 layers, 16 routed experts, no MTP:
the shape of the 45.0 / 33.5 GiB figures); --layers does not apply to it. A preset is cut to --layers layers + 1 MTP.

For each precision (bf16 autocast with fp32 masters; FP8 with the attention / MLP linears and the routed experts
swapped, `convert_to_fp8_training(experts=True)`), one forward + loss under a saved-tensor hook, then backward:
  * saved: the bytes autograd keeps for backward that are not parameters (unique storages: what the hook sees,
    the FP8 functions' payloads included), split into FP8 payloads and the rest;
  * on CUDA also the peak allocated memory of forward + backward beyond the model and its gradients'
    (torch.cuda.max_memory_allocated after reset), which includes the transients of both passes.
With --compile the blocks are compiled (as `dsv3 train --compile`): the hook does not see inside compiled
graphs, so there "saved" counts only what crosses their boundaries; the CUDA peak is the figure to trust.
Prints one table.

--variants V1,V2 (CUDA; bench/train_speed.py's variant tags, e.g. bf16+compile+bf16w,fp8+compile+bf16w): what is
alive at the peak of a training step, instead of the table above. Each variant is built as train_speed builds it
(its optimizer included), takes one step, then a second under torch.cuda.memory._record_memory_history; the
allocator's trace is replayed (`peak_breakdown`) to the moment the allocated bytes peak, and the blocks alive then
are summed by where they were allocated: the innermost frame in dsv3/ or bench/, else the compiled graph's
generated file (inductor), else "(no Python frame)" (the autograd engine's own, e.g. a gradient accumulated in C++).
Prints the step's peak and the --top largest groups per variant, so FP8's and bf16's peaks can be told apart.

    PYTHONPATH=. python bench/fp8_memory.py --device cuda --preset 671b-slice --vocab 0 --batch 2 --seq-len 2048 \
        --variants bf16+compile+bf16w,fp8+compile+bf16w,fp8e+compile+bf16w --top 12
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dsv3  # noqa: E402
from dsv3.training import fp8 as f8  # noqa: E402
from dsv3.training.loss import compute_loss  # noqa: E402


def _storages(obj, into: dict) -> None:
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        into[st.data_ptr()] = (st.nbytes(), obj.dtype)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _storages(o, into)


def measure(args, precision: str) -> dict:
    dev = torch.device(args.device)
    if args.preset == "671b-slice":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from train_speed import shapes

        cfg = shapes(4)["671b-slice"][0]
    else:
        cfg = dsv3.preset(args.preset).replace(num_hidden_layers=args.layers, num_nextn_predict_layers=1)
    if args.vocab:
        cfg = cfg.replace(vocab_size=args.vocab)
    torch.manual_seed(0)
    model = dsv3.build_model(cfg, device=dev, dtype=torch.float32)
    if precision == "fp8":
        f8.convert_to_fp8_training(model, backend="auto", experts=True)
    if args.compile:
        for blk in list(model.layers) + list(model.mtp):
            blk.compile()
    seen: dict = {}
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=dev)
    base = 0
    # a previous measure()'s compiled model lives on in reference cycles (dynamo's guards) until the cyclic GC runs
    # (seen on the CPU): collected here, before the baseline, not in the middle of this run. The likely cause of the
    # negative "peak beyond weights + grads" of compiled FP8 on the H200, 2026-12-05 (not re-measured since)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    # (the FP8 functions keep their payloads through save_for_backward too: this hook sees them)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (_storages(t, seen), t)[1], lambda t: t), \
            torch.autocast(dev.type, dtype=torch.bfloat16):
        out = model(x[:, :-1])
        loss = compute_loss(out, x[:, 1:], 0.3).total
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {k: v for k, v in seen.items() if k not in params}
    fp8 = sum(n for n, dt in kept.values() if dt == torch.float8_e4m3fn)
    row = dict(precision=precision, saved=sum(n for n, _ in kept.values()), saved_fp8=fp8, storages=len(kept))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        row["peak"] = torch.cuda.max_memory_allocated() - base - grads
    del model, out, loss
    return row


_REPO_DIRS = ("/dsv3/", "/bench/")


def _label(frames: list[dict]) -> str:
    """Where an allocation was made: the innermost frame in this repository (file:line function), else the
    generated file of a compiled graph (inductor's output code), else '(no Python frame)'."""
    for f in frames:
        name = f.get("filename", "")
        if any(d in name for d in _REPO_DIRS) and "/torch/" not in name:
            short = name[max(name.rfind(d) for d in _REPO_DIRS if d in name) + 1:]
            return f"{short}:{f.get('line')} {f.get('name')}"
    for f in frames:
        name = f.get("filename", "")
        if "torchinductor" in name or "/_inductor/" in name:
            return f"inductor {os.path.basename(name)}"
    return "(no Python frame)"


def peak_breakdown(trace: list[dict], top: int = 12) -> tuple[int, list[tuple[str, int, int]]]:
    """Replay one device's allocator trace (torch.cuda.memory._snapshot()["device_traces"][i]: entries with
    action, addr, size, frames) -> (the peak of the bytes allocated since the trace began, [(label, bytes, blocks)]
    of the blocks alive at that peak, largest first, at most `top`, the rest summed as "(the rest)"). A block counts
    from its "alloc" to its first "free_requested" / "free_completed"; blocks allocated before the trace began are
    not in it (their bytes are the caller's baseline)."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for e in trace:
        act, addr = e.get("action"), e.get("addr")
        if act == "alloc":
            live[addr] = (e["size"], _label(e.get("frames") or []))
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif act in ("free_requested", "free_completed") and addr in live:
            total -= live.pop(addr)[0]
    groups: dict[str, list[int]] = {}
    for size, label in at_peak.values():
        g = groups.setdefault(label, [0, 0])
        g[0] += size
        g[1] += 1
    rows = sorted(((k, b, n) for k, (b, n) in groups.items()), key=lambda r: -r[1])
    if len(rows) > top:
        rest = rows[top:]
        rows = rows[:top] + [("(the rest)", sum(b for _, b, _ in rest), sum(n for _, _, n in rest))]
    return peak, rows


def peak_event(trace: list[dict]) -> tuple[int, int, str]:
    """Where peak_breakdown's peak is reached -> (its allocation's index among the trace's allocations, how many
    allocations the trace has, the dsv3 line that made it): early indices are the forward, late ones the backward
    and the optimizer step; (0, 0, "") for a trace without allocations."""
    live: dict[int, int] = {}
    total = peak = 0
    n = at = 0
    label = ""
    for e in trace:
        act, addr = e.get("action"), e.get("addr")
        if act == "alloc":
            live[addr] = e["size"]
            total += e["size"]
            if total > peak:
                peak, at, label = total, n, _label(e.get("frames") or [])
            n += 1
        elif act in ("free_requested", "free_completed") and addr in live:
            total -= live.pop(addr)
    return at, n, label


def snapshot_variant(args, variant: str) -> tuple[float, float, int, list, tuple]:
    """One training step of `variant` (bench/train_speed.py's tags) recorded after a first one -> (the step's
    peak allocated GiB, the GiB allocated before it, the trace's peak bytes above that, peak_breakdown's rows,
    peak_event's (index, allocations, label))."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_speed import parse_variant, setup_dsv3, shapes

    from dsv3.training.optim import clip_and_step

    if args.preset == "671b-slice":
        cfg = shapes(4)["671b-slice"][0]
    else:
        cfg = dsv3.preset(args.preset).replace(num_hidden_layers=args.layers, num_nextn_predict_layers=1)
    if args.vocab:
        cfg = cfg.replace(vocab_size=args.vocab)
    kw = parse_variant(variant)
    model, opt = setup_dsv3(cfg, **kw)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device="cuda")

    def step(model, opt):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x[:, :-1])
        compute_loss(out, x[:, 1:], 0.3, compiled=kw["compile_blocks"]).total.backward()
        clip_and_step(opt, 1.0)
        opt.zero_grad(set_to_none=True)

    step(model, opt)  # compiles, and creates the optimizer's state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    try:
        step(model, opt)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated()
    trace = snap["device_traces"][torch.cuda.current_device()]
    extra, rows = peak_breakdown(trace, args.top)
    where = peak_event(trace)
    del model, opt
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return peak / 2**30, base / 2**30, extra, rows, where


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="small", help="a preset, or 671b-slice (bench/train_speed.py's)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=4096, help="a smaller vocabulary (0: the preset's)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--variants", default=None,
                    help="CUDA: what is alive at a training step's peak, per bench/train_speed.py variant (module doc)")
    ap.add_argument("--top", type=int, default=12, help="--variants: the largest groups shown per variant")
    args = ap.parse_args()
    if args.variants:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from train_speed import parse_variant

        try:  # every tag checked before the first model is built
            for v in args.variants.split(","):
                parse_variant(v)
        except ValueError as e:
            raise SystemExit(f"--variants: {e}") from None
        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            raise SystemExit("--variants needs --device cuda and a GPU (the allocator's trace is CUDA's)")
        for v in args.variants.split(","):
            peak, base, extra, rows, (at, n, label) = snapshot_variant(args, v)
            print(f"\n## {v}: {args.preset}, {args.batch} x {args.seq_len} tokens, {torch.cuda.get_device_name()}: "
                  f"step peak {peak:.2f} GiB = {base:.2f} allocated before the step (weights, masters, optimizer "
                  f"state) + {extra / 2**30:.2f} allocated during it and alive at its peak; reached at allocation "
                  f"{at:,} of the step's {n:,} ({100 * at / max(n, 1):.0f}%), by {label}")
            print("| allocated at | GiB alive at the peak | blocks |")
            print("|---|---|---|")
            for label, b, n in rows:
                print(f"| {label} | {b / 2**30:.3f} | {n} |")
        return
    rows = [measure(args, p) for p in ("bf16", "fp8")]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    what = "671b-slice" if args.preset == "671b-slice" else f"{args.preset} cut to {args.layers} layers (+1 MTP)"
    print(f"\n{what}, {args.batch} x {args.seq_len} tokens, {name}, "
          f"torch {torch.__version__}{', compiled blocks' if args.compile else ''}")
    print("| precision | saved for backward (MiB) | of it FP8 payloads (MiB) | storages | peak beyond weights+grads (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak'] / 2**20:,.0f}" if "peak" in r else "-"
        print(f"| {r['precision']} | {r['saved'] / 2**20:,.1f} | {r['saved_fp8'] / 2**20:,.1f} | {r['storages']} | "
              f"{peak} |")


if __name__ == "__main__":
    main()

"""Where FP8 training's memory goes, beside bf16 (issue 15 item 3: FP8 must use less memory than bf16; on the
H200 the 671b-slice peaked at 45.0 GiB in FP8 against 33.5 in bf16).

    PYTHONPATH=. python bench/fp8_memory.py                                  # CPU: a 3-layer `small` cut
    PYTHONPATH=. python bench/fp8_memory.py --device cuda --preset 671b-slice --vocab 0 --batch 2 --seq-len 2048 --compile

--preset 671b-slice is bench/train_speed.py's slice (the 671B's layer widths, 3 layers, 16 routed experts, no MTP:
the shape of the 45.0 / 33.5 GiB figures); --layers does not apply to it. A preset is cut to --layers layers + 1 MTP.

For each precision (bf16 autocast with fp32 masters; FP8 with the attention / MLP linears and the routed experts
swapped, `convert_to_fp8_training(experts=True)`), one forward + loss under a saved-tensor hook, then backward:
  * saved: the bytes autograd keeps for backward that are not parameters (unique storages: what the hook sees
    plus the FP8 functions' own saved tuples, which live on their ctx), split into FP8 payloads and the rest;
  * on CUDA also the peak allocated memory of forward + backward beyond the model and its gradients'
    (torch.cuda.max_memory_allocated after reset), which includes the transients of both passes.
With --compile the blocks are compiled (as `dsv3 train --compile`): the hook does not see inside compiled
graphs, so there "saved" counts only what crosses their boundaries; the CUDA peak is the figure to trust.
Prints one table.
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
    orig = f8._FP8LinearFn.forward, f8._FP8GroupedFn.forward

    def wrap(fn):
        def forward(ctx, *a):
            y = fn(ctx, *a)
            _storages(ctx.saved, seen)
            return y
        return staticmethod(forward)

    f8._FP8LinearFn.forward, f8._FP8GroupedFn.forward = wrap(orig[0]), wrap(orig[1])
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
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (_storages(t, seen), t)[1], lambda t: t), \
                torch.autocast(dev.type, dtype=torch.bfloat16):
            out = model(x[:, :-1])
            loss = compute_loss(out, x[:, 1:], 0.3).total
        loss.backward()
    finally:
        f8._FP8LinearFn.forward, f8._FP8GroupedFn.forward = staticmethod(orig[0]), staticmethod(orig[1])
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="small", help="a preset, or 671b-slice (bench/train_speed.py's)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=4096, help="a smaller vocabulary (0: the preset's)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
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

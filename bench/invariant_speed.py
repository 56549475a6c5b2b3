"""What the batch-invariant mode costs and what it buys (dsv3/kernels/invariant.py), offline on one GPU.

    PYTHONPATH=. python bench/invariant_speed.py CHECKPOINT [--batches 1,32] [--ks 0,1] [--new 128]
    PYTHONPATH=. python bench/invariant_speed.py --preset small        (random weights and prompts)

For the mode off, then on, and every k of --ks: the same held-out prompts (bench/decode.py's windows of val-split
documents, --prompt-len tokens) decoded greedily, --new tokens each, B at a time for every B of --batches, by
bench/spec_gpu.py's `timed_decode` (an untimed pass that captures the graphs, then the timed one: decode tok/s of the
steps after each batch's prefill; CUDA graphs, no compile: the mode refuses it). Reported per row: tok/s, the mode's
speed against off at the same B and k, and how many of the prompts' outputs equal those of the first row of the same
mode (batch --batches[0], k = 0): without the mode a bf16 row's sums follow its batch, so a near-tie can flip; with
it every output should be equal, speculation included. The card's copy bandwidth is measured and printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv3 import kernels  # noqa: E402
from dsv3.checkpoints.hf import load_pretrained  # noqa: E402
from dsv3.checkpoints.rundir import resolve_checkpoint  # noqa: E402
from dsv3.tokenizer import DSTokenizer  # noqa: E402
from bandwidth import copy_bandwidth  # noqa: E402  (bench/bandwidth.py)
from decode import prompts as heldout_prompts  # noqa: E402
from spec_gpu import compare, fmt_cmp, log, timed_decode  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="a run or checkpoint directory (bf16 on the GPU)")
    ap.add_argument("--preset", help="instead of a checkpoint: this preset with random weights (bf16) and random "
                                     "prompts (its outputs compared the same way; no tokenizer needed)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--ks", default="0,1")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=32, help="prompts decoded per row (B at a time)")
    ap.add_argument("--out-json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("invariant_speed.py: the batch-invariant mode needs a GPU")
    device = torch.device("cuda")
    if (args.checkpoint is None) == (args.preset is None):
        ap.error("give a checkpoint or --preset")
    if args.preset:
        from dsv3.config import preset
        from dsv3.model import build_model

        tok, path = None, f"{args.preset} (random weights)"
        model = build_model(preset(args.preset), device=device, seed=0).to(torch.bfloat16).eval()
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, model.config.vocab_size, (args.prompts, args.prompt_len), generator=g).tolist()
    else:
        path = resolve_checkpoint(args.checkpoint)
        tok = DSTokenizer.load(path)
        model = load_pretrained(path, device=device, dtype=torch.bfloat16).eval()
        prompts = heldout_prompts(tok, args.prompts, args.prompt_len)
    bw = copy_bandwidth(device, 2 << 30)
    log(f"{path}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; {bw['caption']}")
    batches = [int(b) for b in args.batches.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    if 0 in ks:
        ks = [0] + [k for k in ks if k]
    if ks[0] != 0 or (ks[1:] and model.config.num_nextn_predict_layers == 0):
        raise SystemExit("--ks: 0 first (the reference row), and k > 0 needs MTP modules")
    rows, speed = [], {}
    for on in (False, True):
        kernels.set_batch_invariant(on)  # process-wide: every engine below runs the mode's kernels or none
        ref = None
        for B in batches:
            for k in ks:
                r = timed_decode(model, tok, prompts, B, k, args.new, graphs=True, compile_decode=False,
                                 device=device)
                outs = r.pop("outputs")
                r.pop("margins", None)
                ref = outs if ref is None else ref
                r.update(mode="on" if on else "off", vs_first=compare(outs, ref))
                speed[(on, B, k)] = r["decode_tok_s"]
                rows.append(r)
                log(f"mode {r['mode']}, batch {B}, k {k}: {r['decode_tok_s']:.1f} tok/s, "
                    f"{fmt_cmp(r['vs_first'])[0]} outputs equal batch {batches[0]}'s at k 0")
    kernels.set_batch_invariant(False)
    print(f"\n{bw['caption']}\n")
    print("| mode | batch | k | decode tok/s | mode on / off | acceptance | outputs equal the first row's "
          "(batch {}, k 0) | first divergences |".format(batches[0]))
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        same, where = fmt_cmp(r["vs_first"])
        ratio = speed[(True, r["batch"], r["k"])] / speed[(False, r["batch"], r["k"])] if r["mode"] == "on" else None
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        print(f"| {r['mode']} | {r['batch']} | {r['k']} | {r['decode_tok_s']:,.1f} | "
              f"{'-' if ratio is None else f'{ratio:.2f}x'} | {acc} | {same} | {where} |")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"card": bw["card"], "copy_bandwidth": bw, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Each row of a teacher-forced decode step against the uncached forward, engine configuration by configuration,
on one GPU: which decode path (graphed or eager, each switched kernel on, off or forced to its reference,
compiled) is off, and by how much.

    python bench/decode_rows_diag.py                (the micro model of tests/test_gpu_*.py with random routing)
    python bench/decode_rows_diag.py --bias-routing  (routing by the correction bias alone, as those tests now do)

The model: tests/test_gpu_expert_gemv.py's micro MoE (16 experts top-4, 3 layers, bf16) and its three prompts (9,
17, 40 tokens), prefilled, then one decode step of bucket 4. Each line prints the relative error of the step's
logits per row against `model(tokens)` (the uncached forward, which takes the shipped kernels). Written for the
34% gaps of the graphed-step GPU tests (bench/RESULTS.md, 2026-12-05): every decode path agreed to 1.1-1.7%; a
row moved 42% only when the uncached forward itself took another expert path (a routing near-tie).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(here, ".."), os.path.join(here, "..", "tests")]

from dsv3 import kernels  # noqa: E402
from dsv3.inference.engine import Engine, SamplingParams  # noqa: E402
from dsv3.model.moe import Router  # noqa: E402


def micro_model(bias_routing: bool):
    """The graphed decode-step tests' micro model and prompts (tests/test_gpu_expert_gemv.py, one definition);
    without `bias_routing` its correction biases go back to 0, so the random routers choose (the routing that
    made the tests' paths disagree on near-ties)."""
    from test_gpu_expert_gemv import decode_model_and_prompts

    m, prompts = decode_model_and_prompts()
    if not bias_routing:
        for r in m.modules():
            if isinstance(r, Router):
                r.e_score_correction_bias.zero_()
    return m, prompts


def rows(m, prompts, tag: str, eager: bool = False, **engine_kw) -> None:
    """One engine: prefill, one teacher-forced step (graphed, or the same static step eagerly), each row's error."""
    eng = Engine(m, None, max_batch_size=4, cuda_graphs=True, **engine_kw)
    if eager:
        eng._graphs.use_graphs = False  # the bucketed static step, run eagerly on the GPU
    for p in prompts:
        eng.add_request(list(p), SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    eng.step()  # prefill
    reqs = eng.running
    logits = eng._graphs.main([[r.tokens[-1]] for r in reqs], [r.main_len for r in reqs],
                              [r.blocks for r in reqs])[0][:, 0].float()
    errs = []
    with torch.no_grad():
        for b, r in enumerate(reqs):
            want = m(torch.tensor([r.tokens], device="cuda")).logits[0, -1].float()
            errs.append(round(((logits[b] - want).norm() / want.norm()).item(), 4))
    print(f"{tag:50s} rows vs uncached: {errs}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bias-routing", action="store_true", help="route by the correction bias alone")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_rows_diag.py: CUDA is not available (the graphed decode step needs a GPU)")
    m, prompts = micro_model(args.bias_routing)
    kb = kernels.backend
    print("switches", dict(kb.SWITCHED))
    rows(m, prompts, "graphed #1 defaults")
    rows(m, prompts, "graphed #2 defaults")
    rows(m, prompts, "static eager on GPU", eager=True)
    for op in ("mla_decode", "expert_gemv", "router_topk", "latent_store", "dense_gemv"):
        with kernels.use_backend(**{op: "reference"}):
            rows(m, prompts, f"static eager on GPU, {op} reference", eager=True)
            rows(m, prompts, f"graphed, {op} reference")
    for op in ("dense_gemv", "latent_store", "moe_gemm"):
        old = kb.switch(op, False)
        rows(m, prompts, f"graphed, {op} off")
        kb.switch(op, old)
    old = {op: kb.switch(op, False) for op in kb.SWITCHED}
    rows(m, prompts, "graphed, all switched off")
    with kernels.use_backend("reference"):
        rows(m, prompts, "graphed, every op reference")
        rows(m, prompts, "static eager, every op reference", eager=True)
    for op, v in old.items():
        kb.switch(op, v)
    rows(m, prompts, "graphed compiled defaults", compile_decode=True)


if __name__ == "__main__":
    main()

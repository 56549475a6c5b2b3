"""Scratch (not committed): why the decode combine as explicit terms breaks the compiled bf16 graphed step with the
shared experts in the GEMV. Usage: python scratch/diag_combine.py {layer,engine,engine_ref_first} [terms|sum]"""
import sys

import torch

sys.path[:0] = [".", "tests"]
from dsv3 import kernels  # noqa: E402
from dsv3.model import moe  # noqa: E402
from dsv3.model.moe import Experts  # noqa: E402


def weighted_rows(y_NRD, w_NK):
    K = w_NK.shape[1]
    acc = y_NRD[:, 0].float() * w_NK[:, :1].float()
    for r in range(1, y_NRD.shape[1]):
        acc = acc + (y_NRD[:, r].float() * w_NK[:, r:r + 1].float() if r < K else y_NRD[:, r].float())
    return acc


def forward_gemv_terms(self, x_ND, idx_NK, w_NK, shared=None):
    N, K = idx_NK.shape
    g, gs, u, us, d, ds = self.gemv_weights()
    if shared is None:
        flat = idx_NK.reshape(-1)
        h_MI = kernels.expert_gemv(x_ND, g, gs, flat, K, up=u, up_s=us)
        y_MD = kernels.expert_gemv(h_MI, d, ds, flat, 1)
        return weighted_rows(y_MD.view(N, K, -1), w_NK).to(x_ND.dtype)
    g2, gs2, u2, us2, d2, ds2 = shared
    S = g2.shape[0]
    flat = idx_NK.reshape(-1)
    h_MI = kernels.expert_gemv(x_ND, g, gs, flat, K + S, up=u, up_s=us, extra=(g2, gs2, u2, us2), routed=K)
    y_MD = kernels.expert_gemv(h_MI, d, ds, flat, 1, extra=(d2, ds2, None, None), routed=K)
    return weighted_rows(y_MD.view(N, K + S, -1), w_NK).to(x_ND.dtype)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def apply_cfg():
    import os
    import torch._inductor.config as ic
    for item in filter(None, os.environ.get("DIAG_CFG", "").split(";")):
        k, v = item.split("=")
        obj = ic
        *path, last = k.split(".")
        for a in path:
            obj = getattr(obj, a)
        setattr(obj, last, eval(v))
        print("inductor config", k, "=", v, flush=True)


def main():
    apply_cfg()
    what = sys.argv[1]
    form = sys.argv[2] if len(sys.argv) > 2 else "terms"
    if form == "terms":
        Experts.forward_gemv = forward_gemv_terms
    from test_gpu_expert_gemv import decode_model_and_prompts, graphed_step_logits

    m, prompts = decode_model_and_prompts()
    kernels.set_shared_gemv(True)
    print(f"== {what} {form}", flush=True)
    if what == "layer":
        layer = m.layers[1]
        mlp = layer.mlp
        x = torch.randn(4, 1, 256, device="cuda").bfloat16()
        with torch.no_grad():
            eager = mlp(x)[0]
            comp = torch.compile(lambda t: mlp(t)[0])(x)
            print("moe compiled vs eager", rel(comp, eager), flush=True)
            kernels.set_shared_gemv(False)
            torch._dynamo.reset()
            off = mlp(x)[0]
            print("moe eager shared-on vs shared-off", rel(eager, off), flush=True)
            kernels.set_shared_gemv(True)

            def blk(t):
                h = t + mlp(t)[0]
                return h, torch.nn.functional.rms_norm(h, (256,), m.layers[2].input_layernorm.weight, 1e-6)
            torch._dynamo.reset()
            e1, e2 = blk(x)
            c1, c2 = torch.compile(blk)(x)
            print("moe+add+norm compiled vs eager", rel(c1, e1), rel(c2, e2), flush=True)
        return
    if what == "cache":  # which latent-cache rows the compiled graphed step changes (expected: the new tokens')
        from conftest import decode_step
        from dsv3.inference import cache as cmod

        made, real = [], cmod.PagedLatentCache.for_model
        cmod.PagedLatentCache.for_model = classmethod(lambda cls, *a, **k: made.append(real(*a, **k)) or made[-1])
        snap = {}

        def after():
            snap["kv"], snap["pe"] = made[-1].kv.clone(), made[-1].pe.clone()
        logits, eng = decode_step(m, prompts, after_prefill=after, max_batch_size=4, compile_decode=True)
        c = made[-1]
        print("block size", getattr(c, "block_size", None), "pad", eng._pad, flush=True)
        for r in eng.running:
            print("request", len(r.tokens), "tokens, blocks", list(r.blocks)[:4], flush=True)
        for name in ("kv", "pe"):
            new, old_ = getattr(c, name), snap[name]
            diff = (new != old_).any(-1)  # (slots, rows)
            for sl in range(diff.shape[0]):
                rows = diff[sl].nonzero().flatten().tolist()
                print(name, "slot", sl, "changed rows", rows[:20], "count", len(rows), flush=True)
        with torch.no_grad():
            for b, r in enumerate(eng.running):
                want = m(torch.tensor([r.tokens], device="cuda")).logits[0, -1].float()
                print("row", b, "rel vs uncached", rel(logits[b], want), flush=True)
        return
    if what == "engine_ref_first":
        kernels.set_shared_gemv(False)
        try:
            graphed_step_logits(m, prompts, compile_decode=True)
            print("ref (shared off) ok", flush=True)
        except AssertionError as e:
            print("ref (shared off) FAILED", e, flush=True)
        kernels.set_shared_gemv(True)
    for kw in ({"compile_decode": True}, {"compile_decode": False}):
        snap = {k: v.detach().clone() for k, v in list(m.named_parameters()) + list(m.named_buffers())}
        try:
            graphed_step_logits(m, prompts, **kw)
            print(kw, "ok", flush=True)
        except AssertionError as e:
            print(kw, "FAILED", str(e).splitlines()[0], flush=True)
        now = dict(list(m.named_parameters()) + list(m.named_buffers()))
        changed = [(k, rel(now[k], v) if v.is_floating_point() else (now[k] != v).sum().item())
                   for k, v in snap.items() if not torch.equal(now[k], v)]
        print("  changed state:", changed, flush=True)
        if changed:
            with torch.no_grad():
                for k, v in snap.items():
                    now[k].copy_(v)


if __name__ == "__main__":
    main()

"""torch._grouped_mm (bf16, as Experts.sorted_mlp calls it) against an fp32 per-group loop, on one GPU.

    python bench/grouped_mm_check.py

For E experts of width (D, I) and M rows with random experts (sorted, so groups may be empty or hold one row): the
largest per-row relative error of `torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)` (the model's transposed
view), of the same with a contiguous (E, D, I) copy, and compiled, against fp32 matmuls group by group; then
Experts.forward_grouped against Experts.forward_loop at 4 decode rows x top-4 of 16 experts. Written to settle
whether the grouped GEMM caused the graphed decode-step tests' 34% gaps (bench/RESULTS.md, 2026-12-05: it did not;
bench/decode_rows_diag.py). Rows over 2% are listed as BAD.
"""

from __future__ import annotations

import os
import sys

import torch
import torch._dynamo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dsv3  # noqa: E402
from dsv3.model.moe import Experts  # noqa: E402

SHAPES = ((16, 256, 128), (16, 128, 256), (64, 2048, 1408), (16, 7168, 2048))  # (E, D, I): micro, 16b, 671B widths
ROWS = (1, 3, 4, 6, 12, 16, 24, 64, 72, 128, 1024)


def loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """fp32 x[rows of group e] @ w[e], group by group (offs: the groups' end rows)."""
    out = torch.zeros(x.shape[0], w.shape[-1], device=x.device)
    s = 0
    for e, end in enumerate(offs.tolist()):
        if end > s:
            out[s:end] = x[s:end].float() @ w[e].float()
        s = end
    return out


def worst_row(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-6)).max().item()


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("grouped_mm_check.py: CUDA is not available (torch._grouped_mm's bf16 path is the GPU's)")
    dev = "cuda"
    print(torch.__version__, torch.cuda.get_device_name())
    torch._dynamo.config.recompile_limit = max(256, torch._dynamo.config.recompile_limit)
    comp = torch.compile(lambda a, b, o: torch._grouped_mm(a, b, offs=o), dynamic=False)
    bad = []
    for E, D, I in SHAPES:
        for M in ROWS:
            for seed in range(3):
                g = torch.Generator(device=dev).manual_seed(seed)
                flat = torch.randint(0, E, (M,), device=dev, generator=g).sort().values
                counts = torch.bincount(flat, minlength=E)
                offs = counts.cumsum(0).to(torch.int32)
                x = torch.randn(M, D, device=dev, generator=g).bfloat16()
                wt = (torch.randn(E, I, D, device=dev, generator=g) * 0.05).bfloat16().transpose(-2, -1)
                ref = loop(x, wt, offs)
                errs = (worst_row(torch._grouped_mm(x, wt, offs=offs), ref),
                        worst_row(torch._grouped_mm(x, wt.contiguous(), offs=offs), ref),
                        worst_row(comp(x, wt, offs), ref))
                sizes = counts.tolist()
                line = (f"E{E} D{D} I{I} M{M:5d} s{seed}: view {errs[0]:.3g} contig {errs[1]:.3g} compiled "
                        f"{errs[2]:.3g} empty {sizes.count(0)} sizes {sizes if E <= 16 else sorted(set(sizes))}")
                if max(errs) > 0.02:
                    bad.append(line)
                if seed == 0 or max(errs) > 0.02:
                    print(line, flush=True)
    print("BAD:", len(bad))
    for line in bad[:30]:
        print("  ", line)

    cfg = dsv3.ModelConfig(hidden_size=256, moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4)
    ex = Experts(cfg)
    g = torch.Generator().manual_seed(0)
    for p in ex.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    ex = ex.bfloat16().cuda()
    worst = 0.0
    for seed in range(20):
        gg = torch.Generator(device=dev).manual_seed(seed)
        x = torch.randn(4, 256, device=dev, generator=gg).bfloat16()
        idx = torch.rand(4, 16, device=dev, generator=gg).topk(4, dim=-1).indices
        wk = torch.rand(4, 4, device=dev, generator=gg)
        with torch.no_grad():
            worst = max(worst, worst_row(ex.forward_grouped(x, idx, wk), ex.forward_loop(x, idx, wk).float()))
    print("Experts.forward_grouped vs forward_loop, 4 rows x top-4 of 16, 20 seeds: worst row rel", worst)


if __name__ == "__main__":
    main()

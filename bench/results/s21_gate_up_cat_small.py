# The scratch script behind s21_gate_up_cat_small.txt (bench/RESULTS.md, 2026-12-06), kept as run.
import sys
sys.path.insert(0, "."); sys.path.insert(0, "bench")
import torch
import torch.nn.functional as F
import train_speed as ts
from dsv3.model.moe import Experts
from dsv3.training.fp8 import swiglu_cat

orig = Experts.sorted_mlp

def fused(one_grad):
    def sorted_mlp(self, x_MD, flat, order, offs, dt):
        w1, w3, w2 = self.weights(dtype=dt)
        I = w1.shape[1]
        h13 = torch._grouped_mm(x_MD, torch.cat([w1, w3], 1).transpose(-2, -1), offs=offs)
        h = swiglu_cat(h13) if one_grad else F.silu(h13[:, :I]) * h13[:, I:]
        return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
    return sorted_mlp

shape = sys.argv[1] if len(sys.argv) > 1 else "small"
cfg, B, T = ts.shapes(4)[shape]
kw = ts.parse_variant("bf16+compile+bf16w+bf16opt")
for rep in range(2):
    for name, fn in (("two GEMMs", orig), ("cat, slices", fused(False)), ("cat, swiglu_cat", fused(True))):
        Experts.sorted_mlp = fn
        t, mem = ts.time_dsv3(cfg, B, T, 6, 3, **kw)
        print(f"{shape} rep {rep} {name:16s} step {t*1e3:.1f} ms peak {mem:.2f} GiB", flush=True)

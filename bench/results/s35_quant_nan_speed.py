"""Scratch (twenty-ninth session): the NaN-propagating quantisers (f2f96c9) against the previous ones, same run
and card. Run from the repository root with the old module beside it:
    git show f2f96c9^:dsv3/kernels/fp8_triton.py > _old_fp8_triton.py"""
import sys, torch, triton
sys.path.insert(0, ".")
import _old_fp8_triton as old
from dsv3.kernels import fp8_triton as new
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
def t(f, *a, n=50):
    for _ in range(5): f(*a)
    torch.cuda.synchronize(); e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(n):
        e0.record(); f(*a); e1.record(); torch.cuda.synchronize(); ts.append(e0.elapsed_time(e1))
    ts.sort(); return ts[len(ts)//2]
torch.manual_seed(0)
x = torch.randn(16384, 7168, device="cuda", dtype=torch.bfloat16)
w = torch.randn(18432, 7168, device="cuda") * 0.02
for name, f_old, f_new, arg in [("act_quant_cm 16384x7168 bf16", old.act_quant_cm, new.act_quant_cm, (x,)),
                                ("act_quant_t 16384x7168 bf16", old.act_quant_t, new.act_quant_t, (x,)),
                                ("weight_quant_pad(t) 18432x7168 fp32", lambda w: old.weight_quant_pad(w, True),
                                 lambda w: new.weight_quant_pad(w, True), (w,))]:
    a, b = t(f_old, *arg), t(f_new, *arg)
    ra, rb = f_old(*arg), f_new(*arg)
    same = all(torch.equal(p.view(torch.uint8) if p.dtype == torch.float8_e4m3fn else p,
                           q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q) for p, q in zip(ra, rb))
    print(f"{name}: before {a*1e3:.1f} us, NaN-propagating {b*1e3:.1f} us ({b/a:.3f}x), same bytes {same}")

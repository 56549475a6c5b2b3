"""Diagnostics for the FP8 Triton kernels against the references (mismatch counts and examples)."""
import torch

from dsv3.kernels import act_dequant, act_quant, fp8_quant_kernels, weight_quant

k = fp8_quant_kernels()
torch.manual_seed(0)


def cmp(name, q, rq, s, rs, x=None):
    a, b = q.contiguous().view(torch.uint8), rq.contiguous().view(torch.uint8)
    bad = (a != b).nonzero()
    print(f"{name}: {bad.shape[0]} / {a.numel()} fp8 bytes differ; scales equal {torch.equal(s, rs)} "
          f"(max rel diff {((s - rs).abs() / rs).max().item():.2e})")
    for i in bad[:4].tolist():
        print("   at", i, "triton", a[tuple(i)].item(), q[tuple(i)].float().item(), "ref", b[tuple(i)].item(),
              rq[tuple(i)].float().item(), "" if x is None else f"x {x[tuple(i)].item():.6g}")


for M, K in ((256, 512), (300, 384)):
    x = (torch.randn(M, K, device="cuda") * torch.logspace(-3, 3, K, device="cuda")).to(torch.bfloat16)
    q, s = k.act_quant_cm(x)
    rq, rs = act_quant(x)
    cmp(f"act_quant_cm {M}x{K}", q, rq, s, rs, x)
    if M % 128 == 0:
        qt, st = k.act_quant_t(x)
        rqt, rst = act_quant(x.t().contiguous())
        cmp("act_quant_t", qt, rqt, st, rst)
        qt2, st2 = k.act_quant_t(rq, rs)
        rqt2, rst2 = act_quant(act_dequant(rq, rs).t().contiguous())
        cmp("act_quant_t(requant)", qt2, rqt2, st2, rst2)
w = torch.randn(576, 7168, device="cuda") * 0.02
q, s = k.weight_quant_pad(w)
rq, rs = weight_quant(w)
cmp("weight_quant 576x7168", q, rq, s[:, :rs.shape[1]], rs, w)

# per-linear fwd+bwd time at 671B shapes (4096 tokens): bf16 autocast vs FP8TrainLinear (scaled_mm)
import time  # noqa: E402

from dsv3.training.fp8 import fp8_linear  # noqa: E402


def timed(fn, n=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


for N, K in ((18432, 7168), (7168, 18432), (1536, 7168), (24576, 1536), (576, 7168), (32768, 512), (7168, 16384)):
    x = torch.randn(4096, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(N, K, device="cuda") * 0.02).requires_grad_()
    g = torch.randn(4096, N, device="cuda", dtype=torch.bfloat16)

    def bf16():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = torch.nn.functional.linear(x, w)
        y.backward(g)

    def fp8():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fp8_linear(x, w, "scaled_mm")
        y.backward(g)

    a, b = timed(bf16), timed(fp8)
    print(f"linear 4096x{N}x{K} fwd+bwd: bf16 {a:.2f} ms, fp8 {b:.2f} ms, speedup {a / b:.2f}x")

"""The whole composition matrix on the CPU (gloo): 8 layouts x 3 precisions x 2 optimizer-state dtypes x
2 recomputation policies = 96 cells, each trained 3 steps through `dsv3.training.pretrain.train` and
compared with the one-process run of the same batches, plus the cross-layout resumes; prints a Markdown
table for bench/RESULTS.md (tests/distributed/test_compose.py runs a covering subset in CI).

    python bench/compose_matrix.py [--out DIR] [--layouts ep2,pp2_1f1b] [--precisions fp32,bf16] [--compile]

--compile trains every cell with per-block torch.compile (inductor on the CPU: needs a C++ compiler; slow
to compile, so pick a few layouts) against the uncompiled one-process reference.

Takes about 15-25 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.distributed.compose import (LAYOUTS, OPTIM_STATES, PRECISIONS, RECOMPUTES, TOLERANCES, Cell,  # noqa: E402
                                       compare, resume_cells, run_cells)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="work directory (default: a temporary one)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--compile", action="store_true", help="per-block torch.compile in every cell")
    args = ap.parse_args()
    root = args.out or tempfile.mkdtemp(prefix="compose-")
    os.makedirs(root, exist_ok=True)
    extra = {"compile": True} if args.compile else {}
    cells = [Cell(lay, p, o, r, extra=dict(extra)) for lay in args.layouts.split(",")
             for p in args.precisions.split(",") for o in OPTIM_STATES for r in RECOMPUTES]
    resumed = [] if args.compile else resume_cells()
    t0 = time.time()
    errors = run_cells(root, cells + resumed, timeout=3600)
    wall = time.time() - t0
    print(f"# composition matrix: {len(cells)} cells + {len(resumed) // 2} resumes, {wall:.0f} s, "
          f"CPU ({platform.machine()}, {os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}\n")
    print("| cell | max loss diff | mean param diff | max param diff | entries > near | within tolerance |")
    print("|---|---|---|---|---|---|")
    n_ok = 0
    for c in cells + [c for c in resumed if c.resume_from]:
        if c.name in errors:
            print(f"| {c.name} | error: {errors[c.name].splitlines()[0][:80]} | | | | no |")
            continue
        d = compare(root, c)
        tl, tm, near, tf, tmean = TOLERANCES[c.precision]
        ok = d["loss"] <= tl and d["param_max"] <= tm and d["param_far_frac"] <= tf and d["param_mean"] <= tmean
        n_ok += ok
        print(f"| {c.name} | {d['loss']:.2e} | {d['param_mean']:.1e} | {d['param_max']:.2e} | {d['param_far_frac']:.2%} (> {near:g}) | "
              f"{'yes' if ok else 'NO'} |")
    total = len(cells) + len(resumed) // 2
    print(f"\n{n_ok} of {total} within tolerance (tests/distributed/compose.py TOLERANCES)")
    return 0 if n_ok == total else 1


if __name__ == "__main__":
    sys.exit(main())

"""The composition matrix in CI: a covering subset (every pair of options in at least one cell) of
layout x precision x optimizer state x recomputation, each trained 3 steps through the real entry point
(`dsv3.training.pretrain.train` under the torchrun variables, gloo) and compared with the one-process
run on the same batches; and checkpoints written by one layout resumed under another. The whole
matrix: `python bench/compose_matrix.py` (table in bench/RESULTS.md). Harness and tolerances:
tests/distributed/compose.py.

    python -m pytest tests/distributed/test_compose.py -s     (prints every cell's differences)
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.distributed.compose import (RESUMES, STEPS, Cell, check, covering_cells, pairs_covered, resume_cells,
                                       run_cells, runnable)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

CELLS = covering_cells()
RESUMED = resume_cells(RESUMES[:5])  # the 6th (FSDP2 -> PP x DP, a 4-process launch of its own): in the bench
# --bf16-weights: one process (the optimizer keeps the fp32 masters) and FSDP2 (its fp32 shards are the masters,
# blocks gathered in bf16), each against the autocast run; an FSDP2 checkpoint resumed in one process
# EP: FSDP2's form for the rest, AdamW's masters for the expert slices (ep2; dp2xep2 with their gradients summed
# over the dp replicas in fp32); --no-fsdp: AdamW's masters for every weight (replicated_dp2); the pipeline:
# ZeRO-1's fp32 chunks as masters over dp (pp2xdp2) or ep (pp2xep2, whose expert slices have no replicas: AdamW
# keeps their masters), AdamW's masters alone (pp2_1f1b); an EP and a pipeline checkpoint (expert-slice masters,
# ZeRO chunks) resumed in one process
_BF16W = {"bf16_weights": True}
_BF16W_FIRST = Cell("fsdp_dp2", "bf16", steps=STEPS - 1, extra=_BF16W)
_BF16W_EP_FIRST = Cell("ep2", "bf16", steps=STEPS - 1, extra=_BF16W)
_BF16W_PP_FIRST = Cell("pp2xep2", "bf16", steps=STEPS - 1, extra=_BF16W)
_FIRSTS = (_BF16W_FIRST, _BF16W_EP_FIRST, _BF16W_PP_FIRST)
BF16W = [Cell("1proc", "bf16", extra=_BF16W), Cell("fsdp_dp2", "bf16", extra=_BF16W), *_FIRSTS,
         Cell("ep2", "bf16", extra=_BF16W), Cell("dp2xep2", "bf16", extra=_BF16W),
         Cell("replicated_dp2", "bf16", extra=_BF16W),
         Cell("pp2xdp2", "bf16", extra=_BF16W), Cell("pp2xep2", "bf16", extra=_BF16W),
         Cell("pp2_1f1b", "bf16", extra=_BF16W)] + [
         Cell("1proc", "bf16", extra=_BF16W, resume_from=c.name) for c in _FIRSTS]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("compose"))
    errors = run_cells(root, CELLS + RESUMED + BF16W)
    return root, errors


def test_the_subset_covers_every_pair():
    assert pairs_covered(CELLS) == set()
    assert len({c.layout for c in CELLS}) == 9 and len({c.precision for c in CELLS}) == 3


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
def test_cell_matches_one_process(matrix, cell: Cell):
    root, errors = matrix
    if not runnable(cell):  # refused with its reason instead (torch < 2.13)
        assert "needs torch >= 2.13" in errors[cell.name], errors[cell.name]
        return
    assert cell.name not in errors, errors[cell.name]
    d = check(root, cell)
    print(cell.name, {k: f"{v:.3g}" for k, v in d.items()})


@pytest.mark.parametrize("cell", [c for c in RESUMED if c.resume_from], ids=lambda c: c.name)
def test_resume_under_another_layout(matrix, cell: Cell):
    root, errors = matrix
    for name in (cell.resume_from, cell.name):
        assert name not in errors, errors[name]
    d = check(root, cell)
    print(cell.name, {k: f"{v:.3g}" for k, v in d.items()})


@pytest.mark.parametrize("cell", [c for c in BF16W if c not in _FIRSTS], ids=lambda c: c.name)
def test_bf16_weights_match_autocast(matrix, cell: Cell):
    root, errors = matrix
    for name in filter(None, (cell.resume_from, cell.name)):
        assert name not in errors, errors[name]
    d = check(root, cell)
    print(cell.name, {k: f"{v:.3g}" for k, v in d.items()})

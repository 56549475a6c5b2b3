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

from tests.distributed.compose import (RESUMES, Cell, check, covering_cells, pairs_covered, resume_cells,
                                       run_cells, runnable)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

CELLS = covering_cells()
RESUMED = resume_cells(RESUMES[:5])  # the 6th (FSDP2 -> PP x DP, a 4-process launch of its own): in the bench


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("compose"))
    errors = run_cells(root, CELLS + RESUMED)
    return root, errors


def test_the_subset_covers_every_pair():
    assert pairs_covered(CELLS) == set()
    assert len({c.layout for c in CELLS}) == 8 and len({c.precision for c in CELLS}) == 3


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

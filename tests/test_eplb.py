"""Redundant-expert placement (dsv3/inference/eplb.py): slot invariants, the greedy choice, lower max rank
load on skewed loads, no regression on uniform loads, replica routing, input checks.

Run: python -m pytest tests/test_eplb.py -q
"""

from __future__ import annotations

import pytest
import torch

from dsv3.inference.eplb import (baseline_rank_load, imbalance, main, plan_placement, route_to_replica)


def zipf_loads(L: int, E: int, s: float, seed: int, tokens: float = 1e5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    return torch.stack([(w[torch.randperm(E, generator=g)] / w.sum() * tokens).round() for _ in range(L)])


def check_invariants(loads, pl, n_ranks, R):
    L, E = loads.shape
    spr = (E + R) // n_ranks
    assert pl.replicas.shape == (L, E) and pl.slots.shape == (L, n_ranks, spr)
    assert (pl.replicas >= 1).all() and (pl.replicas.sum(-1) == E + R).all()
    for i in range(L):
        counts = torch.bincount(pl.slots[i].flatten(), minlength=E)
        assert torch.equal(counts, pl.replicas[i])  # every expert appears replicas[e] times
        # log2phy lists exactly the slots holding the expert
        lp = pl.layer(i)
        for e in range(E):
            phys = lp.log2phy[e][lp.log2phy[e] >= 0]
            assert phys.numel() == lp.replicas[e] and (lp.slots.flatten()[phys] == e).all()
    # the expected rank load conserves the tokens
    torch.testing.assert_close(pl.rank_load.sum(-1), loads.double().sum(-1))


@pytest.mark.parametrize("n_ranks,R,groups,nodes", [(4, 8, None, None), (8, 16, None, None), (1, 4, None, None),
                                                    (8, 8, 8, 2), (8, 8, 4, 2)])
def test_invariants_and_skewed_gain(n_ranks, R, groups, nodes):
    E = 32
    for seed in range(3):
        loads = zipf_loads(3, E, 1.2, seed)
        pl = plan_placement(loads, n_ranks, R, groups, nodes)
        check_invariants(loads, pl, n_ranks, R)
        before = baseline_rank_load(loads, n_ranks).max(-1).values
        after = pl.rank_load.max(-1).values
        if n_ranks == 1:
            torch.testing.assert_close(after, before)
        else:
            assert (after < before).all()
            assert (imbalance(pl.rank_load) < imbalance(baseline_rank_load(loads, n_ranks))).all()


def test_uniform_loads_no_worse():
    loads = torch.full((2, 32), 100.0)
    for n, R in [(4, 8), (8, 8), (8, 16), (2, 4)]:
        pl = plan_placement(loads, n, R)
        check_invariants(loads, pl, n, R)
        assert (pl.rank_load.max(-1).values <= baseline_rank_load(loads, n).max(-1).values + 1e-9).all()
    assert torch.equal(plan_placement(torch.zeros(1, 16), 4, 4).replicas.sum(), torch.tensor(20))


def test_greedy_replicates_hottest():
    loads = torch.tensor([[1000.0, 10, 10, 10, 600, 10, 10, 10]])
    pl = plan_placement(loads, 2, 2)
    assert pl.replicas[0].tolist() == [2, 1, 1, 1, 2, 1, 1, 1]  # 1000 -> 500/copy, then 600 is the max
    pl = plan_placement(loads, 2, 4)
    assert pl.replicas[0].tolist() == [4, 1, 1, 1, 2, 1, 1, 1]  # then 500 -> 333, then 333 > 300
    loads = torch.tensor([[1000.0, 10, 10, 10, 500, 10, 10, 10]])
    assert plan_placement(loads, 2, 2).replicas[0, 0] == 3  # a tie (500, 500) goes to the lower id
    loads = zipf_loads(1, 64, 1.0, 0)
    rep = plan_placement(loads, 8, 8).replicas[0]
    hot = loads[0].argsort(descending=True)[:4]
    assert (rep[hot] > 1).all()


def test_route_to_replica():
    loads = torch.tensor([[1000.0, 10, 10, 10, 500, 10, 10, 10]])
    lp = plan_placement(loads, 2, 4).layer(0)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 8, (101, 3), generator=g)
    idx[:, 0] = 0  # expert 0 (4 copies) in every token
    phys = route_to_replica(idx, lp)
    assert phys.shape == idx.shape
    assert torch.equal(lp.slots.flatten()[phys], idx)  # each token lands on a slot holding its expert
    for e in range(8):
        c = torch.bincount(phys[idx == e], minlength=lp.slots.numel())[lp.log2phy[e][:lp.replicas[e]]]
        assert c.max() - c.min() <= 1  # spread evenly over the copies
    assert torch.equal(route_to_replica(idx, lp), phys)  # deterministic
    # batches routed apart (data-parallel ranks, each its own decode tokens): one token of expert 0 each;
    # with the rank as offset they reach different copies, without it all reach copy 0
    one = torch.tensor([[0, 1, 2]])
    R = int(lp.replicas[0])
    assert len({int(route_to_replica(one, lp)[0, 0]) for _ in range(R)}) == 1
    spread = {int(route_to_replica(one, lp, offset=r)[0, 0]) for r in range(R)}
    assert spread == set(lp.log2phy[0][:R].tolist())
    assert torch.equal(lp.slots.flatten()[route_to_replica(idx, lp, offset=3)], idx)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(n_ranks=4, n_redundant=6), "multiple of n_ranks"),
    (dict(n_ranks=32, n_redundant=0), "slots"),
    (dict(n_ranks=3, n_redundant=3), "split evenly"),
    (dict(n_ranks=4, n_redundant=4, n_nodes=2), "needs n_groups"),
    (dict(n_ranks=4, n_redundant=4, n_groups=3, n_nodes=2), "hierarchical"),
])
def test_bad_inputs(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        plan_placement(torch.ones(2, 16), **kwargs)


def test_negative_loads():
    loads = torch.ones(2, 16)
    loads[1, 3] = -1
    with pytest.raises(ValueError, match="non-negative"):
        plan_placement(loads, 4, 4)
    with pytest.raises(ValueError, match=r"\(L, E\)"):
        plan_placement(torch.ones(16), 4, 4)


def test_cli(tmp_path, capsys):
    path = tmp_path / "counts.pt"
    torch.save(zipf_loads(2, 16, 1.0, 0), path)
    main(["--loads", str(path), "--ranks", "4", "--redundant", "4", "--out", str(tmp_path / "p.pt")])
    out = capsys.readouterr().out
    assert "before" in out and "mean" in out
    assert torch.load(tmp_path / "p.pt")["slots"].shape == (2, 4, 5)


def test_hierarchical_copies_stay_on_their_groups_node():
    E, G, nodes, ranks = 32, 8, 2, 8
    loads = zipf_loads(2, E, 1.2, 3)
    pl = plan_placement(loads, ranks, 8, G, nodes)
    rpn = ranks // nodes
    for i in range(2):
        node_of_slot = torch.arange(ranks).repeat_interleave(pl.slots.shape[-1]) // rpn
        group_of_slot = pl.slots[i].flatten() // (E // G)
        for g in range(G):
            assert node_of_slot[group_of_slot == g].unique().numel() == 1  # a group lives on one node
        # each node holds whole groups: G / nodes of them
        for n in range(nodes):
            assert group_of_slot[node_of_slot == n].unique().numel() == G // nodes


def test_placed_rank_load_and_a_block_without_tokens():
    """placed_rank_load re-evaluates a placement on other loads (a later window's, measured): equal to the plan's
    own rank loads on the loads it was planned from, tokens conserved on others. A block with no recorded tokens
    (an MTP module that never ran) is placed as if uniform, not with every copy on expert 0."""
    from dsv3.inference.eplb import placed_rank_load

    loads = zipf_loads(3, 16, 1.0, seed=2)
    loads[2] = 0
    pl = plan_placement(loads, 4, 8)
    torch.testing.assert_close(placed_rank_load(loads, pl.replicas, pl.slots), pl.rank_load)
    other = zipf_loads(3, 16, 0.5, seed=3)
    torch.testing.assert_close(placed_rank_load(other, pl.replicas, pl.slots).sum(-1), other.sum(-1))
    assert pl.replicas[2].max() == 2 and (pl.replicas[2] >= 1).all()  # 8 copies over 16 experts: one each at most
    assert imbalance(placed_rank_load(other, pl.replicas, pl.slots)).shape == (3,)


def test_saving_recorded_loads(tmp_path, capsys):
    """save_counts writes atomically with the mode open() gives (not mkstemp's 0600); check_writable refuses a
    directory, also one named with a trailing slash that does not exist yet; the CLI's writer leaves an earlier
    recording alone when nothing was routed (a server that failed to start)."""
    import os
    import stat

    from dsv3 import cli
    from dsv3.config import preset
    from dsv3.checkpoints.loads import check_writable, load_counts, save_counts

    counts = torch.arange(8).reshape(2, 4)
    path = save_counts(counts, str(tmp_path / "a" / "loads.pt"), checkpoint="ck")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask
    assert torch.equal(load_counts(path), counts) and os.listdir(tmp_path / "a") == ["loads.pt"]
    for bad in (str(tmp_path), str(tmp_path / "new") + "/"):
        with pytest.raises(ValueError, match="is a directory; give a file name"):
            check_writable(bad)
    cfg = preset("tiny")
    cli._write_expert_loads(torch.zeros(2, 4, dtype=torch.long), path, "ck", cfg)
    assert "no tokens were routed" in capsys.readouterr().err and torch.equal(load_counts(path), counts)
    cli._write_expert_loads(counts * cfg.num_experts_per_tok, path, "ck", cfg)
    assert torch.equal(load_counts(path), counts * cfg.num_experts_per_tok)
    assert torch.load(path, weights_only=True)["tokens"] == int(counts[0].sum())


def test_placement_from_slots_and_keep_in_place():
    """placement_from_slots rebuilds plan_placement's tables from its slots (fixed-width log2phy for in-place
    updates); keep_in_place keeps every expert a rank still holds in its slot, so a re-placement writes only
    the slots whose expert changes, and the ranks' sets of experts are the new plan's."""
    from dsv3.inference.eplb import keep_in_place, placement_from_slots

    a, b = zipf_loads(3, 16, 1.0, seed=4), zipf_loads(3, 16, 1.0, seed=5)
    pa, pb = plan_placement(a, 4, 8), plan_placement(b, 4, 8)
    same = placement_from_slots(pa.slots, a)
    for name in ("replicas", "slots", "rank_load", "log2phy"):
        assert torch.equal(getattr(same, name), getattr(pa, name)), name
    wide = placement_from_slots(pa.slots, a, width=9)
    assert wide.log2phy.shape == (3, 16, 9) and torch.equal(wide.log2phy[..., : pa.log2phy.shape[-1]], pa.log2phy)
    assert (wide.log2phy[..., pa.log2phy.shape[-1]:] == -1).all()
    with pytest.raises(ValueError, match="width 1"):
        placement_from_slots(pa.slots, a, width=1)
    for i in range(3):
        new = keep_in_place(pa.slots[i], pb.slots[i])
        for r in range(4):
            assert sorted(new[r].tolist()) == sorted(pb.slots[i, r].tolist())  # the plan's experts on each rank
            old_r, new_r = pa.slots[i, r].tolist(), new[r].tolist()
            common = sum(min(old_r.count(e), new_r.count(e)) for e in set(new_r))
            assert sum(o == n for o, n in zip(old_r, new_r)) == common  # only the slots that must change do
        # routing over the reordered slots spreads tokens as the plan said: same per-rank loads
        torch.testing.assert_close(placement_from_slots(new[None], b[i:i + 1]).rank_load[0], pb.rank_load[i])


def test_replan_redundant_moves_only_the_redundant_copies():
    """The online re-placement's planner: every expert's first copy stays in its slot, at most R slots change (a
    plan from scratch would re-pack most of them), every expert keeps a copy, the busiest rank gets lighter on a
    skewed load than under the uniform plan it starts from, a layer without tokens keeps its slots, and a
    second window of the same load changes few slots."""
    from dsv3.inference.eplb import placed_rank_load, placement_from_slots, replan_redundant

    E, n_ranks, R = 64, 8, 16
    uniform = torch.ones(3, E, dtype=torch.float64)
    start = plan_placement(uniform, n_ranks, R).slots
    a, b = zipf_loads(3, E, 1.0, seed=7), zipf_loads(3, E, 1.0, seed=7) * 1.1 + torch.rand(3, E) * 20
    a[2] = 0
    new = replan_redundant(a, start)
    assert new.shape == start.shape
    for layer in range(3):
        flat0, flat1 = start[layer].reshape(-1).tolist(), new[layer].reshape(-1).tolist()
        first = {}
        for i, e in enumerate(flat0):
            first.setdefault(e, i)
        assert all(flat1[i] == e for e, i in first.items())  # primaries in place
        assert sum(x != y for x, y in zip(flat0, flat1)) <= R and set(flat1) == set(range(E))
    assert torch.equal(new[2], start[2])  # no tokens: unchanged
    before = imbalance(placed_rank_load(a[:2], *_rep_slots(start[:2], E)))
    after = imbalance(placed_rank_load(a[:2], *_rep_slots(new[:2], E)))
    assert (after < 0.5 * before).all(), (before, after)
    again = replan_redundant(b, new)
    assert sum(int((again[i] != new[i]).sum()) for i in range(2)) <= 2 * R // 2  # mostly the same copies
    placement_from_slots(again, b, width=1 + R)


def _rep_slots(slots, E):
    flat = slots.reshape(slots.shape[0], -1)
    return torch.zeros(slots.shape[0], E, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat)), slots


def test_replan_repacks_once_then_refines():
    """eplb.replan (what the online Rebalancer runs): from a uniform placement a skewed load is re-packed (a plan
    from scratch pays), then further windows of the same load change at most the R redundant slots, and a new
    load re-packs again; the next window's rank imbalance stays low throughout."""
    from dsv3.inference.eplb import placed_rank_load, replan

    E, n_ranks, R = 64, 8, 16
    g = torch.Generator().manual_seed(0)
    w = (1 / torch.arange(1, E + 1, dtype=torch.float64) ** 0.8)[torch.randperm(E, generator=g)]

    def window(w, seed):
        return torch.multinomial(w, 50_000, replacement=True, generator=torch.Generator().manual_seed(seed)) \
            .bincount(minlength=E).double()[None]

    s = plan_placement(torch.ones(1, E, dtype=torch.float64), n_ranks, R).slots
    changed, imb = [], []
    for t in range(6):
        if t == 3:
            w = w[torch.randperm(E, generator=g)]  # the traffic moves to other experts
        new = replan(window(w, t), s)
        changed.append(int((new != s).sum()))
        imb.append(float(imbalance(placed_rank_load(window(w, 100 + t), *_rep_slots(new, E)))))
        s = new
    assert changed[0] > R and changed[3] > R  # re-packed
    assert all(c <= R for i, c in enumerate(changed) if i not in (0, 3))  # refined
    assert max(imb) < 0.15, imb


def test_rebalancer_notices_a_changed_checkpoint(tmp_path, capsys):
    """Online re-placement reads moved experts from the checkpoint served: a training run's rotation deleting it,
    or a save over it, must stop re-placement (with one warning) rather than crash or mix in other weights."""
    import os
    import time
    from types import SimpleNamespace

    from dsv3.ep_serve import Rebalancer

    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "config.json").write_text("{}")
    rb = Rebalancer(None, str(tmp_path), SimpleNamespace(slots=torch.zeros(1, 2, 2, dtype=torch.long)),
                    [SimpleNamespace(placement=SimpleNamespace(log2phy=torch.zeros(1, 1, 2)))], rank=0, ep=2,
                    redundant=2, interval=3)
    assert rb._unchanged() and not rb.stale
    time.sleep(0.01)
    (tmp_path / "model.safetensors").write_bytes(b"y" * 10)  # same size, new mtime
    assert not rb._unchanged() and rb.stale
    assert "changed or is gone" in capsys.readouterr().out
    os.remove(tmp_path / "model.safetensors")
    assert not rb._unchanged() and capsys.readouterr().out == ""  # warned once


def test_eplb_bench_modes_run():
    """bench/eplb.py's --online simulation and --plan-from/--serve on the committed recordings (the RESULTS tables):
    they run, and the placement planned from the served load beats the contiguous split."""
    import os

    from tests.distributed.harness import run_script  # (a process forked from the fork server: as `python SCRIPT`)

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = run_script(os.path.join(repo, "bench", "eplb.py"), ["--online", "--experts", "64", "--ranks", "8",
                                                            "--redundant", "16", "--tokens", "20000", "--windows",
                                                            "3", "--shift", "2"], repo, timeout=120)
    assert r.returncode == 0, r.stdout
    rows = {line.split(" | ")[0].strip("| "): line for line in r.stdout.splitlines() if line.startswith("| ")}
    assert {"replan (--eplb-interval)", "redundant copies only", "from scratch every time"} <= set(rows)
    res = os.path.join(repo, "bench", "results")
    r = run_script(os.path.join(repo, "bench", "eplb.py"), ["--plan-from", os.path.join(res, "tiny_std_loads.pt"),
                                                            "--serve", os.path.join(res, "tiny_pip_loads.pt"),
                                                            "--ranks", "4", "--redundant", "4"], repo, timeout=120)
    assert r.returncode == 0, r.stdout
    cells = r.stdout.strip().splitlines()[-1].split(" | ")
    contiguous, own = float(cells[2].split(" / ")[0]), float(cells[4].split(" / ")[0])
    assert own < contiguous

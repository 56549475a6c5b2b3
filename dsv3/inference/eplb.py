"""Redundant experts (EPLB): which experts to copy, and onto which expert-parallel rank each copy goes.

DeepSeek-V3 §3.4 deploys 32 redundant experts in prefill, chosen from the load observed in serving and
re-chosen every few minutes: a hot expert gets a second (third...) copy on another GPU, and its tokens are
split between the copies, so that the busiest GPU — which sets the step time of an all-to-all MoE layer —
carries less. This module is the CPU-side planner (plain torch math, no torch.distributed), following the
algorithm of DeepSeek's open-source EPLB (github.com/deepseek-ai/EPLB), written afresh:

    1. replicate  with R extra slots, R times give one more copy to the expert with the highest load per
                  copy (loads[e] / replicas[e]); ties go to the lowest expert id
    2. pack       sort the E + R copies by their load (loads[e] / replicas[e]), heaviest first, and put
                  each on the least-loaded rank that still has a free slot (every rank holds exactly
                  (E + R) / n_ranks slots: the expert weights are static buffers of one shape)

The hierarchical variant (`n_nodes` given, as the reference does for node-limited routing) first packs
whole expert groups onto nodes with the same balanced packing (groups per node fixed), then runs steps 1
and 2 inside each node with (E + R) / n_nodes slots over its n_ranks / n_nodes ranks. Every copy of an
expert then lives on the node that holds its group, so a token's node limit (`topk_group` groups, each
on one node) still holds after replication. The global variant ignores groups.

Loads are token counts per MoE layer and expert, (L, E), rows the main MoE layers then the MTP layers (the
rows of `ModelOutput.expert_counts`): recorded by `ExpertLoadRecorder` (dsv3/model/loads.py) in `dsv3 eval
--record-expert-loads` (a corpus through a trained model) and `dsv3 serve --record-expert-loads` (what the
engine ran), written by `save_counts` and read by `load_counts` (dsv3/checkpoints/loads.py). `imbalance` is the
training's MaxVio (`dsv3.model.moe.max_violation`), max / mean - 1, over ranks instead of experts; `before` is the
contiguous placement with no redundancy (expert e on rank e // (E / n_ranks), what
`distributed.expert_parallel.shard_experts` does).

`route_to_replica` maps the router's logical expert ids to physical slots with tensor ops only (no host
sync): the j-th token (in flattened batch order) routed to expert e goes to copy j mod replicas[e], so a
hot expert's tokens are spread over its copies, counts within one of each other.

    python -m dsv3.inference.eplb --loads counts.pt --ranks 8 --redundant 32 [--groups 8 --nodes 4]

Serving with a placement: `torchrun ... dsv3.cli serve CKPT --ep R --expert-loads FILE --redundant-experts N`
(dsv3/ep_serve.py: each rank loads the experts of its slots, `route_to_replica` picks the copies); with
`--eplb-interval S` re-planned every S engine steps from the load served since (ep_serve.Rebalancer, using
`keep_in_place` and `placement_from_slots` below).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

from dsv3.checkpoints.loads import load_counts
from dsv3.model.moe import max_violation


@dataclass
class LayerPlacement:
    """One MoE layer's placement. Physical slot id = rank * slots_per_rank + position on the rank."""
    replicas: torch.Tensor   # (E,) long: copies of each expert, >= 1, sum E + R
    slots: torch.Tensor      # (n_ranks, slots_per_rank) long: the logical expert held in each slot
    rank_load: torch.Tensor  # (n_ranks,) float: expected tokens per rank (each copy carries load / replicas)
    log2phy: torch.Tensor    # (E, max_replicas) long: the physical slots of each expert, padded with -1

    def to(self, device) -> "LayerPlacement":
        """On `device` (route_to_replica reads replicas and log2phy in every MoE call: a CUDA graph cannot capture
        their copy from pageable host memory, and eager calls would pay two blocking copies each)."""
        return LayerPlacement(*(t.to(device) for t in (self.replicas, self.slots, self.rank_load, self.log2phy)))


@dataclass
class Placement:
    """The placement of every layer; the tensors of `LayerPlacement` stacked along a leading (L,) axis."""
    replicas: torch.Tensor   # (L, E)
    slots: torch.Tensor      # (L, n_ranks, slots_per_rank)
    rank_load: torch.Tensor  # (L, n_ranks)
    log2phy: torch.Tensor    # (L, E, max_replicas)

    def layer(self, i: int) -> LayerPlacement:
        return LayerPlacement(self.replicas[i], self.slots[i], self.rank_load[i], self.log2phy[i])

    @property
    def n_layers(self) -> int:
        return self.replicas.shape[0]


def imbalance(rank_load: torch.Tensor) -> torch.Tensor:
    """MaxVio over ranks, max / mean - 1, per row of (..., n_ranks); 0 for a layer without tokens."""
    return max_violation(rank_load)


def baseline_rank_load(loads: torch.Tensor, n_ranks: int) -> torch.Tensor:
    """(L, n_ranks) load per rank without redundancy: expert e on rank e // (E / n_ranks)."""
    L, E = loads.shape
    if E % n_ranks:
        raise ValueError(f"{E} experts do not split evenly over {n_ranks} ranks")
    return loads.double().reshape(L, n_ranks, E // n_ranks).sum(-1)


def placed_rank_load(loads: torch.Tensor, replicas: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(L, n_ranks) load per rank of `loads` (L, E) under a placement (its replicas (L, E) and slots (L, n_ranks,
    S)): each copy carries loads[e] / replicas[e] (route_to_replica splits an expert's tokens evenly, within
    one). The loads need not be those the placement was planned from (a later window's, measured)."""
    L, n_ranks, S = slots.shape
    per_copy = loads.double() / replicas  # (L, E)
    return per_copy.gather(1, slots.reshape(L, -1)).reshape(L, n_ranks, S).sum(-1)


def _replicate(w: np.ndarray, n_phys: int) -> np.ndarray:
    """Greedy: each extra slot goes to the expert with the highest load per copy. (E,) -> replicas (E,)."""
    rep = np.ones(len(w), dtype=np.int64)
    for _ in range(n_phys - len(w)):
        rep[np.argmax(w / rep)] += 1  # argmax takes the first of ties: the lowest expert id
    return rep


def _pack(item_w: np.ndarray, n_packs: int, per_pack: int) -> np.ndarray:
    """Balanced packing: items heaviest first, each onto the least-loaded pack with a free place.
    (n_items,) weights, n_items == n_packs * per_pack -> pack index of each item (n_items,)."""
    order = np.argsort(-item_w, kind="stable")
    load = np.zeros(n_packs)
    count = np.zeros(n_packs, dtype=np.int64)
    pack = np.empty(len(item_w), dtype=np.int64)
    for i in order:
        p = int(np.argmin(np.where(count < per_pack, load, np.inf)))
        pack[i] = p
        load[p] += item_w[i]
        count[p] += 1
    return pack


def _place(w: np.ndarray, experts: np.ndarray, n_phys: int, n_ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """Replicate `experts` (loads w) into n_phys copies and pack them onto n_ranks ranks.
    Returns replicas (len(experts),) and the slots (n_ranks, n_phys / n_ranks) as expert ids."""
    rep = _replicate(w, n_phys)
    copy_expert = np.repeat(np.arange(len(w)), rep)  # (n_phys,) local index of each copy's expert
    spr = n_phys // n_ranks
    pack = _pack(w[copy_expert] / rep[copy_expert], n_ranks, spr)
    slots = np.empty((n_ranks, spr), dtype=np.int64)
    for r in range(n_ranks):
        slots[r] = np.sort(experts[copy_expert[pack == r]])  # expert order within a rank: ascending ids
    return rep, slots


def plan_placement(loads: torch.Tensor, n_ranks: int, n_redundant: int, n_groups: int | None = None,
                   n_nodes: int | None = None) -> Placement:
    """Choose the redundant experts and the slot of every copy, per layer, from loads (L, E) (token
    counts, e.g. summed `ModelOutput.expert_counts`). Global when n_nodes is None; hierarchical (groups
    packed onto nodes first) when n_nodes and n_groups are given."""
    if loads.dim() != 2:
        raise ValueError(f"loads must be (L, E), got shape {tuple(loads.shape)}")
    if not torch.isfinite(loads.double()).all() or (loads < 0).any():
        raise ValueError("loads must be finite and non-negative token counts")
    L, E = loads.shape
    if n_ranks < 1 or n_redundant < 0:
        raise ValueError(f"need n_ranks >= 1 and n_redundant >= 0, got {n_ranks}, {n_redundant}")
    if n_redundant % n_ranks:
        raise ValueError(f"n_redundant ({n_redundant}) must be a multiple of n_ranks ({n_ranks}) so that "
                         "every rank holds the same number of slots")
    if n_ranks > E + n_redundant:
        raise ValueError(f"{n_ranks} ranks but only {E + n_redundant} expert slots: some rank would hold none")
    if E % n_ranks:
        raise ValueError(f"{E} experts do not split evenly over {n_ranks} ranks")
    n_phys, spr = E + n_redundant, (E + n_redundant) // n_ranks
    if n_nodes is not None:
        if n_groups is None:
            raise ValueError("the hierarchical placement (n_nodes) needs n_groups")
        if E % n_groups or n_groups % n_nodes or n_ranks % n_nodes:
            raise ValueError(f"hierarchical placement needs E ({E}) divisible by n_groups ({n_groups}), "
                             f"n_groups and n_ranks ({n_ranks}) divisible by n_nodes ({n_nodes})")
    w_all = loads.double().numpy()
    replicas = np.empty((L, E), dtype=np.int64)
    slots = np.empty((L, n_ranks, spr), dtype=np.int64)
    for layer in range(L):
        w = w_all[layer]
        if not w.any():  # a block without recorded tokens (an MTP module that never ran): placed as if uniform
            w = np.ones(E)
        if n_nodes is None:
            replicas[layer], slots[layer] = _place(w, np.arange(E), n_phys, n_ranks)
            continue
        gsize, rpn = E // n_groups, n_ranks // n_nodes
        group_node = _pack(w.reshape(n_groups, gsize).sum(-1), n_nodes, n_groups // n_nodes)
        for node in range(n_nodes):
            experts = (np.flatnonzero(group_node == node)[:, None] * gsize + np.arange(gsize)).ravel()
            rep, s = _place(w[experts], experts, n_phys // n_nodes, rpn)
            replicas[layer, experts] = rep
            slots[layer, node * rpn:(node + 1) * rpn] = s
    return placement_from_slots(torch.from_numpy(slots), loads)


def placement_from_slots(slots: torch.Tensor, loads: torch.Tensor, width: int | None = None) -> Placement:
    """The Placement whose slots (L, n_ranks, S) hold these logical experts (every expert at least once):
    replicas counted, rank loads of `loads` (L, E), log2phy (L, E, width) listing each expert's slots in
    increasing order, padded with -1 (width: default the most copies any expert has; a fixed width keeps the
    shape of a placement that is later updated in place, `Rebalancer`)."""
    L, n_ranks, S = slots.shape
    E = loads.shape[-1]
    flat = slots.reshape(L, -1)  # (L, n_phys)
    replicas = torch.zeros(L, E, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    if (replicas == 0).any():
        raise ValueError("a placement must hold every expert at least once")
    width = int(replicas.max()) if width is None else width
    if width < int(replicas.max()):
        raise ValueError(f"log2phy width {width} < the {int(replicas.max())} copies of an expert")
    order = torch.sort(flat, dim=1, stable=True)  # copies grouped by expert, slot order kept
    first = torch.searchsorted(order.values, order.values)  # index of each expert's first copy
    j = torch.arange(flat.shape[1]).expand(L, -1) - first  # copy number within its expert
    log2phy = torch.full((L, E, width), -1, dtype=torch.long)
    log2phy[torch.arange(L)[:, None], order.values, j] = order.indices
    return Placement(replicas, slots, placed_rank_load(loads, replicas, slots), log2phy)


def replan_redundant(loads: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Re-choose only the redundant copies of a placement from new loads: (L, E) loads, (L, n_ranks, S) slots ->
    new slots. In each layer the first copy of every expert (in slot order: its primary) stays where it is; the
    other n_ranks·S - E slots are freed and refilled: greedy replication on the load per copy (as
    `plan_placement`), then the extra copies, heaviest first, each to the least-loaded rank that has a freed slot
    and, where one can, does not already hold that expert; a rank's freed slots keep an extra copy it still holds
    (`keep_in_place`). At most the redundant slots change, so an online re-placement (dsv3/ep_serve.py's
    Rebalancer) reads at most R / (E + R) of the experts, where a plan from scratch re-packs most of them (80% of
    the slots on consecutive windows of one Zipf load, E = 256, 8 ranks). A layer without tokens keeps its slots."""
    L, n_ranks, S = slots.shape
    E = loads.shape[-1]
    out = slots.clone()
    for layer in range(L):
        w = loads[layer].double().numpy()
        if not w.any():
            continue
        flat = slots[layer].reshape(-1).tolist()
        seen: set[int] = set()
        primary = []
        for e in flat:
            primary.append(e not in seen)
            seen.add(e)
        free = [i for i, p in enumerate(primary) if not p]
        rep = _replicate(w, E + len(free))
        rank_load = np.zeros(n_ranks)
        holds = [set() for _ in range(n_ranks)]
        for i, e in enumerate(flat):
            if primary[i]:
                rank_load[i // S] += w[e] / rep[e]
                holds[i // S].add(e)
        room = np.bincount([i // S for i in free], minlength=n_ranks)
        extras = sorted(((w[e] / rep[e], e) for e in range(E) for _ in range(rep[e] - 1)),
                        key=lambda t: (-t[0], t[1]))  # heaviest per copy first, ties by expert id
        given: list[list[int]] = [[] for _ in range(n_ranks)]
        for load, e in extras:
            ok = [r for r in range(n_ranks) if room[r] > 0]
            fresh = [r for r in ok if e not in holds[r]] or ok  # a second copy on the same rank balances nothing
            r = min(fresh, key=lambda r: (rank_load[r], r))
            given[r].append(e)
            holds[r].add(e)
            room[r] -= 1
            rank_load[r] += load
        for r in range(n_ranks):
            idx = [i for i in free if i // S == r]
            if not idx:
                continue
            old = torch.tensor([flat[i] for i in idx])
            new = keep_in_place(old[None], torch.tensor(given[r])[None])[0]
            for i, e in zip(idx, new.tolist()):
                out[layer, r, i % S] = e
    return out


def replan(loads: torch.Tensor, slots: torch.Tensor, min_gain: float = 0.1) -> torch.Tensor:
    """An online re-placement's new slots, per layer the cheaper of two plans for the window's loads (L, E): the
    redundant copies re-chosen (`replan_redundant`: at most R slots change), or a plan from scratch
    (`plan_placement`, each rank's experts kept in their slots where they stay: `keep_in_place`; most slots
    change), the latter only where it makes the busiest rank at least `min_gain` lighter than the former. So a
    placement whose primary copies no longer fit the traffic is re-packed once, then refined cheaply (on a
    stationary Zipf load, E = 256, 8 ranks, R = 32: the first re-plan re-packs, the next ones change 2-30 of
    the 288 slots). Deterministic: every rank computes the same."""
    L, n_ranks, _ = slots.shape
    red = replan_redundant(loads, slots)
    scratch = plan_placement(loads.double(), n_ranks, slots[0].numel() - loads.shape[-1]).slots
    out = red.clone()
    for layer in range(L):
        if not loads[layer].any():
            continue
        full = keep_in_place(slots[layer], scratch[layer])
        busiest = [float(placement_from_slots(x[None], loads[layer:layer + 1].double()).rank_load.max())
                   for x in (red[layer], full)]
        if busiest[1] < (1 - min_gain) * busiest[0]:
            out[layer] = full
    return out


def keep_in_place(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Reorder each rank's new slots (n_ranks, S) so that an expert the rank already holds stays in the slot
    that holds it: the rank's set of experts is `new`'s, and only the slots that change need new weights
    (a re-placement then moves as few experts as the plan allows). Deterministic: every rank computes every
    rank's row alike."""
    out = torch.empty_like(new)
    for r in range(new.shape[0]):
        want = new[r].tolist()
        row: list[int | None] = [None] * len(want)
        for j, e in enumerate(old[r].tolist()):
            if e in want:  # kept where it is (a repeated expert keeps as many slots as it still has copies here)
                want.remove(e)
                row[j] = e
        for j in range(len(row)):
            if row[j] is None:
                row[j] = want.pop(0)
        out[r] = torch.tensor(row)
    return out


def route_to_replica(idx: torch.Tensor, placement: LayerPlacement, offset: int = 0) -> torch.Tensor:
    """Logical expert ids (N, K) -> physical slot ids (N, K). The j-th occurrence of expert e in the
    flattened batch goes to copy (j + offset) mod replicas[e]. Tensor ops only: no host sync, deterministic.
    offset: where a batch starts counting, so that batches routed independently (each data-parallel
    rank's own, dsv3/ep_serve.py) do not all send their first token of a hot expert to its copy 0."""
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True)
    first = torch.searchsorted(order.values, order.values)  # first position of each value in sorted order
    occ_sorted = torch.arange(flat.numel(), device=flat.device) - first
    occ = torch.empty_like(occ_sorted).scatter_(0, order.indices, occ_sorted)  # back to token order
    replicas = placement.replicas.to(flat.device)
    copy = (occ + offset) % replicas[flat]
    return placement.log2phy.to(flat.device)[flat, copy].reshape(idx.shape)


def summary(loads: torch.Tensor, placement: Placement, n_ranks: int) -> str:
    """Per-layer imbalance before (contiguous, no redundancy) and after, and the copied experts."""
    before = imbalance(baseline_rank_load(loads, n_ranks))
    after = imbalance(placement.rank_load)
    lines = [f"{'layer':>5} {'before':>8} {'after':>8}  experts with copies (expert x copies)"]
    for i in range(placement.n_layers):
        rep = placement.replicas[i]
        hot = [f"{e}x{int(rep[e])}" for e in torch.nonzero(rep > 1).flatten().tolist()]
        lines.append(f"{i:>5} {before[i].item():>8.3f} {after[i].item():>8.3f}  {' '.join(hot)}")
    lines.append(f"{'mean':>5} {before.mean().item():>8.3f} {after.mean().item():>8.3f}  "
                 f"(imbalance = max rank load / mean - 1; {n_ranks} ranks x "
                 f"{placement.slots.shape[-1]} slots)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dsv3.inference.eplb", description=__doc__.split("\n\n")[0])
    p.add_argument("--loads", required=True, help="(L, E) token counts per MoE layer and expert: .pt or .npy "
                   "(dsv3 eval/serve --record-expert-loads)")
    p.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks")
    p.add_argument("--redundant", type=int, default=32, help="extra expert slots in total (multiple of --ranks)")
    p.add_argument("--groups", type=int, default=None, help="expert groups (hierarchical placement)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (hierarchical placement; needs --groups)")
    p.add_argument("--out", default=None, help="save the placement's tensors to this .pt file")
    a = p.parse_args(argv)
    loads = load_counts(a.loads)
    pl = plan_placement(loads, a.ranks, a.redundant, a.groups, a.nodes)
    print(summary(loads, pl, a.ranks))
    if a.out:
        torch.save({"replicas": pl.replicas, "slots": pl.slots, "rank_load": pl.rank_load,
                    "log2phy": pl.log2phy}, a.out)
        print(f"placement saved to {a.out}")


if __name__ == "__main__":
    main()

"""Expert loads counted where the model runs: tokens routed to each expert of each MoE block (`ExpertLoadRecorder`).

The counts are what dsv3/inference/eplb.py places redundant experts from (`--expert-loads`); they are recorded by
`dsv3 eval --record-expert-loads` (a corpus through a trained model: dsv3/training/evaluate.py) and by the inference
engine (`Engine(record_expert_loads=True)`, `dsv3 serve --record-expert-loads`), and written and read by
dsv3/checkpoints/loads.py. Single-device math on the model's routers (forward hooks), no I/O.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch


class ExpertLoadRecorder:
    """Tokens routed to each expert of each MoE block, counted on the device while a model runs: the loads
    `plan_placement` and `--expert-loads` take. One forward hook per router (`Transformer.routers()`: the main
    MoE layers, then the MTP layers, the rows of `ModelOutput.expert_counts`) adds the router's choices to
    `counts` (L, E) int64 with a scatter-add: no host sync, and inside a captured CUDA graph each replay
    counts its own batch. The counts are the router's logical expert ids, before any redundant copy.

    Only forwards inside `recording()` count (the hooks stay on the model, which others may run too), and
    the hooks go when the recorder is garbage-collected (an engine's with the engine, which holds reference
    cycles: at the next cyclic collection, `gc.collect()`) or `remove()`d.
    `rows`: None counts every row of a forward; else an (N,) 0/1 tensor over the forward's N = B x T rows
    (flattened, batch-major), set by the caller before each forward, so that padding does not count (a
    decode bucket's spare rows, a prefill row's positions past its chunk, a lockstep engine's idle step).
    Inside a graph it must be derived from the graph's static inputs (the engine's DecodeGraphs does).
    What counts in a serving engine: every position the model runs for a request, prompt chunks, decode
    tokens and the drafts it verifies (their expert work is done whether or not they are accepted), and the
    MTP module's rows of the drafting steps. `read()` -> (L, E) int64 on the CPU (one sync)."""

    def __init__(self, model):
        routers = model.routers()
        if not routers:
            raise ValueError("this model has no MoE layers: there are no expert loads to record")
        E = model.config.n_routed_experts
        device = routers[0].e_score_correction_bias.device
        self.counts = torch.zeros(len(routers), E, dtype=torch.long, device=device)
        self.rows: torch.Tensor | None = None
        self.active = False
        me = weakref.ref(self)  # the hooks must not keep the recorder (and its engine) alive
        handles = [r.register_forward_hook(functools.partial(_count_hook, me, i)) for i, r in enumerate(routers)]
        self._remove = weakref.finalize(self, _remove_hooks, handles)

    @contextlib.contextmanager
    def recording(self):
        """The forwards run inside count."""
        self.active = True
        try:
            yield self
        finally:
            self.active, self.rows = False, None

    def read(self) -> torch.Tensor:
        return self.counts.cpu()

    def reset(self) -> None:
        self.counts.zero_()

    def remove(self) -> None:
        """Stop recording: the hooks go (graphs captured with them keep counting into `counts`)."""
        self._remove()


def _count_hook(ref, i: int, module, args, out) -> None:
    rec = ref()
    if rec is None or not rec.active:
        return
    idx_NK = out[1]  # (N, K) int64: the experts each row is routed to
    if rec.rows is None:
        w = torch.ones_like(idx_NK)
    else:
        w = rec.rows.reshape(-1, 1).to(idx_NK.dtype).expand_as(idx_NK)  # (N, K): 0 for padding rows
    rec.counts[i].scatter_add_(0, idx_NK.reshape(-1), w.reshape(-1))


def _remove_hooks(handles) -> None:
    for h in handles:
        h.remove()

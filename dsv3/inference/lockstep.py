"""Several ranks running one Engine in lockstep (torch.distributed; the expert-parallel serving of
dsv3/ep_serve.py is its user). Rank 0 owns the request queue; every rank runs the same sequence of
`Engine.step()` calls on the same requests, so that collectives inside the model (the MoE all-to-alls)
meet with the same shapes on every rank:

  * rank 0's `Leader` is the Engine's interface (the server's EngineLoop and Engine.generate/stream use
    it unchanged); its add_request / abort calls are applied locally and recorded, and each step() first
    broadcasts the recorded commands (a pickled list of ("add", token ids, SamplingParams, id) /
    ("abort", id), `broadcast_object_list`), then steps. `follow` on the other ranks receives the list,
    applies it in the same order, steps. Admission, batching and cache blocks are host decisions on
    identical state, so every rank forms the same batches;
  * the tokens are rank 0's: `agree_with_rank0` makes the engine broadcast each phase's decisions (the
    one tensor the engine copies to the host: tokens, accepted counts, drafts, log-probs) from rank 0
    before the host reads them (`Engine.agree`). Chosen over identically seeded generators on every
    rank because those agree only while the logits agree bit for bit, and under expert parallelism they
    need not: a token's expert rows sit at a different offset (and, on a GPU, in a differently shaped
    GEMM) in the owner's batch for each source rank, so one near-tie in an argmax or an exponential race
    would give ranks different tokens, then different lengths and batches, and the next all-to-all
    would hang. The broadcast makes agreement hold by construction for one small collective per phase
    (a few per step, against two all-to-alls per MoE layer). What a rank computes past its own
    decisions (its MTP module's cache rows, its draft distributions) only shapes proposals that rank
    0's then replace. Rank 0's tokens are what one process computes, so greedy, seeded and
    log-probability outputs keep their one-process meaning;
  * the commands travel on a gloo group of their own with a long timeout (`control_group`): an idle
    server's followers wait in that broadcast (on the CPU: no GPU spin, no 30-minute timeout);
  * shutdown: rank 0 broadcasts ("stop",) (`Leader.shutdown`), after which every rank returns. Under
    torchrun, Ctrl-C or SIGTERM reaches every rank; followers keep following until rank 0's stop
    arrives (`run_follower`), so all ranks exit 0.

Attention data parallelism (`DPLeader`, `follow(..., dp=True)`; the paper's decode layout): each rank
holds, prefills and decodes its own requests (its own latent cache, its own batches, attention and the
dense layers over its own tokens only); the MoE layers exchange the ranks' different tokens by all-to-all.
(With --attn-tp T, "rank" below reads "group of T consecutive ranks holding the same requests": see
DPLeader.) Rank 0 still owns the queue: it gives each new request to the rank with the fewest live requests (ties:
the lowest rank) and sends ("add", ids, params, id, owner) to all; only the owner queues it. After every
step each rank's outputs (and its running / waiting counts and stats) are gathered to rank 0, which
returns them all, so the server and `Engine.generate` see one engine. Tokens are the owner's own (no
`agree`): no other rank's batches depend on them. What must still agree is the sequence of forwards,
since each holds collectives: `Engine.phase_sync` all-reduces (has prefill, has decode) over the ranks
before a step's forwards, and a rank with no work in a phase another rank runs runs it on a throwaway
request in its padding block (`Engine._idle`).

A step that raises on one rank leaves the others inside a collective: the job must be restarted
(torchrun tears the ranks down when one exits with an error).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from dsv3.inference.engine import Engine, EngineStats, RequestOutput, SamplingParams

# How long a follower may wait for rank 0's next command: an idle server sends none.
CONTROL_TIMEOUT = timedelta(days=365)


def control_group():
    """The gloo group over all ranks that carries the commands (every rank must call this, in the same
    order as its other group creations)."""
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def agree_with_rank0(engine: Engine, group=None) -> Engine:
    """Every phase's decisions of `engine` become rank 0's of `group` (module docstring): one broadcast of
    the tensor the engine copies to the host, on the group's own backend (NCCL: on the device)."""
    group = group or dist.group.WORLD
    src = dist.get_global_rank(group, 0)

    def agree(t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, src=src, group=group)
        return t

    engine.agree = agree
    return engine


def _send(cmds: list, ctrl) -> None:
    dist.broadcast_object_list([cmds], src=dist.get_global_rank(ctrl, 0), group=ctrl)


def _receive(ctrl) -> list:
    box = [None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(ctrl, 0), group=ctrl)
    return box[0]


class Leader:
    """Rank 0's engine: the Engine's interface, each step preceded by the broadcast of the requests added
    and aborted since the last one (module docstring). Thread-safe against `shutdown` only (the server's
    EngineLoop is the one thread that steps it)."""

    def __init__(self, engine: Engine, ctrl):
        self.engine = engine
        self.ctrl = ctrl
        self._pending: list[tuple] = []
        self._lock = threading.Lock()  # a step and the shutdown broadcast never interleave
        self.closed = False

    def __getattr__(self, name):  # everything else (cache, stats, max_model_len, has_unfinished...) as the Engine's
        return getattr(self.engine, name)

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        rid = self.engine.add_request(prompt, params, request_id)
        r = self.engine.waiting[-1]  # the request just queued: its token ids and validated parameters
        assert r.id == rid
        self._pending.append(("add", r.prompt, r.params, rid))
        return rid

    def abort(self, request_id: str) -> bool:
        ok = self.engine.abort(request_id)
        if ok:
            self._pending.append(("abort", request_id))
        return ok

    def step(self) -> list[RequestOutput]:
        with self._lock:
            if self.closed:
                raise RuntimeError("the expert-parallel engine was shut down")
            cmds, self._pending = self._pending, []
            _send(cmds, self.ctrl)
            return self._collect(self.engine.step())

    def _collect(self, outs: list[RequestOutput]) -> list[RequestOutput]:
        """The step's outputs as the caller sees them: this rank's (every rank runs every request)."""
        return outs

    # Engine's own drivers, run against this object so that their add_request/step are the Leader's
    generate = Engine.generate
    stream = Engine.stream

    def shutdown(self) -> None:
        """Tell the followers to return (once; later steps raise)."""
        with self._lock:
            if not self.closed:
                self.closed = True
                _send([("stop",)], self.ctrl)


def sync_phases(engine: Engine, ctrl) -> Engine:
    """Attention data parallelism: before each step's forwards the ranks agree on which phases run (one
    all-reduce of two flags on the gloo control group: no device sync); see the module docstring."""
    def phase_sync(has_new: bool, has_decode: bool) -> tuple[bool, bool]:
        t = torch.tensor([int(has_new), int(has_decode)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctrl)
        return bool(t[0]), bool(t[1])

    engine.phase_sync = phase_sync
    return engine


def _report(engine: Engine, outs: list[RequestOutput]) -> tuple:
    """What a data-parallel rank sends rank 0 after a step."""
    return outs, engine.num_running, engine.num_waiting, dataclasses.asdict(engine.stats)


class DPLeader(Leader):
    """Rank 0's interface under attention data parallelism (module docstring): requests go to the least
    loaded data-parallel group, every step gathers all ranks' outputs. A group is `group_size` consecutive
    ranks that hold the same requests (1; or the tensor-parallel group of --attn-tp T: ranks [g·T, (g+1)·T),
    whose tokens are their first rank's, `agree_with_rank0` over the group); its first rank's outputs
    stand for it. `num_running`, `num_waiting` and `stats` are sums over the groups (as of the last step;
    `stats.steps` counted once);
    `max_batch_size` is the groups' total; `cache` is rank 0's (every rank has one of the same size)."""

    def __init__(self, engine: Engine, ctrl, group_size: int = 1):
        super().__init__(engine, ctrl)
        self.group_size = group_size
        self.world = dist.get_world_size(ctrl)
        self.groups = self.world // group_size
        self.owner: dict[str, int] = {}  # live request id -> the group that holds it
        self.load = [0] * self.groups  # live requests per group
        self._counts = [(0, 0)] * self.groups  # (running, waiting) per group after the last step
        self.stats = EngineStats()

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        rid = self.engine.add_request(prompt, params, request_id)  # validated here, for every rank alike
        r = self.engine.waiting[-1]
        owner = min(range(self.groups), key=lambda i: (self.load[i], i))
        if owner != 0:
            self.engine.waiting.pop()  # queued by its owner
        self.owner[rid] = owner
        self.load[owner] += 1
        self._pending.append(("add", r.prompt, r.params, rid, owner))
        return rid

    def abort(self, request_id: str) -> bool:
        owner = self.owner.get(request_id)
        if owner is None:
            return False
        if owner == 0:
            return super().abort(request_id)
        self._pending.append(("abort", request_id))  # its final output comes back from the owner's next step
        return True

    def has_unfinished(self) -> bool:
        return bool(self.owner) or self.engine.has_unfinished()

    @property
    def num_running(self) -> int:
        return sum(c[0] for c in self._counts)

    @property
    def num_waiting(self) -> int:
        return sum(c[1] for c in self._counts)

    @property
    def max_batch_size(self) -> int:
        return self.engine.max_batch_size * self.groups

    def expert_loads(self) -> torch.Tensor:
        """The tokens routed to each expert over every group (each routes its own requests): one ("loads",) command
        between steps, every rank's counts gathered, summed, divided by the group size (a group's ranks route
        the same tokens). Needs record_expert_loads on every rank's engine."""
        with self._lock:
            if self.closed:
                raise RuntimeError("the expert-parallel engine was shut down")
            own = self.engine.expert_loads()  # (raises, on every rank alike, without recording)
            _send([("loads",)], self.ctrl)
            every = [None] * self.world
            dist.gather_object(own, every, dst=_rank0(self.ctrl), group=self.ctrl)
        return sum(every) // self.group_size

    def _collect(self, outs: list[RequestOutput]) -> list[RequestOutput]:
        """Every group's outputs (gathered from every rank; a group's first rank stands for it)."""
        reports = [None] * self.world
        dist.gather_object(_report(self.engine, outs), reports, dst=_rank0(self.ctrl), group=self.ctrl)
        reports = reports[:: self.group_size]  # one rank per group: its first
        outs = [o for rep in reports for o in rep[0]]
        for o in outs:
            if o.finished and o.request_id in self.owner:
                self.load[self.owner.pop(o.request_id)] -= 1
        self._counts = [(rep[1], rep[2]) for rep in reports]
        for name in dataclasses.asdict(self.stats):  # steps: every group steps together, count it once
            setattr(self.stats, name, reports[0][3][name] if name == "steps" else sum(rep[3][name] for rep in reports))
        return outs


def _rank0(ctrl) -> int:
    return dist.get_global_rank(ctrl, 0)


def follow(engine: Engine, ctrl, dp: bool = False, group_size: int = 1) -> int:
    """A follower rank: apply rank 0's commands and step, until rank 0 says stop. Returns the steps run.
    dp: attention data parallelism (`DPLeader` leads, with the same group_size): queue only the requests
    given to this rank's group and report each step's outputs to rank 0."""
    steps, me = 0, dist.get_rank(ctrl) // group_size
    while True:
        cmds = _receive(ctrl)
        if cmds == [("loads",)]:  # rank 0 collects the expert loads (DPLeader.expert_loads): no step
            dist.gather_object(engine.expert_loads(), None, dst=_rank0(ctrl), group=ctrl)
            continue
        for cmd in cmds:
            if cmd[0] == "stop":
                return steps
            if cmd[0] == "add":
                _, ids, params, rid, *owner = cmd
                if not dp or owner[0] == me:
                    engine.add_request(ids, params, request_id=rid)
            elif cmd[0] == "abort":
                engine.abort(cmd[1])
            else:
                raise RuntimeError(f"unknown lockstep command {cmd[0]!r}")
        outs = engine.step()
        if dp:
            dist.gather_object(_report(engine, outs), None, dst=_rank0(ctrl), group=ctrl)
        steps += 1


def run_follower(engine: Engine, ctrl, grace_s: float = 20.0, dp: bool = False, group_size: int = 1) -> int:
    """`follow` for a CLI process: the loop runs on a thread (a blocked collective defers Python signal
    handlers), and SIGINT / SIGTERM (torchrun forwards Ctrl-C and its own SIGTERM to every rank) only start
    a grace period in which rank 0, shutting down too, sends its stop. Returns 0 after the stop; 1 if the
    loop failed or no stop came within grace_s (rank 0 gone: nothing left to wait for)."""
    done = threading.Event()
    failed: list[BaseException] = []
    dev = engine.device

    def run() -> None:
        try:
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            follow(engine, ctrl, dp=dp, group_size=group_size)
        except BaseException as e:  # reported by the main thread
            failed.append(e)
        finally:
            done.set()

    signalled: list[float] = []
    old = {s: signal.signal(s, lambda *_: signalled.append(time.monotonic())) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread = threading.Thread(target=run, name="dsv3-ep-follower", daemon=True)
        thread.start()
        while not done.wait(0.2):
            if signalled and time.monotonic() - signalled[0] > grace_s:
                print(f"rank {dist.get_rank()}: no stop from rank 0 within {grace_s:.0f} s of the signal; exiting",
                      file=sys.stderr)
                return 1
        thread.join()  # (returning: until it has, it holds the engine, whose process groups the caller destroys)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if failed:
        import traceback

        traceback.print_exception(failed[0])
        return 1
    return 0


__all__ = ["CONTROL_TIMEOUT", "DPLeader", "Leader", "agree_with_rank0", "control_group", "follow", "run_follower",
           "sync_phases"]

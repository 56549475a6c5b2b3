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

A step that raises on one rank leaves the others inside a collective: the job must be restarted
(torchrun tears the ranks down when one exits with an error).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from dsv3.inference.engine import Engine, RequestOutput, SamplingParams

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
            return self.engine.step()

    # Engine's own drivers, run against this object so that their add_request/step are the Leader's
    generate = Engine.generate
    stream = Engine.stream

    def shutdown(self) -> None:
        """Tell the followers to return (once; later steps raise)."""
        with self._lock:
            if not self.closed:
                self.closed = True
                _send([("stop",)], self.ctrl)


def follow(engine: Engine, ctrl) -> int:
    """A follower rank: apply rank 0's commands and step, until rank 0 says stop. Returns the steps run."""
    steps = 0
    while True:
        for cmd in _receive(ctrl):
            if cmd[0] == "stop":
                return steps
            if cmd[0] == "add":
                _, ids, params, rid = cmd
                engine.add_request(ids, params, request_id=rid)
            elif cmd[0] == "abort":
                engine.abort(cmd[1])
            else:
                raise RuntimeError(f"unknown lockstep command {cmd[0]!r}")
        engine.step()
        steps += 1


def run_follower(engine: Engine, ctrl, grace_s: float = 20.0) -> int:
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
            follow(engine, ctrl)
        except BaseException as e:  # reported by the main thread
            failed.append(e)
        finally:
            done.set()

    signalled: list[float] = []
    old = {s: signal.signal(s, lambda *_: signalled.append(time.monotonic())) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        threading.Thread(target=run, name="dsv3-ep-follower", daemon=True).start()
        while not done.wait(0.2):
            if signalled and time.monotonic() - signalled[0] > grace_s:
                print(f"rank {dist.get_rank()}: no stop from rank 0 within {grace_s:.0f} s of the signal; exiting",
                      file=sys.stderr)
                return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if failed:
        import traceback

        traceback.print_exception(failed[0])
        return 1
    return 0


__all__ = ["CONTROL_TIMEOUT", "Leader", "agree_with_rank0", "control_group", "follow", "run_follower"]

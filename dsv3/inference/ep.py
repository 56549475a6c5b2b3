"""Expert-parallel inference: one Engine per rank (torchrun), the routed experts split over the ranks,
every rank stepping in lockstep. Rank 0 serves (HTTP or the CLI); the others follow.

    torchrun --nproc-per-node R -m dsv3.cli serve CHECKPOINT --ep R

What each rank holds. The routed experts `local_experts(E, rank, R)` of every MoE block (main and MTP),
contiguous as in training (dsv3/distributed/expert_parallel.py), read from the checkpoint and nothing
else of the other experts (`load_pretrained(experts=...)`); FP8 experts stay FP8 with keep_fp8. Everything
else is replicated: embedding, attention, dense FFNs, shared experts, routers, head, the MTP modules'
non-expert weights, and the paged latent KV cache, which holds the same sequences on every rank. The
MoE blocks route through `AllToAllDispatcher` (the model's one seam, `MoE.dispatcher`): each rank sends
its copy of the batch's (token, expert) rows to the experts' owners and gets the outputs back.

Lockstep: the dispatcher's all-to-alls need every rank to run the same forwards with the same shapes, so
every rank runs the same sequence of `Engine.step()` calls on the same requests:
  * rank 0's `Leader` owns the queue. It is the Engine's interface (the server's EngineLoop and
    Engine.generate/stream use it unchanged); its add_request / abort calls are applied locally and
    recorded, and each step() first broadcasts the recorded commands (a pickled list of ("add", token
    ids, SamplingParams, id) / ("abort", id), `broadcast_object_list`), then steps. `follow` on the
    other ranks receives the list, applies it in the same order, steps. Admission, batching and cache
    blocks are host decisions on identical state, so every rank forms the same batches;
  * the tokens are rank 0's. Each phase's decisions (the one tensor the engine copies to the host:
    tokens, accepted counts, drafts, log-probs) are broadcast from rank 0 (`Engine.agree`) before the
    host reads them. Chosen over identically seeded generators on every rank because those agree only
    while the logits agree bit for bit, and under EP they need not: a token's expert rows sit at a
    different offset (and, on a GPU, in a differently shaped GEMM) in the owner's batch for each
    source rank, so one near-tie in an argmax or an exponential race would give ranks different
    tokens, then different lengths and batches, and the next all-to-all would hang. The broadcast makes
    agreement hold by construction for one small collective per phase (a few per step, against two
    all-to-alls per MoE layer); what a rank computes past its own decisions (its MTP cache, its draft
    distributions) only shapes proposals that rank 0's then replace. Rank 0's tokens are what one
    process computes, so greedy, seeded and log-probability outputs keep their one-process meaning;
  * the commands travel on a gloo group of their own with a long timeout (`CONTROL_TIMEOUT`): an idle
    server's followers wait in that broadcast (on the CPU: no GPU spin, no 30-minute timeout);
  * shutdown: rank 0 broadcasts ("stop",) (`Leader.shutdown`), after which every rank returns. Under
    torchrun, Ctrl-C or SIGTERM reaches every rank; followers keep following until rank 0's stop
    arrives (`run_follower`), so all ranks exit 0.

Refused: CUDA graphs and `compile_decode` (the graphed decode steps). The dispatcher reads the split
sizes on the host (`.tolist()`) and exchanges data-dependent row counts, which a CUDA graph cannot
capture; the EP engine runs its decode steps eagerly.

Cost (the simplest correct design, not the fastest): every rank dispatches its whole copy of the batch,
so each rank's experts compute the rows of all R copies, as many expert FLOPs per rank as one process
spends on the whole model; EP here buys memory (1/R of the experts per rank), not expert throughput.
Sending only a 1/R slice of the tokens from each rank and all-gathering the outputs would divide the
expert work by R (not done yet).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from dsv3.distributed.expert_parallel import AllToAllDispatcher, local_experts
from dsv3.inference.engine import Engine, RequestOutput, SamplingParams
from dsv3.model.moe import MoE

# How long a follower may wait for rank 0's next command: an idle server sends none.
CONTROL_TIMEOUT = timedelta(days=365)


def control_group():
    """The gloo group over all ranks that carries the commands (every rank must call this, in the same
    order as its other group creations)."""
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def check_ep(ep: int, n_routed_experts: int | None = None) -> int:
    """The world size for `--ep ep`, or a ValueError saying why it cannot run: torchrun must have started
    exactly ep processes, and ep must divide the routed experts."""
    if not isinstance(ep, int) or ep < 1:
        raise ValueError(f"--ep must be an integer >= 1, got {ep!r}")
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        raise ValueError(f"--ep {ep} runs one process per expert-parallel rank: start it with torchrun "
                         f"(torchrun --nproc-per-node {ep} -m dsv3.cli ... --ep {ep}); WORLD_SIZE is not set")
    if int(world) != ep:
        raise ValueError(f"--ep {ep} but torchrun started {world} processes: expert-parallel serving uses one rank "
                         "per expert shard (--ep = --nproc-per-node x nodes)")
    if n_routed_experts is not None:
        if n_routed_experts == 0:
            raise ValueError(f"--ep {ep}: the model has no routed experts to split")
        if n_routed_experts % ep:
            raise ValueError(f"--ep {ep} does not divide n_routed_experts ({n_routed_experts}): each rank must hold "
                             f"the same number of experts")
    return int(world)


def load_ep_engine(checkpoint: str, *, ep: int, device: str = "auto", keep_fp8: bool = True,
                   cuda_graphs: bool | None = None, compile_decode: bool = False, group=None, **engine_kwargs):
    """(Engine, DSTokenizer) of this rank: its shard of a checkpoint (or run) directory, the EP dispatcher
    installed in every MoE block, decisions agreed with rank 0. Needs the default process group started
    (torchrun + `dsv3.distributed.init_distributed`) over `ep` ranks (or `group` of ep ranks).
    engine_kwargs go to `Engine`, as for `load_engine`; every rank must pass the same."""
    from dsv3.checkpoints.hf import load_pretrained
    from dsv3.checkpoints.rundir import resolve_checkpoint
    from dsv3.config import ModelConfig
    from dsv3.tokenizer import DSTokenizer

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"ep={ep} needs torch.distributed started over {ep} ranks (run under torchrun)")
    group = group or dist.group.WORLD
    R, rank = dist.get_world_size(group), dist.get_rank(group)
    if R != ep:
        raise ValueError(f"ep={ep} but the process group has {R} ranks")
    if cuda_graphs or compile_decode:
        raise ValueError("CUDA graphs (and compile_decode, which compiles the graphed steps) cannot run with expert "
                         "parallelism: the all-to-all dispatcher reads its split sizes on the host and exchanges "
                         "data-dependent row counts, which a graph cannot capture; the EP engine decodes eagerly")
    checkpoint = resolve_checkpoint(checkpoint)
    E = ModelConfig.from_json(checkpoint).n_routed_experts
    if E == 0 or E % ep:
        raise ValueError(f"ep={ep} does not divide n_routed_experts ({E})" if E else
                         f"ep={ep}: the model has no routed experts to split")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # one GPU per local rank (init_distributed made it the current device)
        device = f"cuda:{torch.cuda.current_device()}"
    tok = DSTokenizer.load(checkpoint)
    model = load_pretrained(checkpoint, device=device, dtype=torch.float32 if device == "cpu" else None,
                            keep_fp8=keep_fp8, experts=local_experts(E, rank, ep)).eval()
    for m in model.modules():
        if isinstance(m, MoE):
            m.dispatcher = AllToAllDispatcher(group, E)
    engine = Engine(model, tok, cuda_graphs=False, **engine_kwargs)
    src = dist.get_global_rank(group, 0)

    def agree(t: torch.Tensor) -> torch.Tensor:  # rank 0's decisions, on every rank (module docstring)
        dist.broadcast(t, src=src, group=group)
        return t

    engine.agree = agree
    return engine, tok


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


__all__ = ["CONTROL_TIMEOUT", "Leader", "check_ep", "control_group", "follow", "load_ep_engine", "run_follower"]

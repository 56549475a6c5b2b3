"""The composition matrix: every layout x precision x optimizer-state dtype x recomputation trains with
the real entry point (`dsv3.training.pretrain.train`, the one loop) and must match the one-process run
of the same batches. Shared by tests/distributed/test_compose.py (a covering subset, in CI) and
bench/compose_matrix.py (the whole matrix, a table for bench/RESULTS.md).

    cells(...)                  the matrix (or a subset) as Cell records
    run_cells(root, cells)      launches one process group per world size (the variables torchrun sets,
                                gloo; the first launches at once, then the resumes), each rank running its
                                cells one after the other; then compares
    compare(root, cell)         losses of every step (metrics.jsonl) and the parameters after the steps
                                (the final checkpoint's Hugging Face export) against the reference:
                                the one-process run with the same precision and optimizer state

Every cell reads the same global batches: 8 sequences of 32 tokens per step, one micro-batch per step
(split over the data-parallel ranks; the pipeline splits it into its micro-batches), so the mean loss of
the step is the same quantity in every layout. The model (4 layers: 1 dense + 3 MoE of 4 experts, one
MTP module) has enough layers for DualPipeV's 4 stages on 2 ranks.

Run one worker by hand: RANK=0 WORLD_SIZE=1 ... python -m tests.distributed.compose worker ROOT CELLS.json
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

# name -> (world size, ParallelConfig fields)
LAYOUTS = {
    "1proc": (1, {}),
    "fsdp_dp2": (2, {"dp_shard": 2, "ep": 1}),
    "ep2": (2, {"dp_shard": 1, "ep": 2}),
    "dp2xep2": (4, {"dp_shard": 2, "ep": 2}),
    "pp2_1f1b": (2, {"pp": 2, "pp_schedule": "1f1b"}),
    "pp2_dualpipev": (2, {"pp": 2, "pp_schedule": "dualpipev"}),
    "pp2xep2": (4, {"pp": 2, "ep": 2, "pp_schedule": "dualpipev"}),
    "pp2xdp2": (4, {"pp": 2, "dp_shard": 2}),
    "replicated_dp2": (2, {"dp_shard": 2, "ep": 1, "fsdp": False}),  # --no-fsdp: whole weights, all-reduced grads
}
PRECISIONS = ("fp32", "bf16", "fp8")
OPTIM_STATES = ("fp32", "bf16")
RECOMPUTES = ("none", "selective")

MODEL = dict(
    vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
    max_position_embeddings=128, rope_scaling=None, num_nextn_predict_layers=1, initializer_range=0.1,
    torch_dtype="float32",
)
STEPS, BATCH, SEQ, LR = 3, 8, 32, 1e-2

# Tolerances (absolute) against the one-process run of the same precision and optimizer state.
# loss: every step's total loss. Parameters after STEPS AdamW steps: Adam turns gradient entries at the
# rounding-noise level into ±lr steps, so single entries can move by up to 2·lr per step whatever the
# layout (max); the bulk must agree: the mean |diff| and the share of entries differing by more than
# `near`. bf16: the layouts round different partial sums (FSDP's gradient reduce, expert rows per rank).
# fp8: in addition the weight gradients' 1x128 activation tiles run along the tokens of a micro-batch,
# and splitting the batch over ranks / pipeline micro-batches regroups them (measured: mean 5e-4, 12% of
# the entries > 1e-3 with 1-2 rows per micro-batch; a layout whose ranks all read the same rows gives
# 6e-3 and 63% in fp8, 6e-3 and 83% in fp32: checked by breaking the row split).
TOLERANCES = {
    #        loss   param max        near  far fraction  mean
    "fp32": (2e-5, 2 * LR, 1e-5, 1e-2, 1e-6),
    # bf16 loss: 1.24-1.36e-2 seen on a CPU with native bf16 matmuls (Zen 4, avx512_bf16), below 1e-2 elsewhere
    "bf16": (2e-2, 2 * LR * STEPS, 1e-3, 5e-2, 3e-4),
    # fp8 loss: the regrouped token tiles make the step-2 gradient norms differ by 0.3-0.9% and lr 1e-2 turns that
    # into up to 0.8% of the loss a step later, depending on the initial weights: largest step-3 difference of
    # pp2_dualpipev / dp2xep2 / ep2 from one process (bf16 moments), seeds 0-3: 0.054 / 0.040 / 0.003 (seed 0, this
    # matrix), then 0.005-0.007 (seeds 1-3); with the earlier one-generator initialisation 0.004-0.021. The
    # divergence is chaotic (another CPU's rounding moves it), so the bound leaves room above the worst seen;
    # a broken gradient sync moves the loss by O(1) and the parameters' bulk (mean / far fraction, below) too
    "fp8": (8e-2, 2 * LR * STEPS, 1e-3, 0.2, 1.5e-3),
}


@dataclass
class Cell:
    layout: str
    precision: str = "fp32"
    optim_state: str = "fp32"
    recompute: str = "none"
    steps: int = STEPS
    resume_from: str | None = None  # the name of a cell whose run directory this one continues
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        n = f"{self.layout}-{self.precision}-{self.optim_state}-{self.recompute}"
        if self.steps != STEPS:
            n += f"-s{self.steps}"
        n += "".join(f"-{k}" if v is True else f"-{k}{v}" for k, v in sorted(self.extra.items()))
        return n + (f"-from-{self.resume_from}" if self.resume_from else "")

    @property
    def world(self) -> int:
        return LAYOUTS[self.layout][0]

    @property
    def reference(self) -> str:
        """The one-process cell this one must match."""
        return f"1proc-{self.precision}-{self.optim_state}-none"


def all_cells() -> list[Cell]:
    return [Cell(lay, p, o, r) for lay, p, o, r in itertools.product(LAYOUTS, PRECISIONS, OPTIM_STATES, RECOMPUTES)]


def runnable(cell: Cell) -> bool:
    """False for the combinations this torch refuses (DualPipeV x FP8 or x --compile before torch 2.13)."""
    from dsv3.distributed.strategy import dualpipev_refusal

    schedule = LAYOUTS[cell.layout][1].get("pp_schedule", "")
    return dualpipev_refusal(cell.precision, schedule, compile=bool(cell.extra.get("compile"))) is None


def covering_cells() -> list[Cell]:
    """Every pair of options (layout x precision, layout x optim state, layout x recompute, precision x
    optim state, precision x recompute, optim state x recompute) in at least one cell: 24 cells, one per
    layout x precision, the two binary options set so that their pairs with everything are covered."""
    out = []
    for i, lay in enumerate(LAYOUTS):
        for j, p in enumerate(PRECISIONS):
            o = OPTIM_STATES[(i + j) % 2]
            r = RECOMPUTES[(i // 2 + j) % 2]
            extra = {"fp8_recompute_weights": FP8_RECOMPUTE_CELLS[lay]} if p == "fp8" and lay in FP8_RECOMPUTE_CELLS \
                else {}
            out.append(Cell(lay, p, o, r, extra=extra))
    return out


# --fp8-recompute-weights against its default (auto: on for the pipelines, off elsewhere; either way the same
# gradients bit for bit, so the same reference and tolerances) in the FP8 cells of these layouts: re-quantised under
# FSDP2 (backward's weight is the re-gathered one) and EP with FSDP2, kept under the pipelines (1F1B's split
# backward calls the FP8 backward twice on one graph); the other FP8 cells run the default
FP8_RECOMPUTE_CELLS = {"fsdp_dp2": "on", "dp2xep2": "on", "pp2_1f1b": "off", "pp2xdp2": "off"}


# checkpoints written by one layout and resumed under another: (writer, reader, optimizer state dtype);
# the writer trains STEPS - 1 steps, the reader the last one; both must end where the uninterrupted
# one-process run ends (exact resume), so the reader is compared with it like any cell
RESUMES = [
    ("1proc", "ep2", "fp32"),                   # run directory (HF format) -> sharded
    ("ep2", "pp2_dualpipev", "fp32"),           # DCP, expert slices -> pipeline stages
    ("pp2xep2", "1proc", "fp32"),               # pipeline DCP -> one process
    ("dp2xep2", "pp2_1f1b", "bf16"),            # bf16 moments through DCP
    ("pp2_1f1b", "fsdp_dp2", "fp32"),           # pipeline -> FSDP2
    ("fsdp_dp2", "pp2xdp2", "fp32"),            # FSDP2 -> pipeline x data parallel
]


def resume_cells(pairs=RESUMES) -> list[Cell]:
    out = []
    for w, r, o in pairs:
        first = Cell(w, "fp32", o, steps=STEPS - 1)
        out += [first, Cell(r, "fp32", o, resume_from=first.name)]
    return out


def pairs_covered(cells: list[Cell]) -> set:
    dims = [("layout", list(LAYOUTS)), ("precision", PRECISIONS), ("optim_state", OPTIM_STATES),
            ("recompute", RECOMPUTES)]
    need = {(a, x, b, y) for (ia, (a, xs)), (ib, (b, ys)) in itertools.combinations(enumerate(dims), 2)
            for x in xs for y in ys}
    have = {(a, getattr(c, a), b, getattr(c, b)) for c in cells
            for (ia, (a, _)), (ib, (b, _)) in itertools.combinations(enumerate(dims), 2)}
    return need - have


# --------------------------------------------------------------------------------------------------
# inputs: a small corpus, its tokenizer, the model config

def make_inputs(root: str) -> None:
    from dsv3.config import ModelConfig
    from dsv3.tokenizer import DSTokenizer
    from dsv3.training.data import split_of

    rng = random.Random(0)
    corpus = os.path.join(root, "corpus")
    os.makedirs(corpus, exist_ok=True)
    names = ["alpha", "beta", "gamma", "delta", "value", "count"]
    for i in range(24):
        with open(os.path.join(corpus, f"f{i:02d}.py"), "w") as f:
            f.write("\n".join(f"def {rng.choice(names)}_{j}(x):\n    return x + {rng.randint(0, 9)}\n"
                              for j in range(30)))
    for n in [n for n in (f"v{i}.py" for i in range(2000)) if split_of(n, 10) == "val"][:3]:
        with open(os.path.join(corpus, n), "w") as f:
            f.write("\n".join(f"def {rng.choice(names)}_{j}(x):\n    return x * {j}\n" for j in range(40)))
    tok = DSTokenizer.train((open(os.path.join(corpus, p)).read() for p in sorted(os.listdir(corpus))), 512)
    tok.save(os.path.join(root, "tok"))
    ModelConfig(**MODEL).validate().to_json(os.path.join(root, "model.json"))


def _train_config(root: str, cell: Cell):
    from dsv3.training.config import TrainConfig

    return TrainConfig(out_dir=os.path.join(root, "cells", cell.name), data=os.path.join(root, "corpus"),
                       tokenizer=os.path.join(root, "tok"), cache_dir=os.path.join(root, "cache"),
                       steps=cell.steps, seq_len=SEQ, batch_size=BATCH, lr=LR, warmup_steps=0, fim_rate=0.0,
                       val_permille=10,  # the split the tolerances were measured on
                       precision=cell.precision, optim_state_dtype=cell.optim_state, recompute=cell.recompute,
                       eval_every=0, save_every=0, progress=False, plots=False, device="cpu", resume=cell.resume_from is not None,
                       **cell.extra)


def run_cell(root: str, cell: Cell) -> dict:
    """In a worker (every rank of the cell's world): train the cell with the one entry point."""
    from dsv3.config import ModelConfig
    from dsv3.distributed.mesh import ParallelConfig
    from dsv3.training.pretrain import train

    tc = _train_config(root, cell)  # a resumed cell continues the copy _launch made of another cell's run
    mc = ModelConfig.from_json(os.path.join(root, "model.json"))
    pcfg = ParallelConfig(**LAYOUTS[cell.layout][1]) if LAYOUTS[cell.layout][1] else None
    return train(mc, tc, pcfg, log=lambda *a, **k: None)


def _worker_main(root: str, cells_path: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    with open(cells_path) as f:
        cells = [Cell(**c) for c in json.load(f)]
    errors = {}
    for c in cells:
        try:
            run_cell(root, c)
        except Exception as e:  # recorded per cell; the other cells still run
            import traceback

            errors[c.name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
            # a refusal (ValueError: a setting this layout cannot run) comes before any collective and on
            # every rank alike, so the group is still usable; anything else may have broken it: stop here
            if dist.is_initialized() and not isinstance(e, ValueError):
                break
    rank = dist.get_rank() if dist.is_initialized() else 0
    if errors:  # every rank its own: the root cause is often on another rank than 0
        with open(f"{cells_path}.errors.{rank}.json", "w") as f:
            json.dump(errors, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def _rank_main(env: dict, root: str, cells_path: str, log: str) -> None:
    """One rank of a launch, in a process forked from the fork server: torchrun's environment, output to `log`."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    _worker_main(root, cells_path)


def _launch(root: str, world: int, cells: list[Cell], tag: str, timeout: float) -> dict:
    from tests.distributed.harness import fork_context, free_port

    for c in cells:  # resumed cells continue a copy of another cell's run directory, made before any rank
        if c.resume_from:  # starts (the ranks' process group only exists inside train())
            out = os.path.join(root, "cells", c.name)
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(os.path.join(root, "cells", c.resume_from), out)
            # the writer stands for a STEPS-step run stopped after STEPS - 1 steps (an interrupted run): its
            # schedule is the whole run's, so the resumed run does not stretch it (dsv3/training/optim.py)
            for st_path in glob.glob(os.path.join(out, "checkpoints", "step_*", "trainer_state.json")):
                with open(st_path) as f:
                    st = json.load(f)
                st["schedule"] = {"total_steps": STEPS, "stretches": []}
                with open(st_path, "w") as f:
                    json.dump(st, f)
    path = os.path.join(root, f"cells-{tag}.json")
    with open(path, "w") as f:
        json.dump([asdict(c) for c in cells], f)
    port = free_port()
    # every rank a process forked from the fork server (tests/distributed/harness.py: torch and dsv3 imported
    # once, not per rank), with the variables torchrun sets; its output goes to a file per rank
    ctx = fork_context()
    procs, logs = [], [f"{path}.out.{r}" for r in range(world)]
    for r in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if world > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(ctx.Process(target=_rank_main, args=(env, root, path, logs[r])))
        procs[-1].start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = any(p.is_alive() for p in procs)
    for p in procs:  # a hung rank: end them all, report every cell of the launch
        if p.is_alive():
            p.kill()
            p.join()
    outs = []
    for log in logs:
        try:
            with open(log, errors="replace") as f:
                outs.append(f.read())
        except FileNotFoundError:  # the rank died before it opened its log
            outs.append("")
    if hung:
        return {c.name: f"launch {tag} timed out after {timeout} s\n" + outs[0][-3000:] for c in cells}
    errors: dict[str, str] = {}
    for r in range(world):  # a rank's own error before another's "connection closed by peer"
        if os.path.exists(f"{path}.errors.{r}.json"):
            with open(f"{path}.errors.{r}.json") as f:
                for name, text in json.load(f).items():
                    if name not in errors or "Connection closed" in errors[name]:
                        errors[name] = f"rank {r}: {text}"
    if any(p.exitcode for p in procs) and not errors:
        errors = {c.name: "worker exited with " + str([p.exitcode for p in procs]) + "\n" + outs[0][-3000:]
                  for c in cells}
    return errors


def run_cells(root: str, cells: list[Cell], timeout: float = 600) -> dict:
    """Run the references and `cells` (grouped by world size; resumed cells after the cells they
    continue). Returns {cell name: error text} for the cells that failed to run."""
    if not os.path.exists(os.path.join(root, "model.json")):
        make_inputs(root)
    cells = list({c.name: c for c in cells}.values())  # a cell that is also a reference runs once
    refs = sorted({c.reference for c in cells})
    ref_cells = [Cell("1proc", *r.split("-")[1:3], "none") for r in refs]
    first = {c.name: c for c in ref_cells + [c for c in cells if c.world == 1 and not c.resume_from]}
    launches = [(1, list(first.values()), "ref")] + [
        (w, [c for c in cells if c.world == w and not c.resume_from], f"w{w}")
        for w in sorted({c.world for c in cells if c.world > 1})]
    resumed = [c for c in cells if c.resume_from]
    later = [(w, [c for c in resumed if c.world == w], f"resume-w{w}") for w in sorted({c.world for c in resumed})]
    # the launches of a stage at once: none reads another's cells, and a launch alone leaves cores idle (one
    # process; ranks waiting on each other's collectives); measured on 2 cores: 37 s for the CI subset
    # instead of 45 s one launch after the other. The numbers do not depend on it (one thread per rank).
    errors: dict[str, str] = {}
    for stage in (launches, later):
        with ThreadPoolExecutor(max(len(stage), 1)) as ex:
            for e in ex.map(lambda launch: _launch(root, *launch, timeout), stage):
                errors |= e
    return errors


# --------------------------------------------------------------------------------------------------
# comparison

def _losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r and "val_loss" not in r}


def _params(run_dir: str) -> dict:
    from safetensors.torch import load_file

    from dsv3.checkpoints.rundir import latest_checkpoint

    ck = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    out = {}
    for name in sorted(os.listdir(ck)):
        if name.startswith("model") and name.endswith(".safetensors"):
            out.update(load_file(os.path.join(ck, name)))
    return out


def compare(root: str, cell: Cell) -> dict:
    """The differences of `cell` from its reference: loss (max over steps), param_max, param_far_frac,
    and the counts checked."""
    import torch

    a = os.path.join(root, "cells", cell.name)
    b = os.path.join(root, "cells", cell.reference)
    la, lb = _losses(a), _losses(b)
    steps = sorted(la)
    if cell.resume_from is None and steps != list(range(1, cell.steps + 1)):
        raise AssertionError(f"{cell.name}: logged steps {steps}")
    loss = max(abs(la[s] - lb[s]) for s in steps)
    pa, pb = _params(a), _params(b)
    if set(pa) != set(pb):
        raise AssertionError(f"{cell.name}: checkpoint names differ: {sorted(set(pa) ^ set(pb))[:5]}")
    near = TOLERANCES[cell.precision][2]
    pmax, far, n, tot = 0.0, 0, 0, 0.0
    for k in pa:
        d = (pa[k].float() - pb[k].float()).abs()
        pmax = max(pmax, float(d.max()) if d.numel() else 0.0)
        far += int((d > near).sum())
        tot += float(d.double().sum())
        n += d.numel()
    return {"loss": loss, "param_max": pmax, "param_mean": tot / max(n, 1), "param_far_frac": far / max(n, 1),
            "steps": len(steps),
            "tensors": len(pa), "loss_first": lb[1], "loss_last": lb[max(lb)]}


def check(root: str, cell: Cell) -> dict:
    """compare() and assert the cell's tolerances; returns the differences."""
    d = compare(root, cell)
    tol_loss, tol_max, near, tol_far, tol_mean = TOLERANCES[cell.precision]
    assert d["loss"] <= tol_loss, f"{cell.name}: loss differs by {d['loss']:.3g} > {tol_loss}"
    assert d["param_mean"] <= tol_mean, f"{cell.name}: parameters differ by {d['param_mean']:.3g} on average"
    assert d["param_max"] <= tol_max, f"{cell.name}: a parameter differs by {d['param_max']:.3g} > {tol_max}"
    assert d["param_far_frac"] <= tol_far, \
        f"{cell.name}: {d['param_far_frac']:.2%} of the entries differ by > {near} (allowed {tol_far:.0%})"
    assert d["loss_last"] < d["loss_first"], f"{cell.reference}: the loss did not fall"
    return d


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        _worker_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m tests.distributed.compose worker ROOT CELLS.json")

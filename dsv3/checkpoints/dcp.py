"""Sharded training checkpoints of a parallelized model (torch.distributed.checkpoint, DCP), and their
conversion to the single-directory Hugging Face format.

A checkpoint is one directory `step_XXXXXXXX/` (the same names as dsv3/checkpoints/rundir.py, so
`latest_checkpoint` and keep-last-K work on both kinds):

    trainer_state.json         "format": "dcp", step, tokens, sampler position (global), run config,
                               model config, the layout it was written with (world size, dp_shard, ep)
    dcp/                       DCP: .metadata + one __R_0.distcp per rank: model and AdamW state
    rng/rank_RRRRR.safetensors each rank's torch RNG states (python/numpy state in the metadata)
    tokenizer.json, tokenizer_config.json
    config.json, model.safetensors    only in an exported checkpoint (the run's final or interrupted
                               save, or `to_hf`): then the directory also loads with load_pretrained

What DCP stores is the *global* tensor of every name with the chunks each rank holds, so any other
layout can read it back (resharding on load):
* FSDP2 parameters are DTensors sharded over all ranks: stored as they are.
* Routed-expert slices under EP are plain (E/ep, ...) tensors on each rank, under the same name on
  every EP rank. Before save/load they are wrapped as DTensors on the ("dp", "ep") mesh with
  placements [Replicate(), Shard(0)]: global shape (E, ...), the rank's slice at rows
  [ep_rank·E/ep, (ep_rank+1)·E/ep). Expert e is therefore stored at global index e whatever the
  ep degree, and a run with ep = 2 resumes with ep = 4, with FSDP (ep = 1) or in one process.
* AdamW moments are keyed by parameter name (torch.distributed.checkpoint.state_dict) and sharded
  like their parameters; the step counts and the router correction biases are replicated.
* Optimizer hyper-parameters (param_groups) are not stored: they come from the run config and the
  schedule (the learning rate is set every step), and their grouping depends on the layout.

Data position on a world-size change: the sampler's state is the position in the *global* batch
sequence (epoch, batch index), identical on every rank; each rank takes rows [r·b, (r+1)·b) of every
global batch (dsv3/training/data.py). A resume on another number of ranks (same global batch size)
therefore continues with exactly the global batches an uninterrupted run would have read, split
over the new ranks. RNG: rank r restores the state saved by rank r mod (old world size); training
draws no random numbers after initialisation (no dropout), so this does not change the losses.

Atomicity: rank 0 makes a temporary sibling directory and broadcasts its name; every rank writes its
part (DCP fsyncs its files), a barrier, then rank 0 writes the JSON and tokenizer (and the HF export),
fsyncs everything and renames the directory into place. A crash at any point leaves no new
`step_*` directory holding trainer_state.json, so the previous checkpoint stays the latest.
All ranks must see one filesystem (one node, or a shared filesystem across nodes).

Loading never unpickles freely: DCP's own reader would `pickle.load` dcp/.metadata (running any code a
crafted file names); dsv3 reads it through the allow-list unpickler of dsv3/checkpoints/safe_dcp.py,
keeps the data files it names inside dcp/, and refuses non-tensor entries.

Disk space (dsv3/checkpoints/space.py): before writing, the ranks agree on the checkpoint's bytes (each
global tensor once) and the smallest free space any of them sees; a save that does not fit, or whose
write fails with a full disk on any rank, removes its temporary directory and raises DiskFullError on
every rank.

CLI: `dsv3 convert CKPT OUT`, where CKPT is a checkpoint directory or a run directory (its latest
checkpoint); one process, no GPU.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dsv3.checkpoints import safe_dcp
from dsv3.checkpoints.files import CheckpointError, confined, load_safetensors, open_safetensors, read_json, require
from dsv3.checkpoints.hf import _meta_model, _umask, load_pretrained, save_pretrained, tempdir_beside
from dsv3.config import ConfigError, ModelConfig
from dsv3.checkpoints import rundir as ckpt
from dsv3.checkpoints import space

FORMAT = "dcp"
DCP_DIR = "dcp"
RNG_DIR = "rng"


def is_dcp_checkpoint(path: str) -> bool:
    """Whether directory `path` holds a sharded checkpoint (a malformed trainer_state.json raises)."""
    if not os.path.exists(os.path.join(path, "trainer_state.json")):
        return False
    return read_state(path).get("format") == FORMAT


def read_state(path: str) -> dict:
    """trainer_state.json of checkpoint `path`; for a sharded one, checked to hold what loading reads."""
    p = os.path.join(path, "trainer_state.json")
    state = read_json(p)
    if state.get("format") == FORMAT:
        require(state, ("model_config", "layout"), p)
        if not isinstance(state["model_config"], dict):
            raise CheckpointError(f"{p}: model_config is not a JSON object")
        world = state["layout"].get("world_size") if isinstance(state["layout"], dict) else None
        if type(world) is not int or world < 1:
            raise CheckpointError(f"{p}: layout.world_size {world!r} is not a positive integer")
        ckpt.check_run_state(state, p)
    return state


def _model_config(path: str, state: dict) -> ModelConfig:
    try:
        return ModelConfig.from_dict(state["model_config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{os.path.join(path, 'trainer_state.json')}: model_config: {e}") from None


# --------------------------------------------------------------------------------------------------
# state dicts with globally indexed expert slices

def _expert_names(model, ps) -> set[str]:
    ids = {id(p) for p in ps.expert_params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _state_dicts(model, opt, ps):
    """(model sd, optimizer sd) keyed by parameter name; EP expert slices (and their moments)
    wrapped as DTensors of the global (E, ...) shape. Returns also the list of wrapped slots."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    msd, osd = get_state_dict(model, opt)  # initialises the AdamW state if it is empty
    wrapped = []
    if ps.pcfg.ep > 1:
        mesh = ps.mesh
        for name in _expert_names(model, ps):
            slots = [(msd, name)]
            if name in osd["state"]:  # a frozen parameter (e.g. post-training's MTP experts) has no AdamW state
                st = osd["state"][name] = dict(osd["state"][name])  # may be the optimizer's own dict: copy
                slots += [(st, k) for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0]
            for d, k in slots:
                d[k] = DTensor.from_local(d[k], mesh, [Replicate(), Shard(0)], run_check=False)
                wrapped.append((d, k))
    return msd, osd, wrapped


def _unwrap(wrapped) -> None:
    for d, k in wrapped:
        d[k] = d[k].to_local()


def _is_pipeline(ps) -> bool:
    return hasattr(ps, "stages") and hasattr(ps, "model_part")  # a pipeline.PipelineState


def _pipeline_state_dicts(opt, ps):
    """Pipeline parallelism: (model sd, optimizer state, wrapped) over this rank's parts of the model
    (`ps.model_part`: the stages' `Transformer.part`s, which keep the model's names:
    `layers.<global index>...`, `embed_tokens.weight`, ...), the same structure as `_state_dicts`; the
    tensors share storage with the parameters, buffers and AdamW state, so DCP loads in place. A name
    held by several ranks (the 1F1B tied embedding copy, replicated parameters of the dp × ep ranks of
    a stage, expert slices of the dp replicas) is equal on them: DCP stores it once. ep > 1: expert
    slices (and their moments) wrapped as DTensors on the stage's ("dp", "ep") sub-mesh with
    placements [Replicate(), Shard(0)], global shape (E, ...), as in `_state_dicts`. ZeRO-1 (`ps.zero`,
    dsv3/distributed/zero.py): a sharded parameter is stored as its master and moments, this rank's chunks,
    DTensors of the global shape (the parameters themselves are gathered from the masters after a load)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state
    from torch.distributed.tensor import DTensor, Replicate, Shard

    _init_optim_state(opt)  # no-op once AdamW has state
    msd, params = {}, {}
    for part in ps.model_part:
        for k, v in part.state_dict(keep_vars=True).items():
            msd[k] = v.detach()
        params.update(dict(part.named_parameters()))
    zero = {id(e.param): (z, e) for z in getattr(ps, "zero", ()) for e in z.entries}

    def optimized(p):  # the tensor AdamW updates for p: its ZeRO master, or p
        return zero[id(p)][1].master if id(p) in zero else p

    some = next((v for v in opt.state.values() if "step" in v), None)
    for p in params.values():  # a parameter that never had a gradient has no AdamW state yet: zeros
        t = optimized(p)
        if not opt.state[t]:
            dt = some["exp_avg"].dtype if some is not None else getattr(opt, "state_dtype", t.dtype)
            step = torch.zeros_like(some["step"]) if some is not None else torch.zeros((), dtype=torch.float32)
            opt.state[t].update(step=step, exp_avg=torch.zeros_like(t.detach(), dtype=dt),
                                exp_avg_sq=torch.zeros_like(t.detach(), dtype=dt))
    osd = {n: dict(opt.state[optimized(p)]) for n, p in params.items()}
    wrapped = []  # (the tensor in place, the DTensor DCP fills)
    for n, p in params.items():
        if id(p) in zero:
            z, e = zero[id(p)]
            msd[n] = e.master.detach()
            for d, k in [(msd, n)] + [(osd[n], k) for k, v in osd[n].items() if torch.is_tensor(v) and v.dim() > 0]:
                orig = d[k]
                d[k] = z.dtensor(orig, p)
                wrapped.append((orig, d[k]))
    if ps.pcfg.ep > 1:
        ids = {id(p) for p in ps.expert_params}
        for n, p in params.items():
            if id(p) not in ids or id(p) in zero:
                continue
            slots = [(msd, n)] + [(osd[n], k) for k, v in osd[n].items() if torch.is_tensor(v) and v.dim() > 0]
            for d, k in slots:
                orig = d[k]
                d[k] = DTensor.from_local(orig, ps.expert_mesh, [Replicate(), Shard(0)], run_check=False)
                wrapped.append((orig, d[k]))
    return msd, osd, wrapped


@torch.no_grad()
def _pipeline_loaded(ps, wrapped) -> None:
    """After a pipeline load: the DTensors' values in their tensors (where DCP did not fill them in place)
    and, under ZeRO-1, the whole parameters gathered from the loaded masters (a collective)."""
    for orig, dt in wrapped:
        if dt.to_local().data_ptr() != orig.data_ptr():
            orig.copy_(dt.to_local())
    for z in getattr(ps, "zero", ()):
        z.gather_params()


def _layout(ps, world: int) -> dict:
    pcfg = ps.pcfg
    if _is_pipeline(ps):  # the stages' dp replicas hold whole weights (no FSDP): dp_shard = dp, fsdp False;
        # zero: their optimizer state (masters, moments) sharded over them (ZeRO-1)
        return {"world_size": world, "pp": pcfg.pp, "dp": pcfg.dp, "ep": pcfg.ep, "schedule": pcfg.schedule,
                "n_microbatches": pcfg.n_microbatches, "dp_shard": pcfg.dp, "fsdp": False, "zero": bool(ps.zero)}
    return {"world_size": world, "dp_shard": pcfg.dp_shard, "ep": pcfg.ep, "fsdp": pcfg.fsdp}


# --------------------------------------------------------------------------------------------------
# save / load

def _rank0_path(path: str | None) -> str:
    obj = [path]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def save_dcp(ckpt_root: str, step: int, model, opt, ps, state: dict, *, tokenizer=None, keep: int = 3,
             export_hf: bool = False) -> str:
    """Collective: every rank calls it. Writes checkpoint `step` atomically and returns its path;
    `state` (JSON-able: sampler, tokens, ...) is rank 0's. export_hf: also write config.json +
    model.safetensors (rank 0 reads the full tensors back from the DCP files). Pipeline runs: `ps` is
    the pipeline.PipelineState and `model` any of its stage modules (for the config and device).
    Raises DiskFullError on every rank (nothing written, earlier checkpoints intact) where the disk
    cannot hold the checkpoint, checked before writing or met while writing on any rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    final = os.path.join(ckpt_root, f"step_{step:08d}")
    device = next(model.parameters()).device
    if _is_pipeline(ps):
        msd, optim, _ = _pipeline_state_dicts(opt, ps)
    else:
        msd, osd, _ = _state_dicts(model, opt, ps)
        optim = osd["state"]
    needed = _check_space(ckpt_root, step, msd, optim, export_hf, device)
    tmp = _rank0_path(tempdir_beside(final) if rank == 0 else None)
    err = None
    try:
        dcp.save({"model": msd, "optim": optim}, checkpoint_id=os.path.join(tmp, DCP_DIR))
        rt, rmeta = ckpt.rng_state()
        os.makedirs(os.path.join(tmp, RNG_DIR), exist_ok=True)
        rng_path = os.path.join(tmp, RNG_DIR, f"rank_{rank:05d}.safetensors")
        save_file({k: v.contiguous() for k, v in rt.items()}, rng_path, metadata={"meta": json.dumps(rmeta)})
        ckpt._fsync_file(rng_path)
        dist.barrier()
        if rank == 0:
            ckpt._write_json({**state, "format": FORMAT, "step": step, "model_config": model.config.to_dict(),
                              "layout": _layout(ps, world), "torch": torch.__version__},
                             os.path.join(tmp, "trainer_state.json"))
            if tokenizer is not None:
                tokenizer.save(tmp, model_max_length=model.config.max_position_embeddings)
            if export_hf:
                _export_hf(tmp, tmp)
            for d, _, files in os.walk(tmp):
                for name in files:
                    os.chmod(os.path.join(d, name), 0o666 & ~_umask())
                    ckpt._fsync_file(os.path.join(d, name))
                ckpt._fsync_dir(d)
            if ckpt.is_complete(final):  # the same step again (e.g. an interrupt right after a periodic save)
                if export_hf and not os.path.exists(os.path.join(final, "config.json")):
                    _export_hf(final, final)
                shutil.rmtree(tmp)
            else:
                if os.path.exists(final):  # a directory of that name without trainer_state.json: not a checkpoint
                    shutil.rmtree(final)
                os.rename(tmp, final)
                ckpt._fsync_dir(ckpt_root)
    except BaseException as e:  # CheckpointException (a failed DCP write on any rank) is a BaseException
        err = e
    # every rank learns whether all succeeded, and whether a disk was full; on failure rank 0 removes the
    # temporary directory
    status = torch.tensor([float(err is not None), float(space.is_disk_full(err))], device=device)
    dist.all_reduce(status, op=dist.ReduceOp.MAX)
    failed, full = status.tolist()
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            dist.barrier()  # the partial files are gone: measure what is free
            free = torch.tensor([float(space.free_bytes(ckpt_root))], dtype=torch.float64, device=device)
            dist.all_reduce(free, op=dist.ReduceOp.MIN)
            raise space.filled(ckpt_root, step, needed, int(free.item()), ckpt.latest_checkpoint(ckpt_root)) from err
        if err is not None:
            raise err
        raise RuntimeError(f"checkpoint step {step} failed on some rank; the previous checkpoints are intact")
    if rank == 0:
        if keep > 0:
            for old in ckpt.list_checkpoints(ckpt_root)[:-keep]:
                ckpt.remove_checkpoint(old)
        for name in os.listdir(ckpt_root):  # temporary directories of earlier interrupted saves
            if name.startswith(".tmp-") and os.path.join(ckpt_root, name) != tmp:
                shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
    dist.barrier()
    return final


def _check_space(ckpt_root: str, step: int, msd: dict, optim: dict, export_hf: bool, device) -> int:
    """Collective: the bytes checkpoint `step` needs (each global tensor once, as DCP stores it: rank 0
    gathers the sizes by name, as DCP gathers the save plans; + the model again for the export), checked
    against the smallest free space any rank sees. Raises DiskFullError on every rank; returns the need."""
    sizes = {f"model/{k}": space.tensor_bytes(t) for k, t in msd.items() if torch.is_tensor(t)}
    for name, st in optim.items():
        sizes.update({f"optim/{name}/{k}": space.tensor_bytes(v) for k, v in st.items() if torch.is_tensor(v)})
    rank, world = dist.get_rank(), dist.get_world_size()
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(sizes, gathered, dst=0)
    need = torch.zeros(1, dtype=torch.float64, device=device)
    if rank == 0:
        merged = {k: v for d in gathered for k, v in d.items()}
        n = sum(merged.values())
        if export_hf:
            n += sum(v for k, v in merged.items() if k.startswith("model/"))
        need[0] = space.required(n)
    free = torch.tensor([float(space.free_bytes(ckpt_root))], dtype=torch.float64, device=device)
    dist.broadcast(need, src=0)
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    needed, free = int(need.item()), int(free.item())
    if free < needed:
        raise space.no_room(ckpt_root, step, needed, free, ckpt.latest_checkpoint(ckpt_root))
    return needed


def load_dcp(path: str, model, opt, ps) -> dict:
    """Collective: fill the (parallelized) model and the optimizer from checkpoint `path`, whatever
    layout wrote it, restore this rank's RNG, and return the trainer state (sampler, step, ...).
    Pipeline runs: `ps` is the pipeline.PipelineState (its stages are filled; `model` is unused)."""
    state = read_state(path)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sharded (DCP) checkpoint")
    if _is_pipeline(ps):
        msd, optim, wrapped = _pipeline_state_dicts(opt, ps)
        safe_dcp.load({"model": msd, "optim": optim}, os.path.join(path, DCP_DIR))
        _pipeline_loaded(ps, wrapped)
    else:
        msd, osd, wrapped = _state_dicts(model, opt, ps)
        safe_dcp.load({"model": msd, "optim": osd["state"]}, os.path.join(path, DCP_DIR))
        _unwrap(wrapped)
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    _restore_rng(path, state, dist.get_rank())
    return state


def _restore_rng(path: str, state: dict, rank: int) -> None:
    old_world = state["layout"]["world_size"]
    rng_path = os.path.join(path, RNG_DIR, f"rank_{rank % old_world:05d}.safetensors")
    with open_safetensors(rng_path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        try:
            meta = json.loads((f.metadata() or {})["meta"])
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{rng_path}: no valid 'meta' entry in the header ({e})") from None
    if torch.cuda.is_available():  # one CUDA state per visible device was saved; keep the ones that exist
        n = torch.cuda.device_count()
        tensors = {k: v for k, v in tensors.items() if not k.startswith("torch_cuda_") or int(k.rsplit("_", 1)[1]) < n}
    ckpt.restore_rng(tensors, meta, rng_path)


def load_dcp_local(path: str, model, opt) -> dict:
    """One process, no process group: fill a whole (unsharded) model and its optimizer from DCP checkpoint
    `path`, whatever layout wrote it; restore rank 0's RNG; return the trainer state."""
    state = read_state(path)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sharded (DCP) checkpoint")
    msd, osd = get_state_dict(model, opt)
    safe_dcp.load({"model": msd, "optim": osd["state"]}, os.path.join(path, DCP_DIR), no_dist=True)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    _restore_rng(path, state, 0)
    return state


@torch.no_grad()
def _fill(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the global tensor `full` into `dst`: a plain tensor whole, a DTensor its local chunk."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(dst, DTensor):
        local = distribute_tensor(full.to(dst.device), dst.device_mesh, dst.placements, src_data_rank=None)
        dst.to_local().copy_(local.to_local())
    else:
        dst.copy_(full)


def load_full_state(path: str, model, opt, ps) -> dict:
    """Collective: resume a run-directory (one-process, Hugging Face-format) checkpoint into a parallelized
    model: every rank reads the global tensors by name and keeps its part (FSDP shards, expert slices,
    pipeline stages). Restores the RNG of that process; returns its trainer state with a layout entry."""
    model_sd, optim, state = ckpt.full_state(path)
    if _is_pipeline(ps):
        msd, osd_state, wrapped = _pipeline_state_dicts(opt, ps)
    else:
        msd, osd, wrapped = _state_dicts(model, opt, ps)
        osd_state = osd["state"]
    missing = sorted(set(msd) - set(model_sd))
    if missing:
        raise ValueError(f"{path} lacks tensors of the model: {missing[:5]}")
    for name, t in msd.items():
        _fill(t, model_sd[name])
    for name, st in osd_state.items():
        saved = optim.get(name)
        if saved is None:
            raise ValueError(f"{path} has no optimizer state for {name}")
        for k, v in st.items():
            if torch.is_tensor(v) and k in saved:
                if v.dim() == 0:
                    v.copy_(saved[k])
                else:
                    _fill(v, saved[k])
    if _is_pipeline(ps):
        _pipeline_loaded(ps, wrapped)
    else:
        _unwrap(wrapped)
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    ckpt.restore_rng(load_safetensors(os.path.join(path, "rng.safetensors")), state["rng"],
                     os.path.join(path, "trainer_state.json"))
    return {**state, "layout": {"world_size": 1}}


# --------------------------------------------------------------------------------------------------
# conversion to the Hugging Face format

def load_full_model(path: str, dtype: torch.dtype = torch.float32):
    """The whole model of DCP checkpoint `path` in this process (CPU), no process group needed."""
    state = read_state(path)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sharded (DCP) checkpoint")
    model = _meta_model(_model_config(path, state)).to_empty(device="cpu").to(torch.float32)
    sd = model.state_dict()  # tensors share storage with the parameters: DCP loads in place
    safe_dcp.load({"model": sd}, os.path.join(path, DCP_DIR), no_dist=True)
    model.init_buffers()
    return model.to(dtype)


def resolve_any(path: str) -> str:
    """The checkpoint directory `path` names: a Hugging Face-format checkpoint directory, a sharded (DCP)
    checkpoint, or a run directory (-> its latest checkpoint, either kind). A run starts from it
    (post-training, `dsv3 train --init-from`)."""
    if os.path.exists(os.path.join(path, "config.json")) or is_dcp_checkpoint(path):
        return path
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    latest = ckpt.latest_checkpoint(os.path.join(path, "checkpoints"))
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint directory (config.json, or a sharded checkpoint's "
                                "trainer_state.json) nor a run directory with checkpoints/")
    return latest


def load_whole(path: str, device) -> torch.nn.Module:
    """The whole fp32 model of checkpoint `path` (either kind) on `device`."""
    if not os.path.exists(os.path.join(path, "config.json")) and is_dcp_checkpoint(path):
        return load_full_model(path).to(device)  # a periodic sharded checkpoint (no Hugging Face export)
    return load_pretrained(path, device=device, dtype=torch.float32)


def _export_hf(path: str, out: str, dtype: torch.dtype | None = None) -> None:
    model = load_full_model(path)
    save_pretrained(model, out, dtype=dtype, mtp_copies=False)  # as the single-process checkpoints


def to_hf(ckpt_path: str, out: str, dtype: torch.dtype | None = None) -> str:
    """Write checkpoint `ckpt_path` (a DCP checkpoint, or a run directory: its latest checkpoint) as
    a new Hugging Face-format directory `out` (config.json, model.safetensors, tokenizer), atomically."""
    if not is_dcp_checkpoint(ckpt_path):
        latest = ckpt.latest_checkpoint(os.path.join(ckpt_path, "checkpoints"))
        if latest is None or not is_dcp_checkpoint(latest):
            raise FileNotFoundError(f"{ckpt_path} is neither a sharded (DCP) checkpoint nor a run directory "
                                    "whose latest checkpoint is one")
        ckpt_path = latest
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"{out} exists and is not empty")
    tmp = tempdir_beside(out)
    try:
        model = load_full_model(ckpt_path)
        save_pretrained(model, tmp, dtype=dtype)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(ckpt_path, name)):  # a link leading out of the checkpoint is refused
                shutil.copyfile(confined(ckpt_path, name, ckpt_path), os.path.join(tmp, name))
        for name in os.listdir(tmp):
            ckpt._fsync_file(os.path.join(tmp, name))
        if os.path.exists(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["is_dcp_checkpoint", "load_dcp", "load_dcp_local", "load_full_state", "load_full_model", "load_whole",
           "read_state", "resolve_any", "save_dcp", "to_hf"]

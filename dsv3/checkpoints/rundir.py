"""Training checkpoints: atomic, complete, pickle-free.

A checkpoint is one directory `step_XXXXXXXX/`:
    config.json, model.safetensors[...]   the model in the Hugging Face format (dsv3.checkpoints.hf)
    tokenizer.json, tokenizer_config.json  so the directory is usable on its own
    optimizer.safetensors                  AdamW moments and step counts, keyed by parameter name
    rng.safetensors                        torch CPU (and CUDA) generator states
    trainer_state.json                     step, tokens, sampler position, python RNG, run config

Atomicity: everything is written into a temporary sibling directory, each file fsynced, then the
directory is renamed into place (a single rename on one filesystem) and the parent fsynced. A
crash or kill at any point leaves either no new checkpoint or a complete one; the previous
checkpoints are untouched. Leftover temporary directories are ignored and cleaned up later. A
checkpoint is a `step_XXXXXXXX` directory holding trainer_state.json (written last, renamed in with
the rest): only those count (list_checkpoints), and a save replaces a `step_` directory without it.

Disk space (dsv3/checkpoints/space.py): a save first checks that the checkpoint's bytes are free (the
older ones are removed only after it is complete); one that does not fit, or whose write fails with a
full disk, removes its temporary directory and raises DiskFullError.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from dsv3.checkpoints import space
from dsv3.checkpoints.files import CheckpointError, load_safetensors, read_json, require
from dsv3.checkpoints.hf import _umask, load_pretrained, save_pretrained, tempdir_beside

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(obj: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _save_st(tensors: dict[str, torch.Tensor], path: str) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)
    os.chmod(path, 0o666 & ~_umask())
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def optimizer_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """AdamW state as {"<param name>.<key>": tensor} plus JSON-able param groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, groups = {}, []
    for g in opt.param_groups:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                      | {"params": [names[id(p)] for p in g["params"]]})
        for p in g["params"]:
            for k, v in opt.state.get(p, {}).items():
                tensors[f"{names[id(p)]}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": groups}


ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")


def optimizer_state(tensors: dict, shapes: dict, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """optimizer_tensors' output by parameter name ({name: {"step", "exp_avg", "exp_avg_sq"}}), checked against
    the model's parameter shapes `shapes` ({name: shape}): a CheckpointError naming `source` and the tensors for a
    parameter the model does not have, part of a parameter's AdamW state, a moment of another shape or not of a
    floating-point dtype, a step that is not one number (each used to fail only at the next step, if at all)."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if "." not in key:
            raise CheckpointError(f"{source}: tensor name {key!r} is not <parameter>.<state>")
        name, k = key.rsplit(".", 1)
        state.setdefault(name, {})[k] = v
    unknown = sorted(set(state) - set(shapes))
    if unknown:
        raise CheckpointError(f"{source}: state for parameters the model does not have: {', '.join(unknown[:5])}")
    bad = []
    for name, st in sorted(state.items()):
        bad += [f"{name}.{k}: missing" for k in ADAMW_STATE if k not in st]
        for k, v in sorted(st.items()):
            if k == "step":
                if v.numel() != 1:
                    bad.append(f"{name}.step: shape {list(v.shape)}, not one number")
            elif not v.is_floating_point():
                bad.append(f"{name}.{k}: {v.dtype}, not floating point")
            elif tuple(v.shape) != tuple(shapes[name]):
                bad.append(f"{name}.{k}: shape {list(v.shape)}, parameter {list(shapes[name])}")
    if bad:
        raise CheckpointError(f"{source}: malformed optimizer state ({len(bad)} tensor(s)): {'; '.join(bad[:5])}"
                              + (" ..." if len(bad) > 5 else ""))
    return state


def load_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict, meta: dict,
                   source: str = "optimizer.safetensors") -> None:
    """Fill `opt` from optimizer_tensors' output; `source` names the file in errors."""
    params = dict(model.named_parameters())
    saved = meta.get("param_groups") if isinstance(meta, dict) else None
    if not isinstance(saved, list) or not all(isinstance(s, dict) and isinstance(s.get("params"), list)
                                              for s in saved):
        raise CheckpointError(f"{source}: optimizer param_groups missing or malformed in trainer_state.json")
    state = optimizer_state(tensors, {n: p.shape for n, p in params.items()}, source)
    if len(saved) != len(opt.param_groups):
        raise ValueError(f"optimizer checkpoint has {len(saved)} param groups, optimizer has {len(opt.param_groups)}")
    for g, s in zip(opt.param_groups, saved):
        mine = [n for n, p in model.named_parameters() if any(p is q for q in g["params"])]
        if sorted(mine) != sorted(s["params"]):
            raise ValueError("optimizer checkpoint was written for different parameters")
        for k, v in s.items():
            if k != "params":
                g[k] = tuple(v) if k == "betas" else v
    opt.state.clear()
    for pname, st in state.items():
        p = params[pname]
        for k, v in st.items():
            if k == "step":
                opt.state.setdefault(p, {})[k] = v.clone()  # AdamW keeps step as a cpu float tensor
            else:
                # moments in the optimizer's storage dtype (AdamW.state_dtype, else the
                # parameter's): a run resumed with another --optim-state converts them
                dtype = getattr(opt, "state_dtype", p.dtype)
                opt.state.setdefault(p, {})[k] = v.to(device=p.device, dtype=dtype, copy=True)


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict, source: str) -> None:
    """set_rng_state, with a CheckpointError naming `source` for malformed states."""
    try:
        set_rng_state(tensors, meta)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointError(f"{source}: malformed RNG state ({type(e).__name__}: {msg})") from None


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(ckpt_root: str, step: int, model, opt, state: dict, tokenizer=None, keep: int = 3) -> str:
    """Write checkpoint `step` atomically under ckpt_root; keep the last `keep` (0 = all). Returns its path.
    Raises DiskFullError (nothing written, earlier checkpoints intact) where the disk cannot hold it."""
    os.makedirs(ckpt_root, exist_ok=True)
    final = os.path.join(ckpt_root, f"step_{step:08d}")
    if is_complete(final):  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        return final
    needed = space.required(space.state_bytes(model, opt))
    space.check(ckpt_root, step, needed, latest_checkpoint(ckpt_root))
    tmp = tempdir_beside(final)
    try:
        save_pretrained(model, tmp, mtp_copies=False)
        if tokenizer is not None:
            tokenizer.save(tmp, model_max_length=model.config.max_position_embeddings)
        ot, ometa = optimizer_tensors(model, opt)
        _save_st(ot, os.path.join(tmp, "optimizer.safetensors"))
        rt, rmeta = rng_state()
        _save_st(rt, os.path.join(tmp, "rng.safetensors"))
        _write_json({**state, "step": step, "optimizer": ometa, "rng": rmeta}, os.path.join(tmp, "trainer_state.json"))
        for name in os.listdir(tmp):  # every file, the tokenizer's included (written without fsync)
            if os.path.isfile(os.path.join(tmp, name)):
                _fsync_file(os.path.join(tmp, name))
        _fsync_dir(tmp)
        if os.path.exists(final):  # a directory of that name without trainer_state.json: not a checkpoint
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if space.is_disk_full(e):
            free = space.free_bytes(ckpt_root)  # the partial files are gone
            raise space.filled(ckpt_root, step, needed, free, latest_checkpoint(ckpt_root)) from e
        raise
    if keep > 0:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            remove_checkpoint(old)
    for name in os.listdir(ckpt_root):  # temporary directories of earlier interrupted saves
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
    return final


def remove_checkpoint(path: str) -> None:
    """Delete checkpoint directory `path` (keep-last-K): first renamed to a temporary name (one atomic rename), so
    that a kill half-way through the deletion never leaves a `step_` directory holding trainer_state.json without
    the files it describes; what such a kill leaves is removed with the other temporary directories."""
    dead = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}-removed-{os.urandom(4).hex()}")
    try:
        os.rename(path, dead)
    except OSError:
        return
    shutil.rmtree(dead, ignore_errors=True)


def is_complete(path: str) -> bool:
    """Whether `path` is a complete checkpoint (of either kind): trainer_state.json is renamed in last."""
    return os.path.exists(os.path.join(path, "trainer_state.json"))


def list_checkpoints(ckpt_root: str) -> list[str]:
    if not os.path.isdir(ckpt_root):
        return []
    steps = sorted(int(m.group(1)) for n in os.listdir(ckpt_root) if (m := _STEP_DIR.match(n))
                   and is_complete(os.path.join(ckpt_root, n)))
    return [os.path.join(ckpt_root, f"step_{s:08d}") for s in steps]


def latest_checkpoint(ckpt_root: str) -> str | None:
    c = list_checkpoints(ckpt_root)
    return c[-1] if c else None


def incomplete_after(ckpt_root: str, path: str | None) -> list[str]:
    """The step directories of `ckpt_root` past checkpoint `path` (all of them when None) that are not complete
    checkpoints (a save interrupted before its last file): a resume skips them, and its next saves replace them."""
    if not os.path.isdir(ckpt_root):
        return []
    after = int(_STEP_DIR.match(os.path.basename(path)).group(1)) if path else -1
    return sorted(n for n in os.listdir(ckpt_root) if (m := _STEP_DIR.match(n)) and int(m.group(1)) > after
                  and not is_complete(os.path.join(ckpt_root, n)))


def load_checkpoint(path: str, device, dtype) -> tuple[torch.nn.Module, dict, dict, dict]:
    """-> model, trainer state, optimizer tensors, rng tensors (the caller restores optimizer and RNG)."""
    model = load_pretrained(path, device=device, dtype=dtype)
    state = read_trainer_state(path)
    opt_t = load_safetensors(os.path.join(path, "optimizer.safetensors"))
    rng_t = load_safetensors(os.path.join(path, "rng.safetensors"))
    return model, state, opt_t, rng_t


def read_trainer_state(path: str) -> dict:
    """trainer_state.json of run-directory checkpoint `path` (a JSON object holding optimizer and rng)."""
    p = os.path.join(path, "trainer_state.json")
    state = read_json(p)
    require(state, ("optimizer", "rng", "step", "tokens", "sampler"), p)
    check_run_state(state, p)
    return state


def check_run_state(state: dict, p: str) -> None:
    """The run state a resume reads from trainer_state.json `p` (either kind of checkpoint), where present:
    the counters integers >= 0, the sampler a JSON object; a CheckpointError naming the file and field."""
    for k in ("step", "tokens", "skipped_steps", "consecutive_skipped_steps"):
        if k in state and (type(state[k]) is not int or state[k] < 0):
            raise CheckpointError(f"{p}: {k} {state[k]!r} is not an integer >= 0")
    if "sampler" in state and not isinstance(state["sampler"], dict):
        raise CheckpointError(f"{p}: sampler is not a JSON object")


@torch.no_grad()
def load_into(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Resume from run-directory checkpoint `path` into a built (one-process) model and its optimizer,
    restore the RNG; returns the trainer state. Every parameter and buffer of the checkpoint must match
    the model's by name and shape."""
    src = load_pretrained(path, device="cpu", dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = read_trainer_state(path)
    opt_path = os.path.join(path, "optimizer.safetensors")
    load_optimizer(model, opt, load_safetensors(opt_path), state["optimizer"], source=opt_path)
    restore_rng(load_safetensors(os.path.join(path, "rng.safetensors")), state["rng"],
                os.path.join(path, "trainer_state.json"))
    return state


def full_state(path: str) -> tuple[dict, dict, dict]:
    """The whole state of run-directory checkpoint `path` by parameter name, on the CPU: (model state
    dict, {name: {"step", "exp_avg", "exp_avg_sq"}}, trainer state); for resuming it in another layout."""
    model_sd = load_pretrained(path, device="cpu", dtype=torch.float32).state_dict()
    opt_path = os.path.join(path, "optimizer.safetensors")
    optim = optimizer_state(load_safetensors(opt_path), {n: t.shape for n, t in model_sd.items()}, opt_path)
    return model_sd, optim, read_trainer_state(path)


def run_name(path: str) -> str:
    """A name for the model at `path` that stays the same while its run goes on: the run directory's name
    for a run directory or one of its checkpoints (RUN/checkpoints/step_*), else the directory's own name.
    (The latest checkpoint's own name, step_00000320, changes with every save and resume.)"""
    p = os.path.abspath(path)
    parent = os.path.dirname(p)
    if _STEP_DIR.match(os.path.basename(p)) and os.path.basename(parent) == "checkpoints":
        p = os.path.dirname(parent)
    return os.path.basename(p) or p  # the root directory has no name


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory (holds config.json), or a run directory -> its latest checkpoint."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    latest = latest_checkpoint(os.path.join(path, "checkpoints"))
    if latest is None:
        if os.path.exists(os.path.join(path, "trainer_state.json")):  # a sharded one without its export
            raise FileNotFoundError(f"{path} is a sharded (torchrun) checkpoint: `dsv3 convert {path} OUT` "
                                    "writes it in the Hugging Face format")
        raise FileNotFoundError(f"{path} is neither a checkpoint directory (no config.json) nor a run directory "
                                "with checkpoints/")
    if not os.path.exists(os.path.join(latest, "config.json")):
        raise FileNotFoundError(f"the latest checkpoint {latest} is a sharded (torchrun) checkpoint: "
                                f"`dsv3 convert {path} OUT` writes it in the Hugging Face format")
    return latest

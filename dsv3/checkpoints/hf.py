"""Hugging Face checkpoint format: `config.json` + `model.safetensors` (or sharded with
`model.safetensors.index.json`), official tensor names (SPEC §6), FP8 e4m3 weights with 128x128
`weight_scale_inv` blocks, and the MTP modules at layer indices num_hidden_layers + k.

The one translation table between dsv3's module names and the names on disk is `_to_disk`:
    embed_tokens.weight              <-> model.embed_tokens.weight
    norm.weight                      <-> model.norm.weight
    lm_head.weight                   <-> lm_head.weight
    layers.{i}.X                     <-> model.layers.{i}.X
    layers.{i}.mlp.experts.P  (E,..) <-> model.layers.{i}.mlp.experts.{e}.P.weight   (P = gate/up/down_proj)
    layers.{i}.mlp.experts.P_scale_inv <-> model.layers.{i}.mlp.experts.{e}.P.weight_scale_inv   (FP8 experts)
    mtp.{k}.X                        <-> model.layers.{n+k}.X                          (n = num_hidden_layers)
The official MTP layer also stores copies of the embedding and the head
(`model.layers.{n+k}.embed_tokens.weight`, `...shared_head.head.weight`); dsv3 shares the main
tensors, writes the copies on save (vLLM and SGLang read them) and skips them on load after
checking that they equal the main ones.

A model holding FP8 modules (dsv3/model/fp8.py: `X.weight` float8_e4m3fn + `X.weight_scale_inv`)
maps onto the same names, so it saves its FP8 bytes and scales as they are, and
`load_pretrained(keep_fp8=True)` fills such modules straight from the file.

Safetensors only, never pickle. Loading first compares the config's sizes (layers, MTP modules,
experts, vocabulary, width) with the tensor names and the embedding's shape in the file, before any
per-layer or per-expert work; then it builds the model on the meta device, checks every name and shape
(one error lists all missing, unexpected and mis-shaped tensors) and fills the parameters tensor by
tensor, so peak memory is the model itself; that memory, counted from the config, is checked against
what the device has before the skeleton is built (dsv3/memory.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from safetensors.torch import save_file

from dsv3.checkpoints.files import CheckpointError, confined, open_safetensors, read_json
from dsv3.cliargs import setting
from dsv3.config import ConfigError, ModelConfig, yarn_get_mscale
from dsv3.kernels import weight_dequant, weight_quant
from dsv3.info import param_count, routed_expert_params
from dsv3.memory import ensure_fits
from dsv3.model.fp8 import FP8Experts, FP8Linear, swap_to_fp8
from dsv3.model.moe import MoE
from dsv3.model.rope import cos_sin_factor
from dsv3.model.transformer import Transformer, build_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [128, 128]}
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)(_scale_inv)?$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class _Slot:
    param: str  # dsv3 state_dict name
    expert: int | None  # index into a stacked expert tensor, or None
    shape: tuple[int, ...]  # shape on disk


def _to_disk(name: str, n_layers: int) -> str:
    if name.startswith("mtp."):
        k, rest = name[4:].split(".", 1)
        return f"model.layers.{n_layers + int(k)}.{rest}"
    if name == "lm_head.weight":
        return name
    return "model." + name


def disk_layout(model: Transformer, first_expert: int = 0) -> dict[str, _Slot]:
    """Every tensor name of the checkpoint (without MTP copies) -> where it goes. Scales appear only
    for the model's FP8 modules (a dense model's FP8 scales are made on save, consumed on load).
    first_expert: the global index of stacked expert 0 (a model holding only experts
    [first_expert, first_expert + L), as an expert-parallel rank does)."""
    n = model.config.num_hidden_layers
    out: dict[str, _Slot] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name == "rope_inv_freq":
            continue
        m = _EXPERT.match(name)
        if m:
            base = _to_disk(m.group(1), n)
            for e in range(t.shape[0]):
                out[f"{base}.{first_expert + e}.{m.group(2)}.weight{m.group(3) or ''}"] = _Slot(
                    name, e, tuple(t.shape[1:]))
        else:
            out[_to_disk(name, n)] = _Slot(name, None, tuple(t.shape))
    return out


def _mtp_copies(cfg: ModelConfig) -> dict[str, str]:
    """Official per-MTP-layer copies of shared tensors -> the main tensor they duplicate."""
    n = cfg.num_hidden_layers
    out = {}
    for k in range(cfg.num_nextn_predict_layers):
        out[f"model.layers.{n + k}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"model.layers.{n + k}.shared_head.head.weight"] = "lm_head.weight"
    return out


def is_fp8_weight(disk_name: str) -> bool:
    """The tensors the official checkpoint stores in FP8: every *_proj matrix of attention and FFNs
    (kv_a_proj_with_mqa included, SPEC §6.2), except the MTP eh_proj. Embeddings, head, norms and the
    router stay BF16 (SPEC §6.3)."""
    return (disk_name.endswith(("_proj.weight", ".kv_a_proj_with_mqa.weight"))
            and not disk_name.endswith("eh_proj.weight"))


# ------------------------------------------------------------------------------------------------
# saving

def _fsync_write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    tmp = path + ".tmp"
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; checkpoints are meant to be shared
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:  # (a full disk): no partial file left behind
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


@torch.no_grad()
def save_pretrained(model: Transformer, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    fp8: bool = False, max_shard_bytes: int = 5 * 1024**3, mtp_copies: bool = True) -> None:
    """Write `config.json` and the weights under official names into directory `path`.

    dtype: storage dtype of non-FP8 tensors (default: the model's); the correction bias stays fp32.
    fp8: store every *_proj matrix as float8_e4m3fn + `weight_scale_inv` 128x128 blocks (official layout).
    Weights the model already holds in FP8 (FP8 modules) are written as they are, whatever `fp8` says.
    Each file is written to a temporary name, fsynced and renamed: a crash never leaves a torn file.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    tensors = _disk_tensors(model, dtype, fp8)
    if mtp_copies:
        for copy, main in _mtp_copies(cfg).items():
            tensors[copy] = tensors[main].clone()

    # shard greedily in name order
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes

    stale = _old_shards(path)
    if len(shards) == 1:
        _save_tensors(shards[0], os.path.join(path, SINGLE_FILE))
        stale.discard(SINGLE_FILE)  # an old index may name it: it is the file just written
        if os.path.exists(os.path.join(path, INDEX_FILE)):
            os.remove(os.path.join(path, INDEX_FILE))
    else:
        # the index is the commit point: until it is replaced, the previous checkpoint stays whole, so no shard of
        # it is overwritten (a save into a directory holding shards of these names writes its own under new ones)
        fnames = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        if any(os.path.lexists(os.path.join(path, f)) for f in fnames):
            tag = os.urandom(4).hex()
            fnames = [f"model-{i + 1:05d}-of-{len(shards):05d}-{tag}.safetensors" for i in range(len(shards))]
        weight_map, total, written = {}, 0, []
        try:
            for fname, shard in zip(fnames, shards):
                _save_tensors(shard, os.path.join(path, fname))
                written.append(fname)
                for k, v in shard.items():
                    weight_map[k] = fname
                    total += v.numel() * v.element_size()
            _fsync_write_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                              os.path.join(path, INDEX_FILE))
        except BaseException:  # the previous checkpoint is as it was: remove this save's shards
            for fname in written:
                os.remove(os.path.join(path, fname))
            raise
        stale -= set(weight_map.values())
        if os.path.exists(os.path.join(path, SINGLE_FILE)):
            os.remove(os.path.join(path, SINGLE_FILE))
    for fname in stale:  # shards of an earlier, differently sharded save
        p = os.path.join(path, fname)
        if os.path.isfile(p):
            os.remove(p)

    _write_config(cfg, path, any(t.dtype == torch.float8_e4m3fn for t in tensors.values()), dtype)


def _disk_tensors(model: Transformer, dtype: torch.dtype, fp8: bool) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of `model` (or of a part of it: what it holds) stores, under official names, on
    the CPU: FP8 quantisation (fp8=True) runs where the weights are (a GPU's is fast), the rest in `dtype`;
    the correction biases and scales fp32; an FP8 module's weights as they are."""
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for disk, slot in disk_layout(model).items():
        t = state[slot.param]
        t = (t[slot.expert] if slot.expert is not None else t).detach()
        if disk.endswith(("e_score_correction_bias", "_scale_inv")):
            tensors[disk] = t.float().cpu().contiguous()
        elif t.dtype == torch.float8_e4m3fn:  # an FP8 module's weight: its bytes, unchanged
            tensors[disk] = t.cpu().contiguous()
        elif fp8 and is_fp8_weight(disk):
            q, s = weight_quant(t)
            tensors[disk], tensors[disk + "_scale_inv"] = q.cpu().contiguous(), s.cpu().contiguous()
        else:
            tensors[disk] = t.to(dtype).cpu().contiguous()
    return tensors


def _write_config(cfg: ModelConfig, path: str, has_fp8: bool, dtype: torch.dtype) -> None:
    out_cfg = ModelConfig.from_dict(cfg.to_dict())
    # DeepSeek-V3.1's `scale_fmt: "ue8m0"` (its inference rounds activation scales up to powers of two) stays with the
    # checkpoint it came from: dropped on a re-save, other engines would quantise V3.1's activations another way
    src = cfg.quantization_config or {}
    kept = {k: src[k] for k in ("scale_fmt",) if src.get(k) is not None}
    out_cfg.quantization_config = {**FP8_QUANT_CONFIG, **kept} if has_fp8 else None
    out_cfg.torch_dtype = {v: k for k, v in _DTYPES.items()}.get(dtype, "bfloat16")
    d = out_cfg.to_dict()
    d.pop("dtype", None)
    _for_other_tools(d, out_cfg, path)
    _fsync_write_json(d, os.path.join(path, "config.json"))


def _for_other_tools(d: dict, cfg: ModelConfig, path: str) -> None:
    """config.json's dict `d`, in place: what another tool would read differently from dsv3 is written so that it
    reads it the same, or said (a warning) where the file cannot say it. Checked against transformers 5 and vLLM."""
    # auto_map (the official config's trust_remote_code classes): kept only where the code files it names are in
    # the directory; from_pretrained(trust_remote_code=True) otherwise fails on the missing file. Without it
    # transformers uses its own DeepseekV3 classes. (A "repo--module.Class" reference names another repository.)
    am = d.get("auto_map")
    if isinstance(am, dict):
        refs = [r for v in am.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
        local = [r.rsplit(".", 1)[0] + ".py" for r in refs if "--" not in r and "." in r]
        if any(not os.path.exists(os.path.join(path, f)) for f in local):
            del d["auto_map"]
    # YaRN: an absent mscale means 1 to dsv3, vLLM and SGLang, but makes transformers use 0.1 ln(factor) + 1 as the
    # cos/sin factor whatever mscale_all_dim says: written out, the three agree wherever the file can say it
    rs = d.get("rope_scaling")
    if isinstance(rs, dict) and rs.get("type", rs.get("rope_type")) == "yarn":
        if rs.get("mscale") is None:
            rs["mscale"] = 1.0
        m, mad = rs["mscale"], rs.get("mscale_all_dim")
        ours = cos_sin_factor(cfg)  # (an absent mscale is 1 there too)
        theirs = ours if m and mad else yarn_get_mscale(float(rs["factor"]))  # transformers' _compute_yarn_parameters
        if abs(ours - theirs) > 1e-6 * ours:
            warnings.warn(f"{path}: rope_scaling mscale {m!r} with mscale_all_dim {mad!r} gives a cos/sin factor of "
                          f"{ours:.6g} in dsv3 and vLLM, but transformers reads {theirs:.6g} (it needs both non-zero): "
                          "transformers will compute other logits from this checkpoint", stacklevel=5)
    if cfg.moe_layer_freq != 1:  # (vLLM and SGLang read it as dsv3 does)
        warnings.warn(f"{path}: moe_layer_freq {cfg.moe_layer_freq} is ignored by transformers' DeepseekV3 (every "
                      f"layer from first_k_dense_replace on is MoE there): transformers will not load this checkpoint "
                      "as the model it is (it fills the experts it expects with random weights)", stacklevel=5)


@torch.no_grad()
def save_random_pretrained(cfg: ModelConfig, path: str | os.PathLike, *, seed: int = 0,
                           device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                           fp8: bool = True, progress=None, head_rows: int | None = None) -> dict:
    """Write a randomly initialised checkpoint of `cfg` (official layout, FP8 blocks with fp8=True) without ever
    holding the whole model: one part at a time (the embedding and head, each decoder layer, the MTP modules)
    is allocated on `device`, initialised as `Transformer.init_weights(seed=seed)` initialises it in the whole
    model (per-tensor generators: the same values as the whole model built on the same kind of device; a CUDA
    generator draws other numbers than the CPU's), converted as `save_pretrained` converts it (on `device`: FP8
    quantisation on a GPU is fast) and written as one shard (temporary name, fsync, rename), then freed. Peak
    memory is about the largest part in fp32 plus its converted copy (671B: a MoE layer 44 GB, the MTP part with
    the embedding and head it shares 53 GB).
    For serving and loading benchmarks at shapes too large to train (bench/ep_serve_gpu.py --checkpoint).
    progress(i, n, name): called after each shard. head_rows: zero the output head's rows from this id on (a
    tokenizer smaller than the vocabulary: greedy decoding then picks ids it can spell, since the other logits
    are 0 and the largest of the random ones is positive), which changes no shape and no cost.
    Returns {"shards": n, "bytes": total}."""
    path = os.fspath(path)
    cfg = cfg.validate()
    if head_rows is not None and not 0 < head_rows <= cfg.vocab_size:
        raise ValueError(f"head_rows must be in 1..vocab_size ({cfg.vocab_size}), got {head_rows}")
    os.makedirs(path, exist_ok=True)
    model = build_model(cfg, device="meta", dtype=torch.float32)  # (quantised and cast from fp32, as save_pretrained)
    units = [("embed_head", model.part([], embed=True, head=True))]
    units += [(f"layer_{i}", model.part([i])) for i in range(cfg.num_hidden_layers)]
    if cfg.num_nextn_predict_layers:
        units.append(("mtp", model.part([], embed=True, head=True, mtp=True)))
    stale = _old_shards(path)
    weight_map, total, has_fp8 = {}, 0, False
    for k, (name, part) in enumerate(units):
        part.to_empty(device=device)
        part.init_weights(seed=seed)
        if head_rows is not None and part.lm_head is not None:
            part.lm_head.weight[head_rows:] = 0
        tensors = _disk_tensors(part, dtype, fp8)
        if name == "mtp":  # the embedding and head went with the first part; the MTP layers' official copies here
            tensors = {**{d: t for d, t in tensors.items() if _is_mtp(d, cfg)},
                       **{c: tensors[main].clone() for c, main in _mtp_copies(cfg).items()}}
        fname = f"model-{k + 1:05d}-of-{len(units):05d}.safetensors"
        _save_tensors(tensors, os.path.join(path, fname))
        for d, t in tensors.items():
            weight_map[d] = fname
            total += t.numel() * t.element_size()
            has_fp8 |= t.dtype == torch.float8_e4m3fn
        part.to_empty(device="meta")  # free it (the meta model keeps the shapes)
        del tensors
        if progress is not None:
            progress(k + 1, len(units), name)
    _fsync_write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, os.path.join(path, INDEX_FILE))
    for fname in stale - set(weight_map.values()):
        p = os.path.join(path, fname)
        if os.path.isfile(p):
            os.remove(p)
    if os.path.exists(os.path.join(path, SINGLE_FILE)):
        os.remove(os.path.join(path, SINGLE_FILE))
    _write_config(cfg, path, has_fp8, dtype)
    return {"shards": len(units), "bytes": total}


def _is_mtp(disk_name: str, cfg: ModelConfig) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", disk_name)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers


def _old_shards(path: str) -> set[str]:
    """Shard files named by the index of an earlier save into `path`, to delete once replaced. Only
    plain `*.safetensors` names inside `path` count: whatever else an index (perhaps not ours) names
    is never deleted, and an unreadable index names nothing."""
    try:
        weight_map = read_json(os.path.join(path, INDEX_FILE)).get("weight_map")
    except CheckpointError:
        return set()
    if not isinstance(weight_map, dict):
        return set()
    return {f for f in weight_map.values() if isinstance(f, str) and f.endswith(".safetensors")
            and os.path.basename(f) == f and f not in (".", "..") and not os.path.islink(os.path.join(path, f))}


# ------------------------------------------------------------------------------------------------
# loading

# the safetensors dtypes a checkpoint's tensors may have: floats, and the official FP8 format (e4m3 + block scales)
_DISK_DTYPES = ("F32", "BF16", "F16", "F64", "F8_E4M3")


class _Reader:
    """Name -> tensor across the shards of one checkpoint directory."""

    def __init__(self, path: str):
        self.path = path
        self._handles: dict[str, object] = {}  # shard file -> its open safetensors handle
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        # both: the single file, as transformers' from_pretrained chooses (its save_pretrained of one file into a
        # directory that held shards deletes them but leaves their index); said, since vLLM reads the index's shards
        sharded = os.path.exists(index)
        if sharded and os.path.exists(single):
            sharded = False
            warnings.warn(f"{path} holds both {SINGLE_FILE} and {INDEX_FILE}: reading {SINGLE_FILE}, as transformers "
                          f"does, and ignoring the index (delete the stale one: other tools may choose the index)",
                          stacklevel=4)  # (the caller of load_pretrained & co.)
        self.source = INDEX_FILE if sharded else SINGLE_FILE  # the file that lists the tensors
        if sharded:
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map of tensor name -> "
                                      "file name)")
            for fname in sorted(set(weight_map.values())):  # every shard must lie inside the directory
                confined(path, fname, index)
            self.weight_map: dict[str, str] = weight_map
            missing_files = sorted({f for f in self.weight_map.values() if not os.path.exists(os.path.join(path, f))})
            if missing_files:
                raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing_files[:10])}")
            by_shard: dict[str, list[str]] = {}
            for k, f in self.weight_map.items():
                by_shard.setdefault(f, []).append(k)
            absent = []  # tensors the index places in a shard that does not hold them (its header read once)
            for fname, names in sorted(by_shard.items()):
                keys = set(self._open(fname).keys())
                absent += [f"{k} -> {fname}" for k in names if k not in keys]
            if absent:
                raise CheckpointError(f"{index} maps {len(absent)} tensor(s) to shards that do not contain them: "
                                      + ", ".join(sorted(absent)[:10]) + (" ..." if len(absent) > 10 else ""))
        elif os.path.exists(single):
            confined(path, SINGLE_FILE, path)
            with open_safetensors(single) as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            found = sorted(os.listdir(path))
            if any(f.endswith((".bin", ".pt", ".pth")) for f in found):
                raise CheckpointError(f"{path} holds only pickle weights ({', '.join(found[:5])}); dsv3 reads "
                                      "safetensors only (pickle can run code). Convert them to safetensors first.")
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")

    def _open(self, fname: str):
        if fname not in self._handles:
            self._handles[fname] = open_safetensors(os.path.join(self.path, fname))
        return self._handles[fname]

    def _f(self, name: str):
        return self._open(self.weight_map[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._f(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._f(name).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self._f(name).get_tensor(name)

    def get_range(self, name: str, dim: int, lo: int, hi: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [lo, hi) of a 2-d tensor, reading only those bytes' rows."""
        sl = self._f(name).get_slice(name)
        return sl[lo:hi] if dim == 0 else sl[:, lo:hi]

    def get_tp(self, name: str, spec: tuple[int, int, int], target_dtype: torch.dtype) -> torch.Tensor:
        """A tensor-parallel slice (dsv3/distributed/attention_tp.py's spec: dim, lo, hi) of `name` for a
        target of `target_dtype`: the range itself, or, for an FP8 weight going to a dense target, the
        128-blocks the range touches, dequantised with their scales, then cut."""
        dim, lo, hi = spec
        if self.dtype(name) != "F8_E4M3" or target_dtype == torch.float8_e4m3fn:
            return self.get_range(name, dim, lo, hi)
        b = 128
        size = self.shape(name)[dim]
        w = self.get_range(name, dim, lo // b * b, min(-(-hi // b) * b, size))
        scale = self.get_range(name + "_scale_inv", dim, lo // b, -(-hi // b))
        return weight_dequant(w, scale, dtype=torch.float32).narrow(dim, lo - lo // b * b, hi - lo)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


_LAYER_ID = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_ID = re.compile(r"\.mlp\.experts\.(\d+)\.")


def _span(ids: set[int], what: str) -> str:
    return f"{what} {min(ids)}..{max(ids)}" if ids else f"no {what}"


def _check_sizes(cfg: ModelConfig, reader: _Reader, said: str, path: str, raw: dict | None = None) -> ModelConfig:
    """Compare the config's sizes with what the file holds (tensor names and the embedding's shape)
    before any per-layer or per-expert work (the model skeleton, the list of expected names), so that a
    config claiming 10^6 layers or 10^9 experts fails at once, naming the field. Returns the config to
    load: without MTP (and a warning) when it has MTP modules but the file holds none (transformers drops
    them). Costs O(tensors in the file)."""
    def fail(msg: str):
        raise CheckpointError(f"{path}: {said} says {msg}")

    # raw: the config.json dict `cfg` came from, where it came from one (a size it leaves out is said to be the default)
    aliases = {"num_nextn_predict_layers": ("num_mtp_layers",), "vocab_size": (), "hidden_size": (),
               "num_hidden_layers": (), "n_routed_experts": ()}

    def v(name: str, value) -> str:  # a size config.json leaves out is ModelConfig's (671B) default: said so
        absent = isinstance(raw, dict) and all(k not in raw for k in (name, *aliases[name]))
        return f"{name}={value}" + (" (absent from it: the 671B default)" if absent else "")

    src = reader.source
    layers = {int(m.group(1)) for k in reader.weight_map if (m := _LAYER_ID.match(k))}
    n, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    if not layers or n > max(layers) + 1:
        fail(f"{v('num_hidden_layers', n)} but {src} holds {_span(layers, 'layers')}")
    if D > 0 and max(layers) < n:
        warnings.warn(f"{path}: config has num_nextn_predict_layers={D} but the checkpoint holds no MTP "
                      f"tensors (model.layers.{n}.*); loading without MTP", stacklevel=3)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    elif n + D > max(layers) + 1:
        fail(f"{v('num_nextn_predict_layers', D)} (MTP layers {n}..{n + D - 1}) but {src} holds "
             f"{_span(layers, 'layers')}")
    E = cfg.n_routed_experts
    if cfg.num_moe_layers() > 0 or (cfg.num_nextn_predict_layers > 0 and E > 0):
        experts = {int(m.group(1)) for k in reader.weight_map if (m := _EXPERT_ID.search(k))}
        if not experts or E > max(experts) + 1:
            fail(f"{v('n_routed_experts', E)} but {src} holds {_span(experts, 'routed experts')}")
    embed = "model.embed_tokens.weight"
    if embed in reader.weight_map:
        shape = reader.shape(embed)
        if len(shape) != 2 or shape != (cfg.vocab_size, cfg.hidden_size):
            fail(f"{v('vocab_size', cfg.vocab_size)}, {v('hidden_size', cfg.hidden_size)} but {src} holds {embed} of "
                 f"shape {list(shape)}")
    return cfg


def _meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def _check(cfg: ModelConfig, layout: dict[str, _Slot], reader: _Reader) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    have = set(reader.weight_map)
    copies = set(_mtp_copies(cfg))
    missing = sorted(set(layout) - have)
    unexpected, bad_shape = [], []
    for name in sorted(have - set(layout) - copies):
        base = name[: -len("_scale_inv")] if name.endswith("_scale_inv") else None
        if base is None or base not in layout:
            # (an empty tensor holds no weights: transformers saves a model with n_shared_experts 0 with shared-expert
            # weights of 0 rows, a model dsv3 builds without them)
            if math.prod(reader.shape(name)) != 0:
                unexpected.append(name)
    bad_dtype = []
    for name in sorted(have - set(layout)):  # a block scale beside a weight that is not e4m3 would be ignored
        base = name[: -len("_scale_inv")] if name.endswith("_scale_inv") else None
        if base in layout and base in have and reader.dtype(base) != "F8_E4M3":
            bad_dtype.append(f"{name}: a block scale, but {base} is {reader.dtype(base)}, not F8_E4M3")
    for name in sorted(set(layout) & have):
        want, got = layout[name].shape, reader.shape(name)
        dtype = reader.dtype(name)
        if dtype not in _DISK_DTYPES:  # (e5m2, integers, ...: a cast would load other numbers, silently)
            bad_dtype.append(f"{name}: {dtype}")
        elif got != want:
            bad_shape.append(f"{name}: checkpoint {list(got)}, model {list(want)}")
        elif dtype == "F8_E4M3":
            sname = name + "_scale_inv"
            if sname not in have:
                missing.append(sname)
            else:
                sw = (-(-want[0] // 128), -(-want[1] // 128))
                if reader.shape(sname) != sw:
                    bad_shape.append(f"{sname}: checkpoint {list(reader.shape(sname))}, expected {list(sw)}")
                elif sname not in layout and reader.dtype(sname) not in _DISK_DTYPES:  # (a dequantised weight's)
                    bad_dtype.append(f"{sname}: {reader.dtype(sname)}")
    if missing or unexpected or bad_shape or bad_dtype:
        def show(title, items):
            if not items:
                return ""
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:20]) + more

        raise CheckpointError(
            f"checkpoint {reader.path} does not match its config.json"
            + show("missing tensors", missing) + show("unexpected tensors", unexpected)
            + show("mis-shaped tensors", bad_shape)
            + show(f"tensors of other dtypes (dsv3 reads {', '.join(_DISK_DTYPES)}; F8_E4M3 with its "
                   "weight_scale_inv)", bad_dtype))


def _swap_in_fp8_modules(model: Transformer, reader: _Reader) -> None:
    """Replace (on the meta device) the modules whose weights the checkpoint stores in FP8 by FP8
    modules; a stacked expert parameter counts as FP8 when every expert's tensor is."""
    fp8: dict[str, bool] = {}
    for disk, slot in disk_layout(model).items():
        if disk in reader.weight_map:
            fp8[slot.param] = fp8.get(slot.param, True) and reader.dtype(disk) == "F8_E4M3"
    swap_to_fp8(model, [p for p, is_fp8 in fp8.items() if is_fp8])


def _keep_experts(model: Transformer, experts: range) -> None:
    """On the meta device: every routed-expert stack keeps only the experts `experts` (an expert-parallel
    shard; the routers, shared experts and everything else stay whole)."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.experts.keep_experts(experts.start, len(experts))


def _select_experts(model: Transformer, per_block: list) -> dict[str, list[int]]:
    """On the meta device: MoE block i (main layers, then MTP) keeps the experts per_block[i] (global ids, a
    copy may repeat). -> {experts module name: its ids}."""
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
    if len(per_block) != len(blocks):
        raise ValueError(f"experts: {len(per_block)} lists for {len(blocks)} MoE blocks (main layers, then MTP)")
    E = model.config.n_routed_experts
    out = {}
    for (name, m), ids in zip(blocks, per_block):
        ids = [int(i) for i in ids]
        if not ids or not all(0 <= i < E for i in ids):
            raise ValueError(f"experts of {name}: a non-empty list of ids in [0, {E}), got {ids}")
        m.experts.select_experts(ids)
        out[f"{name}.experts" if name else "experts"] = ids
    return out


def _expert_entries(model: Transformer, selected: dict[str, list[int]]) -> list[tuple[str, _Slot]]:
    """(disk name, slot) of every selected expert tensor: local j of a stack reads global selected[j]'s."""
    n = model.config.num_hidden_layers
    out = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        m = _EXPERT.match(name)
        if m:
            base = _to_disk(m.group(1), n)
            for j, g in enumerate(selected[m.group(1)]):
                out.append((f"{base}.{g}.{m.group(2)}.weight{m.group(3) or ''}", _Slot(name, j, tuple(t.shape[1:]))))
    return out


def _stored_dtype(reader: _Reader, path: str) -> torch.dtype | None:
    """The dtype a config.json without one means: the stored weights' (the embedding's; transformers' dtype="auto"
    takes the first floating tensor's), where ModelConfig's default (bfloat16) would round fp32 weights silently.
    None where it is not one of _DTYPES (then the default stands)."""
    names = [n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in reader.weight_map]
    on_disk = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    dt = on_disk.get(reader.dtype(names[0])) if names else None
    if dt is not None:
        warnings.warn(f"{path}/config.json names no torch_dtype: loading in the stored weights' "
                      f"{str(dt).removeprefix('torch.')}", stacklevel=4)
    return dt


@torch.no_grad()
def load_pretrained(path: str | os.PathLike, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None, config: ModelConfig | None = None,
                    keep_fp8: bool = False, experts: range | list | None = None,
                    split=None) -> Transformer:
    """Load a Hugging Face-format DeepSeek-V3 checkpoint directory into a dsv3 Transformer.

    dtype: parameter dtype (default: config.json's torch_dtype). FP8 weights are dequantised with
    their `weight_scale_inv` blocks, unless keep_fp8: then the modules whose weights are stored in
    FP8 become FP8 modules (dsv3/model/fp8.py) holding the file's fp8 bytes and scales unchanged,
    and they compute in the activations' dtype (= dtype). A checkpoint without any MTP tensor
    (transformers drops them) loads with num_nextn_predict_layers = 0 and a warning.

    experts: load only these routed experts (a contiguous range of global indices, e.g. an
    expert-parallel rank's `local_experts`): every MoE block's stacked experts then hold len(experts)
    experts, local index j = global experts.start + j, and every other tensor is whole. The whole
    checkpoint is still validated (names, shapes, FP8 scales: header reads only), but only the tensors
    this model holds are read: the official layout stores one tensor per expert, so reading a shard is
    one `get_tensor` per name of the shard and never touches another rank's experts. The MTP copies of
    the embedding and head are read (and compared) on every shard; with keep_fp8, FP8 experts stay FP8.
    Or a list with one list of global expert ids per MoE block (main layers, then MTP; ids may repeat): an
    expert-parallel rank's slots under a redundant-expert placement (dsv3/inference/eplb.py).

    split: hold and read only slices of some tensors (tensor-parallel serving): a callable (meta model, dtype)
    -> {state-dict name: (dim, lo, hi)} that replaces modules of the meta model by narrower ones and says
    which rows (dim 0) or columns (dim 1) of the file's tensor each sliced one holds (for an FP8 weight kept
    FP8 its scale's block range too), e.g. dsv3/distributed/attention_tp.py's `split_modules` bound to a
    rank. Only those rows or columns are read; an FP8 slice going to a dense module reads the 128-blocks it
    touches and dequantises them.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    cfg = config or ModelConfig.from_json(path)
    raw = read_json(os.path.join(path, "config.json")) if config is None else None  # (valid: from_json read it)
    reader = _Reader(path)
    try:
        if dtype is None and raw is not None and "torch_dtype" not in raw and "dtype" not in raw:  # (v5: dtype)
            dtype = _stored_dtype(reader, path)
        if dtype is None:
            dtype = _DTYPES.get(cfg.torch_dtype)
            if dtype is None:
                raise ConfigError(f"torch_dtype {cfg.torch_dtype!r} is not one of {', '.join(_DTYPES)}; pass dtype=")
        cfg = _check_sizes(cfg, reader, "config.json" if config is None else "the given config", path, raw)
        n_params = param_count(cfg)  # arithmetic: checked before the skeleton is built
        if isinstance(experts, range):
            E = cfg.n_routed_experts
            if experts.step != 1 or not 0 <= experts.start < experts.stop <= E:
                raise ValueError(f"experts must be a non-empty contiguous range inside [0, {E}), got {experts}")
            stacks = cfg.num_moe_layers() + (cfg.num_nextn_predict_layers if E else 0)  # MoE blocks
            n_params -= stacks * (E - len(experts)) * routed_expert_params(cfg)
        elif experts is not None:
            n_params -= sum(cfg.n_routed_experts - len(ids) for ids in experts) * routed_expert_params(cfg)
        per = 1 if keep_fp8 else dtype.itemsize  # keep_fp8: a lower bound (norms, embedding, head stay wider)
        ensure_fits(n_params * per, device, f"{'at least ' if keep_fp8 else ''}to load {path} ({n_params:,} "
                                            f"parameters, {'fp8' if keep_fp8 else str(dtype).removeprefix('torch.')})")
        model = _meta_model(cfg)
        if keep_fp8:
            _swap_in_fp8_modules(model, reader)
        layout = disk_layout(model)
        _check(cfg, layout, reader)  # the whole checkpoint, every expert included (headers only)
        entries = None
        if isinstance(experts, range):
            _keep_experts(model, experts)
            layout = disk_layout(model, experts.start)
        elif experts is not None:  # per-block lists: the non-expert tensors, then each selected copy
            selected = _select_experts(model, experts)
            layout = {k: v for k, v in disk_layout(model).items() if v.expert is None}
            entries = list(layout.items()) + _expert_entries(model, selected)
        entries = entries if entries is not None else list(layout.items())
        tp_specs: dict[str, tuple[int, int, int]] = split(model, dtype) if split is not None else {}  # (meta)

        model = model.to_empty(device=device).to(dtype)
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        for name, slot in sorted(entries, key=lambda kv: (reader.weight_map[kv[0]], kv[0], kv[1].expert or 0)):
            if tp_specs and slot.param not in params and name.endswith("_scale_inv"):
                continue  # the scale of an FP8 projection whose slice is dequantised (get_tp reads what it needs)
            target = params[slot.param]
            spec = tp_specs.get(slot.param)
            if spec is not None:  # a tensor-parallel slice: only its rows or columns are read
                target.copy_(reader.get_tp(name, spec, target.dtype).to(target.dtype))
                continue
            # (shard by shard; a repeated expert is read once per copy)
            _copy_in(reader, name, target[slot.expert] if slot.expert is not None else target)
        for copy, main in _mtp_copies(cfg).items():
            if copy in reader.weight_map:
                a = reader.get(copy)
                b = params[layout[main].param]  # the tensor just loaded; read again only if it was cast
                b = b if b.dtype == a.dtype else reader.get(main)
                if a.dtype == b.dtype and not torch.equal(a.to(b.device), b):
                    warnings.warn(f"{copy} differs from {main}; dsv3 shares {main} (as vLLM and SGLang do)",
                                  stacklevel=2)
        model.init_buffers()
    finally:
        reader.close()
    return model


def loaded_config(path: str | os.PathLike) -> ModelConfig:
    """The model config `load_pretrained(path)` builds: config.json checked against the tensor names (headers
    only), without MTP modules (and a warning) where the files hold none (transformers drops them)."""
    path = os.fspath(path)
    cfg = ModelConfig.from_json(path)
    reader = _Reader(path)
    try:
        return _check_sizes(cfg, reader, "config.json", path, read_json(os.path.join(path, "config.json")))
    finally:
        reader.close()


def _copy_in(reader: _Reader, name: str, dst: torch.Tensor) -> None:
    """Read tensor `name` into `dst` (an FP8 tensor going to a wider one is dequantised with its scale blocks)."""
    t = reader.get(name)
    if t.dtype == torch.float8_e4m3fn and dst.dtype != torch.float8_e4m3fn:
        t = weight_dequant(t, reader.get(name + "_scale_inv"), dtype=torch.float32)
    dst.copy_(t.to(dst.dtype))


@torch.no_grad()
def load_expert_slots(model: Transformer, path: str | os.PathLike, per_block: list) -> int:
    """Overwrite some routed-expert slots of a loaded model in place from its checkpoint: per_block[i] (MoE blocks:
    main layers, then MTP) lists (local slot j, global expert e) pairs; slot j of block i's stacks then holds
    expert e's weights (and scales, FP8 experts staying FP8), as `load_pretrained(experts=...)` would have
    loaded them. The tensors keep their storage, so CUDA graphs captured over them see the new weights. Reads
    only those experts' tensors. Returns the number of slots written (an expert-parallel re-placement,
    dsv3/ep_serve.py's Rebalancer)."""
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
    if len(per_block) != len(blocks):
        raise ValueError(f"per_block: {len(per_block)} lists for {len(blocks)} MoE blocks (main layers, then MTP)")
    n_layers, E = model.config.num_hidden_layers, model.config.n_routed_experts
    reader = _Reader(os.fspath(path))
    written = 0
    try:
        for (name, m), pairs in zip(blocks, per_block):
            stacks = list(m.experts.named_parameters()) + list(m.experts.named_buffers())
            for j, e in pairs:
                if not (0 <= e < E and 0 <= j < m.experts.gate_proj.shape[0]):
                    raise ValueError(f"{name}: slot {j} <- expert {e} is out of range")
                for sname, t in stacks:
                    hit = _EXPERT.match(f"{name}.experts.{sname}")
                    if hit:
                        base = _to_disk(hit.group(1), n_layers)
                        _copy_in(reader, f"{base}.{e}.{hit.group(2)}.weight{hit.group(3) or ''}", t[j])
                written += 1
    finally:
        reader.close()
    return written


def fp8_weight_names(model: nn.Module) -> list[str]:
    """state_dict names of the weights the official checkpoint stores in FP8 (every attention and FFN
    projection incl. shared and routed experts; not embeddings, head, norms, router or MTP eh_proj)."""
    return sorted({slot.param for disk, slot in disk_layout(model).items() if is_fp8_weight(disk)})


@torch.no_grad()
def quantize_model_fp8(model: nn.Module) -> nn.Module:
    """Swap, in place, every matrix that the official checkpoint stores in FP8 for its 128x128
    block quantisation (`weight_quant`); the dense weights are freed module by module. Returns the
    model (now for inference only: FP8 weights are buffers, not parameters)."""
    swap_to_fp8(model, fp8_weight_names(model), quantize=True)
    return model


def tempdir_beside(path: str) -> str:
    """A fresh temporary directory on the same filesystem as `path` (for atomic renames)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    d = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    os.chmod(d, 0o777 & ~_umask())  # mkdtemp makes it 0700; it becomes the user's checkpoint directory
    return d


# --- FP8 copies and exports of a checkpoint (`dsv3 quantize`, `dsv3 convert`) ----------------------------

STORAGE_DTYPES = ("bfloat16", "float16", "float32")
# files of a checkpoint directory besides the weights and config.json that a copy carries over
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")


@dataclass
class QuantizeConfig:
    """`quantize_checkpoint`'s settings; the fields are also the flags of `dsv3 quantize`."""
    dtype: str = setting("bfloat16", "storage dtype of the tensors that stay high precision (bfloat16: as the "
                                     "official checkpoint)", choices=STORAGE_DTYPES)


@dataclass
class ExportConfig:
    """How a sharded checkpoint is written in Hugging Face format (dsv3.checkpoints.dcp.to_hf); the
    fields are also the flags of `dsv3 convert`."""
    dtype: str | None = setting(None, "storage dtype (default: as trained, float32)", choices=STORAGE_DTYPES)


def _weight_bytes(d: str) -> int:
    """Bytes of the model shards only (a training checkpoint also holds optimizer.safetensors)."""
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
               if f.startswith("model") and f.endswith(".safetensors"))


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, cfg: QuantizeConfig | None = None) -> dict:
    """Checkpoint directory `src` (any dtype, or FP8 already) -> new official-layout FP8 checkpoint `out`:
    every matrix the official checkpoint stores in FP8 becomes e4m3 + 128x128 `weight_scale_inv` blocks
    (tensors that are FP8 already are copied bit for bit), the rest is stored in cfg.dtype, the router
    bias in fp32; the tokenizer files come along. `out` must not exist or be empty; it is written in a
    temporary directory beside it and renamed, so it never holds a partial checkpoint. Returns
    {src, out, n_fp8_modules, dtype, src_weight_bytes, out_weight_bytes, copied}."""
    cfg = cfg or QuantizeConfig()
    src, out = os.fspath(src), os.fspath(out)
    if cfg.dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {cfg.dtype!r}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"output {out} already exists and is not an empty directory; choose a new one")
    model = quantize_model_fp8(load_pretrained(src, keep_fp8=True))
    n_fp8 = sum(isinstance(m, (FP8Linear, FP8Experts)) for m in model.modules())
    tmp = tempdir_beside(out)
    try:
        save_pretrained(model, tmp, dtype=getattr(torch, cfg.dtype))
        copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
        for f in copied:  # a link leading out of the checkpoint is refused, not copied
            shutil.copy2(confined(src, f, src), os.path.join(tmp, f))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"src": src, "out": out, "n_fp8_modules": n_fp8, "dtype": cfg.dtype, "src_weight_bytes": _weight_bytes(src),
            "out_weight_bytes": _weight_bytes(out), "copied": copied}


__all__ = ["CheckpointError", "ExportConfig", "QuantizeConfig", "disk_layout", "fp8_weight_names", "is_fp8_weight",
           "quantize_checkpoint", "quantize_model_fp8", "load_pretrained", "loaded_config", "save_pretrained",
           "tempdir_beside"]

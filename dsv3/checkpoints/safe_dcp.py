"""Loading a sharded (DCP) checkpoint without executing anything it contains.

torch.distributed.checkpoint reads `dcp/.metadata` with a plain `pickle.load`, which runs whatever
code the file names, and reads a non-tensor entry of a `.distcp` file with
`torch.load(weights_only=False)`, which does the same. dsv3 replaces both:

* `.metadata` goes through `_MetadataUnpickler`, which resolves only the classes DCP metadata is made
  of (listed in `_ALLOWED`: the dataclasses of torch.distributed.checkpoint.metadata, the storage
  record `_StorageInfo`, torch.Size, and torch's dtype / layout / memory-format constants looked up
  by name and checked by type) and refuses every other global with a CheckpointError. Paths are
  rebuilt as pure paths (no filesystem access). The loaded object is then checked: a `Metadata`
  whose data files all lie inside the `dcp/` directory (dsv3/checkpoints/files.py `confined`).
* Non-tensor (byte) entries are refused: dsv3 writes only tensors, so a checkpoint that asks for
  one is not dsv3's.
* Tensor payloads are read by DCP itself with `torch.load(weights_only=True)`, torch's restricted
  unpickler for tensors and plain containers.

`load(state_dict, directory)` is the one entry point. It checks the metadata before DCP starts and
turns the failures DCP wraps in its own CheckpointException (whose text is a traceback) back into
one-line CheckpointErrors naming the directory. The allow-list was read off a file torch 2.13 writes
(`pickletools`); torch 2.11's metadata and _StorageInfo classes are the same source.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from dsv3.checkpoints.files import CheckpointError, confined

_METADATA = "torch.distributed.checkpoint.metadata"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"
# (module, name) -> (module, name) of the object it resolves to; nothing else is ever imported
_ALLOWED = {
    **{(_METADATA, n): (_METADATA, n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")},
    (_FILESYSTEM, "_StorageInfo"): (_FILESYSTEM, "_StorageInfo"),
    ("torch", "Size"): ("torch", "Size"),
    ("collections", "OrderedDict"): ("collections", "OrderedDict"),
    # StorageMeta.checkpoint_id: rebuilt as a pure path (WindowsPath cannot even be made on Linux)
    **{(m, n): ("pathlib", "PurePosixPath") for m in ("pathlib", "pathlib._local")
       for n in ("PosixPath", "PurePosixPath")},
    **{(m, n): ("pathlib", "PureWindowsPath") for m in ("pathlib", "pathlib._local")
       for n in ("WindowsPath", "PureWindowsPath")},
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


def _layout(name: str) -> torch.layout:
    """torch.serialization._get_layout, restricted: "torch.strided" -> torch.strided."""
    value = vars(torch).get(name[len("torch."):]) if isinstance(name, str) and name.startswith("torch.") else None
    if not isinstance(value, torch.layout):
        raise pickle.UnpicklingError(f"unknown layout {name!r}")
    return value


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals (see the module docstring)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            m, n = _ALLOWED[(module, name)]
            return getattr(importlib.import_module(m), n)
        if module == "torch" and isinstance(vars(torch).get(name), _TORCH_CONSTANTS):  # vars: no lazy imports
            return vars(torch)[name]  # a dtype / layout / memory format value, not a callable
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of DCP metadata")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of DCP metadata")


def read_metadata(path: str, directory: str):
    """The checked `Metadata` of file `path` (the `.metadata` of DCP directory `directory`)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (not a complete sharded checkpoint)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        md = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused, not plain DCP metadata ({e})") from None
    except Exception as e:  # truncated or garbage bytes: EOFError, ValueError, TypeError, ...
        raise CheckpointError(f"{path}: corrupt DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: holds a {type(md).__name__}, not DCP metadata")
    if not isinstance(getattr(md, "state_dict_metadata", None), dict) or not isinstance(
            getattr(md, "storage_data", None), dict):
        raise CheckpointError(f"{path}: corrupt DCP metadata (no state_dict_metadata / storage_data)")
    checked: set[str] = set()  # the data files: one per rank, each named by many entries, is checked once
    for index, info in md.storage_data.items():
        if not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{path}: corrupt DCP metadata (storage entry of a {type(info).__name__})")
        if not (isinstance(info.relative_path, str) and info.relative_path in checked):
            confined(directory, info.relative_path, path)  # (a name that is not a string raises here)
            checked.add(info.relative_path)
        if not (type(info.offset) is int and type(info.length) is int and info.offset >= 0 and info.length >= 0):
            raise CheckpointError(f"{path}: corrupt DCP metadata (offset {info.offset!r} length {info.length!r} "
                                  f"of {getattr(index, 'fqn', index)})")
    return md


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader reading `.metadata` with `read_metadata` instead of pickle.load."""

    def read_metadata(self, *args, **kwargs):  # **kwargs: DCP passes rank= to readers that accept it
        from torch.distributed.checkpoint.metadata import StorageMeta

        md = read_metadata(os.fspath(self._get_metadata_path(kwargs.get("rank"))), os.fspath(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that refuses non-tensor entries (DCP would torch.load them unrestricted)."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"entry {read_item.dest_index.fqn} is stored as pickled bytes, not a tensor; "
                              "dsv3 checkpoints hold only tensors and pickle is never loaded")


def load(state_dict: dict, directory: str, *, no_dist: bool = False) -> None:
    """dcp.load(state_dict) from DCP directory `directory` (in place), through the safe reader and
    planner; collective unless no_dist. Failures raise CheckpointError naming `directory`."""
    from torch.distributed.checkpoint.api import CheckpointException

    reader = SafeFileSystemReader(directory)
    # checked here first: a failing read inside dcp.load is logged with a traceback, then retried on
    # per-rank metadata files that dsv3 never writes
    read_metadata(os.fspath(reader._get_metadata_path()), os.fspath(reader.path))
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state_dict, storage_reader=reader, planner=TensorOnlyLoadPlanner(), no_dist=no_dist)
    except CheckpointException as e:
        failures = list(e.failures.values())
        for exc, _tb in failures:
            if isinstance(exc, CheckpointError):
                raise exc from None
        exc = failures[0][0] if failures else e
        if isinstance(exc, (ValueError, RuntimeError, KeyError, OSError, AssertionError, pickle.UnpicklingError)):
            msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            raise CheckpointError(f"{directory}: cannot be loaded into this model ({type(exc).__name__}: "
                                  f"{msg.splitlines()[0] if msg else ''})") from e
        raise


__all__ = ["SafeFileSystemReader", "TensorOnlyLoadPlanner", "load", "read_metadata"]

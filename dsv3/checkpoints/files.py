"""Reading the files of a checkpoint or run directory as untrusted input.

A checkpoint directory may come from anywhere (a download, a shared filesystem, a colleague), so every
reader in dsv3 treats its files as data that can be malformed or hostile:
* no pickle: weights are safetensors; JSON is parsed as JSON; the one pickled file dsv3 reads, a
  sharded checkpoint's `dcp/.metadata`, goes through an allow-list unpickler (dsv3/checkpoints/safe_dcp.py);
* file names that come from a file (the shard names of `model.safetensors.index.json`, the data files
  of `dcp/.metadata`) must stay inside the directory: no absolute path, no `..`, no symlink leading out;
* a malformed file raises `CheckpointError` whose one-line message names the file and the problem
  (never a bare SafetensorError or JSONDecodeError without a file name).

Symlinks: the Hugging Face hub cache stores a snapshot as `.../snapshots/<revision>/<file>` links to
`.../blobs/<hash>`; a link from a `snapshots/<revision>` directory into the `blobs/` directory beside
`snapshots/` is therefore accepted. Any other link that resolves outside the directory is refused.
"""

from __future__ import annotations

import json
import os
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


def check_creatable(path: str, what: str, directory: bool = True) -> None:
    """Raise ValueError naming `what` (the flag, e.g. "--out") unless `path` can be made later, before any slow
    work: the path itself (a directory, with `directory`), or the nearest ancestor that exists, must be a writable
    directory. A file in the way was os.makedirs' "[Errno 20] Not a directory" after the data, the BPE or a whole
    evaluation had run. Creates nothing."""
    p = os.path.abspath(path)
    if os.path.exists(p):
        if directory and not os.path.isdir(p):
            raise ValueError(f"{what} {path}: a file of that name exists (a directory is needed)")
        if not directory and os.path.isdir(p):
            raise ValueError(f"{what} {path}: is a directory (a file name is needed)")
        return
    up = os.path.dirname(p)
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise ValueError(f"{what} {path}: {up} is a file, so no directory can be made under it")
    if not os.access(up, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {up} is not writable")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (missing, malformed, unsafe, or not matching the model);
    the message names the file and every problem."""


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def confined(root: str, name: str, source: str) -> str:
    """Path of `name`, a file name read from `source` (a file of directory `root`), refused unless it
    stays inside `root`: a relative path without `..` whose real location (symlinks followed) is in
    `root` (or in the Hugging Face cache's blobs/ directory, see the module docstring)."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{source}: file name {name!r} is not a non-empty string")
    parts = name.replace("\\", "/").split("/")
    drive = name[1:2] == ":" and name[:1].isalpha()  # C:... (a Windows absolute path)
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or drive:
        raise CheckpointError(f"{source}: entry {name!r} points outside the checkpoint directory {root}")
    path = os.path.join(root, name)
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if not _inside(real, real_root):
        snapshots = os.path.dirname(real_root)  # .../models--org--name/snapshots/<revision>
        blobs = os.path.join(os.path.dirname(snapshots), "blobs")
        if not (os.path.basename(snapshots) == "snapshots" and _inside(real, blobs)):
            raise CheckpointError(f"{source}: entry {name!r} resolves to {real}, outside the checkpoint "
                                  f"directory {root} (a symlink leading out of it)")
    return path


def read_json(path: str, *, kind: type = dict) -> Any:
    """The JSON value of file `path` (by default it must be an object); CheckpointError naming the file
    when it is missing, unreadable, not valid JSON or of another type."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                              f"found {type(value).__name__}")
    return value


def require(d: dict, keys, path: str) -> None:
    """CheckpointError naming `path` unless JSON object `d` has every key of `keys`."""
    missing = [k for k in keys if k not in d]
    if missing:
        raise CheckpointError(f"{path}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")


def open_safetensors(path: str):
    """`safe_open(path, "pt")`, with a CheckpointError naming the file when it is missing or corrupt
    (truncated, garbage header, ...)."""
    try:
        return safe_open(path, "pt")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None


def load_safetensors(path: str) -> dict:
    """Every tensor of safetensors file `path` (CPU), with `open_safetensors`' errors."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None


__all__ = ["CheckpointError", "confined", "load_safetensors", "open_safetensors", "read_json", "require"]

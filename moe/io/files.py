"""Files that are never seen half-written, and reads that name what is wrong with a bad one.

Every write goes to a temporary name, is fsynced and renamed over the target, so a reader
(or a run killed mid-write) sees the old file or the new one. Every read of an untrusted
file turns a missing, truncated or corrupt file into one FileNotFoundError or ValueError
that names the path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import Tensor

TRAINER_FILE = "trainer.json"  # a training checkpoint's state, with the sha256 of its other files


def write_atomic(path: Path, data: bytes) -> None:
    """Write to path.tmp, fsync, rename over path: readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_safetensors(path: Path, data: bytes | None = None) -> dict[str, Tensor]:
    """All tensors of a safetensors file (on CPU); a clear error if it is truncated or corrupt."""
    try:
        return st_load(Path(path).read_bytes() if data is None else data)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file not found: {path}") from None
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON, truncated or corrupt ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checked_bytes(directory: Path, name: str, trainer_state: dict[str, Any]) -> bytes:
    """The file's bytes, verified against the sha256 that trainer.json recorded for it."""
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    data = path.read_bytes()
    if sha256(data) != trainer_state.get("sha256", {}).get(name):
        raise ValueError(f"{path}: contents differ from the checksum in {TRAINER_FILE} (truncated or corrupt)")
    return data

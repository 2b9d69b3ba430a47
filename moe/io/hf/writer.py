"""Writing Hugging Face checkpoint folders: config.json + safetensors shards (+ index).

Each checkpoint tensor is assembled from its pieces when its shard is written, so memory holds
the model plus one shard. Files are written under a temporary name, fsynced and renamed into
place. A folder that holds anything is refused unless `overwrite=True`; then the shards and
index of the earlier export are removed afterwards, so the folder never mixes two exports'
weights, and every other file in it is left alone. A write that fails (disk full) removes its
temporary file and raises an OSError naming the path.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from ..files import check_destination, fsync_dir, write_atomic
from .reader import INDEX
from .spec import Piece

SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size
_EXPORT_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")  # what an earlier export wrote


def write_checkpoint(
    directory: Path,
    config: dict,
    state: dict[str, torch.Tensor],
    pieces: list[Piece],
    dtypes: dict[str, torch.dtype],
    max_shard_bytes: int = SHARD_BYTES,
    progress: bool = False,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write config.json and the shards; `dtypes` gives each checkpoint tensor's dtype. Returns the shards.
    `directory` must be empty or absent unless overwrite=True (module docstring)."""
    check_destination(directory, overwrite, "pass overwrite=True to replace the model files in it")
    by_name: dict[str, list[Piece]] = {}
    for p in pieces:
        by_name.setdefault(p.hf, []).append(p)
    sizes = {n: torch.Size(ps[0].hf_shape).numel() * dtypes[n].itemsize for n, ps in by_name.items()}
    shards = _plan_shards(list(by_name), sizes, max_shard_bytes)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    directory.mkdir(parents=True, exist_ok=True)
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="saving", disable=not progress) as bar:
        for file, names in zip(files, shards):
            tensors = {}
            for name in names:
                tensors[name] = _assemble(by_name[name], state, dtypes[name])
                bar.update(sizes[name])
            _atomic(directory / file, lambda tmp, shard=tensors: save_file(shard, tmp, metadata={"format": "pt"}))
            del tensors
    if len(files) > 1:
        weight_map = {name: file for file, names in zip(files, shards) for name in names}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        write_atomic(directory / INDEX, (json.dumps(index, indent=2) + "\n").encode())
    write_atomic(directory / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    _remove_stale(directory, set(files))
    return [directory / f for f in files]


def _assemble(pieces: list[Piece], state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(pieces[0].hf_shape, dtype=dtype)  # zeros: a piece with ours=None stays zero
    for p in pieces:
        if p.ours is not None:
            src = state[p.ours][p.our_index]
            out[p.hf_index].copy_(src.mT if p.transpose else src)
    return out


def _plan_shards(names: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Consecutive runs of tensors of at most `limit` bytes (a larger tensor gets a shard alone)."""
    shards, current, used = [], [], 0
    for name in names:
        if current and used + sizes[name] > limit:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += sizes[name]
    return shards + [current] if current else shards


def _atomic(path: Path, write) -> None:
    """write(tmp name), fsync, rename over path; safetensors' I/O errors become OSErrors naming path."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover, possibly a symlink: never written through
        write(str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))  # safetensors reports ENOSPC as "... (os error 28)"
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _remove_stale(directory: Path, keep: set[str]) -> None:
    """The shards and index of an earlier export (overwrite=True), never another file."""
    for old in list(directory.iterdir()):
        if _EXPORT_FILES.fullmatch(old.name) and old.name not in keep:
            old.unlink()
    if len(keep) == 1:
        (directory / INDEX).unlink(missing_ok=True)

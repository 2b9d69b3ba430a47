"""Reading Hugging Face checkpoint folders: safetensors only, checked before loading, filled lazily.

`scan` reads only the headers: which tensor lives in which file, with what shape and dtype.
`check` compares them with the pieces a family expects and names every problem in one error.
`fill` then allocates each of our tensors once, in the requested dtype and device, and copies
the checkpoint tensors into it slice by slice, one shard open at a time. Peak memory is the
model plus one checkpoint tensor: safetensors maps the open shard (clean file pages the
kernel can drop under pressure), so no second copy of the weights is ever made.

The folder is untrusted input (moe/io/files.py): config.json, the index and every shard it
names must be regular files inside the folder (a hub cache snapshot's symlinks into blobs/
aside); the index's weight_map must map tensor names to file names; safetensors checks every
header against its file (length, offsets, dtype x shape) before a tensor is made; and `check`
refuses a tensor whose name, shape or dtype the family does not expect. Each is one InputError.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ...errors import InputError, excerpt
from ..files import folder_file, read_json
from .spec import Piece

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")  # written by old transformers versions; recomputed here
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "BF16", "F32", ...


def read_config(directory: Path) -> dict:
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {directory}")
    try:
        path = folder_file(directory, "config.json")
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory}: no config.json (is this a Hugging Face model folder?)") from None
    return read_json(path)


def scan(directory: Path) -> dict[str, Entry]:
    """Tensor name -> (file, shape, dtype), from the headers of every shard."""
    files = _shard_files(directory)
    entries: dict[str, Entry] = {}
    for file, wanted in files.items():
        try:
            with safe_open(file, framework="pt") as f:
                names = set(f.keys())
                for name in sorted(names if wanted is None else wanted & names):
                    if name in entries:
                        raise InputError(
                            f"{directory}: tensor {name} is in both {entries[name].file.name} and {file.name}"
                        )
                    s = f.get_slice(name)
                    entries[name] = Entry(file, tuple(s.get_shape()), s.get_dtype())
        except SafetensorError as e:
            raise InputError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        if wanted is not None and wanted - names:
            raise InputError(
                f"{file}: {INDEX} lists {len(wanted - names)} tensor(s) this file lacks, "
                f"e.g. {sorted(wanted - names)[0]}"
            )
    return entries


def _shard_files(directory: Path) -> dict[Path, set[str] | None]:
    """Shard file -> the tensor names the index assigns it (None: no index, take all it holds).
    Every shard is checked to be a regular file inside the folder before anything opens it."""
    index = directory / INDEX
    if os.path.lexists(index):
        weight_map = read_json(folder_file(directory, INDEX)).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index}: malformed index: 'weight_map' = {excerpt(weight_map)} is not a map of names")
        by_name: dict[str, set[str]] = defaultdict(set)
        for name, file in weight_map.items():
            if not isinstance(file, str):
                raise InputError(f"{index}: malformed index: tensor {excerpt(name)} maps to {excerpt(file)}")
            by_name[file].add(name)
        files: dict[Path, set[str] | None] = {}
        missing = []
        for file, names in sorted(by_name.items()):
            try:
                files[folder_file(directory, file, f"shard named by {INDEX}")] = names
            except FileNotFoundError:
                missing.append(file)
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return {folder_file(directory, f.name, "shard"): None for f in shards}
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InputError(
            f"{directory}: only pickle checkpoints ({', '.join(pickles)}); moe never unpickles "
            "(it can run code): convert them to safetensors first, e.g. with transformers' "
            "save_pretrained"
        )
    raise FileNotFoundError(f"{directory}: no *.safetensors files")


def check(
    entries: dict[str, Entry], pieces: list[Piece], skipped_layers: range, optional: set[str], family: str
) -> None:
    """Raise one InputError naming every missing, unexpected, misshapen or non-float tensor."""
    expected = {p.hf: p.hf_shape for p in pieces}
    missing = sorted(n for n in expected if n not in entries)
    skipped, unexpected = [], []
    for name in entries:
        if name in expected or name in optional or IGNORED.search(name):
            continue
        layer = LAYER.match(name)
        (skipped if layer and int(layer.group(1)) in skipped_layers else unexpected).append(name)
    misshapen = [
        f"{n} {list(entries[n].shape)} (expected {list(s)}) in {entries[n].file.name}"
        for n, s in expected.items()
        if n in entries and entries[n].shape != s
    ]
    # Weights are floats: an F32 header retyped I32 (same bytes) would load its bits as integers.
    not_float = [
        f"{n} ({entries[n].dtype}) in {entries[n].file.name}"
        for n in expected
        if n in entries and entries[n].dtype not in FLOAT_DTYPES
    ]
    problems = [
        (what, names)
        for what, names in (
            ("missing", missing),
            ("unexpected", sorted(unexpected)),
            ("wrong shape", misshapen),
            ("not a float dtype", not_float),
        )
        if names
    ]
    if problems:
        raise InputError(
            f"checkpoint does not match its {family} config.json: "
            + "; ".join(f"{what}: {_listing(names)}" for what, names in problems)
        )
    if skipped:
        layers = sorted({int(LAYER.match(n).group(1)) for n in skipped})
        warnings.warn(
            f"skipping {len(skipped)} tensors of multi-token-prediction layer(s) {layers}: "
            "they do not take part in next-token logits",
            stacklevel=3,
        )


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} (+{len(names) - limit} more)"


def fill(
    entries: dict[str, Entry],
    pieces: list[Piece],
    shapes: dict[str, torch.Size],
    dtypes: dict[str, torch.dtype],
    device: torch.device,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Our tensors (name -> tensor), each allocated once and filled from its pieces."""
    by_file: dict[Path, dict[str, list[Piece]]] = defaultdict(lambda: defaultdict(list))
    for p in pieces:
        if p.ours is not None:
            by_file[entries[p.hf].file][p.hf].append(p)
    total = sum(_nbytes(entries[n]) for per_file in by_file.values() for n in per_file)
    out: dict[str, torch.Tensor] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
        for file, per_name in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name, name_pieces in per_name.items():
                    for p in name_pieces:
                        dst = out.get(p.ours)
                        if dst is None:
                            dst = out[p.ours] = torch.empty(shapes[p.ours], dtype=dtypes[p.ours], device=device)
                        src = f.get_slice(name)[p.hf_index] if p.hf_index else f.get_tensor(name)
                        dst[p.our_index].copy_(src.mT if p.transpose else src)
                        del src  # drop the mapped view before the next tensor
                    bar.update(_nbytes(entries[name]))
    return out


def _nbytes(entry: Entry) -> int:
    return FLOAT_DTYPES.get(entry.dtype, 1) * int(torch.Size(entry.shape).numel())

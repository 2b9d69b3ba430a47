"""The file layout of a sharded training checkpoint (moe.distributed.checkpoint writes it).

    checkpoints/step_00000040/
        config.json                                the ModelConfig
        model-rank00000-of-00004.safetensors       rank 0's slices of the weights and buffers
        optimizer-rank00000-of-00004.safetensors   rank 0's AdamW state of those slices
        ...                                        one pair per rank
        trainer.json                               step, data position, run arguments, the layout
                                                   {"world", "dp", "ep"}, every rank's RNG state
                                                   and the sha256 of every other file

Every sharded tensor is split along dim 0 (expert stacks by expert, then FSDP's chunks of
ceil(rows / ranks)), so a slice is its full shape and its first row. Each file carries the
layout of its tensors in its safetensors metadata, under "layout":
    {"layers.1.ffn.experts.w_in": {"shape": [8, 32, 64], "start": 4}, "layers.1.ffn.router.expert_bias":
     {"shape": [8], "start": null}, ...}
"start": null marks a tensor every rank holds whole (buffers, AdamW's step): every rank
writes its copy, and a reader checks that the copies agree.

`read_full_model` assembles the full tensors in one process, so from_pretrained and
`moe generate` read a sharded checkpoint like any other; it needs no torch.distributed. The
layout is untrusted input: every rank's rows must tile each tensor exactly (checked before the
full tensor is allocated, so a layout that claims a huge shape allocates nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor

from ..errors import InputError, excerpt
from .files import checked_bytes, read_safetensors, read_trainer_state, safetensors_metadata

Slice = tuple[Tensor, list[int], "int | None"]  # (this rank's tensor, full shape, first row or None)


def file_names(rank: int, world: int) -> tuple[str, str]:
    tag = f"rank{rank:05d}-of-{world:05d}.safetensors"
    return f"model-{tag}", f"optimizer-{tag}"


def encode(slices: dict[str, Slice]) -> bytes:
    tensors = {name: t.cpu().contiguous() for name, (t, _, _) in slices.items()}
    layout = {name: {"shape": shape, "start": start} for name, (_, shape, start) in slices.items()}
    return st_save(tensors, metadata={"format": "pt", "layout": json.dumps(layout)})


def decode(path: Path, data: bytes) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, layout) of one rank's file, from the bytes that were checksummed (never reopened)."""
    tensors = read_safetensors(path, data)  # checks that the bytes are a whole safetensors file
    try:
        layout = json.loads(safetensors_metadata(data)["layout"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise InputError(f"{path}: no readable 'layout' in its metadata: not a shard of a sharded checkpoint") from None
    if not isinstance(layout, dict):
        raise InputError(f"{path}: its 'layout' metadata is not a map of tensor names")
    for name, tensor in tensors.items():
        _check_entry(path, name, layout.get(name), tensor)
    return tensors, layout


def _check_entry(path: Path, name: str, entry: object, tensor: Tensor) -> None:
    """A layout entry is {"shape": [ints >= 0], "start": row or null} and agrees with the tensor."""
    shape = entry.get("shape") if isinstance(entry, dict) else None
    start = entry.get("start") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        ok = False
    elif start is None:  # held whole by every rank
        ok = list(tensor.shape) == shape
    elif isinstance(start, int) and not isinstance(start, bool) and start >= 0:  # rows start.. of the full tensor
        ok = tensor.dim() == len(shape) > 0 and list(tensor.shape[1:]) == shape[1:] and start + len(tensor) <= shape[0]
    else:
        ok = False
    if not ok:
        raise InputError(
            f"{path}: layout of tensor '{name}' is {excerpt(entry)}, which does not fit its shape {list(tensor.shape)}"
        )


def read_full_model(directory: str | Path, state: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """Full weights of a sharded checkpoint, assembled in this process from every rank's file
    (state: its trainer.json, from read_trainer_state; read here when not given)."""
    directory = Path(directory)
    state = read_trainer_state(directory) if state is None else state
    if "parallel" not in state:
        raise InputError(f"{directory}: not a sharded checkpoint (no 'parallel' layout in its trainer.json)")
    world = state["parallel"]["world"]
    pieces: dict[str, list[tuple[int, Tensor]]] = {}
    shapes: dict[str, list[int]] = {}
    full: dict[str, Tensor] = {}
    for rank in range(world):
        name = file_names(rank, world)[0]
        tensors, layout = decode(directory / name, checked_bytes(directory, name, state))
        for key, tensor in tensors.items():
            if layout[key]["start"] is None:
                if key in full and not torch.equal(full[key], tensor):
                    raise InputError(f"{directory / name}: its copy of '{key}' differs from rank 0's")
                full.setdefault(key, tensor)
            else:
                if shapes.setdefault(key, layout[key]["shape"]) != layout[key]["shape"]:
                    raise InputError(f"{directory / name}: shape of '{key}' differs from the other ranks' files")
                pieces.setdefault(key, []).append((layout[key]["start"], tensor))
    for key, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        row = 0
        for start, tensor in parts:  # the rows must tile the tensor before it is allocated
            if start != row:
                where = "in no rank's file" if start > row else "in two ranks' files"
                raise InputError(f"{directory}: rows {min(row, start)}..{max(row, start) - 1} of '{key}' are {where}")
            if tensor.dtype != parts[0][1].dtype:
                raise InputError(f"{directory}: the ranks' pieces of '{key}' differ in dtype")
            row = start + tensor.shape[0]
        if row != shapes[key][0]:
            raise InputError(f"{directory}: rows {row}..{shapes[key][0] - 1} of '{key}' are in no rank's file")
        full[key] = torch.cat([tensor for _, tensor in parts])
    return full

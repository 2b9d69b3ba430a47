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
`moe generate` read a sharded checkpoint like any other; it needs no torch.distributed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor

from .files import TRAINER_FILE, checked_bytes, read_json, read_safetensors

Slice = tuple[Tensor, list[int], "int | None"]  # (this rank's tensor, full shape, first row or None)


def file_names(rank: int, world: int) -> tuple[str, str]:
    tag = f"rank{rank:05d}-of-{world:05d}.safetensors"
    return f"model-{tag}", f"optimizer-{tag}"


def encode(slices: dict[str, Slice]) -> bytes:
    tensors = {name: t.cpu().contiguous() for name, (t, _, _) in slices.items()}
    layout = {name: {"shape": shape, "start": start} for name, (_, shape, start) in slices.items()}
    return st_save(tensors, metadata={"format": "pt", "layout": json.dumps(layout)})


def decode(path: Path, data: bytes) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = read_safetensors(path, data)  # checks that the bytes are a whole safetensors file
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if "layout" not in metadata:
        raise ValueError(f"{path}: no 'layout' in its metadata: not a shard of a sharded checkpoint")
    return tensors, json.loads(metadata["layout"])


def read_full_model(directory: str | Path) -> dict[str, Tensor]:
    """Full weights of a sharded checkpoint, assembled in this process from every rank's file."""
    directory = Path(directory)
    state = read_json(directory / TRAINER_FILE)
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
                    raise ValueError(f"{directory / name}: its copy of '{key}' differs from rank 0's")
                full.setdefault(key, tensor)
            else:
                pieces.setdefault(key, []).append((layout[key]["start"], tensor))
                shapes[key] = layout[key]["shape"]
    for key, parts in pieces.items():
        out = torch.empty(shapes[key], dtype=parts[0][1].dtype)
        row = 0
        for start, tensor in sorted(parts, key=lambda p: p[0]):
            if start != row:
                where = "in no rank's file" if start > row else "in two ranks' files"
                raise ValueError(f"{directory}: rows {min(row, start)}..{max(row, start) - 1} of '{key}' are {where}")
            out[start : start + tensor.shape[0]] = tensor
            row = start + tensor.shape[0]
        if row != out.shape[0]:
            raise ValueError(f"{directory}: rows {row}..{out.shape[0] - 1} of '{key}' are in no rank's file")
        full[key] = out
    return full

"""Sharded training checkpoints: each rank writes its own slices, safetensors only, no pickle.

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

Saving is atomic: rank 0 creates step_X.tmp; every rank writes its files there; rank 0
gathers their checksums and RNG states, writes trainer.json and renames the folder to
step_X (the commit point) after everyone has finished. `load_sharded` resumes on the same
layout (each rank reads its own files); `read_full_model` assembles full tensors in one
process, so from_pretrained and `moe generate` read a sharded checkpoint like any other.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save as st_save
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from .. import checkpoint as ckpt
from .expert_parallel import expert_rows
from .mesh import ParallelContext

Slice = tuple[Tensor, list[int], "int | None"]  # (this rank's tensor, full shape, first row or None)


def file_names(rank: int, world: int) -> tuple[str, str]:
    tag = f"rank{rank:05d}-of-{world:05d}.safetensors"
    return f"model-{tag}", f"optimizer-{tag}"


# --------------------------------------------------------------------------- layout


def model_slices(model: nn.Module) -> dict[str, Slice]:
    """Parameters and persistent buffers by name, as this rank holds them (a tied tensor once)."""
    return {name: piece for name, (_, piece) in _entries(model).items()}


def _entries(model: nn.Module) -> dict[str, tuple[Tensor, Slice]]:
    """state_dict entries (FSDP2's hook makes them its sharded parameters, the objects the
    optimizer holds, even after an eval forward left some unsharded) with their slices."""
    rows = expert_rows(model)
    seen, out = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor, _slice(name, tensor, rows.get(name))
    return out


def _slice(name: str, tensor: Tensor, experts: tuple[int, int] | None) -> Slice:
    if not isinstance(tensor, DTensor):
        return tensor.detach(), list(tensor.shape), None
    if tuple(tensor.placements) != (Shard(0),):
        raise ValueError(f"'{name}' is sharded as {tensor.placements}; checkpoints take Shard(0) only")
    local = tensor.to_local().detach()
    rows, ranks = tensor.shape[0], tensor.device_mesh.size()
    start = min(tensor.device_mesh.get_local_rank() * math.ceil(rows / ranks), rows)  # FSDP2's torch.chunk split
    shape = list(tensor.shape)
    if experts is not None:  # this rank's experts sit at rows first .. first + rows - 1 of the layer's stack
        first, num_experts = experts
        start, shape[0] = start + first, num_experts
    return local, shape, start


def optimizer_slices(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Slice]:
    """"{param name}.{state key}" -> slice; the moments are laid out as their parameter."""
    out = {}
    for name, (param, (_, shape, start)) in _param_entries(model).items():
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, DTensor):
                out[f"{name}.{key}"] = (value.to_local().detach(), shape, start)
            else:
                value = torch.as_tensor(value).detach()
                out[f"{name}.{key}"] = (value, list(value.shape), None)
    return out


def _param_entries(model: nn.Module) -> dict[str, tuple[Tensor, Slice]]:
    entries = _entries(model)
    return {name: entries[name] for name, _ in model.named_parameters() if name in entries}


def _encode(slices: dict[str, Slice]) -> bytes:
    tensors = {name: t.cpu().contiguous() for name, (t, _, _) in slices.items()}
    layout = {name: {"shape": shape, "start": start} for name, (_, shape, start) in slices.items()}
    return st_save(tensors, metadata={"format": "pt", "layout": json.dumps(layout)})


def _decode(path: Path, data: bytes) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = ckpt.read_safetensors(path, data)
    header_len = int.from_bytes(data[:8], "little")  # the safetensors format: u64 length, JSON header
    metadata = json.loads(data[8:8 + header_len]).get("__metadata__", {})
    if "layout" not in metadata:
        raise ValueError(f"{path}: no 'layout' in its metadata: not a shard of a sharded checkpoint")
    return tensors, json.loads(metadata["layout"])


# --------------------------------------------------------------------------- gathering small records


def gather_json(record: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's JSON-able record, in rank order (CPU tensors: gloo serves them on GPUs too)."""
    data = torch.frombuffer(bytearray(json.dumps(record).encode()), dtype=torch.uint8)
    world = dist.get_world_size(group)
    size = torch.tensor([data.numel()])
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:data.numel()] = data
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded, group=group)
    return [json.loads(bytes(c[:int(n)].tolist())) for c, n in zip(chunks, sizes)]


# --------------------------------------------------------------------------- save and resume


def save_sharded(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 trainer_state: dict[str, Any], keep_last: int, ctx: ParallelContext) -> Path:
    """Write root/step_{step} from every rank (a collective); trainer_state["rng"] is this rank's."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob("step_*.tmp"):  # from a save that was killed
            shutil.rmtree(leftover)
        tmp.mkdir()
    dist.barrier()
    model_file, optimizer_file = file_names(ctx.rank, ctx.world_size)
    files = {model_file: _encode(model_slices(model)), optimizer_file: _encode(optimizer_slices(model, optimizer))}
    for name, data in files.items():
        ckpt.write_atomic(tmp / name, data)
    records = gather_json({"sha256": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
                           "rng": trainer_state["rng"]})
    if ctx.rank == 0:
        config = json.dumps(model.config.to_dict(), indent=2).encode()
        ckpt.write_atomic(tmp / ckpt.CONFIG_FILE, config)
        sha = {ckpt.CONFIG_FILE: hashlib.sha256(config).hexdigest()}
        for record in records:
            sha.update(record["sha256"])
        state = {"step": step, **trainer_state, "rng": [r["rng"] for r in records], "parallel": ctx.describe(),
                 "sha256": sha}
        ckpt.write_atomic(tmp / ckpt.TRAINER_FILE, json.dumps(state, indent=2).encode())
        os.replace(tmp, final)  # the commit point
        ckpt._fsync_dir(root)
        for old in ckpt.checkpoint_dirs(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old)
    dist.barrier()
    return final


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 ctx: ParallelContext) -> dict[str, Any]:
    """Restore this rank's slices (same layout as the save); returns trainer.json with this
    rank's RNG state under "rng"."""
    path = Path(path)
    state = ckpt.read_json(path / ckpt.TRAINER_FILE)
    saved = state.get("parallel")
    if saved != ctx.describe():
        where = f"on {saved['world']} ranks (dp {saved['dp']} x ep {saved['ep']})" if saved else "by one process"
        raise ValueError(f"{path} was saved {where}; this run has {ctx.world_size} ranks (dp {ctx.dp} x ep "
                         f"{ctx.ep}): resume with the same torchrun --nproc-per-node and --ep")
    model_file, optimizer_file = file_names(ctx.rank, ctx.world_size)
    _restore(path / model_file, ckpt._checked_bytes(path, model_file, state), model_slices(model))
    if optimizer is not None:
        params = _param_entries(model)
        tensors, layout = _decode(path / optimizer_file, ckpt._checked_bytes(path, optimizer_file, state))
        for key, tensor in tensors.items():
            name, _, state_key = key.rpartition(".")
            if name not in params:
                raise ValueError(f"{path / optimizer_file} holds optimizer state for '{name}', which the model lacks")
            param, expected = params[name]
            if layout[key]["start"] is not None:
                _check_layout(path / optimizer_file, key, layout[key], tensor, expected)
                tensor = DTensor.from_local(tensor.to(expected[0].device), param.device_mesh, param.placements,
                                            run_check=False, shape=param.shape, stride=param.stride())
            optimizer.state[param][state_key] = tensor
    return {**state, "rng": state["rng"][ctx.rank]}


def _restore(path: Path, data: bytes, expected: dict[str, Slice]) -> None:
    tensors, layout = _decode(path, data)
    for name, piece in expected.items():
        if name not in tensors:
            raise ValueError(f"{path} has no tensor '{name}': it was saved from another config")
        _check_layout(path, name, layout[name], tensors[name], piece)
        with torch.no_grad():
            piece[0].copy_(tensors[name])  # this rank's slice: writes through to the sharded parameter
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{path} has tensor '{extra[0]}' that the model does not: it was saved from another config")


def _check_layout(path: Path, name: str, saved: dict[str, Any], tensor: Tensor, expected: Slice) -> None:
    local, shape, start = expected
    if saved != {"shape": shape, "start": start} or tensor.shape != local.shape:
        raise ValueError(f"{path}: tensor '{name}' was saved as {saved} (here {tuple(tensor.shape)}), but this rank "
                         f"holds {tuple(local.shape)} of shape {shape} from row {start}: it was saved from another "
                         f"config or layout")


# --------------------------------------------------------------------------- one process


def read_full_model(directory: str | Path) -> dict[str, Tensor]:
    """Full weights of a sharded checkpoint, assembled in this process from every rank's file."""
    directory = Path(directory)
    state = ckpt.read_json(directory / ckpt.TRAINER_FILE)
    world = state["parallel"]["world"]
    pieces: dict[str, list[tuple[int, Tensor]]] = {}
    shapes: dict[str, list[int]] = {}
    full: dict[str, Tensor] = {}
    for rank in range(world):
        name = file_names(rank, world)[0]
        tensors, layout = _decode(directory / name, ckpt._checked_bytes(directory, name, state))
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
            out[start:start + tensor.shape[0]] = tensor
            row = start + tensor.shape[0]
        if row != out.shape[0]:
            raise ValueError(f"{directory}: rows {row}..{out.shape[0] - 1} of '{key}' are in no rank's file")
        full[key] = out
    return full

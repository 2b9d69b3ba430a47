"""Sharded training checkpoints: each rank writes its own slices, safetensors only, no pickle.

The layout of the files is moe/io/sharded.py's.

Saving is atomic: rank 0 creates step_X.tmp; every rank writes its files there; rank 0
gathers their checksums and RNG states, writes trainer.json and renames the folder to
step_X (the commit point) after everyone has finished: moe.io.checkpoint's commit routine,
the one a single process uses. `load_sharded` resumes on the same layout (each rank reads its
own files). Every file is read through moe.io's checks: regular files inside the folder,
trainer.json and every rank's file matching their checksums, layouts that fit their tensors.
A rank whose write fails (disk full) raises the OSError; the temporary folder it leaves is
cleared by the next save (begin_checkpoint), and the previous checkpoints stay loadable.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from ..errors import InputError
from ..io.checkpoint import begin_checkpoint, checkpoint_folders, commit_checkpoint
from ..io.files import checked_bytes, read_trainer_state, sha256, write_atomic
from ..io.sharded import Slice, decode, encode, file_names
from .mesh import ParallelContext
from .parallelize import expert_rows

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
    """ "{param name}.{state key}" -> slice; the moments are laid out as their parameter."""
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
    padded[: data.numel()] = data
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded, group=group)
    return [json.loads(bytes(c[: int(n)].tolist())) for c, n in zip(chunks, sizes)]


# --------------------------------------------------------------------------- save and resume


def save_sharded(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
    ctx: ParallelContext,
) -> Path:
    """Write root/step_{step} from every rank (a collective); trainer_state["rng"] is this rank's."""
    tmp, final = checkpoint_folders(Path(root), step)
    if ctx.rank == 0:
        begin_checkpoint(tmp)
    dist.barrier()
    model_file, optimizer_file = file_names(ctx.rank, ctx.world_size)
    files = {model_file: encode(model_slices(model)), optimizer_file: encode(optimizer_slices(model, optimizer))}
    for name, data in files.items():
        write_atomic(tmp / name, data)
    records = gather_json({"sha256": {n: sha256(d) for n, d in files.items()}, "rng": trainer_state["rng"]})
    if ctx.rank == 0:
        sha = {name: digest for record in records for name, digest in record["sha256"].items()}
        state = {"step": step, **trainer_state, "rng": [r["rng"] for r in records], "parallel": ctx.describe()}
        commit_checkpoint(tmp, final, model, state, sha, keep_last)
    dist.barrier()
    return final


def load_sharded(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: ParallelContext
) -> dict[str, Any]:
    """Restore this rank's slices (same layout as the save); returns trainer.json with this
    rank's RNG state under "rng"."""
    path = Path(path)
    state = read_trainer_state(path)
    saved = state.get("parallel")
    if saved != ctx.describe():
        where = f"on {saved['world']} ranks (dp {saved['dp']} x ep {saved['ep']})" if saved else "by one process"
        raise InputError(
            f"{path} was saved {where}; this run has {ctx.world_size} ranks (dp {ctx.dp} x ep "
            f"{ctx.ep}): resume with the same torchrun --nproc-per-node and --ep"
        )
    model_file, optimizer_file = file_names(ctx.rank, ctx.world_size)
    _restore(path / model_file, checked_bytes(path, model_file, state), model_slices(model))
    if optimizer is not None:
        params = _param_entries(model)
        tensors, layout = decode(path / optimizer_file, checked_bytes(path, optimizer_file, state))
        for key, tensor in tensors.items():
            name, _, state_key = key.rpartition(".")
            if name not in params:
                raise InputError(f"{path / optimizer_file} holds optimizer state for '{name}', which the model lacks")
            param, expected = params[name]
            if layout[key]["start"] is not None:
                _check_layout(path / optimizer_file, key, layout[key], tensor, expected)
                tensor = DTensor.from_local(
                    tensor.to(expected[0].device),
                    param.device_mesh,
                    param.placements,
                    run_check=False,
                    shape=param.shape,
                    stride=param.stride(),
                )
            optimizer.state[param][state_key] = tensor
    return {**state, "rng": state["rng"][ctx.rank]}


def _restore(path: Path, data: bytes, expected: dict[str, Slice]) -> None:
    tensors, layout = decode(path, data)
    for name, piece in expected.items():
        if name not in tensors:
            raise InputError(f"{path} has no tensor '{name}': it was saved from another config")
        _check_layout(path, name, layout[name], tensors[name], piece)
        with torch.no_grad():
            piece[0].copy_(tensors[name])  # this rank's slice: writes through to the sharded parameter
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise InputError(f"{path} has tensor '{extra[0]}' that the model does not: it was saved from another config")


def _check_layout(path: Path, name: str, saved: dict[str, Any], tensor: Tensor, expected: Slice) -> None:
    local, shape, start = expected
    if saved != {"shape": shape, "start": start} or tensor.shape != local.shape or not _same_kind(tensor, local):
        raise InputError(
            f"{path}: tensor '{name}' was saved as {saved} (here {tuple(tensor.shape)} {tensor.dtype}), but this "
            f"rank holds {tuple(local.shape)} {local.dtype} of shape {shape} from row {start}: it was saved from "
            f"another config or layout"
        )


def _same_kind(tensor: Tensor, local: Tensor) -> bool:
    """Any float loads into a float (an F32 header retyped I32 would load its bits as integers)."""
    return tensor.dtype == local.dtype or (tensor.is_floating_point() and local.is_floating_point())

"""Checkpoints, safetensors only: nothing is ever unpickled.

Pretrained folder (`save_pretrained` / `load_pretrained`):
    config.json                    the ModelConfig
    model.safetensors              weights and persistent buffers (the routers' expert_bias)
    or model-0000i-of-0000n.safetensors + model.safetensors.index.json above max_shard_bytes
                                   (the Hugging Face sharded layout: {"weight_map": {name: file}})

Training checkpoint (`save_checkpoint` / `load_checkpoint`), one folder per step:
    checkpoints/step_00000040/
        config.json, model.safetensors   a pretrained folder: from_pretrained and generate read it
        optimizer.safetensors            "{param name}.{state key}" -> tensor (AdamW: step,
                                         exp_avg, exp_avg_sq), so no pickled state dict
        trainer.json                     step, RNG states, data position, run arguments, the
                                         sha256 of every other file (to catch torn or corrupt files)
                                         and of its own content (files.seal_trainer_state)

Every file is written to a temporary name, fsynced and renamed (files.py); a training
checkpoint is built in `step_X.tmp` and renamed to `step_X` only when complete, and older
checkpoints are pruned only after that (`begin_checkpoint` / `commit_checkpoint`, the one
commit routine both writers use). A run killed mid-save leaves the previous checkpoint intact;
a save that fails (disk full) removes its temporary folder and raises the OSError; the next
save clears what a killed one left (`clear_leftovers`), and nothing a save leaves blocks a resume.

Reading trusts nothing in the folder: every file must be a regular file inside it (files.py),
every tensor must have the name, shape and kind of dtype the model expects, and a training
checkpoint's files must match trainer.json's checksums, trainer.json its own. A pretrained
folder that holds anything is not written into unless `overwrite=True`, and then only its
model files (config.json, model*.safetensors, the index) are replaced: nothing else is deleted.

Under torchrun each rank writes its own slices instead (moe/distributed/checkpoint.py, in the
layout of sharded.py); trainer.json then records the layout under "parallel", and
load_pretrained assembles the full weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ..config import config_from_dict
from ..errors import InputError, excerpt
from ..model import Transformer
from .files import (
    TRAINER_FILE,
    check_destination,
    checked_bytes,
    folder_file,
    fsync_dir,
    read_json,
    read_safetensors,
    read_trainer_state,
    seal_trainer_state,
    sha256,
    write_atomic,
)
from .sharded import read_full_model

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MAX_SHARD_BYTES = 2 * 1024**3
_STEP_DIR = re.compile(r"step_(\d+)")
_MODEL_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


# --------------------------------------------------------------------------- model weights


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers by name, a tensor tied to an earlier one left out
    (safetensors refuses shared storage; loading the first name restores both)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            state[name] = tensor.detach().contiguous()
    return state


def load_model_state(
    model: nn.Module, tensors: dict[str, Tensor], source: str, files: dict[str, str] | None = None
) -> None:
    """Copy tensors into model, naming the first missing, extra, mis-shaped or mistyped tensor
    (and its file: `files` maps a name to it where the tensors come from several)."""
    files = files or {}
    expected = model_state(model)
    for name, tensor in expected.items():
        if name not in tensors:
            raise InputError(f"{source} has no tensor '{name}': it was saved from another config")
        got, where = tensors[name], files.get(name, source)
        if tuple(got.shape) != tuple(tensor.shape):
            raise InputError(
                f"{where}: tensor '{name}' has shape {tuple(got.shape)} but the "
                f"model built from the config expects {tuple(tensor.shape)}: it was saved "
                f"from another config"
            )
        # Any float dtype loads into a float tensor (a bf16 export into the fp32 model built here);
        # anything else must match exactly: an F32 header retyped I32 would load its bits as integers.
        if got.dtype != tensor.dtype and not (got.is_floating_point() and tensor.is_floating_point()):
            raise InputError(
                f"{where}: tensor '{name}' is {str(got.dtype).removeprefix('torch.')} but the model expects "
                f"{str(tensor.dtype).removeprefix('torch.')}: a retyped or corrupt header"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise InputError(f"{source} has tensor '{extra[0]}' that the model does not: it was saved from another config")
    model.load_state_dict(tensors, strict=False)  # strict=False only for the tied names left out


def save_pretrained(
    model: nn.Module, directory: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False
) -> None:
    """config.json + model.safetensors (sharded above max_shard_bytes) in `directory`, which must
    be empty or absent unless overwrite=True (then its model files are replaced, nothing else)."""
    directory = Path(directory)
    check_destination(directory, overwrite, "pass overwrite=True to replace the model files in it")
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu() for k, v in model_state(model).items()}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    stale = {p for p in directory.iterdir() if _MODEL_FILES.fullmatch(p.name)}  # an earlier save's, nothing else
    if len(shards) == 1:
        written = [directory / MODEL_FILE]
        write_atomic(written[0], st_save(state, metadata={"format": "pt"}))
    else:
        written, weight_map = [], {}
        for i, shard in enumerate(shards, 1):
            written.append(directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors")
            write_atomic(written[-1], st_save(shard, metadata={"format": "pt"}))
            weight_map.update({name: written[-1].name for name in shard})
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": weight_map,
        }
        written.append(directory / INDEX_FILE)
        write_atomic(written[-1], json.dumps(index, indent=2).encode())
    write_atomic(directory / CONFIG_FILE, config_bytes(model))
    for path in stale - set(written):
        path.unlink(missing_ok=True)


def config_bytes(model: nn.Module) -> bytes:
    """config.json's contents: the model's ModelConfig."""
    return json.dumps(model.config.to_dict(), indent=2).encode()


def read_model_tensors(directory: Path) -> dict[str, Tensor]:
    """The weights of a pretrained folder, single file or sharded (checksummed in a training checkpoint)."""
    return _read_model_files(Path(directory))[0]


def _read_model_files(directory: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, the file each came from) of a pretrained folder or a training checkpoint."""
    tensors: dict[str, Tensor] = {}
    files: dict[str, str] = {}
    if os.path.lexists(directory / TRAINER_FILE):
        state = read_trainer_state(directory)
        if "parallel" in state:  # written by several ranks under torchrun
            return read_full_model(directory, state), {}
        data = checked_bytes(directory, MODEL_FILE, state)
        tensors = read_safetensors(directory / MODEL_FILE, data)
        return tensors, dict.fromkeys(tensors, str(directory / MODEL_FILE))
    if os.path.lexists(directory / INDEX_FILE):
        weight_map = _weight_map(directory)
        for file in sorted(set(weight_map.values())):
            path = folder_file(directory, file, f"shard named by {INDEX_FILE}")
            for name, tensor in read_safetensors(path).items():
                if weight_map.get(name) != file:
                    raise InputError(
                        f"{path} holds tensor '{name}', which {INDEX_FILE} assigns to {weight_map.get(name)}"
                    )
                tensors[name], files[name] = tensor, str(path)
        return tensors, files
    path = folder_file(directory, MODEL_FILE, "checkpoint file")
    tensors = read_safetensors(path)
    return tensors, dict.fromkeys(tensors, str(path))


def _weight_map(directory: Path) -> dict[str, str]:
    """The index's {tensor name: file name}, every name and file a string."""
    path = folder_file(directory, INDEX_FILE, "checkpoint file")
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{path}: 'weight_map' = {excerpt(weight_map)} is not a map of tensor names to files")
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad:
        raise InputError(f"{path}: tensor '{excerpt(bad[0])}' maps to {excerpt(bad[1])}, not a file name")
    return weight_map


def load_pretrained(directory: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """The Transformer saved in `directory` by save_pretrained (or a training checkpoint)."""
    directory = Path(directory)
    if not os.path.lexists(directory / CONFIG_FILE):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not a saved model folder")
    config_path = folder_file(directory, CONFIG_FILE, "checkpoint file")
    try:
        config = config_from_dict(read_json(config_path))
    except InputError:
        raise
    except (ValueError, TypeError) as e:  # the config's own checks name the key, not the file
        raise InputError(f"{config_path}: {e}") from None
    model = Transformer(config)
    tensors, files = _read_model_files(directory)
    load_model_state(model, tensors, str(directory), files)
    return model.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- optimizer


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The optimizer's per-parameter state as "{param name}.{state key}" -> tensor."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            out[f"{names[id(param)]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return out


def load_optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], source: str
) -> None:
    """Inverse of optimizer_tensors; hyperparameters stay those the optimizer was built with."""
    state_dict = optimizer.state_dict()
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    index_of = {}  # state_dict() numbers parameters across groups; map names to those numbers
    for group_sd, group in zip(state_dict["param_groups"], optimizer.param_groups):
        index_of.update({names[id(p)]: i for i, p in zip(group_sd["params"], group["params"])})
    state: dict[int, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, state_key = key.rpartition(".")
        if name not in params:
            raise InputError(f"{source} holds optimizer state for '{name}', which the model does not have")
        if tensor.dim() and tuple(tensor.shape) != tuple(params[name].shape):
            raise InputError(
                f"{source}: optimizer tensor '{key}' has shape {tuple(tensor.shape)} but "
                f"parameter '{name}' has {tuple(params[name].shape)}"
            )
        if tensor.dtype == torch.bool or tensor.is_complex() or (tensor.dim() and not tensor.is_floating_point()):
            raise InputError(
                f"{source}: optimizer tensor '{key}' is {str(tensor.dtype).removeprefix('torch.')}, "
                "but optimizer moments are floats: a retyped or corrupt header"
            )
        state.setdefault(index_of[name], {})[state_key] = tensor
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


# --------------------------------------------------------------------------- training checkpoints


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under root (a temporary folder or a symlink never matches), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, a run folder or a run's checkpoints/ folder (latest)."""
    path = Path(path)
    if (path / TRAINER_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = checkpoint_dirs(root)
        if found:
            return found[-1]
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raise FileNotFoundError(f"no checkpoint in {path} (expected {TRAINER_FILE} or checkpoints/step_*/)")


def checkpoint_folders(root: Path, step: int) -> tuple[Path, Path]:
    """(temporary folder, final folder) of the checkpoint of `step` under root."""
    final = root / f"step_{step:08d}"
    return root / f"{final.name}.tmp", final


def clear_leftovers(root: Path) -> list[str]:
    """Remove what killed or failed saves left under root (step_X.tmp folders with their partial
    files, or anything else of that name); returns their names. Complete checkpoints are never
    touched: a save's temporary folder only becomes step_X by the rename that completes it."""
    removed = []
    for leftover in sorted(Path(root).glob("step_*.tmp")) if Path(root).is_dir() else []:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()  # a file or a symlink of that name: never followed
        removed.append(leftover.name)
    return removed


def begin_checkpoint(tmp: Path) -> None:
    """Create the temporary folder for a checkpoint's files, clearing what killed saves left.
    One process calls it, before any file is written."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(tmp.parent)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if os.path.lexists(final):
        raise FileExistsError(f"checkpoint {final} already exists; move it away to save step {final.name[5:]} again")
    tmp.mkdir()


def commit_checkpoint(
    tmp: Path, final: Path, model: nn.Module, trainer_state: dict[str, Any], sha: dict[str, str], keep_last: int
) -> Path:
    """Write config.json and trainer.json (with the sha256 of every file) into tmp, rename it to
    final (the commit point: before it the folder is step_X.tmp, after it step_X), then prune
    all but the newest keep_last checkpoints. Called once, after every file of tmp is written."""
    config = config_bytes(model)
    write_atomic(tmp / CONFIG_FILE, config)
    state = {**trainer_state, "sha256": {**sha, CONFIG_FILE: sha256(config)}}
    write_atomic(tmp / TRAINER_FILE, seal_trainer_state(state))
    os.replace(tmp, final)
    fsync_dir(final.parent)
    for old in checkpoint_dirs(final.parent)[:-keep_last]:
        if old != final:
            shutil.rmtree(old)
    return final


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write checkpoint `root/step_{step}` atomically, then keep only the newest keep_last.
    If a write fails (disk full), the temporary folder is removed and the OSError raised: the
    previous checkpoints stay as they were."""
    tmp, final = checkpoint_folders(Path(root), step)
    begin_checkpoint(tmp)
    try:
        files = {
            MODEL_FILE: st_save({k: v.cpu() for k, v in model_state(model).items()}, metadata={"format": "pt"}),
            OPTIMIZER_FILE: st_save(optimizer_tensors(model, optimizer)),
        }
        for name, data in files.items():
            write_atomic(tmp / name, data)
        sha = {name: sha256(data) for name, data in files.items()}
        return commit_checkpoint(tmp, final, model, {"step": step, **trainer_state}, sha, keep_last)
    finally:
        if tmp.exists():  # not committed: a failed save leaves nothing behind
            shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore model (and optimizer) from a checkpoint folder; returns trainer.json's contents
    (verified: its own checksum, step and tokens counts, the checksums of the other files)."""
    path = Path(path)
    state = read_trainer_state(path)
    if "parallel" in state:
        raise InputError(
            f"{path} is a sharded checkpoint of {state['parallel']['world']} ranks: resume it under "
            f"torchrun with the same layout (from_pretrained and generate read its weights anywhere)"
        )
    model_path = path / MODEL_FILE
    load_model_state(model, read_safetensors(model_path, checked_bytes(path, MODEL_FILE, state)), str(model_path))
    if optimizer is not None:
        opt_path = path / OPTIMIZER_FILE
        tensors = read_safetensors(opt_path, checked_bytes(path, OPTIMIZER_FILE, state))
        load_optimizer_tensors(model, optimizer, tensors, str(opt_path))
    return state

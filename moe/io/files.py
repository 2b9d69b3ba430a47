"""Files that are never seen half-written, and folders that are closed.

Writes: every file goes to a temporary name, is fsynced and renamed over the target, so a
reader (or a run killed mid-write) sees the old file or the new one. A write that fails (the
disk is full) removes its temporary file and raises an OSError naming the path. A folder is
replaced whole (`swap_folder`): the new one is written beside it, then renamed in.

Reads: a model or checkpoint folder is untrusted input. Every file read from it, and every
file its index names, must resolve inside it (no `..`, no absolute path, no symlink out of it)
and be a regular file: never a FIFO (a read would wait forever), a device (/dev/zero never
ends) or a folder. Sizes come from the file's own stat before a byte is read; JSON files are
capped. A bad file is one InputError (FileNotFoundError when absent) naming its path. One
exception to "inside": a Hugging Face hub cache snapshot (`models--org--name/snapshots/REV/`),
whose files are symlinks into the repository's `blobs/` folder, may resolve there.

trainer.json, a training checkpoint's state, carries the sha256 of every other file of the
checkpoint and one of its own content (`seal_trainer_state`): an edit of any file, trainer.json
included, is caught when the checkpoint is read (`read_trainer_state`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from torch import Tensor

from ..errors import InputError, excerpt

TRAINER_FILE = "trainer.json"  # a training checkpoint's state, with the sha256 of its other files
TRAINER_CHECKSUM = "trainer_sha256"  # trainer.json's key for the sha256 of its own content
JSON_BYTES = 64 * 2**20  # the largest JSON file read (a 90k-tensor index.json is about 10 MB)
MAX_COUNT = 2**62  # steps and tokens: anything larger is not a count a run reached
_STEP_DIR = re.compile(r"step_(\d+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------- writing


def write_atomic(path: Path, data: bytes) -> None:
    """Write to path.tmp, fsync, rename over path: readers see the old file or the new one.
    On failure (ENOSPC, EIO, ...) the temporary file is removed and the OSError names `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover, possibly a symlink: O_EXCL never writes through one
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e  # the same subclass, now naming the path
        raise
    fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[: 2**30]) :]  # os.write may write less than asked


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_destination(directory: Path, overwrite: bool, hint: str) -> None:
    """Refuse to write into a folder that holds anything unless told to overwrite (`hint` says how)."""
    directory = Path(directory)
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise InputError(f"{directory} exists and is not a folder")
    if not overwrite and directory.is_dir():
        held = sorted(p.name for p in directory.iterdir())
        if held:
            shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
            raise InputError(f"{directory} is not empty (it holds {shown}): {hint}")


def swap_folder(new: Path, dst: Path) -> None:
    """Put the complete folder `new` at `dst` (same parent): rename the old dst away, rename
    new in, then delete the old one. A crash leaves dst old or new, or (between the renames)
    both complete under their temporary names; never a mix of the two."""
    parent = dst.parent
    if not dst.exists():
        os.rename(new, dst)
        fsync_dir(parent)
        return
    old = parent / f".{dst.name}.old-{os.getpid()}"
    os.rename(dst, old)
    try:
        os.rename(new, dst)
    except BaseException:
        os.rename(old, dst)  # put the old one back: dst is never left missing by a failed swap
        raise
    fsync_dir(parent)
    shutil.rmtree(old)


# --------------------------------------------------------------------------- reading


def folder_file(directory: str | Path, name: object, what: str = "file") -> Path:
    """`directory / name`, refused unless it resolves to a regular file inside `directory`:
    `name` comes from untrusted input (an index, a checkpoint's own listing)."""
    directory = Path(directory)
    if not isinstance(name, str) or not name or "\0" in name:
        raise InputError(f"{directory}: {what} name {excerpt(name, 300)} is not a file name")
    if os.path.isabs(name) or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise InputError(f"{directory}: {what} {excerpt(name, 300)} points outside the folder (absolute path or '..')")
    path = directory / name
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(root) for root in _roots(directory)):
        raise InputError(f"{path}: a symlink to {excerpt(str(real), 400)}, outside the folder {directory}")
    if not os.path.lexists(real):
        raise FileNotFoundError(f"{what} not found: {path}")
    _regular(path)
    return path


def _roots(directory: Path) -> list[Path]:
    """Where the files of `directory` may resolve: the folder itself, and for a hub cache
    snapshot the repository's blobs/ folder that its symlinks point into."""
    root = Path(os.path.realpath(directory))
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and blobs.is_dir():
        return [root, Path(os.path.realpath(blobs))]
    return [root]


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device")]
    kinds += [(stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a file")


def read_file(path: str | Path, limit: int | None = None) -> bytes:
    """A regular file's bytes, at most `limit`. O_NONBLOCK: a FIFO opens at once (and is then
    refused) instead of waiting for a writer; the size comes from fstat before reading."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: not a regular file ({_kind(st.st_mode)}); refused without reading it")
        if limit is not None and st.st_size > limit:
            raise InputError(f"{path}: {st.st_size:,} bytes, more than the {limit:,} a file of its kind may have")
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 2**30))
            if not chunk:
                raise InputError(f"{path}: shorter than its size ({st.st_size:,} bytes): truncated while read")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_safetensors(path: Path, data: bytes | None = None) -> dict[str, Tensor]:
    """All tensors of a safetensors file (on CPU), from `data` (its bytes, already read and
    checksummed) or from the file. safetensors checks the header against the file (header
    length, every offset inside the data, sizes that match dtype x shape) before it reads or
    allocates a tensor; a failure is one InputError naming the path."""
    try:
        if data is not None:
            return st_load(data)
        _regular(path)
        with safe_open(path, framework="pt") as f:  # maps the file: the header is checked first
            return {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise InputError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def _regular(path: Path) -> None:
    """Refuse anything but a regular file (after symlinks) without opening it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a regular file ({_kind(mode)}); refused without reading it")


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's bytes (already checked by read_safetensors)."""
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def read_json(path: Path, limit: int = JSON_BYTES) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(read_file(path, limit))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: malformed JSON, truncated or corrupt ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- trainer.json


def seal_trainer_state(state: dict[str, Any]) -> bytes:
    """trainer.json's bytes: `state` and, under TRAINER_CHECKSUM, the sha256 of its own content."""
    body = json.loads(json.dumps({k: v for k, v in state.items() if k != TRAINER_CHECKSUM}))  # as read back
    return json.dumps({**body, TRAINER_CHECKSUM: _digest(body)}, indent=2).encode()


def _digest(body: dict[str, Any]) -> str:
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    """trainer.json of a checkpoint folder, its own checksum verified and its fields checked."""
    path = folder_file(directory, TRAINER_FILE, "checkpoint file")
    state = read_json(path)
    claimed = state.pop(TRAINER_CHECKSUM, None)
    if claimed is None:
        raise InputError(
            f"{path}: no '{TRAINER_CHECKSUM}' (the checksum of its own content): edited, or written by an older moe"
        )
    if claimed != _digest(state):
        raise InputError(f"{path}: contents differ from its own checksum '{TRAINER_CHECKSUM}' (edited or corrupt)")
    _check_trainer_state(path, state)
    return state


def _check_trainer_state(path: Path, state: dict[str, Any]) -> None:
    """Types and ranges of the fields the io side uses (the trainer checks its own)."""
    for key in ("step", "tokens"):
        value = state.get(key, 0 if key == "tokens" else None)  # tokens: only the trainer records them
        if not _is_count(value):
            raise InputError(f"{path}: '{key}' = {excerpt(value)} is not a count (an integer from 0 to 2**62)")
    named = _STEP_DIR.fullmatch(path.parent.name)
    if named and int(named.group(1)) != state["step"]:
        raise InputError(f"{path}: 'step' = {state['step']} but the folder is {path.parent.name}")
    elapsed = state.get("elapsed_s", 0.0)
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not 0 <= elapsed < math.inf:
        raise InputError(f"{path}: 'elapsed_s' = {excerpt(elapsed)} is not a duration in seconds")
    sums = state.get("sha256")
    if not isinstance(sums, dict) or not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in sums.values()):
        raise InputError(f"{path}: 'sha256' = {excerpt(sums)} is not a map of file names to sha256 digests")
    if "parallel" in state:
        layout = state["parallel"]
        sizes = [layout.get(k) for k in ("world", "dp", "ep")] if isinstance(layout, dict) else []
        counts = [n for n in sizes if _is_count(n) and 1 <= n <= 2**16]
        if len(counts) != 3 or counts[0] != counts[1] * counts[2]:
            raise InputError(f"{path}: 'parallel' = {excerpt(layout)} is not a layout {{world, dp, ep}}, world = dp*ep")
        if not isinstance(state.get("rng"), list) or len(state["rng"]) != layout["world"]:
            raise InputError(f"{path}: 'rng' must list one RNG state per rank ({layout['world']})")


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def checked_bytes(directory: Path, name: str, trainer_state: dict[str, Any]) -> bytes:
    """The bytes of a file of a checkpoint folder, verified against the sha256 trainer.json
    recorded for it (trainer_state from read_trainer_state)."""
    path = folder_file(directory, name, "checkpoint file")
    data = read_file(path)
    if sha256(data) != trainer_state.get("sha256", {}).get(name):
        raise InputError(f"{path}: contents differ from the checksum in {TRAINER_FILE} (truncated or corrupt)")
    return data

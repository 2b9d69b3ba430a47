"""Training data: the corpus, its deterministic train/validation split, and batch sampling.

Legend: B = sequences in a batch, S = tokens per training sequence, S1 = S + 1 tokens per window
(the inputs and, shifted by one, the targets).

The default corpus is the Python standard library's own source, read as bytes (vocab 256),
so every machine has it and nothing is downloaded. Any of these replaces it:
- a text file (memory-mapped: its bytes are the tokens), or a folder of text files (read on
  demand as one stream, files in sorted path order: byte_files.py);
- a token file: `.npy` (uint16 / uint32, dtype from its header) or raw `.bin` (a flat
  uint16 or uint32 memmap, as nanoGPT writes them; the dtype is given by the caller).
Nothing is read whole into memory, so a corpus of gigabytes costs page cache, not RAM. Only
regular files are read (a FIFO or a device file is refused by name).

Split: the token stream is cut into 100 equal pieces and every `1 / val_fraction`-th piece
(evenly spread) is validation, so both splits sample the whole corpus. A split is a list
of (start, end) ranges of the stream, read in place: a memmap is never copied.

Sampling is counter-based: batch number `position` of rank `rank` is drawn from
`numpy.random.default_rng((seed, rank, position))`, so the sampler's whole state is one
integer and a resumed run draws exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import math
import os
import stat
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, excerpt
from .byte_files import ByteFiles

NUM_PIECES = 100
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
# Directories of the stdlib that are not the standard library's own code.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files (no test suites, no installed packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _STDLIB_SKIP]  # prune, do not descend
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@dataclass
class Corpus:
    # [corpus length] uint8 (bytes), uint16 or uint32: a read-only memmap, or ByteFiles for a folder.
    # Never a copy of the whole corpus in memory: a multi-GB corpus costs only page cache.
    tokens: np.ndarray | ByteFiles
    source: str  # what was read, for the run record
    is_bytes: bool  # byte-level: bits per token are bits per byte

    @property
    def max_token(self) -> int:
        return int(self.tokens.max())


def load_corpus(path: str | Path | None = None, token_dtype: str = "uint16") -> Corpus:
    """Open the corpus at `path` (None: the standard library's source), without reading it whole."""
    if path is None:
        files = stdlib_files()
        if not files:
            raise FileNotFoundError(f"no Python sources under {sysconfig.get_paths()['stdlib']}")
        return Corpus(ByteFiles(files), f"python stdlib ({len(files)} files)", True)
    path = Path(path)
    if path.is_dir():
        files = folder_files(path)
        if not files or not any(p.stat().st_size for p in files):
            raise InputError(f"data folder {path} holds no non-empty files")
        return Corpus(ByteFiles(files), f"{path} ({len(files)} files)", True)
    _check_regular(path)
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"data file {path} is empty")
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise InputError(f"{path}: not a readable .npy token file ({str(e).splitlines()[0]})") from None
        if not isinstance(tokens, np.ndarray) or tokens.dtype not in (np.uint16, np.uint32) or tokens.ndim != 1:
            raise InputError(
                f"{path}: token file must be a 1-D uint16 or uint32 array, got "
                f"{getattr(tokens, 'dtype', type(tokens).__name__)} with shape {getattr(tokens, 'shape', '?')}"
            )
        if not tokens.size:
            raise InputError(f"data file {path} holds no tokens")
        return Corpus(tokens, str(path), False)
    if path.suffix == ".bin":
        if token_dtype not in TOKEN_DTYPES:
            raise InputError(f"--token-dtype must be one of {', '.join(TOKEN_DTYPES)}, got {excerpt(token_dtype)}")
        dtype = TOKEN_DTYPES[token_dtype]
        if size % np.dtype(dtype).itemsize:
            raise InputError(f"{path}: size {size} bytes is not a whole number of {token_dtype}")
        return Corpus(np.memmap(path, dtype=dtype, mode="r"), f"{path} ({token_dtype})", False)
    # Text: its bytes are the tokens, so the file itself, mapped, is the token array.
    return Corpus(np.memmap(path, dtype=np.uint8, mode="r"), str(path), True)


def folder_files(folder: Path) -> list[Path]:
    """The files of a data folder, hidden ones (a part starting with '.') left out, in path order;
    every one must be a regular file (a FIFO or a device would block or never end)."""
    files = []
    for parent, subfolders, names in os.walk(folder):  # symlinked folders are listed, not entered
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                files.append(Path(parent) / name)
    for p in files:
        _check_regular(p)
    return sorted(files, key=lambda p: p.relative_to(folder).parts)


def _check_regular(path: Path) -> None:
    """Raise unless path (its target, for a link) is a regular file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(
            f"data not found: {path}" + (" (a broken symbolic link)" if path.is_symlink() else "")
        ) from None
    if not stat.S_ISREG(mode):
        kind = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
        what = kind.get(stat.S_IFMT(mode), "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise InputError(f"data {path} is {what}: --data takes a regular file or a folder of them")


def check_vocab(corpus: Corpus, vocab_size: int) -> None:
    """Raise if a token id of the corpus has no embedding in a model of this vocabulary."""
    if corpus.is_bytes and vocab_size >= 256:
        return  # every byte fits: no need to scan a corpus of gigabytes
    if corpus.max_token >= vocab_size:
        raise InputError(
            f"token id {corpus.max_token} in {corpus.source} is outside the vocabulary "
            f"(config vocab_size = {vocab_size})"
        )


def check_length(corpus: Corpus, val_fraction: float, seq_len: int, world_size: int = 1) -> None:
    """Raise, naming the corpus, if either split is too short for one window of seq_len + 1 tokens
    (per rank, for training)."""
    train, val = split_ranges(len(corpus.tokens), val_fraction)
    for split, ranges, need in (("training", train, seq_len + world_size), ("validation", val, seq_len + 1)):
        have = sum(e - s for s, e in ranges)
        if have < need:
            raise InputError(
                f"data {corpus.source} is too short: its {split} split has {have:,} tokens, fewer than the "
                f"{need:,} that sequences of --seq-len {seq_len} need (use more data or a smaller --seq-len)"
            )


# --------------------------------------------------------------------------- split


def split_ranges(num_tokens: int, val_fraction: float) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train ranges, validation ranges) of a stream of `num_tokens`.

    Piece i of NUM_PIECES is validation when floor((i+1) f) > floor(i f): exactly
    round(NUM_PIECES * f) pieces, evenly spread (f = 0.1: pieces 9, 19, ..., 99).
    """
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in (0, 1), got {excerpt(val_fraction)}")
    bounds = np.linspace(0, num_tokens, NUM_PIECES + 1).astype(np.int64)
    train, val = [], []
    for i in range(NUM_PIECES):
        is_val = math.floor((i + 1) * val_fraction + 1e-9) > math.floor(i * val_fraction + 1e-9)
        if bounds[i + 1] > bounds[i]:
            (val if is_val else train).append((int(bounds[i]), int(bounds[i + 1])))
    return train, val


class TokenView:
    """Ranges of a token array read as one virtual stream, without copying them."""

    def __init__(self, tokens: np.ndarray | ByteFiles, ranges: list[tuple[int, int]]):
        self.tokens = tokens
        self.starts = np.array([s for s, _ in ranges], dtype=np.int64)
        lengths = np.array([e - s for s, e in ranges], dtype=np.int64)
        self.vstarts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        self.length = int(lengths.sum())

    def __len__(self) -> int:
        return self.length

    def windows(self, offsets_B: np.ndarray, width: int) -> Tensor:
        """Tokens [offset, offset + width) of the virtual stream for each offset: [B, S1 = width] int64."""
        virtual_BS1 = offsets_B[:, None] + np.arange(width, dtype=np.int64)[None, :]
        piece_BS1 = np.searchsorted(self.vstarts, virtual_BS1, side="right") - 1
        real_BS1 = self.starts[piece_BS1] + (virtual_BS1 - self.vstarts[piece_BS1])
        return torch.from_numpy(self.tokens[real_BS1].astype(np.int64))


# --------------------------------------------------------------------------- sampling


class BatchSampler:
    """Random training windows; rank r of world_size draws only from its own 1/world_size
    of the window offsets, with its own random stream."""

    def __init__(
        self, view: TokenView, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        num_offsets = len(view) - seq_len  # each window holds seq_len + 1 tokens (inputs + next)
        if num_offsets < world_size:
            raise InputError(
                f"the training split has {len(view)} tokens, too few for sequences of "
                f"{seq_len} + 1 tokens (use a larger corpus or a smaller --seq-len)"
            )
        self.view, self.batch_size, self.seq_len, self.seed = view, batch_size, seq_len, seed
        self.rank = rank
        self.low = rank * num_offsets // world_size
        self.high = (rank + 1) * num_offsets // world_size
        self.position = 0  # batches drawn so far: the sampler's whole state

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(inputs [B, S], targets [B, S]) int64: targets are the inputs shifted by one."""
        rng = np.random.default_rng((self.seed, self.rank, self.position))
        offsets_B = rng.integers(self.low, self.high, size=self.batch_size, dtype=np.int64)
        self.position += 1
        w_BS1 = self.view.windows(offsets_B, self.seq_len + 1)
        return w_BS1[:, :-1], w_BS1[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise InputError(f"checkpoint's data seed {state['seed']} differs from this run's ({self.seed})")
        self.position = int(state["position"])


def eval_batches(view: TokenView, batch_size: int, seq_len: int, num_batches: int) -> list[tuple[Tensor, Tensor]]:
    """A fixed validation set: batch_size * num_batches windows spread evenly over the split,
    the same at every evaluation, so validation losses are comparable across steps and runs."""
    num_offsets = len(view) - seq_len
    if num_offsets < 1:
        raise InputError(
            f"the validation split has {len(view)} tokens, too few for sequences of "
            f"{seq_len} + 1 tokens (use a larger corpus or a smaller --seq-len)"
        )
    offsets = np.linspace(0, num_offsets - 1, batch_size * num_batches).astype(np.int64)
    batches = []
    for chunk in np.array_split(offsets, num_batches):
        w_BS1 = view.windows(chunk, seq_len + 1)
        batches.append((w_BS1[:, :-1], w_BS1[:, 1:]))
    return batches

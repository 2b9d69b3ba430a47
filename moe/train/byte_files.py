"""The bytes of many files, read as one uint8 array without loading them into memory.

A folder of text files (or the standard library's sources) is a corpus of byte tokens: file 0's
bytes, then file 1's, and so on. Reading the whole folder into RAM does not scale to a folder of
gigabytes, and memory-mapping each file holds a descriptor per file, so this reads on demand:
indexing with an array of positions reads, per run of consecutive positions, one `os.pread` of
that file. A batch of B windows is about B reads.

    files = ByteFiles([Path("a.txt"), Path("b.txt")])   # sizes 1 and 3: bytes "A" + "BBB"
    files[np.array([[0, 1], [2, 3]])]                   # -> [[65, 66], [66, 66]] uint8
    files[1:3]                                          # -> [66, 66]

The sizes are taken once, when the corpus is opened: a file that shrinks afterwards is an error
that names it, never a silent shift of every later position.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError

_CHUNK = 1 << 24  # bytes per read when scanning a whole file (max, tobytes)


class ByteFiles:
    """Files concatenated into one read-only uint8 array of len() = sum of their sizes."""

    dtype = np.dtype(np.uint8)
    ndim = 1

    def __init__(self, files: list[Path]):
        sizes = [os.stat(p).st_size for p in files]
        self.files = [p for p, n in zip(files, sizes) if n]  # an empty file holds no position
        self.sizes = np.array([n for n in sizes if n], dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(self.sizes))).astype(np.int64)  # file i: [starts[i], starts[i+1])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def size(self) -> int:
        return len(self)

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("ByteFiles slices take no step")
            return self._read_range(start, max(start, stop))
        index = np.asarray(key)
        if not np.issubdtype(index.dtype, np.integer):
            raise IndexError(f"ByteFiles takes integer positions, got {index.dtype}")
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"position outside 0..{len(self) - 1}")
        if index.ndim == 0:
            return self._read_range(int(index), int(index) + 1)[0]
        unique, inverse = np.unique(index.ravel(), return_inverse=True)
        values = np.empty(unique.size, dtype=np.uint8)
        # Runs of consecutive positions within one file: each is one read.
        file_of = np.searchsorted(self.starts, unique, side="right") - 1
        breaks = np.flatnonzero((np.diff(unique) != 1) | (np.diff(file_of) != 0)) + 1
        for lo, hi in zip(np.concatenate(([0], breaks)), np.concatenate((breaks, [unique.size]))):
            f = int(file_of[lo])
            values[lo:hi] = self._pread(f, int(unique[lo] - self.starts[f]), int(hi - lo))
        return values[inverse].reshape(index.shape)

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        """Positions [start, stop) as one array (they may span several files)."""
        out = np.empty(stop - start, dtype=np.uint8)
        f = int(np.searchsorted(self.starts, start, side="right") - 1)
        pos = start
        while pos < stop:
            n = min(stop, int(self.starts[f + 1])) - pos
            out[pos - start : pos - start + n] = self._pread(f, int(pos - self.starts[f]), n)
            pos, f = pos + n, f + 1
        return out

    def _pread(self, f: int, offset: int, length: int) -> np.ndarray:
        path = self.files[f]
        parts, done = [], 0
        fd = os.open(path, os.O_RDONLY)
        try:
            while done < length:
                data = os.pread(fd, min(length - done, _CHUNK), offset + done)
                if not data:
                    raise InputError(
                        f"data file {path} is shorter than when the run opened it ({int(self.sizes[f])} bytes): "
                        f"it changed during training"
                    )
                parts.append(data)
                done += len(data)
        finally:
            os.close(fd)
        return np.frombuffer(b"".join(parts), dtype=np.uint8)

    def max(self) -> int:
        """The largest byte (a scan of every file, in chunks)."""
        return max(
            (int(self._read_range(s, min(s + _CHUNK, len(self))).max()) for s in range(0, len(self), _CHUNK)), default=0
        )

    def tobytes(self) -> bytes:
        return self._read_range(0, len(self)).tobytes()

"""One trainer per run folder: an advisory lock on <run>/.lock.

Two trainers writing one folder would interleave metrics.jsonl, prune each other's checkpoints
and, with --overwrite, delete the other's run. So the trainer takes the lock before it writes or
deletes anything in the folder, and a second trainer is refused with one line naming the holder:

    runs/tiny is in use by another trainer (held by pid 4242 on host gpu-7: runs/tiny/.lock); wait ...

The lock is `fcntl.flock` on the file, which the kernel drops when its holder exits, however it
exits: a lock file left by a killed run is simply taken over. The pid and host written into the
file are only for that message. On release the holder unlinks the file while still holding it;
a process that opened the old file meanwhile notices (its descriptor's inode is no longer the
path's) and opens the new one, so two processes never both believe they hold the folder.
Under torchrun rank 0 takes the lock for the whole job (the ranks share the folder).
Where fcntl does not exist (Windows) there is no lock.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from ..errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


class RunLock:
    """acquire() once (InputError if another process holds the folder), release() at the end."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LOCK_FILE
        self._fd: int | None = None
        self._made_dir = False

    def acquire(self) -> None:
        self._made_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return
        try:
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    os.close(fd)
                    raise InputError(
                        f"{self.run_dir} is in use by another trainer (held by {holder}: {self.path}); "
                        f"wait for it to finish, or train into another --out"
                    ) from None
                if _same_file(fd, self.path):
                    self._fd = fd
                else:  # its previous holder unlinked it after we opened it: lock the new file
                    os.close(fd)
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Unlink the lock file (while still holding it) and close it; remove the run folder too
        if acquire() created it and nothing else was written there. Safe to call twice."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        if self._made_dir:
            self._made_dir = False
            try:
                self.run_dir.rmdir()  # only if empty: a run that wrote files keeps its folder
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    """'pid P on host H' from the lock file's contents (written by the holder), or a fallback."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {int(info['pid'])} on host {str(info['host'])[:100]}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
        return "a process that has not written its pid yet"


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)

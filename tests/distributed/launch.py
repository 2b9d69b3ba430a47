"""Run a function on N CPU processes joined by gloo, with deadlines so nothing hangs.

    spawn(fn, world_size, *args, timeout=120)   # runs fn(rank, world_size, *args) in each

Each process joins the group through a file store in a fresh temporary folder (no port to
collide with), computes on one thread (the CI machine has two cores for everything), and
its collectives fail after `collective_timeout` seconds instead of waiting forever. A rank
that raises fails the launch at once: the other ranks are terminated, and the error names
the rank that failed first (its peers often fail a moment later, in the collective it left)
with its traceback. `timeout` bounds the whole launch.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """One rank of a launch raised, or the launch ran out of time."""


def spawn(fn, world_size: int, *args, timeout: float = 120.0, collective_timeout: float = 30.0) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/store"
        ctx = mp.start_processes(
            _run_rank,
            args=(fn, world_size, init, collective_timeout, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.2):  # raises as soon as one rank fails, killing the rest
                if time.monotonic() > deadline:
                    raise RankFailed(f"the {world_size} ranks did not finish within {timeout:.0f} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise RankFailed(_first_failure(Path(tmp)) or f"rank {e.error_index} failed: {e}") from None
        finally:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
                    process.join()


def _first_failure(folder: Path) -> str | None:
    """The error of the rank that failed first, from the files the ranks leave when they raise."""
    reports = []
    for path in folder.glob("rank*.error"):
        when, text = path.read_text().split("\n", 1)
        reports.append((float(when), int(path.stem[len("rank") :]), text))
    if not reports:
        return None
    reports.sort()
    later = f" (then rank {', '.join(str(r[1]) for r in reports[1:])})" if len(reports) > 1 else ""
    return f"rank {reports[0][1]} failed first{later}:\n{reports[0][2]}"


def _run_rank(rank: int, fn, world_size: int, init: str, collective_timeout: float, args: tuple) -> None:
    torch.set_num_threads(1)
    folder = Path(init.removeprefix("file://")).parent
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout)
    )
    try:
        fn(rank, world_size, *args)
    except BaseException:
        (folder / f"rank{rank}.error").write_text(f"{time.time():.6f}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()

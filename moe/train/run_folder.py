"""The run folder of `moe train`: where a run lives, when it may start there, and the RNG
state a checkpoint carries so that a resumed run draws the same numbers."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import torch

from ..io import checkpoint

RUN_FILES = ("run.json", "metrics.jsonl", "checkpoints", "loss.png", "expert_load.png")


def locate_run(name: str, out: str | None, resume: str | None, overwrite: bool) -> tuple[Path, Path | None, bool]:
    """(run folder, checkpoint to resume from, whether the run continues in its own folder)."""
    if not resume:
        run_dir = Path(out or f"runs/{name}")
        check_run_dir(run_dir, overwrite)
        return run_dir, None, False
    resume_from = checkpoint.resolve_checkpoint(resume)
    home = resume_from.parent.parent if resume_from.parent.name == "checkpoints" else None
    if out is None and home is None:
        raise ValueError(f"checkpoint {resume_from} is not inside a run folder: pass --out for the new run")
    run_dir = Path(out) if out else home
    continuing = home is not None and run_dir.resolve() == home.resolve()
    if continuing:
        newer = [p.name for p in checkpoint.checkpoint_dirs(resume_from.parent) if p.name > resume_from.name]
        if newer:
            raise ValueError(
                f"{run_dir} has checkpoints newer than {resume_from.name} ({', '.join(newer)}): "
                f"resume from the run folder, or move them away first"
            )
    else:
        check_run_dir(run_dir, overwrite)
    return run_dir, resume_from, continuing


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start a fresh run over another one unless told to overwrite it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"output {run_dir} exists and is not a folder")
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held and not overwrite:
        raise FileExistsError(
            f"{run_dir} holds another run ({', '.join(held)}); pass --resume {run_dir} "
            f"to continue it or --overwrite to replace it"
        )


def clear_run_dir(run_dir: Path) -> None:
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def rng_state() -> dict[str, Any]:
    encode = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    state = {"torch": encode(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [encode(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    decode = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(decode(state["torch"]))
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])

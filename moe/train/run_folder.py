"""The run folder of `moe train`: where a run lives, when it may start there, and the RNG
state a checkpoint carries so that a resumed run draws the same numbers.

Without --out a run lives in runs/<config name>. The name must then be one plain folder name
(moe.config_checks.NAME, the rule ModelConfig holds its name to; checked again here because a config's
fields can be assigned after it was validated): a config named `../..`,
`/etc` or `a/b` is refused rather than sanitised, since a silently renamed folder is a run the
user cannot find. --out is the user's explicit choice of folder and may be anywhere.
"""

from __future__ import annotations

import base64
import binascii
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config_checks import NAME
from ..errors import InputError, excerpt
from ..io import checkpoint

RUNS_ROOT = Path("runs")
RUN_FILES = ("run.json", "metrics.jsonl", "checkpoints", "loss.png", "expert_load.png", "tensorboard")


def default_run_dir(name: str) -> Path:
    """runs/<name>, for a config name that is one plain folder name (see the module docstring)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InputError(
            f"config name {excerpt(name)} cannot name a folder under {RUNS_ROOT}/ (up to 128 letters, digits, "
            f"'_', '.', '-', '+', starting with a letter, digit or '_'): rename it, or pass --out DIR"
        )
    return RUNS_ROOT / name


def locate_run(name: str, out: str | None, resume: str | None, overwrite: bool) -> tuple[Path, Path | None, bool]:
    """(run folder, checkpoint to resume from, whether the run continues in its own folder)."""
    if not resume:
        run_dir = Path(out) if out else default_run_dir(name)
        check_run_dir(run_dir, overwrite)
        return run_dir, None, False
    resume_from = checkpoint.resolve_checkpoint(resume)
    home = resume_from.parent.parent if resume_from.parent.name == "checkpoints" else None
    if out is None and home is None:
        raise InputError(f"checkpoint {resume_from} is not inside a run folder: pass --out for the new run")
    run_dir = Path(out) if out else home
    continuing = home is not None and run_dir.resolve() == home.resolve()
    if continuing:
        newer = [p.name for p in checkpoint.checkpoint_dirs(resume_from.parent) if p.name > resume_from.name]
        if newer:
            raise InputError(
                f"{run_dir} has checkpoints newer than {resume_from.name} ({', '.join(newer)}): "
                f"resume from the run folder, or move them away first"
            )
    else:
        check_run_dir(run_dir, overwrite)
    return run_dir, resume_from, continuing


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start a fresh run over another one unless told to overwrite it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"output {run_dir} exists and is not a folder")
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held and not overwrite:
        raise InputError(
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


def set_rng_state(state: dict[str, Any], source: str = "trainer.json") -> None:
    """Restore rng_state()'s output; a state that is not one (wrong type, bad base64, wrong
    length: a hand-edited or corrupt trainer.json) is an InputError naming `source`."""
    if not isinstance(state, dict) or not isinstance(state.get("torch"), str):
        raise InputError(f"{source}: 'rng' is not an RNG state (expected {{\"torch\": base64 string, ...}})")
    cuda = state.get("cuda", [])
    if not isinstance(cuda, list) or not all(isinstance(s, str) for s in cuda):
        raise InputError(f"{source}: 'rng.cuda' is not a list of RNG states")

    def decode(text: str, like: torch.Tensor, key: str) -> torch.Tensor:
        try:
            raw = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise InputError(f"{source}: '{key}' is not base64") from None
        if len(raw) != like.numel():
            raise InputError(f"{source}: '{key}' holds {len(raw)} bytes, not the {like.numel()} of an RNG state")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    cpu = decode(state["torch"], torch.get_rng_state(), "rng.torch")
    cuda_states = []
    if torch.cuda.is_available() and cuda:
        current = torch.cuda.get_rng_state_all()
        # one state per GPU of this machine (a checkpoint from a machine with more GPUs has extra)
        cuda_states = [decode(s, current[i], f"rng.cuda[{i}]") for i, s in enumerate(cuda[: len(current)])]
    torch.set_rng_state(cpu)
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)

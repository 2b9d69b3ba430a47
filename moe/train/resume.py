"""What a resumed run checks before it trusts a checkpoint.

A checkpoint folder is untrusted input: it may come from another config, or its trainer.json
may have been edited or cut short. Before the run folder is touched:

- the checkpoint's config.json must describe the model of the given config, key by key
  (`moe.top_k: checkpoint 2, --config 4`). Two keys may differ: `name` (it only names the
  run folder) and `moe.backend` (how the experts are computed, not what: a run trained with
  the Triton backend on a GPU resumes with the eager one on a CPU);
- trainer.json's step, tokens, elapsed time and data position must be non-negative numbers
  of the right type, the step must leave something to train before --steps, and --stop-at
  must come after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ModelConfig, config_from_dict
from ..errors import InputError, excerpt
from ..io import checkpoint
from ..io.files import TRAINER_FILE, read_json, read_trainer_state
from .args import TrainArgs

CONFIG_FILE = "config.json"
IGNORED_KEYS = ("name", "moe.backend")  # see the module docstring
_MAX_COUNT = 2**62  # far beyond any run, and within int64 (numpy's and torch's integers)


def checkpoint_config(resume: str | Path) -> ModelConfig:
    """The ModelConfig a run folder's latest checkpoint (or a checkpoint folder) was trained with."""
    path = checkpoint.resolve_checkpoint(resume) / CONFIG_FILE
    try:
        return config_from_dict(read_json(path))
    except InputError:
        raise
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None


def config_differences(saved: ModelConfig, given: ModelConfig) -> list[str]:
    """'key: checkpoint A, --config B' for every key (dotted: moe.top_k) whose values differ."""
    a, b = _flatten(saved.to_dict()), _flatten(given.to_dict())
    return [
        f"{key}: checkpoint {excerpt(a.get(key), 30)}, --config {excerpt(b.get(key), 30)}"
        for key in sorted(set(a) | set(b))
        if key not in IGNORED_KEYS and a.get(key) != b.get(key)
    ]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "rope_scaling":  # a nested config (moe:), not a value
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_resume(path: Path, config: ModelConfig, args: TrainArgs) -> None:
    """Raise InputError unless the checkpoint at `path` can continue this run (module docstring)."""
    saved = checkpoint_config(path)
    diffs = config_differences(saved, config)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise InputError(
            f"{path} was trained with another config: {'; '.join(diffs[:3])}{more}; "
            f"resume with the config it was trained with"
        )
    # its own checksum first (an edit is named as one), then the counters this run takes from it
    check_trainer_state(read_trainer_state(path), path / TRAINER_FILE, args)


def check_trainer_state(state: dict[str, Any], source: Path, args: TrainArgs) -> None:
    """What a resumed run takes from trainer.json (`source`) beyond what moe.io checks (step, tokens and
    elapsed_s are counts, the checksums): the data sampler's state and the step against this run's flags."""
    step = state["step"]
    data = state.get("data")
    if not isinstance(data, dict):
        raise InputError(f"{source}: 'data' must be the data sampler's state, got {excerpt(data)}")
    for key in ("position", "seed", "rank"):
        _count(data, key, source, prefix="data.")
    if step >= args.steps:
        raise InputError(
            f"{source.parent} is at step {step}, which already reaches --steps {args.steps}: nothing is left to "
            f"train (a larger --steps continues it, with the schedule stretched to the new length)"
        )
    if args.stop_at is not None and args.stop_at <= step:
        raise InputError(f"--stop-at {args.stop_at} is not after the checkpoint's step {step} ({source.parent})")


def _count(state: dict[str, Any], key: str, source: Path, prefix: str = "") -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_COUNT:
        raise InputError(f"{source}: '{prefix}{key}' must be a non-negative integer, got {excerpt(value)}")
    return value

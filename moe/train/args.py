"""TrainArgs: everything about a training run that is not the model (the CLI flags are its fields).

Every field is checked on construction, so a bad flag is refused with one line (an InputError
naming the flag) before the run folder is looked at, let alone written.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from ..device import check_device_name
from ..errors import InputError, excerpt

TOKEN_DTYPES = ("uint16", "uint32")  # of a raw .bin token file
MIN_VAL_FRACTION, MAX_VAL_FRACTION = 0.01, 0.99  # the corpus is cut into 100 pieces (data.py)


def _arg(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainArgs:
    """Everything about a training run that is not the model. The CLI flags are these fields."""

    out: str | None = _arg(None, "run folder (default runs/<config name>)")
    data: str | None = _arg(
        None,
        "text file, folder of text files, or token file (.npy, .bin); "
        "default: the Python standard library's source as bytes",
    )
    token_dtype: str = _arg("uint16", "dtype of a raw .bin token file: uint16 or uint32")
    val_fraction: float = _arg(0.1, "share of the corpus held out for validation, 0.01 to 0.99")
    steps: int = _arg(600, "optimizer steps; the learning-rate schedule spans them")
    batch_size: int = _arg(16, "sequences per micro-batch")
    seq_len: int | None = _arg(None, "tokens per sequence, at most the config's max_seq_len (default: max_seq_len)")
    grad_accum: int = _arg(1, "micro-batches per optimizer step")
    lr: float = _arg(3e-3, "peak learning rate")
    min_lr: float = _arg(3e-4, "learning rate at the end of the cosine decay, 0 to --lr")
    warmup_steps: int | None = _arg(None, "steps of linear warmup (default: 5%% of --steps)")
    weight_decay: float = _arg(0.1, "AdamW weight decay on matrices (not on norms or biases)")
    beta1: float = _arg(0.9, "AdamW beta1, in [0, 1)")
    beta2: float = _arg(0.95, "AdamW beta2, in [0, 1)")
    grad_clip: float = _arg(1.0, "clip the gradient norm to this (0: off)")
    eval_every: int = _arg(100, "steps between validation evaluations")
    eval_batches: int = _arg(8, "validation batches per evaluation (a fixed set)")
    log_every: int = _arg(10, "steps between metrics rows")
    save_every: int = _arg(200, "steps between checkpoints (one is always written at the end)")
    keep_last: int = _arg(3, "checkpoints kept")
    seed: int = _arg(0, "seed of the initialisation and of the data order")
    ep: int = _arg(
        1,
        "expert parallelism under torchrun: split each layer's experts over this many ranks "
        "(it must divide the number of processes; the rest is data parallelism)",
    )
    dist_timeout: float = _arg(600.0, "under torchrun: seconds a collective may wait before the run fails")
    device: str = _arg("auto", "cpu, cuda, cuda:N or auto")
    compile: bool = _arg(False, "torch.compile the model")
    resume: str | None = _arg(None, "continue the run in this folder (or from this checkpoint)")
    overwrite: bool = _arg(False, "replace a previous run in the output folder")
    stop_at: int | None = _arg(
        None, "stop after this step, as if interrupted (1 to --steps; the schedule still spans --steps)"
    )
    time_limit: float | None = _arg(None, "stop (and save) after this many seconds of training")
    progress: bool = _arg(True, "show a progress bar")
    plots: bool = _arg(True, "draw PNG plots from metrics.jsonl at the end")
    tensorboard: bool = _arg(
        False, "also write the metrics and the expert-load heatmap for TensorBoard (<run>/tensorboard)"
    )

    def __post_init__(self) -> None:
        _check_types(self)
        for key in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every", "save_every"):
            _require(self, key, getattr(self, key) >= 1, "must be a positive integer")
        _require(self, "keep_last", self.keep_last >= 1, "must be a positive integer (the run's last checkpoint)")
        _require(self, "ep", self.ep >= 1, "must be a positive integer")
        _require(self, "seed", self.seed >= 0, "must be a non-negative integer")
        _require(self, "seq_len", self.seq_len is None or self.seq_len >= 1, "must be a positive integer")
        _require(self, "lr", math.isfinite(self.lr) and self.lr > 0, "must be a positive number")
        _require(
            self,
            "min_lr",
            math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr,
            f"must be in [0, --lr {self.lr}]",
        )
        for key in ("weight_decay", "grad_clip"):
            _require(self, key, math.isfinite(getattr(self, key)) and getattr(self, key) >= 0, "must be a number >= 0")
        for key in ("beta1", "beta2"):
            _require(self, key, 0 <= getattr(self, key) < 1, "must be in [0, 1)")
        _require(
            self,
            "val_fraction",
            MIN_VAL_FRACTION <= self.val_fraction <= MAX_VAL_FRACTION,
            f"must be in [{MIN_VAL_FRACTION}, {MAX_VAL_FRACTION}] (the corpus is cut into 100 pieces)",
        )
        _require(
            self, "dist_timeout", math.isfinite(self.dist_timeout) and self.dist_timeout > 0, "must be positive seconds"
        )
        _require(
            self,
            "time_limit",
            self.time_limit is None or (math.isfinite(self.time_limit) and self.time_limit >= 0),
            "must be a number of seconds >= 0",
        )
        _require(
            self,
            "stop_at",
            self.stop_at is None or 1 <= self.stop_at <= self.steps,
            f"must be a step from 1 to --steps {self.steps}",
        )
        _require(self, "token_dtype", self.token_dtype in TOKEN_DTYPES, f"must be one of {', '.join(TOKEN_DTYPES)}")
        for key in ("out", "data", "resume"):
            _require(self, key, getattr(self, key) != "", "must not be empty")
        check_device_name(self.device)
        if self.warmup_steps is None:
            self.warmup_steps = self.steps // 20
        _require(self, "warmup_steps", self.warmup_steps >= 0, "must be a non-negative integer")


def flag(key: str) -> str:
    """The command-line spelling of a TrainArgs field: batch_size -> --batch-size."""
    return "--" + key.replace("_", "-")


def _require(args: TrainArgs, key: str, ok: bool, why: str) -> None:
    if not ok:
        raise InputError(f"{flag(key)} {why}, got {excerpt(getattr(args, key))}")


def _check_types(args: TrainArgs) -> None:
    """Each field has its annotated type (an int is accepted for a float and made one), so that a
    Python caller's TrainArgs(steps="10") fails here with the flag's name, not mid-run."""
    hints = typing.get_type_hints(TrainArgs)
    for f in fields(TrainArgs):
        value = getattr(args, f.name)
        kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)]
        if value is None and len(kinds) < len(typing.get_args(hints[f.name]) or (hints[f.name],)):
            continue  # an optional field left unset
        kind = kinds[0]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(args, f.name, float(value))
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InputError(
                f"{flag(f.name)} must be {'an' if kind is int else 'a'} {kind.__name__}, got {excerpt(value)}"
            )

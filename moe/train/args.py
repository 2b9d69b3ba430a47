"""TrainArgs: everything about a training run that is not the model (the CLI flags are its fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    val_fraction: float = _arg(0.1, "share of the corpus held out for validation")
    steps: int = _arg(600, "optimizer steps; the learning-rate schedule spans them")
    batch_size: int = _arg(16, "sequences per micro-batch")
    seq_len: int | None = _arg(None, "tokens per sequence (default: the config's max_seq_len)")
    grad_accum: int = _arg(1, "micro-batches per optimizer step")
    lr: float = _arg(3e-3, "peak learning rate")
    min_lr: float = _arg(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int | None = _arg(None, "steps of linear warmup (default: 5%% of --steps)")
    weight_decay: float = _arg(0.1, "AdamW weight decay on matrices (not on norms or biases)")
    beta1: float = _arg(0.9, "AdamW beta1")
    beta2: float = _arg(0.95, "AdamW beta2")
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
    stop_at: int | None = _arg(None, "stop after this step, as if interrupted (the schedule still spans --steps)")
    time_limit: float | None = _arg(None, "stop (and save) after this many seconds of training")
    progress: bool = _arg(True, "show a progress bar")
    plots: bool = _arg(True, "draw PNG plots from metrics.jsonl at the end")

    def __post_init__(self) -> None:
        for key in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "log_every",
            "save_every",
            "keep_last",
            "ep",
            "dist_timeout",
        ):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.seq_len is not None and self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if self.warmup_steps is None:
            self.warmup_steps = self.steps // 20
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

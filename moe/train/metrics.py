"""The run folder's metrics.jsonl: one JSON object per line, written as training goes.

Two kinds of rows; every row has `kind`, `step` (optimizer steps done), `tokens` (training
tokens consumed so far) and `elapsed_s` (training wall time so far, resumes included).

kind "train", every `log_every` steps:
    loss          cross-entropy of the step's batch (nats per token; mean over micro-batches)
    aux_loss      weighted sum of every MoE layer's balancing losses (what was added to the loss),
                  the MTP modules' MoE layers included
    mtp_loss      models with multi-token prediction only (num_mtp_layers > 0): the MTP cross-entropy,
                  mean over depths (unweighted; mtp_loss_coef times it was added to the loss)
    lr            learning rate of the step
    grad_norm     gradient norm before clipping
    tokens_per_s  training throughput since the previous train row
    drop_rate     share of routed assignments dropped by capacity, mean over MoE layers
    load_max_mean the worst MoE layer's max(load) / mean(load) (1.0 = perfectly balanced)
    layers        one entry per MoE layer: {"layer": block index, "load": [share of the
                  assignments per expert, sums to 1], "drop_rate": float, and each enabled
                  aux loss unweighted: "switch_aux", "seq_aux", "z_loss"}
                  (statistics of the step's last micro-batch)

kind "eval", at step 0, every `eval_every` steps and at the end:
    val_loss      mean cross-entropy on the fixed validation windows (nats per token)
    val_bpb       val_loss / ln 2 when the data are bytes (bits per byte), else null
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.files import write_atomic


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    rows, lines = [], path.read_bytes().decode("utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break  # a line cut short by a kill: drop it
            raise InputError(f"{path}: line {n} is not JSON") from None
        if not (isinstance(row, dict) and row.get("kind") in ("train", "eval") and type(row.get("step")) is int):
            raise InputError(f"{path}: line {n} is not a metrics row (a JSON object with kind and step)")
        rows.append(row)
    return rows


class MetricsLog:
    """Appends rows to metrics.jsonl, flushed per row so a killed run keeps what it logged."""

    def __init__(self, path: str | Path, keep_until_step: int | None = None):
        """keep_until_step: a resumed run first drops the rows logged after its checkpoint,
        so the file reads as one run whether or not it was interrupted."""
        self.path = Path(path)
        if keep_until_step is not None:
            kept = [r for r in read_rows(self.path) if r["step"] <= keep_until_step]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._file = open(self.path, "a")

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(row, allow_nan=True) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk says ENOSPC, not which file: name it
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def close(self) -> None:
        self._file.close()


def bits(loss_nats: float) -> float:
    return loss_nats / math.log(2)


def eval_endpoints(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The first and last eval rows (before and after training)."""
    evals = [r for r in rows if r["kind"] == "eval"]
    return (evals[0], evals[-1]) if evals else (None, None)


def final_load(rows: list[dict[str, Any]], last: int = 10) -> dict[int, list[float]]:
    """Per MoE layer, the expert load averaged over the last `last` train rows."""
    train = [r for r in rows if r["kind"] == "train" and r.get("layers")][-last:]
    out: dict[int, list[float]] = {}
    for r in train:
        for entry in r["layers"]:
            acc = out.setdefault(entry["layer"], [0.0] * len(entry["load"]))
            for i, share in enumerate(entry["load"]):
                acc[i] += share / len(train)
    return out

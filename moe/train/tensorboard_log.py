"""`moe train --tensorboard`: the metrics.jsonl rows, also as TensorBoard events in <run>/tensorboard/.

    tensorboard --logdir runs/tiny/tensorboard

Every row of metrics.jsonl (metrics.py) becomes scalars at its step, with the same values:

    train/loss  train/aux_loss  train/lr  train/grad_norm  train/tokens_per_s
    train/drop_rate  train/load_max_mean            (the row's fields)
    load_max_mean/layer_<i>                          (each MoE layer's max / mean expert load)
    drop_rate/layer_<i>                              (each MoE layer's drop rate)
    eval/val_loss  eval/val_bpb                      (eval rows; val_bpb for byte data only)

and at every evaluation after the first an image `expert_load`: the heatmap, MoE layer x expert,
of the load shares averaged over the train rows since the previous one (a labelled figure when
matplotlib is installed, else the bare grid, brighter = more load; one cell per expert).

A resumed run opens the writer with purge_step = the checkpoint's step + 1, so TensorBoard
drops the events the interrupted run wrote after its checkpoint, as metrics.jsonl drops its rows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from ..extras import require

FOLDER = "tensorboard"
TRAIN_SCALARS = ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "drop_rate", "load_max_mean")
_CELL = 16  # pixels per heatmap cell when drawn without matplotlib


def check_available() -> None:
    """Raise MissingExtra (naming `moe-reference[tensorboard]`) unless TensorBoard is installed."""
    require("tensorboard", "--tensorboard")


class TensorBoardLog:
    """Writes metrics rows as TensorBoard scalars and expert-load images."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / FOLDER
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(self.path), purge_step=purge)
        self._loads: list[list[list[float]]] = []  # train rows' [layer][expert] loads since the last image
        self._layer_ids: list[int] = []

    def write(self, row: dict[str, Any]) -> None:
        step = row["step"]
        if row["kind"] == "train":
            for key in TRAIN_SCALARS:
                self.writer.add_scalar(f"train/{key}", row[key], step)
            for entry in row.get("layers", []):
                shares = entry["load"]
                self.writer.add_scalar(f"load_max_mean/layer_{entry['layer']}", max(shares) * len(shares), step)
                self.writer.add_scalar(f"drop_rate/layer_{entry['layer']}", entry["drop_rate"], step)
            if row.get("layers"):
                self._layer_ids = [entry["layer"] for entry in row["layers"]]
                self._loads.append([entry["load"] for entry in row["layers"]])
        elif row["kind"] == "eval":
            self.writer.add_scalar("eval/val_loss", row["val_loss"], step)
            if row.get("val_bpb") is not None:
                self.writer.add_scalar("eval/val_bpb", row["val_bpb"], step)
            if self._loads:
                self._write_heatmap(np.mean(self._loads, axis=0), step)
                self._loads = []

    def _write_heatmap(self, grid_LE: np.ndarray, step: int) -> None:
        if importlib.util.find_spec("matplotlib") is not None:
            self.writer.add_figure("expert_load", _figure(grid_LE, self._layer_ids, step), step)
        else:
            self.writer.add_image("expert_load", heatmap_image(grid_LE), step, dataformats="HW")

    def flush(self) -> None:
        """Write what is buffered (at each checkpoint: a killed run keeps its events up to there)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def heatmap_image(grid_LE: np.ndarray) -> np.ndarray:
    """The load grid [L, E] as a grey image [L * _CELL, E * _CELL] in [0, 1]: each cell's share
    over the grid's largest share (white = the most loaded expert of all layers)."""
    scaled = grid_LE / max(float(grid_LE.max()), 1e-12)
    return np.kron(scaled, np.ones((_CELL, _CELL))).astype(np.float32)


def _figure(grid_LE: np.ndarray, layer_ids: list[int], step: int):
    """A labelled heatmap figure (matplotlib), like expert_load.png's panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers, num_experts = grid_LE.shape
    fig, ax = plt.subplots(figsize=(2.5 + 0.4 * min(num_experts, 64), 1.5 + 0.4 * num_layers), layout="constrained")
    im = ax.imshow(grid_LE, cmap="viridis", vmin=0, aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(num_layers), [str(i) for i in layer_ids])
    ax.set_title(f"expert load up to step {step} (uniform = {1 / num_experts:.3f})")
    fig.colorbar(im, ax=ax, label="share of assignments")
    return fig  # add_figure closes it

"""PNG plots of a run, drawn from its metrics.jsonl (see moe/train/metrics.py for the rows).

loss.png         training loss (raw and smoothed) and validation loss against tokens, in nats
                 per token with a bits axis; beside it the balance: the worst layer's
                 max/mean expert load and the drop rate over training
expert_load.png  heatmap, MoE layer x expert: each expert's share of the routed assignments
                 at the start and at the end of the run (a balanced layer is flat at 1/E)
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import read_rows  # noqa: E402


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write `fig` as a PNG and close it (pyplot keeps every open figure alive until then)."""
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def draw_run(run_dir: str | Path) -> list[Path]:
    """Draw the plots of the run in run_dir; returns the files written."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir / "metrics.jsonl")
    written = []
    if any(r["kind"] == "train" for r in rows):
        written.append(plot_losses(rows, run_dir / "loss.png"))
    if any(r["kind"] == "train" and r.get("layers") for r in rows):
        written.append(plot_expert_load(rows, run_dir / "expert_load.png"))
    return written


def _ema(values: list[float]) -> list[float]:
    """Exponential moving average spanning about a twentieth of the run."""
    alpha = min(1.0, 20 / len(values))
    out, acc = [], values[0]
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_losses(rows: list[dict], path: Path) -> Path:
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, (ax, ax_bal) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = [r["tokens"] for r in train]
    loss = [r["loss"] for r in train]
    ax.plot(x, loss, color="tab:blue", alpha=0.3, lw=1, label="train (per step)")
    ax.plot(x, _ema(loss), color="tab:blue", lw=2, label="train (smoothed)")
    if evals:
        ax.plot(
            [r["tokens"] for r in evals],
            [r["val_loss"] for r in evals],
            "o-",
            color="tab:orange",
            lw=2,
            label="validation",
        )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats per token)")
    bits_ax = ax.secondary_yaxis("right", functions=(lambda n: n / math.log(2), lambda b: b * math.log(2)))
    bits_ax.set_ylabel("bits per token (byte data: bits per byte)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()

    ax_bal.plot(x, [r["load_max_mean"] for r in train], color="tab:green", label="max/mean expert load (worst layer)")
    ax_bal.axhline(1.0, color="gray", ls=":", lw=1)
    ax_bal.set_xlabel("training tokens")
    ax_bal.set_ylabel("max / mean load")
    ax_drop = ax_bal.twinx()
    ax_drop.plot(x, [100 * r["drop_rate"] for r in train], color="tab:red", label="drop rate (mean of layers)")
    ax_drop.set_ylabel("dropped assignments (%)")
    ax_drop.set_ylim(0, max(1.0, 110 * max(r["drop_rate"] for r in train)))
    lines = ax_bal.get_lines()[:1] + ax_drop.get_lines()
    ax_bal.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax_bal.set_title("expert balance")
    ax_bal.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_expert_load(rows: list[dict], path: Path, window: int = 10) -> Path:
    """Mean load over the first and the last `window` train rows, side by side."""
    train = [r for r in rows if r["kind"] == "train" and r.get("layers")]
    phases = [("start", train[:window]), ("end", train[-window:])]
    layer_ids = [entry["layer"] for entry in train[0]["layers"]]
    grids = [np.mean([[entry["load"] for entry in r["layers"]] for r in part], axis=0) for _, part in phases]
    num_experts = grids[0].shape[1]
    vmax = max(g.max() for g in grids)
    width = 2.5 + 2 * 0.45 * max(6, min(num_experts, 32))
    fig, axes = plt.subplots(1, 2, figsize=(width, 2.2 + 0.45 * len(layer_ids)), squeeze=False, layout="constrained")
    for ax, (label, part), grid in zip(axes[0], phases, grids):
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(f"{label} (steps {part[0]['step']}-{part[-1]['step']})")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layer_ids)), [str(i) for i in layer_ids])
        if num_experts <= 32:
            ax.set_xticks(range(num_experts))
            for (i, j), share in np.ndenumerate(grid):
                ax.text(
                    j,
                    i,
                    f"{share:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share < 0.6 * vmax else "black",
                )
    fig.colorbar(im, ax=axes[0].tolist(), label="share of assignments")
    fig.suptitle(f"expert load per MoE layer: share of the routed assignments (uniform = {1 / num_experts:.3f})")
    return save_figure(fig, path)

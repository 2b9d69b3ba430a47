"""What the three claims share: the setup of one invocation, training one run, reading its
metrics, and the statistics of an expert-load vector.

Legend: E = experts, K = top-k, p = load shares [E] (share of the T*K routed assignments per
expert, sums to 1; balanced = 1/E), u = K * p = utilisation (share of the tokens that reach
each expert; balanced = K/E).
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from moe import ModelConfig
from moe.train import TrainArgs, run
from moe.train.data import load_corpus
from moe.train.metrics import read_rows

REPO = Path(__file__).resolve().parents[2]
VERDICTS = ("reproduced", "not reproduced", "not measurable at this scale")


@dataclass
class Setup:
    """One invocation of scripts/claims.py: where runs go, on what data, how long."""

    runs_dir: Path
    quick: bool = False
    device: str = "auto"
    seeds: int = 3  # claim 2 trains each compared layer plan with this many seeds
    data: str | None = None  # set by prepare_data
    bar: Any = None  # tqdm over all runs of the invocation
    log: list[str] = field(default_factory=list)

    def scale(self, full: int, quick: int) -> int:
        """A step count (or any size) for this mode."""
        return quick if self.quick else full

    @property
    def batch_size(self) -> int:
        return self.scale(16, 4)

    @property
    def seq_len(self) -> int:
        return self.scale(128, 32)


def prepare_data(setup: Setup) -> dict[str, Any]:
    """Write the default corpus (the standard library's source, as bytes) once into the runs
    folder, so the many runs read one file instead of walking the standard library each time.
    Quick mode keeps its first 2 MB."""
    corpus = load_corpus(None)
    tokens = corpus.tokens[:2_000_000] if setup.quick else corpus.tokens
    path = setup.runs_dir / "corpus.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tokens.tobytes())
    setup.data = str(path)
    return {"source": corpus.source, "bytes": int(tokens.size), "file": str(path)}


def train(setup: Setup, config: ModelConfig, folder: str, **overrides: Any) -> tuple[dict, list[dict]]:
    """Train `config` into runs_dir/folder; returns (summary of moe.train.run, metrics rows)."""
    steps = overrides.pop("steps")
    args = dict(
        out=str(setup.runs_dir / folder),
        data=setup.data,
        steps=steps,
        batch_size=setup.batch_size,
        seq_len=setup.seq_len,
        log_every=setup.scale(5, 1),
        eval_every=max(1, steps // 4),
        eval_batches=setup.scale(8, 2),
        save_every=steps,
        keep_last=1,
        seed=0,
        device=setup.device,
        overwrite=True,
        progress=False,
        plots=False,
    )
    args.update(overrides)
    if setup.bar is not None:
        setup.bar.set_postfix_str(folder)
    summary = run(config, TrainArgs(**args))
    if setup.bar is not None:
        setup.bar.update(1)
    return summary, read_rows(summary["metrics"])


def progress_bar(total: int) -> tqdm:
    return tqdm(total=total, desc="claims", unit="run", dynamic_ncols=True)


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["kind"] == "train"]


def eval_curve(rows: list[dict]) -> dict[str, list]:
    evals = [r for r in rows if r["kind"] == "eval"]
    return {"step": [r["step"] for r in evals], "val_loss": [r["val_loss"] for r in evals]}


def late(rows: list[Any], share: float = 1 / 3) -> list[Any]:
    """The last `share` of a run's rows (at least one): "late in training"."""
    return rows[-max(1, round(len(rows) * share)) :]


# --------------------------------------------------------------------------- load statistics


def spread(p_E: np.ndarray) -> dict[str, float]:
    """max/mean, min/mean and coefficient of variation of one load vector (1, 1, 0 = balanced)."""
    mean = p_E.mean()
    return {"max_mean": float(p_E.max() / mean), "min_mean": float(p_E.min() / mean), "cv": float(p_E.std() / mean)}


def layer_loads(row: dict) -> dict[int, np.ndarray]:
    """Per MoE layer, the load shares [E] of one train row."""
    return {entry["layer"]: np.asarray(entry["load"], dtype=np.float64) for entry in row["layers"]}


def quantiles(values: list[float]) -> dict[str, float]:
    """Median and 20th / 80th percentiles (the figures every timing in the project reports)."""
    if len(values) == 1:
        return {"median": values[0], "p20": values[0], "p80": values[0]}
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "p20": deciles[1], "p80": deciles[7]}


def replace_moe(config: ModelConfig, name: str, **moe_fields: Any) -> ModelConfig:
    return dataclasses.replace(config, name=name, moe=dataclasses.replace(config.moe, **moe_fields))


def rounded(obj: Any, digits: int = 6) -> Any:
    """Floats rounded for the JSON file (the figures carry no more precision than that)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj

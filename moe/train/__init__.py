"""Training: a Trainer that runs the loop (trainer.py), one step (step.py), the world it runs
in (runtime.py, distributed_runtime.py), its data, run folder, metrics and plots.

    from moe.train import TrainArgs, run
    summary = run(load_config("tiny"), TrainArgs(steps=100))
"""

from __future__ import annotations

from .args import TrainArgs
from .trainer import TrainingDiverged, run

__all__ = ["TrainArgs", "TrainingDiverged", "run"]

"""Training: a Trainer that runs the loop, its data, run folder, metrics and plots.

    from moe.train import TrainArgs, run
    summary = run(load_config("tiny"), TrainArgs(steps=100))
"""

from __future__ import annotations

from .trainer import TrainArgs, TrainingDiverged, run

__all__ = ["TrainArgs", "TrainingDiverged", "run"]

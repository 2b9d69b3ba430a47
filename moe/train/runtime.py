"""The world a run trains in: what the Trainer asks of it, and the answer of one process.

The Trainer never tests whether it is distributed; it asks its Runtime for the device, the
wrapped model, the gradient norm, the validation loss, checkpoints and agreement between
ranks. SingleProcess answers for one process holding everything; distributed_runtime.py's
Distributed answers for one of torchrun's ranks (expert parallelism, FSDP2, sharded
checkpoints).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..device import pick_device
from ..errors import InputError
from ..io import checkpoint
from .args import TrainArgs
from .step import clip_gradients, evaluate


class Runtime(ABC):
    """rank, world_size and is_main (rank 0 writes the run folder), and the methods below.
    A context manager: leaving it closes the runtime (a process group, say)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def device(self, name: str) -> torch.device:
        """The device to train on, given --device (cpu, cuda, cuda:N or auto)."""

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as this world trains it (sharded, say); called once, before the optimizer."""

    @abstractmethod
    def clip_gradients(self, model: nn.Module, max_norm: float) -> Tensor:
        """Clip the gradients to max_norm (0: do not); returns the norm before clipping."""

    @abstractmethod
    def reduce_step(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """train_step's outputs as the whole world's."""

    @abstractmethod
    def any(self, flag: bool) -> bool:
        """Whether any rank says so."""

    @abstractmethod
    def evaluate(self, forward: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device) -> float:
        """Mean validation loss (nats per token) over the batches (each rank's rows of them)."""

    @abstractmethod
    def load_checkpoint(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model and optimizer; returns the trainer state saved with them."""

    @abstractmethod
    def save_checkpoint(
        self,
        root: Path,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        keep_last: int,
    ) -> Path:
        """Write root/step_{step}, keeping the last keep_last checkpoints; returns its folder."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait for every rank."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Entries for run.json about this world."""

    @abstractmethod
    def close(self) -> None:
        """Release what the runtime holds."""


class SingleProcess(Runtime):
    """One process holds the whole model and the whole batch."""

    def __init__(self, args: TrainArgs):
        if args.ep > 1:
            raise InputError(
                f"--ep {args.ep} needs several processes: launch with "
                f"torchrun --nproc-per-node N -m moe train ... --ep {args.ep}"
            )
        super().__init__(rank=0, world_size=1)

    def device(self, name: str) -> torch.device:
        return pick_device(name)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def clip_gradients(self, model: nn.Module, max_norm: float) -> Tensor:
        return clip_gradients(model, max_norm)

    def reduce_step(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        return out

    def any(self, flag: bool) -> bool:
        return flag

    def evaluate(self, forward: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device) -> float:
        return evaluate(forward, batches, device)

    def load_checkpoint(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return checkpoint.load_checkpoint(path, model, optimizer)

    def save_checkpoint(
        self,
        root: Path,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        keep_last: int,
    ) -> Path:
        return checkpoint.save_checkpoint(root, step, model, optimizer, state, keep_last)

    def barrier(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

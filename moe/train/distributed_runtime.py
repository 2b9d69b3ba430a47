"""`moe train` under torchrun: the runtime `moe.train.run` uses when it is one of many ranks.

    torchrun --nproc-per-node 4 -m moe train --config configs/tiny.yaml --ep 2

Every rank builds the whole model with the run's seed, keeps its experts (shard_experts) and
lets FSDP2 shard the rest (apply_fsdp); then it runs the same loop as one process, on its
own batches (BatchSampler's split by rank; --batch-size is per rank, so a step consumes
ranks x batch-size sequences). The step's loss is the mean of the ranks' losses, the
gradient norm and the balancing statistics are those of the whole batch, and validation
splits every fixed batch across the ranks, so the metrics read like one process's on the
concatenated batch. Rank 0 writes the run folder; every rank writes its checkpoint shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed.checkpoint import load_sharded, save_sharded
from ..distributed.fsdp import apply_fsdp, clip_grad_norm_
from ..distributed.mesh import init_parallel
from ..distributed.parallelize import shard_experts
from ..errors import InputError
from .args import TrainArgs
from .runtime import Runtime
from .step import eval_sums


class Distributed(Runtime):
    """One of torchrun's ranks: its (dp, ep) mesh and process groups, set up from torchrun's environment."""

    def __init__(self, args: TrainArgs):
        if args.compile:
            raise InputError(
                "--compile is not supported under torchrun yet (expert parallelism reads its "
                "all-to-all sizes on the host, and this path is not tested compiled)"
            )
        self.ctx = init_parallel(args.ep, args.device, args.dist_timeout)
        super().__init__(rank=self.ctx.rank, world_size=self.ctx.world_size)

    def device(self, name: str) -> torch.device:
        return self.ctx.device

    def wrap(self, model: nn.Module) -> nn.Module:
        shard_experts(model, self.ctx)
        return apply_fsdp(model, self.ctx)

    def clip_gradients(self, model: nn.Module, max_norm: float) -> Tensor:
        return clip_grad_norm_(model, max_norm)

    def reduce_step(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """The mean of the ranks' losses, the main one and the MTP one where there is one (equal
        batches: the loss of the whole batch). aux_loss and grad_norm are already the whole batch's."""
        means = {}
        for key in ("loss", "mtp_loss"):
            if key in out:
                total = out[key].clone()
                dist.all_reduce(total)
                means[key] = total / self.world_size
        return {**out, **means}

    def any(self, flag: bool) -> bool:
        """Whether any rank says so: ranks must agree to stop, or the others would wait forever."""
        t = torch.tensor(int(flag), device=self.ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    def evaluate(self, forward: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device) -> float:
        total, count = eval_sums(forward, batches, device)
        sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
        dist.all_reduce(sums)
        return float(sums[0] / sums[1])  # host sync, once per evaluation

    def load_checkpoint(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return load_sharded(path, model, optimizer, self.ctx)

    def save_checkpoint(
        self,
        root: Path,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        keep_last: int,
    ) -> Path:
        return save_sharded(root, step, model, optimizer, state, keep_last, self.ctx)

    def barrier(self) -> None:
        dist.barrier()

    def describe(self) -> dict[str, Any]:
        return {"parallel": self.ctx.describe()}

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

"""Old import path of moe.distributed (`from moe.parallel import shard_experts` keeps working)."""

from __future__ import annotations

from .distributed import (
    ParallelContext,
    apply_fsdp,
    clip_grad_norm_,
    expert_rows,
    init_parallel,
    make_context,
    shard_experts,
    under_torchrun,
)

__all__ = [
    "ParallelContext",
    "apply_fsdp",
    "clip_grad_norm_",
    "expert_rows",
    "init_parallel",
    "make_context",
    "shard_experts",
    "under_torchrun",
]

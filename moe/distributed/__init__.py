"""Expert parallelism and FSDP2 data parallelism on torch.distributed (launched by torchrun).

    ctx = init_parallel(ep=2)            # from torchrun's environment: a (dp, ep) DeviceMesh
    shard_experts(model, ctx)            # each rank keeps E/ep experts; MoE layers get an
                                         # all-to-all dispatcher and the world as batch scope
    apply_fsdp(model, ctx)               # FSDP2: experts over dp, everything else over the world
    norm = clip_grad_norm_(model, 1.0)   # one global norm over parameters on different meshes

mesh.py (process groups), all_to_all.py (the all-to-all dispatcher), scope.py (the batch of
every rank), parallelize.py (installing both), fsdp.py (sharding and clipping), checkpoint.py
(sharded safetensors checkpoints). moe.train runs a model this way under torchrun.
The old import path `moe.parallel` names the same objects.
"""

from __future__ import annotations

from .all_to_all import AllToAllDispatcher
from .fsdp import apply_fsdp, clip_grad_norm_
from .mesh import ParallelContext, init_parallel, make_context, under_torchrun
from .parallelize import expert_rows, shard_experts
from .scope import ProcessGroupScope

__all__ = [
    "AllToAllDispatcher",
    "ParallelContext",
    "ProcessGroupScope",
    "apply_fsdp",
    "clip_grad_norm_",
    "expert_rows",
    "init_parallel",
    "make_context",
    "shard_experts",
    "under_torchrun",
]

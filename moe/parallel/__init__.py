"""Expert parallelism and FSDP2 data parallelism on torch.distributed (launched by torchrun).

    ctx = init_parallel(ep=2)            # from torchrun's environment: a (dp, ep) DeviceMesh
    shard_experts(model, ctx)            # each rank keeps E/ep experts; MoE layers get `layer.ep`
    apply_fsdp(model, ctx)               # FSDP2: experts over dp, everything else over the world
    norm = clip_grad_norm_(model, 1.0)   # one global norm over parameters on different meshes

mesh.py (process groups), expert_parallel.py (the all-to-all dispatcher and the batch-wide
capacity, losses and statistics), fsdp.py (sharding and clipping), checkpoint.py (sharded
safetensors checkpoints), trainer.py (what `moe train` does under torchrun).
"""

from .expert_parallel import ExpertParallel, expert_rows, shard_experts
from .fsdp import apply_fsdp, clip_grad_norm_
from .mesh import ParallelContext, init_parallel, make_context, under_torchrun

__all__ = ["ExpertParallel", "ParallelContext", "apply_fsdp", "clip_grad_norm_", "expert_rows", "init_parallel",
           "make_context", "shard_experts", "under_torchrun"]

"""Expert parallelism and FSDP2 data parallelism on torch.distributed (launched by torchrun).

    ctx = init_parallel(ep=2)            # from torchrun's environment: a (dp, ep) DeviceMesh
    shard_experts(model, ctx)            # each rank keeps E/ep experts; MoE layers get `layer.ep`
    apply_fsdp(model, ctx)               # FSDP2: experts over dp, everything else over the world
    norm = clip_grad_norm_(model, 1.0)   # one global norm over parameters on different meshes

mesh.py (process groups), expert_parallel.py (the all-to-all dispatcher and the batch-wide
capacity, losses and statistics), fsdp.py (sharding and clipping), checkpoint.py (sharded
safetensors checkpoints), trainer.py (what `moe train` does under torchrun).

The names load on first use: a single-process `moe train` asks only `under_torchrun()` and
does not pay for importing FSDP and DTensor (about a second).
"""

from __future__ import annotations

import importlib

_HOME = {
    "ExpertParallel": "expert_parallel", "expert_rows": "expert_parallel", "shard_experts": "expert_parallel",
    "apply_fsdp": "fsdp", "clip_grad_norm_": "fsdp",
    "ParallelContext": "mesh", "init_parallel": "mesh", "make_context": "mesh", "under_torchrun": "mesh",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'moe.parallel' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)

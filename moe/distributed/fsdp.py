"""FSDP2 over the (dp, ep) layout, and gradient clipping across its two meshes.

`fully_shard` (torch.distributed.fsdp, torch >= 2.6) splits dim 0 of each parameter:
- the expert stacks of each MoE layer (this rank's E/ep experts) over the dp group, the
  ranks that hold the same experts; with ep = 1 they are ordinary block parameters;
- every transformer block, and then the rest (embeddings, final norm, head), over all ranks.
The backward's reduce-scatter averages each gradient over its own group: over the world
for the shared parameters, over dp for the experts (whose gradients the all-to-all already
gathered from the EP group, see all_to_all.py). Buffers (the routers' expert_bias) are
not sharded: every rank holds the same copy.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from ..layer import MoE
from .all_to_all import AllToAllDispatcher
from .mesh import ParallelContext

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch 2.4 / 2.5 kept FSDP2 under its composable name
    from torch.distributed._composable.fsdp import fully_shard


def apply_fsdp(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Shard `model` in place (call shard_experts first, build the optimizer after)."""
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.dispatcher, AllToAllDispatcher):
            fully_shard(module.experts, mesh=ctx.mesh["dp"])
    # Recent torch (2.13) warns when a sharded module returns a view, in case the caller changes
    # it in place; the experts' output is a view (grouped_mm's gradient wrapper) that is only indexed.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPExperts\) returned a view")
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=ctx.world_mesh)
    fully_shard(model, mesh=ctx.world_mesh)
    return model


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ for a model sharded by apply_fsdp; returns the total
    norm before clipping. Every element of every gradient lives on exactly one rank (shared
    parameters split over the world; expert stacks split over ep, then over dp), so the
    global sum of squares is one all-reduce of the local sums, whatever mesh each uses."""
    local = []
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad
        if not isinstance(grad, DTensor) or any(not isinstance(p, Shard) for p in grad.placements):
            raise ValueError(
                f"parameter '{name}' is not sharded by apply_fsdp: its gradient norm would be counted once per rank"
            )
        local.append(grad.to_local())
    square = torch.zeros((), dtype=torch.float32, device=local[0].device if local else None)
    for g in local:
        square += g.float().square().sum()
    dist.all_reduce(square, group=group)
    norm = square.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # the factor torch's clip_grad_norm_ applies
        for g in local:
            g.mul_(coef.to(g.dtype))
    return norm

"""Applying expert parallelism to a model from outside, as torchtitan does: the model code
never learns that it is distributed.

    shard_experts(model, ctx)   # every MoE layer: an all-to-all dispatcher over the EP group
                                # (ep > 1), the whole world as its batch scope, E/ep experts kept

Build the full model with the same seed on every rank first: each rank then keeps its slice of
the same initialisation a single process would have.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..layer import MoE
from .all_to_all import AllToAllDispatcher
from .mesh import ParallelContext
from .scope import ProcessGroupScope


def shard_experts(model: nn.Module, ctx: ParallelContext) -> None:
    """Install the distributed seams in every MoE layer of `model`; with ep > 1 keep only this
    rank's experts. With one EP rank (data parallelism only) the experts all stay here and the
    local dispatcher runs them; only the batch scope involves the other ranks."""
    for name, layer in model.named_modules():
        if not isinstance(layer, MoE):
            continue
        num_experts = layer.config.num_experts
        if num_experts % ctx.ep:
            raise InputError(f"layer '{name}': num_experts = {num_experts} is not divisible by --ep {ctx.ep}")
        layer.scope = ProcessGroupScope(ctx.world_group)
        if ctx.ep > 1:
            dispatcher = AllToAllDispatcher(num_experts, ctx.ep_group)
            lo, hi = dispatcher.first_expert, dispatcher.first_expert + dispatcher.num_local
            with torch.no_grad():
                layer.experts.w_in = nn.Parameter(layer.experts.w_in[lo:hi].clone())
                layer.experts.w_out = nn.Parameter(layer.experts.w_out[lo:hi].clone())
            layer.dispatcher = dispatcher


def expert_rows(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{parameter name: (first expert held here, experts in the whole layer)} for every
    expert stack split by expert parallelism."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, MoE) and isinstance(layer.dispatcher, AllToAllDispatcher):
            for param in ("w_in", "w_out"):
                out[f"{name}.experts.{param}"] = (layer.dispatcher.first_expert, layer.config.num_experts)
    return out

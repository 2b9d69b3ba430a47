"""The MoE layer: router -> capacity -> dispatch -> experts -> combine, plus shared experts.

Legend: T = tokens, D = hidden size, E = experts, K = top-k, A = T*K slots,
B = sequences, S = tokens per sequence.

    layer = MoE(MoEConfig(num_experts=8, top_k=2), hidden_size=512)
    y = layer(x)                      # x [..., 512] -> y [..., 512]
    loss = task_loss + layer.aux_loss  # weighted sum of the enabled balancing losses
    layer.stats["load"], layer.stats["drop_rate"]

A 3-D input [B, S, D] is read as B sequences of S tokens (for the sequence-wise loss); any
other shape is one sequence of all its tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import balance
from .capacity import expert_capacity
from .config import MoEConfig
from .dispatch import combine, plan_dispatch
from .dispatcher import Dispatcher, LocalDispatcher
from .experts import Experts
from .mlp import MLP
from .router import Router
from .scope import BatchScope, BatchTotals, batch_totals


class MoE(nn.Module):
    def __init__(self, config: MoEConfig, hidden_size: int):
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.router = Router(config, hidden_size)
        self.experts = Experts(config, hidden_size)
        self.shared_experts = (
            MLP(hidden_size, config.shared_size(hidden_size), config.activation) if config.num_shared_experts else None
        )
        # The two seams distribution swaps from outside (moe.distributed.shard_experts): where
        # the experts are (the dispatcher) and which tokens make up the batch (the scope).
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.scope = BatchScope()
        # Assignments per expert since the last bias update (summed over micro-batches).
        self.register_buffer("load_since_update", torch.zeros(config.num_experts), persistent=False)
        self.aux_loss: Tensor = torch.zeros(())
        self._stats: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> [..., D]; sets `aux_loss` and `stats` for this call's batch."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE expects inputs [..., {self.hidden_size}], got {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.hidden_size)
        route = self.router(x_TD)
        batch = batch_totals(route, x.shape[0] if x.dim() == 3 else None, self.config, self.scope)
        capacity_E = expert_capacity(batch.load_E, batch.num_tokens, self.config)
        plan = plan_dispatch(route.topk_idx, batch.local_load_E, capacity_E, batch.ahead_KE)
        y_AD = self.dispatcher(x_TD, plan, self.experts)
        out_TD = combine(y_AD, route.topk_weight.to(y_AD.dtype), plan)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        self._record(batch, capacity_E)
        return out_TD.view(x.shape)

    def _record(self, batch: BatchTotals, capacity_E: Tensor | None) -> None:
        cfg = self.config
        coef = {"switch_aux": cfg.aux_loss_coef, "seq_aux": cfg.seq_aux_loss_coef, "z_loss": cfg.z_loss_coef}
        self.aux_loss = sum((coef[k] * v for k, v in batch.losses.items()), torch.zeros((), device=batch.tokens.device))
        load_E = batch.load_E
        if self.training and self.router.expert_bias is not None:
            self.load_since_update += load_E
        # A slot keeps its place when its queue position is below its expert's capacity, and the
        # positions of expert e run 0 .. load_e - 1: min(load, capacity) assignments survive.
        slots = batch.tokens.detach() * cfg.top_k
        kept = slots if capacity_E is None else torch.minimum(load_E, capacity_E).sum()
        self._stats = {
            "load": load_E.float() / slots,
            "drop_rate": 1.0 - kept / slots,
            **{k: v.detach() for k, v in batch.losses.items()},
        }

    @property
    def stats(self) -> dict:
        """Statistics of the last forward: `load` [E] (share of assignments per expert, before
        drops), `drop_rate` (float), and each enabled loss (float). Reading it syncs."""
        return {k: v if k == "load" else float(v) for k, v in self._stats.items()}

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step; call after each optimizer step.

        load_since_update holds the load of the whole batch (under moe.distributed, of every
        rank's tokens), so every rank takes the same step and the biases stay identical."""
        if self.router.expert_bias is None:
            return
        step = balance.bias_update(self.load_since_update, self.config.bias_update_rate, self.config.bias_update)
        self.router.expert_bias += step
        self.load_since_update.zero_()


def update_expert_biases(model: nn.Module) -> None:
    """Run the aux-loss-free bias update of every MoE layer in `model`."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.update_expert_bias()

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

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import balance
from .capacity import expert_capacity
from .config import MoEConfig
from .dispatch import DispatchPlan, combine, expert_load, plan_dispatch
from .experts import Experts
from .mlp import MLP
from .router import Router, Routing

if TYPE_CHECKING:
    from .parallel.expert_parallel import BatchTotals


class MoE(nn.Module):
    def __init__(self, config: MoEConfig, hidden_size: int):
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.router = Router(config, hidden_size)
        self.experts = Experts(config, hidden_size)
        self.shared_experts = (MLP(hidden_size, config.shared_size(hidden_size), config.activation)
                               if config.num_shared_experts else None)
        # Assignments per expert since the last bias update (summed over micro-batches).
        self.register_buffer("load_since_update", torch.zeros(config.num_experts), persistent=False)
        self.aux_loss: Tensor = torch.zeros(())
        self._stats: dict[str, Tensor] = {}
        # Set by moe.parallel.shard_experts when several processes share the batch: an
        # ExpertParallel that runs the experts through an all-to-all and computes capacity,
        # losses and statistics over every rank's tokens. None: this process's batch is the batch.
        self.ep = None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE expects inputs [..., {self.hidden_size}], got {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.hidden_size)
        route = self.router(x_TD)
        if self.ep is None:
            load_E = expert_load(route.topk_idx, self.config.num_experts)
            plan = plan_dispatch(route.topk_idx, load_E, expert_capacity(load_E, x_TD.shape[0], self.config))
            totals = None
        else:
            plan, totals = self.ep.plan_dispatch(route.topk_idx, x.shape, self.config)
        y_AD = self.run_experts(x_TD, plan)
        out_TD = combine(y_AD, route.topk_weight.to(y_AD.dtype), plan)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        self._record(route, plan, x.shape, totals)
        return out_TD.view(x.shape)

    def run_experts(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        """[T, D] -> [A, D]; the seam where expert parallelism swaps in an all-to-all."""
        if self.ep is not None:
            return self.ep.run_experts(self.experts, x_TD, plan)
        return self.experts(x_TD, plan)

    def _record(self, route: Routing, plan: DispatchPlan, shape: torch.Size,
                totals: BatchTotals | None = None) -> None:
        cfg = self.config
        if totals is None:
            losses = balance_losses(route, shape, cfg)
            load_E, num_slots, drop_rate = plan.load, plan.kept.numel(), 1.0 - plan.kept.float().mean()
        else:  # every rank's batch: moe/parallel/expert_parallel.py
            losses = self.ep.balance_losses(route, shape, totals, cfg)
            load_E, num_slots, drop_rate = totals.load_E, totals.slots, 1.0 - totals.kept / totals.slots
        coef = {"switch_aux": cfg.aux_loss_coef, "seq_aux": cfg.seq_aux_loss_coef, "z_loss": cfg.z_loss_coef}
        self.aux_loss = sum((coef[k] * v for k, v in losses.items()), torch.zeros((), device=plan.offs.device))
        if self.training and self.router.expert_bias is not None:
            self.load_since_update += load_E
        self._stats = {
            "load": load_E.float() / num_slots,
            "drop_rate": drop_rate,
            **{k: v.detach() for k, v in losses.items()},
        }

    @property
    def stats(self) -> dict:
        """Statistics of the last forward: `load` [E] (share of assignments per expert, before
        drops), `drop_rate` (float), and each enabled loss (float). Reading it syncs."""
        return {k: v if k == "load" else float(v) for k, v in self._stats.items()}

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step; call after each optimizer step.

        Under moe.parallel, load_since_update holds the load of every rank's tokens (summed
        in `_record`), so every rank takes the same step and the biases stay identical."""
        if self.router.expert_bias is None:
            return
        step = balance.bias_update(self.load_since_update, self.config.bias_update_rate, self.config.bias_update)
        self.router.expert_bias += step
        self.load_since_update.zero_()


def balance_losses(route: Routing, shape: torch.Size, cfg: MoEConfig) -> dict[str, Tensor]:
    """The enabled balancing losses of one batch, unweighted."""
    losses = {}
    if cfg.aux_loss_coef:
        losses["switch_aux"] = balance.switch_aux_loss(route.probs, route.topk_idx)
    if cfg.seq_aux_loss_coef:
        B, S = (shape[0], shape[1]) if len(shape) == 3 else (1, route.probs.shape[0])
        losses["seq_aux"] = balance.seq_aux_loss(route.probs.view(B, S, -1), route.topk_idx.view(B, S, -1))
    if cfg.z_loss_coef:
        losses["z_loss"] = balance.router_z_loss(route.logits)
    return losses


def update_expert_biases(model: nn.Module) -> None:
    """Run the aux-loss-free bias update of every MoE layer in `model`."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.update_expert_bias()

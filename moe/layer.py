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
from .dispatch import plan_dispatch
from .dispatcher import Dispatcher, LocalDispatcher
from .errors import InputError
from .experts import Experts, autocasting
from .mlp import MLP
from .router import Router
from .scope import BatchScope, BatchTotals, batch_totals

# Input dtypes that torch.autocast casts to its compute dtype (it never casts fp64).
AUTOCAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class MoE(nn.Module):
    """One MoE layer: x [..., D] -> [..., D], with `aux_loss` and `stats` of the last call.

    `MoE(config, hidden_size=D)` holds the router (gate weight [E, D]; with `expert_bias`, a
    float32 bias [E] that stays float32 under `.to(dtype)`), the routed experts (w_in [E, D, 2F]
    for SwiGLU or [E, D, F] for GELU, w_out [E, F, D]) and the shared experts. Parameters
    follow `.to(dtype)`; scores, combine weights and the balancing losses are computed in fp32.

    Input. `x` is floating point, of the layer's parameter dtype (under autocast, which sets
    the compute dtype, also fp32, bf16 or fp16) and on its device; its last dim is D. Anything else
    raises `moe.errors.InputError` naming the expected and the given dtype, device or shape,
    before any computation. [B, S, D] is read as B sequences of S tokens (the sequence-wise
    loss); any other shape [..., D] is one sequence of its T tokens.

    Degenerate input:
    - Zero tokens ([0, D], [B, 0, D], [0, S, D]): the output has the input's shape, `aux_loss`
      and every loss in `stats` are exactly 0, `stats["load"]` is all zeros and
      `stats["drop_rate"]` 0 (no NaN), backward gives zero gradients, and the bias update that
      follows is a no-op (no load was counted).
    - NaN or inf in the input: the layer does not refuse it (finding it would cost a host
      sync per call) but keeps it where it came from. A token whose router logits are not
      finite is still routed (top-k of NaN scores picks arbitrary experts) and its output row
      is NaN; the rows of the other tokens are what they would be without it (with capacity,
      its assignments still take their place in the queue). The balancing losses of the batch
      become NaN, which is how a training loop sees it (`moe train` stops on a non-finite
      loss). The bias path refuses it: the load that the aux-loss-free bias update moves on
      counts only tokens whose logits are all finite, so `expert_bias` stays finite and is not
      steered by the arbitrary choices of poisoned tokens. `stats["load"]` counts every
      assignment, as dispatched.
    """

    load_since_update: Tensor  # [E] int64, a buffer: assignments of finite tokens since the last bias update

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
        # Assignments per expert since the last bias update (summed over micro-batches). int64:
        # counts are exact at any size, and `.to(dtype)` leaves integer buffers alone.
        self.register_buffer("load_since_update", torch.zeros(config.num_experts, dtype=torch.long), persistent=False)
        self.aux_loss: Tensor = torch.zeros(())
        self._stats: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> out [..., D] (x's shape and dtype); sets `aux_loss` and `stats` for this
        call's batch. [B, S, D] is B sequences of S tokens; T = all tokens, may be 0."""
        self._check_input(x)
        x_TD = x.reshape(-1, self.hidden_size)
        route = self.router(x_TD)
        batch = batch_totals(route, x.shape[0] if x.dim() == 3 else None, self.config, self.scope)
        capacity_E = expert_capacity(batch.load_E, batch.num_tokens, self.config)
        plan = plan_dispatch(route.topk_idx, batch.local_load_E, capacity_E, batch.ahead_KE)
        out_TD = self.dispatcher(x_TD, plan, route.topk_weight, self.experts)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        self._record(batch, capacity_E)
        return out_TD.view(x.shape)

    def _check_input(self, x: Tensor) -> None:
        """InputError, naming expected and got, for an input the layer cannot compute on. Reads
        only metadata: no host sync, and torch.compile turns it into guards."""
        weight = self.router.weight
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise InputError(f"MoE expects inputs [..., {self.hidden_size}], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InputError(f"MoE expects floating-point inputs ({weight.dtype}), got {x.dtype}")
        if x.device != weight.device:
            raise InputError(f"MoE expects inputs on its parameters' device {weight.device}, got {x.device}")
        if x.dtype != weight.dtype and not (x.dtype in AUTOCAST_DTYPES and autocasting(x.device)):
            raise InputError(
                f"MoE expects inputs of its parameters' dtype {weight.dtype}, got {x.dtype} "
                f"(convert one of them, or run under torch.autocast)"
            )

    def _record(self, batch: BatchTotals, capacity_E: Tensor | None) -> None:
        cfg = self.config
        coef = {"switch_aux": cfg.aux_loss_coef, "seq_aux": cfg.seq_aux_loss_coef, "z_loss": cfg.z_loss_coef}
        self.aux_loss = sum((coef[k] * v for k, v in batch.losses.items()), torch.zeros((), device=batch.tokens.device))
        load_E = batch.load_E
        if self.training and batch.bias_load_E is not None:
            self.load_since_update += batch.bias_load_E  # finite tokens only (see the class docstring)
        # A slot keeps its place when its queue position is below its expert's capacity, and the
        # positions of expert e run 0 .. load_e - 1: min(load, capacity) assignments survive.
        slots = batch.tokens.detach() * cfg.top_k
        kept = slots if capacity_E is None else torch.minimum(load_E, capacity_E).sum()
        nonzero_slots = slots.clamp(min=1)  # a batch of no tokens: load 0 and drop rate 0, not 0/0
        self._stats = {
            "load": load_E.float() / nonzero_slots,
            "drop_rate": (slots - kept) / nonzero_slots,
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

"""Expert parallelism: the experts split over an EP group, tokens moved to them by all-to-all.

Legend: T = this rank's tokens, D = hidden size, E = experts, El = E / ep experts per rank,
K = top-k, A = T*K slots, R = rows, W = ranks that share the batch (the whole world).

One MoE layer on EP rank j (it holds experts j*El .. (j+1)*El - 1):
  1. route this rank's tokens over all E experts and plan the dispatch (dispatch.py), with
     capacity decided over every rank's tokens: rows grouped by global expert;
  2. count exchange: an all_to_all of the kept rows per expert tells each rank how many
     rows it gets from each source for each of its experts;
  3. all_to_all_single the rows; they arrive grouped by source rank, then by local expert;
  4. regroup them by local expert (a stable sort), run the local experts (`Experts.ffn`,
     any backend), undo the regrouping;
  5. all_to_all_single the outputs back (splits reversed); unpermute and combine as usual.
The backward runs the same exchanges in reverse (the autograd Functions below).

Worked example of step 4, ep = 2, El = 2, on rank 1 (experts 2, 3): rank 0 sends 2 rows for
expert 2 and 1 for expert 3, rank 1 keeps 1 row for expert 2 and 2 for expert 3:
    received:      r0:e2 r0:e2 r0:e3 | r1:e2 r1:e3 r1:e3     local expert 0 0 1 0 1 1
    sorted order:  0 1 3 2 4 5  ->  e2 e2 e2 e3 e3 e3,       local offs = [3, 6]

"The batch" is every rank's tokens, concatenated in rank order, and everything that looks at
the batch is computed over it, so N ranks compute what one process computes on the
concatenated batch: capacity (the static limit counts all tokens, the water-fill splits the
global load, and a slot keeps its place by its position in the global k-major queue),
the balancing losses (global f_i and P_i; the sequence-wise loss averaged over all
sequences; the z-loss over all tokens), the statistics, and the load that drives the
aux-loss-free bias (identical on every rank).

Gradients follow data-parallel convention: average them over the ranks and you have the
gradient of the mean of the ranks' losses. The balancing losses are the same global value on
every rank, and their all-reduce sums the gradients of all ranks' copies in its backward;
the all-to-all's backward sums every rank's contribution into the expert gradients, and
`Experts.ffn` scales those by 1 / ep, so they arrive as their mean over the EP group and
FSDP's average over the dp group finishes the job.

Host syncs per layer and forward: one (the count exchange's split sizes), plus one with
capacity (the global token count). The collectives run under torch.profiler ranges
moe.ep.count_exchange, moe.ep.all_to_all, moe.ep.batch_totals and moe.ep.loss_all_reduce
(bench/ep_overhead.py reads them). The differentiable collectives are two small autograd
Functions below (torch 2.13 marks torch.distributed.nn.functional.all_to_all_single deprecated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.profiler import record_function

from .. import balance
from ..capacity import expert_capacity
from ..config import MoEConfig
from ..dispatch import DispatchPlan, count_ids, permute, plan_dispatch, unpermute
from ..experts import Experts
from ..layer import MoE
from ..router import Routing
from .mesh import ParallelContext


# --------------------------------------------------------------------------- collectives with a backward


def _exchange(x: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        send_splits, recv_splits = ctx.splits
        with record_function("moe.ep.all_to_all"):
            return _exchange(grad, recv_splits, send_splits, ctx.group), None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the backward sums the gradients too (every rank's loss used it)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        with record_function("moe.ep.loss_all_reduce"):
            dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Differentiable sum of x over the group's ranks."""
    return _AllReduceSum.apply(x, group)


# --------------------------------------------------------------------------- the layer's partner


@dataclass
class BatchTotals:
    """Counts over every rank's batch (int64 device tensors)."""

    load_E: Tensor  # [E] assignments per expert, before drops
    kept: Tensor  # assignments that survive capacity
    slots: Tensor  # tokens * K
    tokens: Tensor
    sequences: Tensor  # of 3-D inputs [B, S, D]


class ExpertParallel:
    """What an MoE layer (`layer.ep`) calls to see the batch of every rank and to reach
    experts held elsewhere. With ep_group of one rank (data parallelism only) the experts all
    run here, through any backend; only the batch-wide quantities involve the others."""

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup, batch_group: dist.ProcessGroup):
        self.ep_group, self.batch_group = ep_group, batch_group
        self.ep_size, self.ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
        self.batch_rank = dist.get_rank(batch_group)
        if num_experts % self.ep_size:
            raise ValueError(f"num_experts = {num_experts} is not divisible by --ep {self.ep_size}")
        self.num_local = num_experts // self.ep_size
        self.first_expert = self.ep_rank * self.num_local

    def plan_dispatch(self, topk_idx_TK: Tensor, shape: torch.Size, cfg: MoEConfig) -> tuple[DispatchPlan, BatchTotals]:
        """The dispatch plan of this rank's slots, capacity decided over every rank's tokens."""
        T, K = topk_idx_TK.shape
        E = cfg.num_experts
        expert_A = topk_idx_TK.t().reshape(-1)  # k-major, as in dispatch.plan_dispatch
        k_A = torch.arange(expert_A.numel(), device=expert_A.device) // T
        counts_KE = count_ids(k_A * E + expert_A, K * E).view(K, E)
        load_E = counts_KE.sum(0)
        sizes = torch.tensor([T, shape[0] if len(shape) == 3 else 1], device=expert_A.device)
        if cfg.capacity_factor is None:
            summed = torch.cat([load_E, sizes])
            with record_function("moe.ep.batch_totals"):
                dist.all_reduce(summed, group=self.batch_group)
            load, tokens, seqs = summed[:E], summed[E], summed[E + 1]
            totals = BatchTotals(load, tokens * K, tokens * K, tokens, seqs)
            return plan_dispatch(topk_idx_TK, load_E), totals

        local = torch.cat([counts_KE.flatten(), sizes])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(self.batch_group))]
        with record_function("moe.ep.batch_totals"):
            dist.all_gather(gathered, local, group=self.batch_group)
        all_WX = torch.stack(gathered)
        counts_WKE = all_WX[:, :K * E].view(-1, K, E)
        global_KE = counts_WKE.sum(0)
        # Host sync (capacity only): the static limit and the water-fill's search take the
        # global token count as a Python int, as they take T on one process.
        tokens = int(all_WX[:, K * E].sum())
        load = global_KE.sum(0)
        capacity_E = expert_capacity(load, tokens, cfg)
        # The single-process queue is k-major over the concatenated batch. Ahead of this
        # rank's first slot of (k, e): every rank's choices k' < k of e, then earlier ranks'
        # choices k of e. position_in_expert counts this rank's own k' < k slots already.
        ahead_KE = ((global_KE.cumsum(0) - global_KE) - (counts_KE.cumsum(0) - counts_KE)
                    + counts_WKE[:self.batch_rank].sum(0))
        plan = plan_dispatch(topk_idx_TK, load_E, capacity_E, ahead_KE)
        # Global queue positions of expert e are 0 .. load_e - 1: min(load, capacity) survive.
        kept = torch.minimum(load, capacity_E).sum()
        tokens_t = all_WX[:, K * E].sum()
        return plan, BatchTotals(load, kept, tokens_t * K, tokens_t, all_WX[:, K * E + 1].sum())

    def run_experts(self, experts: Experts, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        """[T, D] -> [A, D] like Experts.forward, each expert computed on the rank that holds it."""
        if self.ep_size == 1:
            return experts(x_TD, plan)
        ep, El = self.ep_size, self.num_local
        rows_RD = permute(x_TD, plan)
        if torch.is_autocast_enabled(x_TD.device.type):  # the experts compute in autocast's dtype
            rows_RD = rows_RD.to(torch.get_autocast_dtype(x_TD.device.type))  # anyway: send half the bytes
        kept_E = torch.diff(plan.offs, prepend=plan.offs.new_zeros(1)).long()
        with record_function("moe.ep.count_exchange"):
            recv_E = torch.empty_like(kept_E)  # [source rank * El + local expert]
            dist.all_to_all_single(recv_E, kept_E, group=self.ep_group)
            # Host sync, the one expert parallelism needs: all-to-all split sizes are Python ints.
            counts = torch.cat([kept_E, recv_E]).tolist()
        send, recv = counts[:len(counts) // 2], counts[len(counts) // 2:]
        send_splits = [sum(send[j * El:(j + 1) * El]) for j in range(ep)]
        recv_splits = [sum(recv[s * El:(s + 1) * El]) for s in range(ep)]
        num_sent = sum(send_splits)
        with record_function("moe.ep.all_to_all"):
            got_RD = _AllToAll.apply(rows_RD[:num_sent], send_splits, recv_splits, self.ep_group)

        local_ids = torch.arange(El, device=x_TD.device).repeat(ep)
        expert_R = torch.repeat_interleave(local_ids, recv_E, output_size=got_RD.shape[0])
        order_R = torch.argsort(expert_R, stable=True)
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        per_expert = [sum(recv[s * El + e] for s in range(ep)) for e in range(El)]
        offs = torch.tensor(per_expert, device=x_TD.device).cumsum(0).to(torch.int32)
        y_RD = experts.ffn(got_RD[order_R], offs, weight_grad_scale=1.0 / ep)[inverse_R]

        with record_function("moe.ep.all_to_all"):
            back_RD = _AllToAll.apply(y_RD, recv_splits, send_splits, self.ep_group)
        dropped = back_RD.new_zeros(rows_RD.shape[0] - num_sent, back_RD.shape[1])
        return unpermute(torch.cat([back_RD, dropped]), plan)

    def balance_losses(self, route: Routing, shape: torch.Size, totals: BatchTotals,
                       cfg: MoEConfig) -> dict[str, Tensor]:
        """The enabled balancing losses of the whole batch (the same value on every rank)."""
        E = cfg.num_experts
        three_d = len(shape) == 3
        # A 2-D input is one sequence; so is the concatenated batch: its sequence-wise loss is
        # the Switch loss.
        switch_form = bool(cfg.aux_loss_coef or (cfg.seq_aux_loss_coef and not three_d))
        parts = {}  # local sums, reduced together in one differentiable all-reduce
        if switch_form:
            parts["probs"] = route.probs.sum(dim=0)
        if cfg.seq_aux_loss_coef and three_d:
            B, S = shape[0], shape[1]
            parts["seq"] = balance.seq_aux_loss(route.probs.view(B, S, -1), route.topk_idx.view(B, S, -1)) * B
        if cfg.z_loss_coef:
            parts["z"] = balance.router_z_loss(route.logits) * route.logits.shape[0]
        if not parts:
            return {}
        with record_function("moe.ep.loss_all_reduce"):
            flat = all_reduce_sum(torch.cat([v.reshape(-1) for v in parts.values()]), self.batch_group)
        sums = dict(zip(parts, flat.split([v.numel() for v in parts.values()])))
        losses = {}
        if switch_form:
            f_E = totals.load_E / totals.slots
            switch = E * (f_E * sums["probs"] / totals.tokens).sum()
            if cfg.aux_loss_coef:
                losses["switch_aux"] = switch
        if cfg.seq_aux_loss_coef:
            losses["seq_aux"] = sums["seq"][0] / totals.sequences if three_d else switch
        if cfg.z_loss_coef:
            losses["z_loss"] = sums["z"][0] / totals.tokens
        return losses


# --------------------------------------------------------------------------- sharding a model


def shard_experts(model: nn.Module, ctx: ParallelContext) -> None:
    """Give every MoE layer of `model` its ExpertParallel; with ep > 1 keep only this rank's
    experts. Build the full model with the same seed on every rank first: each rank then
    keeps its slice of the same initialisation a single process would have."""
    for name, layer in model.named_modules():
        if not isinstance(layer, MoE):
            continue
        num_experts = layer.config.num_experts
        if num_experts % ctx.ep:
            raise ValueError(f"layer '{name}': num_experts = {num_experts} is not divisible by --ep {ctx.ep}")
        layer.ep = ExpertParallel(num_experts, ctx.ep_group, ctx.world_group)
        if ctx.ep > 1:
            lo, hi = layer.ep.first_expert, layer.ep.first_expert + layer.ep.num_local
            with torch.no_grad():
                layer.experts.w_in = nn.Parameter(layer.experts.w_in[lo:hi].clone())
                layer.experts.w_out = nn.Parameter(layer.experts.w_out[lo:hi].clone())


def expert_rows(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{parameter name: (first expert held here, experts in the whole layer)} for every
    expert stack split by expert parallelism."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, MoE) and layer.ep is not None and layer.ep.ep_size > 1:
            for param in ("w_in", "w_out"):
                out[f"{name}.experts.{param}"] = (layer.ep.first_expert, layer.config.num_experts)
    return out

"""The all-to-all dispatcher: experts split over an expert-parallel group, rows sent to them.

Legend: T = this rank's tokens, D = hidden size, E = experts, El = E / ep experts per rank,
K = top-k, A = T*K slots, R = rows.

One MoE layer on EP rank j (it holds experts j*El .. (j+1)*El - 1):
  1. the layer routes this rank's tokens over all E experts and plans the dispatch
     (dispatch.py), capacity decided over every rank's tokens by the batch scope
     (moe/scope.py, moe/distributed/scope.py): rows grouped by global expert;
  2. `dispatch`: count exchange: an all_to_all of the kept rows per expert tells each rank how many
     rows it gets from each source for each of its experts;
  3. all_to_all_single the rows; they arrive grouped by source rank, then by local expert;
  4. regroup them by local expert (a stable sort); the layer runs its local experts (any
     backend) on them;
  5. `collect`: undo the regrouping, all_to_all_single the outputs back (splits reversed),
     unpermute; the layer combines as usual.
The backward runs the same exchanges in reverse (the autograd Functions below).

Worked example of step 4, ep = 2, El = 2, on rank 1 (experts 2, 3): rank 0 sends 2 rows for
expert 2 and 1 for expert 3, rank 1 keeps 1 row for expert 2 and 2 for expert 3:
    received:      r0:e2 r0:e2 r0:e3 | r1:e2 r1:e3 r1:e3     local expert 0 0 1 0 1 1
    sorted order:  0 1 3 2 4 5  ->  e2 e2 e2 e3 e3 e3,       local offs = [3, 6]

Gradients follow data-parallel convention: average them over the ranks and you have the
gradient of the mean of the ranks' losses. The all-to-all's backward sums every rank's
contribution into the expert gradients, and the experts scale those by 1 / ep, so they
arrive as their mean over the EP group and FSDP's average over the dp group finishes the job.

Host syncs per layer and forward: one (the count exchange's split sizes). The collectives run
under torch.profiler ranges moe.ep.count_exchange and moe.ep.all_to_all (bench/ep_overhead.py
reads them). The differentiable all-to-all is a small autograd
Function below (torch 2.13 marks torch.distributed.nn.functional.all_to_all_single deprecated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from ..dispatch import DispatchPlan, permute, unpermute
from ..dispatcher import Dispatched, Dispatcher
from ..errors import InputError
from ..experts import Experts

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


# --------------------------------------------------------------------------- the dispatcher


@dataclass
class _Exchange:
    """What `collect` needs to send the outputs back the way the rows came."""

    send_splits: list[int]
    recv_splits: list[int]
    inverse_R: Tensor  # received order of the rows regrouped by local expert
    num_rows: int  # rows of the plan (the sent ones, then the dropped ones)


class AllToAllDispatcher(Dispatcher):
    """Each rank holds El = E / ep experts of every MoE layer; rows travel to them by all-to-all."""

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup):
        self.ep_group = ep_group
        self.ep_size, self.ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
        if num_experts % self.ep_size:
            raise InputError(f"num_experts = {num_experts} is not divisible by --ep {self.ep_size}")
        self.num_local = num_experts // self.ep_size
        self.first_expert = self.ep_rank * self.num_local

    def dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> Dispatched:
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
        send, recv = counts[: len(counts) // 2], counts[len(counts) // 2 :]
        send_splits = [sum(send[j * El : (j + 1) * El]) for j in range(ep)]
        recv_splits = [sum(recv[s * El : (s + 1) * El]) for s in range(ep)]
        with record_function("moe.ep.all_to_all"):
            got_RD = _AllToAll.apply(rows_RD[: sum(send_splits)], send_splits, recv_splits, self.ep_group)

        local_ids = torch.arange(El, device=x_TD.device).repeat(ep)
        expert_R = torch.repeat_interleave(local_ids, recv_E, output_size=got_RD.shape[0])
        order_R = torch.argsort(expert_R, stable=True)
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        per_expert = [sum(recv[s * El + e] for s in range(ep)) for e in range(El)]
        offs = torch.tensor(per_expert, device=x_TD.device).cumsum(0).to(torch.int32)
        return Dispatched(got_RD[order_R], offs, _Exchange(send_splits, recv_splits, inverse_R, rows_RD.shape[0]))

    def collect(self, y_RD: Tensor, dispatched: Dispatched, plan: DispatchPlan) -> Tensor:
        sent: _Exchange = dispatched.state
        with record_function("moe.ep.all_to_all"):
            back_RD = _AllToAll.apply(y_RD[sent.inverse_R], sent.recv_splits, sent.send_splits, self.ep_group)
        dropped = back_RD.new_zeros(sent.num_rows - back_RD.shape[0], back_RD.shape[1])
        return unpermute(torch.cat([back_RD, dropped]), plan)

    def expert_outputs(self, x_TD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
        sent = self.dispatch(x_TD, plan)
        return self.collect(experts(sent.rows, sent.offs, weight_grad_scale=1.0 / self.ep_size), sent, plan)

"""Dispatch and combine: from per-token top-k choices to rows grouped by expert, and back.

Legend: T = tokens, D = hidden size, E = experts, K = top-k, A = T*K assignments (slots),
R = A permuted rows.

Assignments are numbered k-major, slot a = k*T + t (all first choices, then all second
choices, ...), which is also the capacity priority: when an expert overflows, first choices
and earlier tokens keep their place. A stable sort of the slots by expert gives the grouped
layout of `torch.nn.functional.grouped_mm`: expert e owns permuted rows offs[e-1]..offs[e].
Dropped assignments are sorted past offs[-1], outside every group, so the row count stays
A and nothing on this path needs the host (no `.item()`).

Worked example: T=3, K=2, topk_idx = [[1, 0], [1, 2], [0, 1]], E=3, dropless:
    slots (k-major):   a = 0  1  2  3  4  5
    expert of slot:        1  1  0  0  2  1
    row_slot (sorted):     2  3  0  1  5  4      experts 0 0 1 1 1 2
    row_token = row_slot % T = 2 0 0 1 2 1
    offs = [2, 5, 6]
Combining reverses it: y_slot[row_slot[r]] = y_row[r], then out[t] = sum_k w[t,k] y_slot[k*T+t].

An expert-parallel all-to-all slots in between `permute` and the expert computation: the
permuted rows of each expert are contiguous, and the kept count per expert (the steps of
`offs`) says how many to send where (moe/distributed/all_to_all.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchPlan:
    row_slot: Tensor  # [R] int64: permuted row r holds assignment slot row_slot[r]
    row_token: Tensor  # [R] int64: ... which belongs to token row_token[r]
    slot_row: Tensor  # [A] int64: inverse permutation, slot a sits in row slot_row[a]
    offs: Tensor  # [E] int32: cumulative end row of each expert's kept rows
    kept: Tensor  # [A] bool: slot survives the capacity limit

    @property
    def row_kept(self) -> Tensor:
        """[R] bool: permuted row r belongs to an expert group (rows past offs[-1] are drops)."""
        return torch.arange(self.row_slot.numel(), device=self.offs.device) < self.offs[-1]


def expert_load(topk_idx_TK: Tensor, num_experts: int) -> Tensor:
    """Assignments routed to each expert: [E] int64."""
    return count_ids(topk_idx_TK.flatten(), num_experts)


def count_ids(ids: Tensor, n: int, counted: Tensor | None = None) -> Tensor:
    """How often each of 0..n-1 occurs in ids: [n] int64; with `counted` (bool, the shape of
    ids), only the occurrences where it is True.

    A scatter-add rather than `torch.bincount`, whose output length depends on the data
    (max id + 1): that would make every downstream shape unknown to torch.compile.
    """
    ones = torch.ones_like(ids) if counted is None else counted.to(ids.dtype)
    return torch.zeros(n, dtype=torch.long, device=ids.device).scatter_add_(0, ids, ones)


def plan_dispatch(
    topk_idx_TK: Tensor, load_E: Tensor, capacity_E: Tensor | None = None, queue_offset_KE: Tensor | None = None
) -> DispatchPlan:
    """Sort the T*K assignments by expert, dropping those beyond each expert's capacity.

    load_E [E]: this process's assignments per expert (their queue positions start at 0).
    queue_offset_KE [K, E] (moe/scope.py's ahead_KE): how many assignments of other processes
    stand ahead of this process's first slot of choice k for expert e in the batch's queue, so
    that capacity drops are those of one process holding every process's tokens. None: these
    tokens are the whole queue.
    """
    T, K = topk_idx_TK.shape
    num_experts = load_E.numel()
    expert_A = topk_idx_TK.t().reshape(-1)  # k-major slot order
    if capacity_E is None:
        kept_A = torch.ones_like(expert_A, dtype=torch.bool)
        key_A = expert_A
    else:
        pos_A = position_in_expert(expert_A, load_E)
        if queue_offset_KE is not None:
            k_A = torch.arange(expert_A.numel(), device=expert_A.device) // T
            pos_A = pos_A + queue_offset_KE[k_A, expert_A]
        kept_A = pos_A < capacity_E[expert_A]
        key_A = torch.where(kept_A, expert_A, num_experts)  # drops sort after every expert
    row_slot = torch.argsort(key_A, stable=True)
    slot_row = torch.empty_like(row_slot)
    slot_row[row_slot] = torch.arange(row_slot.numel(), device=row_slot.device)
    kept_load_E = count_ids(key_A, num_experts + 1)[:num_experts]
    offs = torch.cumsum(kept_load_E, 0).to(torch.int32)
    return DispatchPlan(row_slot, row_slot % T, slot_row, offs, kept_A)


def position_in_expert(expert_A: Tensor, load_E: Tensor) -> Tensor:
    """For each slot, how many earlier slots chose the same expert (its queue position)."""
    order = torch.argsort(expert_A, stable=True)
    start_E = torch.cumsum(load_E, 0) - load_E
    pos_sorted = torch.arange(expert_A.numel(), device=expert_A.device) - start_E[expert_A[order]]
    pos_A = torch.empty_like(pos_sorted)
    pos_A[order] = pos_sorted
    return pos_A


def permute(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """Gather token rows into expert order: [T, D] -> [R, D]; dropped rows are zeros."""
    return torch.where(plan.row_kept[:, None], x_TD[plan.row_token], 0)


def unpermute(y_RD: Tensor, plan: DispatchPlan) -> Tensor:
    """Rows back to slot order: [R, D] -> [A, D]; dropped slots are zeros.

    The mask is a `where`, not a multiply: rows outside every group may hold garbage
    (grouped GEMMs do not write them), and 0 * NaN would still be NaN.
    """
    return torch.where(plan.row_kept[:, None], y_RD, 0)[plan.slot_row]


def combine(y_AD: Tensor, weight_TK: Tensor, plan: DispatchPlan) -> Tensor:
    """Weighted sum of each token's K expert outputs: [A, D] -> [T, D], accumulated in fp32.

    A dense reduction over a [K, T, D] view, not a scatter-add, so the result is deterministic.
    Dropped slots are already zero in y_AD.
    """
    return _WeightedSum.apply(y_AD, weight_TK)


class _WeightedSum(torch.autograd.Function):
    """out[t] = sum_k w[t, k] * y[k*T + t] in fp32, keeping y in its own dtype for the backward.

    Plain autograd of `(y.float() * w).sum(0)` would keep the fp32 copy of y [A, D] for the
    weights' gradient: twice the bytes of a bf16 y, the largest activation the "torch" backend
    kept (bench/activation_memory.py). Here the fp32 products are formed again in the backward.
    """

    @staticmethod
    def forward(ctx, y_AD: Tensor, weight_TK: Tensor) -> Tensor:
        ctx.save_for_backward(y_AD, weight_TK)
        T, K = weight_TK.shape
        y_KTD = y_AD.view(K, T, y_AD.shape[-1])
        return (y_KTD.float() * weight_TK.t().unsqueeze(-1).float()).sum(dim=0).to(y_AD.dtype)

    @staticmethod
    def backward(ctx, grad_TD: Tensor) -> tuple[Tensor | None, Tensor | None]:
        y_AD, weight_TK = ctx.saved_tensors
        T, K = weight_TK.shape
        g_1TD = grad_TD.float().unsqueeze(0)
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = (g_1TD * weight_TK.t().unsqueeze(-1).float()).to(y_AD.dtype).reshape(y_AD.shape)
        if ctx.needs_input_grad[1]:
            y_KTD = y_AD.view(K, T, y_AD.shape[-1])
            grad_w = (y_KTD.float() * g_1TD).sum(dim=-1).t().to(weight_TK.dtype)
        return grad_y, grad_w


def row_weights(weight_TK: Tensor, plan: DispatchPlan) -> Tensor:
    """The routing weight of each permuted row: [T, K] -> [R], in the plan's row order (the
    fused kernels weight each row themselves instead of combining slot outputs afterwards)."""
    return weight_TK.t().reshape(-1)[plan.row_slot]  # slots are k-major, as in `combine`

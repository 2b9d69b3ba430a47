"""The batch scope: which tokens make up "the batch" that an MoE layer balances over.

Legend: T = this process's tokens, B = its sequences, E = experts, K = top-k, W = processes
that share the batch, X = numbers summed per process.

Capacity, the three balancing losses, the logged statistics and the load that drives the
aux-loss-free bias are all functions of a few per-expert counts and sums over the batch.
`batch_totals` computes those partial counts and sums for this process's tokens, packs them
into one vector [X] and hands it to the scope, which returns every process's vector [W, X]:

- `BatchScope` (the default): this process's tokens are the batch; the vector comes back as
  it went in ([1, X]), no copy, no collective, no host sync.
- moe.distributed's `ProcessGroupScope`: one differentiable all-gather over the processes
  that share the batch (data and expert parallelism), so that N ranks compute exactly what
  one process computes on their concatenated batch.

Everything after the gather is the same code for both, which is the point: there is one
implementation of "the batch", and the distributed case is a different scope, not a branch.

Packed vector, per process: counts [K*E] (assignments of choice k to expert e; float, exact
below 2**24 per process), with expert_bias the load of finite tokens [E] (the bias update's),
tokens, sequences, then the differentiable sums the enabled losses need: router
probabilities summed over tokens [E], the sequence-wise loss summed over sequences, the
z-loss summed over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import balance
from .config import MoEConfig
from .dispatch import count_ids
from .router import Routing


class BatchScope:
    """This process's tokens are the batch. Subclasses widen it to several processes."""

    rank = 0  # position of this process's tokens in the concatenated batch

    def gather(self, partial_X: Tensor) -> Tensor:
        """Every process's partial vector [W, X], in rank order; differentiable."""
        return partial_X.unsqueeze(0)

    def token_count(self, local_tokens: int, batch_tokens: Tensor) -> int:
        """The batch's token count as a Python int (capacity sizes its slots on the host).
        Here it is this process's, known without asking the device."""
        return local_tokens


@dataclass
class BatchTotals:
    """What the layer needs to know about the whole batch (device tensors)."""

    load_E: Tensor  # [E] int64: the batch's assignments per expert, before capacity drops
    local_load_E: Tensor  # [E] int64: this process's
    ahead_KE: Tensor  # [K, E] int64: the batch's assignments of choice k to expert e that stand
    #                   ahead of this process's first such slot in the capacity queue (0 alone)
    tokens: Tensor  # the batch's tokens (float)
    losses: dict[str, Tensor]  # each enabled balancing loss, unweighted, over the batch
    num_tokens: int  # the batch's tokens as a Python int when capacity needs it, else this process's
    bias_load_E: Tensor | None = None  # [E] int64: the batch's assignments of tokens whose router
    #                                    logits are all finite (with expert_bias), for the bias update


def batch_totals(route: Routing, num_sequences: int | None, config: MoEConfig, scope: BatchScope) -> BatchTotals:
    """Gather this process's partial counts and sums over the batch, then derive everything
    that looks at the batch from the totals (one `scope.gather`). num_sequences: B of a 3-D
    input [B, S, D]; None for any other shape, which is one sequence of all its tokens.

    A batch of zero tokens is defined: counts 0, losses exactly 0 (a mean over nothing adds
    nothing), no NaN."""
    T, K = route.topk_idx.shape
    E = config.num_experts
    k_A = torch.arange(T * K, device=route.topk_idx.device) // T  # k-major slots, as in plan_dispatch
    counts_KE = count_ids(k_A * E + route.topk_idx.t().reshape(-1), K * E).view(K, E)
    counts = [counts_KE.flatten()]
    if config.expert_bias:
        # The bias moves on the load of tokens whose logits are finite: a NaN or inf token is routed
        # to arbitrary experts (top-k of NaN scores), which must not steer the bias of later batches.
        finite_TK = torch.isfinite(route.logits).all(dim=-1, keepdim=True).expand(T, K)
        counts.append(count_ids(route.topk_idx.reshape(-1), E, finite_TK.reshape(-1)))
    parts = balance.partial_sums(route, num_sequences, config)
    dtype = route.probs.dtype
    # Filled on the device: torch.tensor([...], device="cuda") copies from pageable host memory,
    # which waits for the stream (a host sync per layer).
    sizes = torch.full((2,), float(T), dtype=dtype, device=counts_KE.device)
    sizes[1] = num_sequences or 0
    partial_X = torch.cat([*[c.to(dtype) for c in counts], sizes, *[v.reshape(-1) for v in parts.values()]])

    gathered_WX = scope.gather(partial_X)
    num_counts = sum(c.numel() for c in counts)
    # Counts are exact in the float vector below 2**24 per process; summed as integers: exact for any batch.
    counts_WX = gathered_WX[:, :num_counts].long()
    counts_WKE = counts_WX[:, : K * E].view(-1, K, E)
    bias_load_E = counts_WX[:, K * E :].sum(0) if config.expert_bias else None
    total_X = gathered_WX[:, num_counts:].sum(0)
    tokens, sequences = total_X[0], total_X[1]
    sums = dict(zip(parts, total_X[2:].split([v.numel() for v in parts.values()])))

    batch_KE = counts_WKE.sum(0)
    # The single-process capacity queue is k-major over the concatenated batch. Ahead of this
    # process's first slot of (k, e): every process's choices k' < k of e, then earlier
    # processes' choices k of e. position_in_expert counts this process's own k' < k slots.
    ahead_KE = (batch_KE.cumsum(0) - batch_KE) - (counts_KE.cumsum(0) - counts_KE) + counts_WKE[: scope.rank].sum(0)
    num_tokens = scope.token_count(T, tokens) if config.capacity_factor is not None else T
    load_E = batch_KE.sum(0)
    losses = balance.losses_from_sums(sums, load_E, tokens, sequences, K, config)
    return BatchTotals(load_E, counts_KE.sum(0), ahead_KE, tokens, losses, num_tokens, bias_load_E)

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
below 2**24 per process), tokens, sequences, then the differentiable sums the enabled losses
need: router probabilities summed over tokens [E], the sequence-wise loss summed over
sequences, the z-loss summed over tokens.
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


def batch_totals(route: Routing, num_sequences: int | None, config: MoEConfig, scope: BatchScope) -> BatchTotals:
    """Gather this process's partial counts and sums over the batch, then derive everything
    that looks at the batch from the totals (one `scope.gather`). num_sequences: B of a 3-D
    input [B, S, D]; None for any other shape, which is one sequence of all its tokens."""
    T, K = route.topk_idx.shape
    E = config.num_experts
    k_A = torch.arange(T * K, device=route.topk_idx.device) // T  # k-major slots, as in plan_dispatch
    counts_KE = count_ids(k_A * E + route.topk_idx.t().reshape(-1), K * E).view(K, E)
    parts = balance.partial_sums(route, num_sequences, config)
    dtype = route.probs.dtype
    # Filled on the device: torch.tensor([...], device="cuda") copies from pageable host memory,
    # which waits for the stream (a host sync per layer).
    sizes = torch.full((2,), float(T), dtype=dtype, device=counts_KE.device)
    sizes[1] = num_sequences or 0
    partial_X = torch.cat([counts_KE.flatten().to(dtype), sizes, *[v.reshape(-1) for v in parts.values()]])

    gathered_WX = scope.gather(partial_X)
    counts_WKE = gathered_WX[:, : K * E].long().view(-1, K, E)  # summed as integers: exact for any batch
    total_X = gathered_WX[:, K * E :].sum(0)
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
    return BatchTotals(load_E, counts_KE.sum(0), ahead_KE, tokens, losses, num_tokens)

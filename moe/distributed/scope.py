"""The batch of several processes: the scope moe.distributed installs in every MoE layer.

Legend: W = processes that share the batch, X = numbers per process (moe/scope.py).

With data or expert parallelism, "the batch" is every rank's tokens, concatenated in rank
order. The layer's one implementation of the batch (moe/scope.py: capacity, the balancing
losses, the statistics, the bias load) needs only every rank's vector of partial counts and
sums; this scope supplies it with one all-gather per layer forward. The gather is
differentiable: every rank computes the same global losses from every rank's partial sums,
so the backward sums the gradients that all ranks' losses send to this rank's partials.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from ..scope import BatchScope


class ProcessGroupScope(BatchScope):
    """The batch is the tokens of every rank of `group` (the whole world under moe train)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)

    def gather(self, partial_X: Tensor) -> Tensor:
        with record_function("moe.scope.gather"):
            return _AllGather.apply(partial_X, self.group)

    def token_count(self, local_tokens: int, batch_tokens: Tensor) -> int:
        # Host sync (capacity only): the static limit and the water-fill's search take the batch's
        # token count as a Python int, as they take T on one process.
        return int(batch_tokens)


class _AllGather(torch.autograd.Function):
    """[X] -> [W, X] every rank's vector; the backward returns this rank's row of the summed gradients."""

    @staticmethod
    def forward(ctx, x_X: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        rows = [torch.empty_like(x_X) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, x_X.contiguous(), group=group)
        return torch.stack(rows)

    @staticmethod
    def backward(ctx, grad_WX: Tensor):
        grad_WX = grad_WX.contiguous()
        with record_function("moe.scope.gather"):
            dist.all_reduce(grad_WX, group=ctx.group)
        return grad_WX[dist.get_rank(ctx.group)], None

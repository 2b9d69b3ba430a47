"""One implementation of the batch: the totals-based losses equal their definitions
(balance.py), the local scope is the identity, and a scope that sees more processes changes
capacity, losses and statistics as one process holding every process's tokens would."""

import torch

from moe import MoE, MoEConfig
from moe.balance import router_z_loss, seq_aux_loss, switch_aux_loss
from moe.router import Routing
from moe.scope import BatchScope, batch_totals


def routing(T: int, E: int, K: int, seed: int) -> Routing:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    probs = logits.softmax(-1)
    topk = probs.topk(K, dim=-1)
    return Routing(topk.indices, topk.values, probs, logits)


def test_batch_totals_losses_equal_the_definitions():
    route = routing(T=12, E=6, K=2, seed=0)
    cfg = MoEConfig(num_experts=6, top_k=2, aux_loss_coef=1.0, seq_aux_loss_coef=1.0, z_loss_coef=1.0)
    three_d = batch_totals(route, 3, cfg, BatchScope())
    assert torch.equal(three_d.losses["switch_aux"], switch_aux_loss(route.probs, route.topk_idx))
    assert torch.equal(three_d.losses["z_loss"], router_z_loss(route.logits))
    assert torch.equal(three_d.losses["seq_aux"], seq_aux_loss(route.probs.view(3, 4, 6), route.topk_idx.view(3, 4, 2)))
    one_sequence = batch_totals(route, None, cfg, BatchScope())  # a 2-D input is one sequence
    assert torch.equal(one_sequence.losses["seq_aux"], switch_aux_loss(route.probs, route.topk_idx))
    assert one_sequence.load_E.tolist() == torch.bincount(route.topk_idx.flatten(), minlength=6).tolist()
    assert not one_sequence.ahead_KE.any()  # alone in the batch: nobody queues ahead


class TwoProcessScope(BatchScope):
    """The second of two processes, the first one's partial vector given: what
    moe.distributed.ProcessGroupScope returns on rank 1, without the collective."""

    rank = 1

    def __init__(self, first_partial_X: torch.Tensor):
        self.first = first_partial_X

    def gather(self, partial_X):
        return torch.stack([self.first, partial_X])

    def token_count(self, local_tokens, batch_tokens):
        return int(batch_tokens)


def test_a_wider_scope_gives_rank_1_what_one_process_gives_its_tokens():
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=0.75, aux_loss_coef=0.1, z_loss_coef=0.01)
    torch.manual_seed(2)
    layer = MoE(cfg, 8)
    x0, x1 = torch.randn(9, 8), torch.randn(5, 8)
    whole = layer(torch.cat([x0, x1]))
    whole_stats, whole_aux = layer.stats, layer.aux_loss

    captured = {}
    real_gather = BatchScope.gather

    def capture(self, partial_X):
        captured["X"] = partial_X.detach()
        return real_gather(self, partial_X)

    BatchScope.gather = capture
    try:
        layer(x0)  # rank 0's partial vector
    finally:
        BatchScope.gather = real_gather
    layer.scope = TwoProcessScope(captured["X"])
    part = layer(x1)
    # Rank 1's tokens: the same outputs, capacity drops included, as in the whole batch ...
    torch.testing.assert_close(part, whole[9:], rtol=0, atol=1e-6)
    # ... and the batch's losses and statistics, not its own.
    torch.testing.assert_close(layer.aux_loss, whole_aux, rtol=1e-6, atol=0)
    assert layer.stats["drop_rate"] == whole_stats["drop_rate"] > 0
    assert torch.equal(layer.stats["load"], whole_stats["load"])

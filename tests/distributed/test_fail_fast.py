"""A broken rank fails the whole group quickly, naming the rank and its error, instead of hanging:
a rank that raises while its peer waits in the expert-parallel all-to-all, and a rank that
stops taking part (its peer's collective times out)."""

from __future__ import annotations

import time

import pytest
import torch
from launch import RankFailed, spawn

from moe import MoE, MoEConfig
from moe.distributed import make_context, shard_experts


def ep_layer(world: int) -> MoE:
    torch.manual_seed(0)
    layer = MoE(MoEConfig(num_experts=4, top_k=2, expert_ffn_size=8), 16)
    shard_experts(layer, make_context(world, torch.device("cpu")))
    return layer


def raise_on_rank_1(rank: int, world: int) -> None:
    layer = ep_layer(world)
    if rank == 1:
        raise ValueError("rank 1 broke before its all-to-all")
    layer(torch.randn(8, 16))  # rank 0 waits for rank 1 in the count exchange


def stall_on_rank_1(rank: int, world: int) -> None:
    layer = ep_layer(world)
    if rank == 1:
        time.sleep(120)  # alive, but never joins the all-to-all
    layer(torch.randn(8, 16))


def test_a_rank_that_raises_fails_the_group_at_once():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"(?s)^rank 1 failed first.*ValueError: rank 1 broke before its all-to-all"):
        spawn(raise_on_rank_1, 2, timeout=120, collective_timeout=120)
    assert time.monotonic() - start < 60  # well before any timeout


def test_a_rank_that_stalls_times_out_the_collective():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"(?si)^rank 0 failed first.*timed out"):
        spawn(stall_on_rank_1, 2, timeout=120, collective_timeout=3)
    assert time.monotonic() - start < 60

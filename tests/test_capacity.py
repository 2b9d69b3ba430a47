import math

import pytest
import torch

from moe import MoE, MoEConfig
from moe.capacity import expert_capacity, static_slots, water_fill
from moe.dispatch import expert_load, plan_dispatch


def test_static_slots_formula():
    cfg = MoEConfig(num_experts=8, top_k=2, capacity_factor=1.25)
    assert static_slots(100, cfg) == math.ceil(1.25 * 100 * 2 / 8) == 32
    cap = expert_capacity(torch.tensor([50, 0, 10, 0, 0, 0, 0, 140]), 100, cfg)
    assert cap.tolist() == [32] * 8
    assert expert_capacity(torch.zeros(8, dtype=torch.long), 100, MoEConfig(num_experts=8)) is None


def test_static_drop_counts_and_priority():
    # 4 tokens, top-2, 2 experts, 2 slots each. Queues in k-major slot order:
    # expert 0: t0 (1st choice), t1 (1st), t3 (1st), t2 (2nd) -> t3 and t2 dropped;
    # expert 1: t2 (1st), t0 (2nd), t1 (2nd), t3 (2nd)         -> t1 and t3 dropped.
    topk = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    load = expert_load(topk, 2)
    plan = plan_dispatch(topk, load, torch.tensor([2, 2]))
    kept = plan.kept.view(2, 4)  # [K, T]
    assert kept[0].tolist() == [True, True, True, False]
    assert kept[1].tolist() == [True, False, False, False]
    assert plan.offs.tolist() == [2, 4]
    assert load.tolist() == [4, 4]


def test_water_fill_worked_example():
    load = torch.tensor([9, 1, 4, 2])
    assert water_fill(load, 12, max_load=16).tolist() == [5, 1, 4, 2]
    assert water_fill(load, 13, max_load=16).tolist() == [6, 1, 4, 2]
    assert water_fill(load, 100, max_load=16).tolist() == [9, 1, 4, 2]
    assert water_fill(torch.tensor([5, 5, 5]), 7, max_load=5).tolist() == [3, 2, 2]


@pytest.mark.parametrize("seed", range(5))
def test_water_fill_is_optimal_and_within_budget(seed):
    g = torch.Generator().manual_seed(seed)
    load = torch.randint(0, 60, (16,), generator=g)
    budget = int(torch.randint(1, 400, (), generator=g))
    cap = water_fill(load, budget, max_load=60)
    assert (cap <= load).all() and (cap >= 0).all()
    assert cap.sum().item() == min(budget, load.sum().item())  # every slot used while load remains
    # Only the peaks are cut: an expert that was cut keeps at least as much as any other cap - 1.
    cut = cap < load
    if cut.any():
        assert cap[cut].min() >= cap.max() - 1


def test_dynamic_drops_no_more_than_static_for_the_same_slots():
    torch.manual_seed(0)
    for factor in (0.5, 1.0, 1.25):
        for mode in ("static", "dynamic"):
            cfg = MoEConfig(num_experts=8, top_k=2, capacity_factor=factor, capacity_mode=mode)
            layer = MoE(cfg, 16)
            with torch.no_grad():
                layer.router.weight[:2] += 0.3  # skew the routing toward experts 0 and 1
            layer(torch.randn(512, 16) + 0.5)
            if mode == "static":
                static = layer.stats["drop_rate"]
            else:
                dynamic = layer.stats["drop_rate"]
        assert static > 0.05
        assert dynamic <= static
        assert dynamic == (0.0 if factor >= 1 else pytest.approx(1 - factor, abs=1e-3))


def test_dropped_assignments_contribute_nothing():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=1, capacity_factor=0.25, norm_topk_prob=False, backend="eager")
    layer = MoE(cfg, 8)
    x = torch.randn(16, 8)
    y = layer(x)
    # capacity 1 per expert -> at most 4 tokens computed, all others get exactly zero.
    nonzero = (y.abs().sum(-1) > 0).sum().item()
    assert nonzero <= 4
    assert layer.stats["drop_rate"] >= 0.75

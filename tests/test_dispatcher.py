"""The dispatcher seam: the layer runs whatever dispatcher is installed, and the local one's
gather/scatter path, its fused path and a dispatcher written outside the package agree."""

import pytest
import torch

from moe import MoE, MoEConfig
from moe.dispatch import DispatchPlan, combine, permute, unpermute
from moe.dispatcher import Dispatched, Dispatcher, LocalDispatcher


class CountingDispatcher(Dispatcher):
    """A dispatcher as a user would write one: the local moves, counted."""

    def __init__(self):
        self.calls = {"dispatch": 0, "collect": 0}

    def dispatch(self, x_TD: torch.Tensor, plan: DispatchPlan) -> Dispatched:
        self.calls["dispatch"] += 1
        return Dispatched(permute(x_TD, plan), plan.offs, state="token")

    def collect(self, y_RD: torch.Tensor, dispatched: Dispatched, plan: DispatchPlan) -> torch.Tensor:
        assert dispatched.state == "token"  # what dispatch handed over comes back
        self.calls["collect"] += 1
        return unpermute(y_RD, plan)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_an_installed_dispatcher_is_used_and_computes_the_same_layer(capacity_factor):
    torch.manual_seed(0)
    layer = MoE(MoEConfig(num_experts=6, top_k=2, capacity_factor=capacity_factor, aux_loss_coef=0.1), 12)
    x = torch.randn(3, 7, 12, requires_grad=True)
    expected = layer(x)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)

    layer.dispatcher = CountingDispatcher()
    got = layer(x)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    assert layer.dispatcher.calls == {"dispatch": 1, "collect": 1}
    assert torch.equal(got, expected) and torch.equal(grad_got, grad_expected)


def test_the_local_dispatcher_takes_the_fused_path_when_the_backend_has_one(monkeypatch):
    torch.manual_seed(1)
    layer = MoE(MoEConfig(num_experts=4, top_k=2), 8)
    assert isinstance(layer.dispatcher, LocalDispatcher)
    x = torch.randn(10, 8)
    expected = layer(x)
    seen = []

    def fused(x_TD, plan, weight_TK):  # what the Triton backend's fused path returns: the routed output [T, D]
        seen.append(plan.row_slot.numel())
        return combine(unpermute(layer.experts(permute(x_TD, plan), plan.offs), plan), weight_TK, plan)

    monkeypatch.setattr(layer.experts, "fused", fused)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert seen == [20]  # T * K slots, once

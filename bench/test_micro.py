"""CPU micro-benchmarks of the MoE layer's pieces (pytest-benchmark).

    PYTHONPATH=. python -m pytest bench/ --benchmark-columns=median,iqr,rounds

Not part of the test suite (pyproject's testpaths is tests/): they measure, they do not
check. Shapes are a Qwen3-MoE-like routing (64 experts, top-8) at CPU scale: 1,024 tokens of
width 256, expert FFN 128. On a GPU the layer-level figures come from `moe bench layers`.

Legend: T = tokens, D = hidden size, E = experts, K = top-k.
"""

import pytest
import torch

from moe import MoE, MoEConfig, Router
from moe.dispatch import expert_load, permute, plan_dispatch, unpermute

T, D, E, K, F = 1024, 256, 64, 8, 128
SOFTMAX = MoEConfig(num_experts=E, top_k=K, expert_ffn_size=F)
GROUPED = MoEConfig(
    num_experts=E,
    top_k=K,
    expert_ffn_size=F,
    score_func="sigmoid",
    n_group=8,
    topk_group=4,
    expert_bias=True,
    num_shared_experts=1,
    routed_scaling_factor=2.5,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("config", [SOFTMAX, GROUPED], ids=["softmax", "sigmoid-grouped"])
def test_router(benchmark, config):
    router = Router(config, D)
    x_TD = torch.randn(T, D)
    with torch.no_grad():
        route = benchmark(router, x_TD)
    assert route.topk_idx.shape == (T, K)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity-1.0"])
def test_plan_dispatch(benchmark, capacity_factor):
    topk_idx_TK = torch.randint(E, (T, K))
    load_E = expert_load(topk_idx_TK, E)
    capacity = None if capacity_factor is None else torch.full((E,), int(capacity_factor * T * K / E))
    plan = benchmark(plan_dispatch, topk_idx_TK, load_E, capacity)
    assert plan.row_slot.numel() == T * K


def test_permute_unpermute(benchmark):
    topk_idx_TK = torch.randint(E, (T, K))
    plan = plan_dispatch(topk_idx_TK, expert_load(topk_idx_TK, E))
    x_TD = torch.randn(T, D)
    y = benchmark(lambda: unpermute(permute(x_TD, plan), plan))
    assert y.shape == (T * K, D)


@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("config", [SOFTMAX, GROUPED], ids=["softmax", "sigmoid-grouped"])
def test_layer_forward(benchmark, config, backend):
    layer = MoE(MoEConfig(**{**config.__dict__, "backend": backend}), D)
    x = torch.randn(T, D)
    with torch.no_grad():
        y = benchmark(layer, x)
    assert y.shape == x.shape


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_layer_forward_backward(benchmark, backend):
    layer = MoE(MoEConfig(**{**GROUPED.__dict__, "backend": backend}), D)
    x = torch.randn(T, D, requires_grad=True)
    grad = torch.randn(T, D)
    params = list(layer.parameters())
    grads = benchmark(lambda: torch.autograd.grad(layer(x), [x, *params], grad))
    assert grads[0].shape == x.shape

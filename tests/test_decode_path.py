"""The MoE decode path (moe/experts.py `gathered_ffn`): with few rows and no autograd, the
experts read only the chosen experts' weights through batched matmuls; it must compute what the
grouped GEMM over all experts computes."""

import pytest
import torch

from moe import MoE, MoEConfig
from moe import experts as experts_module

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
E, K, D = 32, 2, 40  # the decode path takes up to E / 3 = 10 rows: 5 tokens


def layer(dtype=torch.float32, activation="swiglu", backend="torch", **overrides):
    torch.manual_seed(0)
    config = MoEConfig(num_experts=E, top_k=K, expert_ffn_size=24, activation=activation, backend=backend, **overrides)
    return MoE(config, hidden_size=D).to(dtype).eval()


def gathered_calls(monkeypatch):
    """Record the row count of every call of the decode path."""
    calls = []
    real = experts_module.gathered_ffn

    def spy(x_RD, *args):
        calls.append(x_RD.shape[0])
        return real(x_RD, *args)

    monkeypatch.setattr(experts_module, "gathered_ffn", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("tokens", [1, 2, 5])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_the_decode_path_equals_the_grouped_gemm(monkeypatch, dtype, activation, tokens, capacity_factor):
    moe = layer(dtype, activation, capacity_factor=capacity_factor)
    x = torch.randn(1, tokens, D, dtype=dtype)
    calls = gathered_calls(monkeypatch)
    with torch.no_grad():
        fast = moe(x)
    assert calls == [K * tokens]
    monkeypatch.setattr(experts_module, "GATHER_TRAFFIC", E + 1)  # never few enough rows: the grouped GEMM
    with torch.no_grad():
        grouped = moe(x)
    assert calls == [K * tokens]
    torch.testing.assert_close(fast, grouped, **TOLERANCE[dtype])


def test_training_many_rows_and_the_eager_reference_take_the_grouped_gemm(monkeypatch):
    calls = gathered_calls(monkeypatch)
    moe = layer()
    with torch.no_grad():
        moe(torch.randn(6, D))  # 12 rows: 3 * 12 > 32
    moe(torch.randn(2, D, requires_grad=True)).sum().backward()  # autograd on: the training path
    assert moe.experts.w_in.grad is not None
    with torch.no_grad():
        layer(backend="eager")(torch.randn(1, D))
    assert calls == []
    with torch.no_grad():
        moe(torch.randn(0, D))  # no tokens: the decode path with no rows is still well defined
        moe(torch.randn(1, D))
    assert calls == [0, K]


def test_the_triton_backend_takes_the_decode_path_too(monkeypatch):
    calls = gathered_calls(monkeypatch)
    moe = layer(backend="triton")
    x = torch.randn(3, D)
    with torch.no_grad():
        fast = moe(x)  # before the fused kernels (and their availability check): nothing to warn about
    assert calls == [K * 3]
    moe.config.backend = moe.experts.backend = "torch"
    monkeypatch.setattr(experts_module, "GATHER_TRAFFIC", E + 1)
    with torch.no_grad():
        torch.testing.assert_close(fast, moe(x), **TOLERANCE[torch.float32])

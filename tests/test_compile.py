"""torch.compile(fullgraph=True, inductor) of the MoE layer and of the decoder, forward and backward,
in fp32 and bf16 on the default expert backend ("torch"): no graph break, and the eager results.

fp32 needs moe::grouped_mm (moe/experts.py): torch's fake grouped_mm takes bf16 only.
Slow: each case is an inductor compile of a forward and a backward graph (tens of seconds on 2 cores).
"""

import dataclasses

import pytest
import torch

from moe import MoE, MoEConfig, Transformer, load_config

pytestmark = pytest.mark.slow

# Relative error, ||compiled - eager|| / ||eager||: inductor fuses elementwise chains and keeps their
# intermediates in fp32, where eager rounds each one to the tensor's dtype. Measured (torch 2.13, CPU):
# fp32 up to 1.2e-6; bf16 up to 2e-2 (the gradients of the norm weights, reductions over every token).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def small_tiny_config():
    """configs/tiny.yaml (the config `moe train` defaults to) at a size that compiles quickly."""
    cfg = load_config("tiny")
    moe_cfg = dataclasses.replace(cfg.moe, expert_ffn_size=32)
    return dataclasses.replace(cfg, hidden_size=32, num_layers=2, intermediate_size=64, max_seq_len=16, moe=moe_cfg)


def assert_close_rel(got, want, dtype, what):
    assert got.dtype == want.dtype, what
    assert torch.isfinite(got).all(), what
    err = (got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.2e} > {REL_TOL[dtype]:.0e}"


def run(fn, module, inputs, aux_loss):
    """Output, aux loss, and the gradients of a loss that uses both, of every parameter and float input."""
    out = fn(*inputs)
    aux = aux_loss()
    loss = out.float().square().mean() + aux
    wrt = [p for p in module.parameters()] + [x for x in inputs if x.is_floating_point()]
    grads = torch.autograd.grad(loss, wrt)
    return out.detach(), aux.detach(), grads


def check_compiles_like_eager(module, inputs, aux_loss, dtype):
    explained = torch._dynamo.explain(module)(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    moe_layers = [m for m in module.modules() if isinstance(m, MoE)]
    load_before = [m.load_since_update.clone() for m in moe_layers]
    eager = run(module, module, inputs, aux_loss)
    eager_load = [m.load_since_update - before for m, before in zip(moe_layers, load_before)]
    eager_stats = [m.stats for m in moe_layers]

    compiled = torch.compile(module, backend="inductor", fullgraph=True)
    load_before = [m.load_since_update.clone() for m in moe_layers]
    got = run(compiled, module, inputs, aux_loss)

    assert_close_rel(got[0], eager[0], dtype, "output")
    torch.testing.assert_close(got[1], eager[1], rtol=1e-4, atol=1e-7)  # losses are computed in fp32
    names = [n for n, _ in module.named_parameters()] + ["input"]
    for name, g, e in zip(names, got[2], eager[2]):
        assert_close_rel(g, e, dtype, f"gradient of {name}")
    for m, before, want, stats in zip(moe_layers, load_before, eager_load, eager_stats):
        assert torch.equal(m.load_since_update - before, want)  # the buffer mutation survives compilation
        assert m.stats["drop_rate"] == stats["drop_rate"]
        torch.testing.assert_close(m.stats["load"], stats["load"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_compiles_fullgraph_like_eager(dtype):
    torch.manual_seed(0)
    layer = MoE(MoEConfig(), hidden_size=16).to(dtype)  # the default config: softmax top-2 of 8, dropless, "torch"
    x = torch.randn(2, 6, 16, dtype=dtype, requires_grad=True)
    check_compiles_like_eager(layer, (x,), lambda: layer.aux_loss, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transformer_compiles_fullgraph_like_eager(dtype):
    torch.manual_seed(0)
    model = Transformer(small_tiny_config()).to(dtype).train()
    assert model.moe_layers()[0].router.expert_bias is not None
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    check_compiles_like_eager(model, (ids,), model.aux_loss, dtype)

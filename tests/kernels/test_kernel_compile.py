"""torch.compile(fullgraph=True) captures the kernels' custom ops, forward and backward.

aot_eager runs the fake implementations and AOT autograd's graph capture (what
inductor sees) without generating code, so it works on CPU under the interpreter.
"""

import pytest
import torch
from kernel_testing import DEVICE

import moe_kernels


def _layer(x, w_in, w_out, offs, row_token, row_slot, topk_w, w_proj):
    """A miniature MoE block: fused expert FFN, routing weights, sum over top-k,
    then a one-group grouped_mm as an output projection."""
    t, k = topk_w.shape
    y = moe_kernels.expert_ffn(x, w_in, w_out, offs, row_token, row_slot, t * k)
    y = (y.view(t, k, -1) * topk_w[..., None]).sum(1)
    one_group = torch.full((1,), t, dtype=torch.int32, device=x.device)
    return moe_kernels.grouped_mm(y, w_proj, one_group)


@pytest.mark.slow
def test_fullgraph_compile_matches_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    t, d, f, e, k = 6, 32, 16, 3, 2
    x = torch.randn(t, d, generator=gen).to(DEVICE).requires_grad_(True)
    w_in = (torch.randn(e, d, 2 * f, generator=gen) / d**0.5).to(DEVICE).requires_grad_(True)
    w_out = (torch.randn(e, f, d, generator=gen) / f**0.5).to(DEVICE).requires_grad_(True)
    row_slot = torch.randperm(t * k, generator=gen).to(DEVICE)
    row_token = row_slot // k
    offs = torch.tensor([4, 4, t * k], dtype=torch.int32, device=DEVICE)
    topk_w = torch.rand(t, k, generator=gen).to(DEVICE)
    w_proj = (torch.randn(1, d, d, generator=gen) / d**0.5).to(DEVICE).requires_grad_(True)
    args = (x, w_in, w_out, offs, row_token, row_slot, topk_w, w_proj)

    eager = _layer(*args)
    eager_grads = torch.autograd.grad(eager.square().sum(), (x, w_in, w_out, w_proj))
    compiled = torch.compile(_layer, fullgraph=True, backend="aot_eager")(*args)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), (x, w_in, w_out, w_proj))

    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)

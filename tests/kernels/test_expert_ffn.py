"""moe_kernels.expert_ffn (fused gather/scatter) against moe_kernels.expert_ffn_reference in float64.

Shapes: T = tokens, d = model dim, f = expert hidden dim, E = experts, K = top-k,
        R = permuted rows = T * K.
"""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, assert_close, double_leaf, routing, weights

import moe_kernels


def check_against_reference(x, w_in, w_out, offs, row_token, row_slot, num_slots, activation, dtype, seed):
    y = moe_kernels.expert_ffn(x, w_in, w_out, offs, row_token, row_slot, num_slots, activation)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, (x, w_in, w_out), dy)

    leaves = [double_leaf(w) for w in (x, w_in, w_out)]
    ref = moe_kernels.expert_ffn_reference(*leaves, offs, row_token, row_slot, num_slots, activation)
    ref_grads = torch.autograd.grad(ref, leaves, dy.double())
    assert_close(y, ref, dtype, "y")
    for name, grad, ref_grad in zip(("dx", "dw_in", "dw_out"), grads, ref_grads):
        assert_close(grad, ref_grad, dtype, name)
    return y, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_matches_reference_with_drops_and_empty_expert(activation, dtype):
    t, d, f, e, k = 12, 40, 24, 4, 2
    offs, row_token, row_slot = routing(t, k, e, n_dropped=3, seed=0, empty_expert=1)
    x, w_in, w_out = weights(t, d, f, e, activation, dtype, seed=1)
    y, (dx, dw_in, dw_out) = check_against_reference(
        x, w_in, w_out, offs, row_token, row_slot, t * k, activation, dtype, seed=2
    )
    dropped_slots = row_slot[offs[-1] :]
    assert dropped_slots.numel() == 3
    assert torch.equal(y[dropped_slots], torch.zeros_like(y[dropped_slots]))
    assert torch.equal(dw_in[1], torch.zeros_like(dw_in[1]))
    assert torch.equal(dw_out[1], torch.zeros_like(dw_out[1]))


@pytest.mark.slow
def test_dims_not_multiple_of_block():
    t, d, f, e, k = 10, 100, 37, 3, 2
    offs, row_token, row_slot = routing(t, k, e, n_dropped=0, seed=3)
    x, w_in, w_out = weights(t, d, f, e, "swiglu", torch.float32, seed=4)
    check_against_reference(x, w_in, w_out, offs, row_token, row_slot, t * k, "swiglu", torch.float32, seed=5)


def test_slots_named_by_no_row_are_zero():
    t, d, f, e, k = 6, 32, 16, 3, 2
    offs, row_token, row_slot = routing(t, k, e, n_dropped=2, seed=6)
    x, w_in, w_out = weights(t, d, f, e, "gelu", torch.float32, seed=7)
    num_slots = t * k + 5
    y, _ = check_against_reference(x, w_in, w_out, offs, row_token, row_slot, num_slots, "gelu", torch.float32, seed=8)
    assert torch.equal(y[t * k :], torch.zeros_like(y[t * k :]))


def test_no_rows():
    t, d, f, e = 3, 32, 16, 2
    x, w_in, w_out = weights(t, d, f, e, "swiglu", torch.float32, seed=9)
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    offs = torch.zeros(e, dtype=torch.int32, device=DEVICE)
    y = moe_kernels.expert_ffn(x, w_in, w_out, offs, empty, empty, 4)
    assert torch.equal(y, torch.zeros(4, d, device=DEVICE))
    for grad in torch.autograd.grad(y.sum(), (x, w_in, w_out)):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_inference_matches_and_saves_no_preactivation():
    t, d, f, e, k = 8, 32, 16, 3, 2
    offs, row_token, row_slot = routing(t, k, e, n_dropped=1, seed=10)
    x, w_in, w_out = weights(t, d, f, e, "swiglu", torch.float32, seed=11)
    with torch.no_grad():
        y = moe_kernels.expert_ffn(x, w_in, w_out, offs, row_token, row_slot, t * k)
        _, z = torch.ops.moe_kernels.expert_ffn(x, w_in, w_out, offs, row_token, row_slot, t * k, "swiglu", False)
        ref = moe_kernels.expert_ffn_reference(
            x.double(), w_in.double(), w_out.double(), offs, row_token, row_slot, t * k
        )
    assert not y.requires_grad
    assert z.shape == (0, 2 * f)
    assert_close(y, ref, torch.float32, "y")


@pytest.mark.slow
def test_backward_is_deterministic():
    t, d, f, e, k = 16, 32, 16, 4, 4
    offs, row_token, row_slot = routing(t, k, e, n_dropped=0, seed=12)
    x, w_in, w_out = weights(t, d, f, e, "swiglu", torch.float32, seed=13)
    runs = []
    for _ in range(2):
        y = moe_kernels.expert_ffn(x, w_in, w_out, offs, row_token, row_slot, t * k)
        runs.append(torch.autograd.grad(y.square().sum(), (x, w_in, w_out)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)

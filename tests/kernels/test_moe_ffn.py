"""moe_kernels.moe_ffn (routing weights and the sum over top-k fused in) against
moe_kernels.moe_ffn_reference in float64, and what it keeps for the backward.

Shapes: T = tokens, d = model dim, f = expert hidden dim, E = experts, K = top-k,
        R = permuted rows = T * K.
"""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, assert_close, check_moe_ffn, routing, weights

import moe_kernels


def row_weight(r, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(r, generator=gen).to(DEVICE, dtype).requires_grad_(True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_matches_reference_with_drops_and_empty_expert(activation, dtype):
    t, d, f, e, k = 12, 40, 24, 4, 2
    offs, row_token, row_slot = routing(t, k, e, n_dropped=3, seed=0, empty_expert=1)
    x, w_in, w_out = weights(t, d, f, e, activation, dtype, seed=1)
    s = row_weight(t * k, torch.float32, seed=2)  # the layer passes the router's fp32 weights
    _, (_, dw_in, dw_out, ds) = check_moe_ffn(x, w_in, w_out, offs, row_token, s, activation, dtype, seed=3)
    assert ds.dtype == torch.float32
    assert torch.equal(ds[offs[-1] :], torch.zeros(3, device=DEVICE))  # dropped rows: no gradient
    assert torch.equal(dw_in[1], torch.zeros_like(dw_in[1]))  # the empty expert
    assert torch.equal(dw_out[1], torch.zeros_like(dw_out[1]))


def test_equals_expert_ffn_weighted_and_summed_over_top_k():
    """The layer's two triton paths, old and new, compute one function."""
    t, d, f, e, k = 9, 32, 16, 3, 3
    offs, row_token, row_slot = routing(t, k, e, n_dropped=2, seed=4)
    x, w_in, w_out = weights(t, d, f, e, "swiglu", torch.float32, seed=5)
    s = row_weight(t * k, torch.float32, seed=6)
    out = moe_kernels.moe_ffn(x, w_in, w_out, offs, row_token, s)
    y = moe_kernels.expert_ffn(x, w_in, w_out, offs, row_token, row_slot, t * k)  # slot = token * k + j
    slot_weight = torch.empty_like(s).index_copy(0, row_slot, s)
    expected = (y * slot_weight[:, None]).view(t, k, d).sum(1)
    assert_close(out, expected.double(), torch.float32, "out")


def test_a_token_with_every_row_dropped_gets_zeros():
    t, d, f, e, k = 5, 32, 16, 2, 2
    offs, row_token, _ = routing(t, k, e, n_dropped=0, seed=7)
    x, w_in, w_out = weights(t, d, f, e, "gelu", torch.float32, seed=8)
    # move token 0's rows past the end of every group: offs[-1] = R - 2, and those rows last
    mine = row_token == 0
    order = torch.cat([torch.nonzero(~mine).flatten(), torch.nonzero(mine).flatten()])
    kept_expert = torch.repeat_interleave(torch.arange(e, device=DEVICE), torch.diff(offs, prepend=offs.new_zeros(1)))
    expert_of_kept = kept_expert[order[:-2]]
    regroup = torch.argsort(expert_of_kept, stable=True)
    row_token = torch.cat([row_token[order[:-2]][regroup], row_token[mine]])
    offs = torch.bincount(expert_of_kept, minlength=e).cumsum(0).to(torch.int32)
    s = row_weight(t * k, torch.float32, seed=9)
    out, _ = check_moe_ffn(x, w_in, w_out, offs, row_token, s, "gelu", torch.float32, seed=10)
    assert torch.equal(out[0], torch.zeros(d, device=DEVICE))


@pytest.mark.slow
def test_dims_not_multiple_of_block():
    t, d, f, e, k = 10, 100, 37, 3, 2
    offs, row_token, _ = routing(t, k, e, n_dropped=0, seed=11)
    x, w_in, w_out = weights(t, d, f, e, "swiglu", torch.float32, seed=12)
    s = row_weight(t * k, torch.float32, seed=13)
    check_moe_ffn(x, w_in, w_out, offs, row_token, s, "swiglu", torch.float32, seed=14)


def test_no_rows():
    t, d, f, e = 3, 32, 16, 2
    x, w_in, w_out = weights(t, d, f, e, "swiglu", torch.float32, seed=15)
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    s = torch.empty(0, device=DEVICE, requires_grad=True)
    out = moe_kernels.moe_ffn(x, w_in, w_out, torch.zeros(e, dtype=torch.int32, device=DEVICE), empty, s)
    assert torch.equal(out, torch.zeros(t, d, device=DEVICE))
    for grad in torch.autograd.grad(out.sum(), (x, w_in, w_out, s)):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_keeps_only_the_preactivation_for_the_backward():
    """Saved for the backward: the inputs and z [R, 2f]; nothing [R, d] (no per-expert output,
    no gathered x), so the saved bytes per row are those of z."""
    t, d, f, e, k = 8, 48, 16, 3, 2
    offs, row_token, _ = routing(t, k, e, n_dropped=1, seed=16)
    x, w_in, w_out = weights(t, d, f, e, "swiglu", torch.float32, seed=17)
    s = row_weight(t * k, torch.float32, seed=18)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda p: saved.append(p) or p, lambda p: p):
        moe_kernels.moe_ffn(x, w_in, w_out, offs, row_token, s)
    inputs = {id(v) for v in (x, w_in, w_out, offs, row_token, s)}
    made_here = [p for p in saved if id(p) not in inputs]
    assert [tuple(p.shape) for p in made_here] == [(t * k, 2 * f)]


def test_inference_saves_no_preactivation():
    t, d, f, e, k = 8, 32, 16, 3, 2
    offs, row_token, _ = routing(t, k, e, n_dropped=1, seed=19)
    x, w_in, w_out = weights(t, d, f, e, "swiglu", torch.float32, seed=20)
    s = row_weight(t * k, torch.float32, seed=21)
    with torch.no_grad():
        out = moe_kernels.moe_ffn(x, w_in, w_out, offs, row_token, s)
        _, z = torch.ops.moe_kernels.moe_ffn(x, w_in, w_out, offs, row_token, s, "swiglu", False)
        ref = moe_kernels.moe_ffn_reference(x.double(), w_in.double(), w_out.double(), offs, row_token, s.double())
    assert not out.requires_grad
    assert z.shape == (0, 2 * f)
    assert_close(out, ref, torch.float32, "out")


@pytest.mark.slow
def test_backward_is_deterministic():
    t, d, f, e, k = 16, 32, 16, 4, 4
    offs, row_token, _ = routing(t, k, e, n_dropped=0, seed=22)
    x, w_in, w_out = weights(t, d, f, e, "swiglu", torch.float32, seed=23)
    s = row_weight(t * k, torch.float32, seed=24)
    runs = []
    for _ in range(2):
        out = moe_kernels.moe_ffn(x, w_in, w_out, offs, row_token, s)
        runs.append((out, *torch.autograd.grad(out.square().sum(), (x, w_in, w_out, s))))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_fullgraph_compile_matches_eager():
    t, d, f, e, k = 6, 32, 16, 2, 2
    offs, row_token, _ = routing(t, k, e, n_dropped=1, seed=25)
    x, w_in, w_out = weights(t, d, f, e, "swiglu", torch.float32, seed=26)
    s = row_weight(t * k, torch.float32, seed=27)
    leaves = (x, w_in, w_out, s)

    def run(fn):
        out = fn(x, w_in, w_out, offs, row_token, s)
        return (out, *torch.autograd.grad(out.square().sum(), leaves))

    eager = run(moe_kernels.moe_ffn)
    compiled = run(torch.compile(moe_kernels.moe_ffn, fullgraph=True, backend="aot_eager"))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda s: s[:-1], r"row_weight must be \[R\]"),
        (lambda s: s.long(), "row_weight"),
    ],
)
def test_bad_row_weight_is_refused(bad, message):
    t, d, f, e, k = 4, 32, 16, 2, 2
    offs, row_token, _ = routing(t, k, e, n_dropped=0, seed=28)
    x, w_in, w_out = weights(t, d, f, e, "swiglu", torch.float32, seed=29)
    s = row_weight(t * k, torch.float32, seed=30).detach()
    with pytest.raises((ValueError, TypeError), match=message):
        moe_kernels.moe_ffn(x, w_in, w_out, offs, row_token, bad(s))

"""The expert backends against each other and against a token-by-token loop."""

import math

import pytest
import torch

from moe import MoE, MoEConfig
from moe.experts import activate, eager_grouped_mm, torch_grouped_mm


def reference_moe(layer, x_TD):
    """The whole MoE layer as a loop over tokens and their k choices, with capacity decided
    by Python queues in the documented priority (k-major, then token order)."""
    cfg = layer.config
    route = layer.router(x_TD)
    T, K = route.topk_idx.shape
    capacity = None
    if cfg.capacity_factor is not None:
        assert cfg.capacity_mode == "static"
        capacity = math.ceil(cfg.capacity_factor * T * K / cfg.num_experts)
    queue = {}
    out = [torch.zeros_like(x_TD[0]) for _ in range(T)]
    for k in range(K):
        for t in range(T):
            e = int(route.topk_idx[t, k])
            queue[e] = queue.get(e, 0) + 1
            if capacity is not None and queue[e] > capacity:
                continue
            h = activate(x_TD[t] @ layer.experts.w_in[e], cfg.activation)
            out[t] = out[t] + route.topk_weight[t, k].to(x_TD.dtype) * (h @ layer.experts.w_out[e])
    out = torch.stack(out)
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x_TD)
    return out


def grads(layer, x, y, g):
    params = [x] + [p for p in layer.parameters()]
    return torch.autograd.grad(y, params, g, allow_unused=True)


CASES = [
    dict(num_experts=8, top_k=2),
    dict(num_experts=6, top_k=3, activation="gelu", num_shared_experts=2, expert_ffn_size=19),
    dict(
        num_experts=16,
        top_k=4,
        score_func="sigmoid",
        expert_bias=True,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        num_shared_experts=1,
        expert_ffn_size=13,
    ),
    dict(num_experts=8, top_k=2, capacity_factor=0.5),
    dict(num_experts=5, top_k=1, capacity_factor=1.0, activation="gelu", expert_ffn_size=7),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("backend", ["eager", "torch", "triton"])
def test_backend_matches_token_loop_in_output_and_every_gradient(case, backend):
    # the kernels run compiled on a GPU machine, through the interpreter elsewhere (fp32 is IEEE on both)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    layer = MoE(MoEConfig(backend=backend, **case), hidden_size=37).to(device)
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.normal_(std=0.1)
    x = torch.randn(23, 37, device=device, requires_grad=True)
    y = layer(x)
    y_ref = reference_moe(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    for got, ref in zip(grads(layer, x, y, g), grads(layer, x, y_ref, g)):
        if ref is None:
            assert got is None or got.abs().max() == 0
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_experts_with_no_tokens_get_zero_gradient():
    torch.manual_seed(0)
    for backend in ("eager", "torch"):
        layer = MoE(MoEConfig(num_experts=8, top_k=1, backend=backend), 16)
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[3] = 1.0  # all tokens with positive sum go to expert 3 ...
        x = torch.randn(10, 16).abs()  # ... and these all have positive sums
        layer(x).square().sum().backward()
        assert layer.stats["load"][3] == 1.0
        w_in_grad = layer.experts.w_in.grad
        assert w_in_grad[3].abs().sum() > 0
        assert w_in_grad[torch.arange(8) != 3].abs().sum() == 0


@pytest.mark.parametrize("K, N", [(8, 8), (37, 19), (3, 100)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_grouped_mm_backends_agree(K, N, dtype, tol):
    torch.manual_seed(0)
    offs = torch.tensor([0, 5, 5, 17, 20], dtype=torch.int32)  # empty first and middle groups
    a = torch.randn(23, K, dtype=dtype, requires_grad=True)  # rows 20..22 belong to no group
    b = torch.randn(5, K, N, dtype=dtype, requires_grad=True)
    ref = torch.cat([a[s:e].double() @ b[g].double() for g, (s, e) in enumerate(zip([0, 0, 5, 5, 17], offs.tolist()))])
    for fn in (eager_grouped_mm, torch_grouped_mm):
        out = fn(a, b, offs)[:20]
        assert out.dtype == dtype
        err = (out.double() - ref).norm() / ref.norm()
        assert err < tol, (fn.__name__, err.item())
    g = torch.randn(20, N, dtype=dtype)
    ga_e, gb_e = torch.autograd.grad(eager_grouped_mm(a, b, offs)[:20], (a, b), g)
    ga_t, gb_t = torch.autograd.grad(torch_grouped_mm(a, b, offs)[:20], (a, b), g)
    for got, ref in ((ga_t[:20], ga_e[:20]), (gb_t, gb_e)):
        assert ((got.double() - ref.double()).norm() / ref.double().norm()) < tol


def test_bf16_layer_is_close_to_fp32():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(num_experts=8, top_k=2, num_shared_experts=1), 64)
    x = torch.randn(40, 64)
    ref = layer(x)
    out = layer.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()) < 2e-2


def test_triton_backend_falls_back_with_a_warning_where_it_cannot_run(monkeypatch):
    # Whether Triton can run is the kernels package's call (tested in tests/kernels); here:
    # when it says no, the layer warns and computes the same function on the torch backend.
    import moe_kernels

    monkeypatch.setattr(moe_kernels, "triton_available", lambda *args: (False, "no GPU and no interpreter"))
    torch.manual_seed(0)
    cfg = dict(num_experts=4, top_k=2)
    ref_layer = MoE(MoEConfig(backend="torch", **cfg), 16)
    layer = MoE(MoEConfig(backend="triton", **cfg), 16)
    layer.load_state_dict(ref_layer.state_dict())
    x = torch.randn(9, 16)
    with pytest.warns(RuntimeWarning, match="no GPU and no interpreter"):
        y = layer(x)
    torch.testing.assert_close(y, ref_layer(x))


def test_layer_keeps_leading_shape_and_rejects_wrong_width():
    layer = MoE(MoEConfig(num_experts=4, top_k=2), 8)
    assert layer(torch.randn(2, 3, 5, 8)).shape == (2, 3, 5, 8)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        layer(torch.randn(3, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_compiles_without_graph_breaks(dtype):
    # fp32 runs moe::grouped_mm (torch's fake grouped_mm takes bf16 only), bf16 torch's own op.
    # tests/test_compile.py (slow) holds inductor, the decoder and every gradient to eager.
    torch.manual_seed(0)
    layer = MoE(
        MoEConfig(
            num_experts=8,
            top_k=2,
            num_shared_experts=1,
            score_func="sigmoid",
            expert_bias=True,
            aux_loss_coef=0.01,
            capacity_factor=1.0,
        ),
        32,
    ).to(dtype)
    x = torch.randn(2, 12, 32, dtype=dtype)
    expected = layer(x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)
    assert compiled.aux_loss.item() == layer.aux_loss.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grouped_mm_custom_op_passes_opcheck(dtype):
    # The op torch.compile sees for dtypes other than bf16: schema, fake, autograd registration.
    # Every row in a group: rows past offs[-1] come out unspecified (uninitialised), which opcheck
    # would report as eager and traced runs that differ.
    torch.manual_seed(0)
    offs = torch.tensor([0, 5, 5, 17, 23], dtype=torch.int32)
    a = torch.randn(23, 12, dtype=dtype, requires_grad=True)
    b = torch.randn(5, 12, 8, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.moe.grouped_mm.default, (a, b, offs))
    torch.library.opcheck(torch.ops.moe.grouped_mm_dw.default, (a.detach(), torch.randn(23, 8, dtype=dtype), offs))


def test_grouped_mm_without_a_torch_kernel_runs_the_reference_loop(monkeypatch):
    # Where torch has no grouped_mm kernel for the dtype (fp32 on CUDA), moe::grouped_mm computes
    # the same function, forward and backward, with the eager loops (and one warning).
    import moe.experts as experts

    torch.manual_seed(0)
    offs = torch.tensor([0, 5, 5, 17, 20], dtype=torch.int32)
    a = torch.randn(23, 37, requires_grad=True)
    b = torch.randn(5, 37, 19, requires_grad=True)
    g = torch.randn(20, 19)
    want = torch_grouped_mm(a, b, offs)[:20]
    want_grads = torch.autograd.grad(want, (a, b), g)
    monkeypatch.setattr(experts, "_native_takes", lambda a: False)
    with pytest.warns(RuntimeWarning, match="eager loop"):
        got = torch_grouped_mm(a, b, offs)[:20]
        got_grads = torch.autograd.grad(got, (a, b), g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad[:20], want_grad[:20], rtol=1e-5, atol=1e-5)


def test_autocast_runs_the_grouped_gemm_in_the_autocast_dtype():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(num_experts=4, top_k=2), 32)
    x = torch.randn(10, 32)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.slow
def test_triton_layer_compiles_without_graph_breaks():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    layer = MoE(MoEConfig(num_experts=4, top_k=2, num_shared_experts=1, backend="triton"), 16).to(device)
    x = torch.randn(7, 16, device=device, requires_grad=True)
    expected = layer(x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    (grad_compiled,) = torch.autograd.grad(out.square().sum(), x)
    (grad_eager,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad_compiled, grad_eager)

from pathlib import Path

import pytest
import torch

from moe import ModelConfig, MoE, MoEConfig, load_config
from moe.perf.components import KINDS, RankMoE, build, layer_counts, make_step, scale_config, train_flops_per_token
from moe.perf.flops import active_params, count

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    "path, ep",
    [
        ("tiny.yaml", 1),
        ("tiny.yaml", 4),
        ("full/deepseek-v3.yaml", 64),
        ("full/ling-1t.yaml", 8),
        ("full/mixtral-8x7b.yaml", 8),
        ("deepseek-v3-mini.yaml", 2),
    ],
)
def test_components_add_up_to_the_model_flops(path, ep):
    config = load_config(CONFIGS / path)
    counts = layer_counts(config)
    total = sum(counts[k] * train_flops_per_token(k, config, 1024, ep) for k in KINDS if counts[k])
    assert total == pytest.approx(count(config, 1024).train_flops_per_token, rel=1e-12)


def test_components_add_up_with_tied_embeddings_and_no_moe():
    config = ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, tie_embeddings=True, moe=None)
    counts = layer_counts(config)
    assert counts == {"attention": 2, "moe": 0, "dense": 2, "head": 1}
    total = sum(counts[k] * train_flops_per_token(k, config, 64) for k in ("attention", "dense", "head"))
    assert total == pytest.approx(count(config, 64).train_flops_per_token, rel=1e-12)


MOE = MoEConfig(
    num_experts=8,
    top_k=3,
    expert_ffn_size=12,
    num_shared_experts=1,
    score_func="sigmoid",
    n_group=4,
    topk_group=2,
    expert_bias=True,
    routed_scaling_factor=2.5,
)


def test_rank_moe_with_one_rank_is_the_moe_layer():
    torch.manual_seed(0)
    rank = RankMoE(MOE, 16, 1, "cpu")
    layer = MoE(MOE, 16)
    layer.load_state_dict(rank.state_dict())
    x = torch.randn(2, 7, 16, requires_grad=True)
    y_rank, y_layer = rank(x), layer(x)
    torch.testing.assert_close(y_rank, y_layer, rtol=0, atol=0)
    g = torch.randn_like(y_rank)
    grads_rank = torch.autograd.grad(y_rank, [x, *rank.parameters()], g)
    grads_layer = torch.autograd.grad(y_layer, [x, *layer.parameters()], g)
    for a, b in zip(grads_rank, grads_layer):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("ep", [2, 4, 8])
def test_rank_moe_runs_every_assignment_through_its_local_experts(ep):
    # Local expert j takes the rows of global experts j*P .. j*P+P-1; a full layer whose global
    # expert e holds local expert e // P's weights computes the same function.
    torch.manual_seed(ep)
    rank = RankMoE(MOE, 16, ep, "cpu")
    assert rank.experts.w_in.shape == (8 // ep, 16, 24)
    layer = MoE(MOE, 16)
    state = rank.state_dict()
    state["experts.w_in"] = state["experts.w_in"].repeat_interleave(ep, dim=0)
    state["experts.w_out"] = state["experts.w_out"].repeat_interleave(ep, dim=0)
    layer.load_state_dict(state)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(rank(x), layer(x), rtol=1e-6, atol=1e-6)


def test_rank_moe_gives_grouped_mm_offsets_it_can_read_without_strides(monkeypatch):
    # CUDA's grouped_mm (torch 2.11) reads offs from its data pointer with unit stride; a strided
    # view offs[P-1::P] then groups the wrong rows and the layer silently does a fraction of the
    # work (the first H100 calibration timed a MoE layer at 1,514 TFLOP/s that way).
    import moe.experts

    real = torch.nn.functional.grouped_mm

    def reads_like_cuda(a, b, offs=None, **kwargs):
        flat = torch.as_strided(offs, offs.shape, (1,))  # what a unit-stride read of data_ptr sees
        return real(a, b, offs=flat, **kwargs)

    monkeypatch.setattr(moe.experts.F, "grouped_mm", reads_like_cuda)
    test_rank_moe_runs_every_assignment_through_its_local_experts(4)


def test_rank_moe_counts_one_tokens_active_weights():
    rank = RankMoE(MOE, 16, 4, "meta")
    per_expert = 16 * 24 + 12 * 16
    shared = 3 * 16 * 12
    assert active_params(rank) == 8 * 16 + shared + 3 * per_expert


def test_rank_moe_rejects_a_degree_that_does_not_divide_the_experts():
    with pytest.raises(ValueError, match="expert-parallel degree 3"):
        RankMoE(MOE, 16, 3, "cpu")


def test_scaled_config_keeps_the_routing_shape():
    config = load_config(CONFIGS / "full" / "deepseek-v3.yaml")
    small = scale_config(config, 16)
    assert small.hidden_size == 7168 // 16 and small.num_heads == 8 and small.vocab_size == 129280 // 16
    assert small.moe.expert_ffn_size == 128 and small.intermediate_size == 18432 // 16
    assert (small.q_lora_rank, small.kv_lora_rank) == (1536 // 16, 512 // 16)
    assert (small.moe.num_experts, small.moe.top_k, small.num_layers) == (256, 8, 61)
    assert small.qk_nope_head_dim == 128 and small.v_head_dim == 128
    ling = scale_config(load_config(CONFIGS / "full" / "ling-1t.yaml"), 16)
    assert (ling.num_heads, ling.num_kv_heads, ling.dim_per_head, ling.rotary_dim) == (4, 1, 128, 64)
    assert scale_config(config, 1) is config


@pytest.mark.parametrize("kind", KINDS)
def test_make_step_runs_forward_and_backward(kind):
    config = load_config(CONFIGS / "tiny.yaml")
    module = build(kind, config, ep_degree=2)
    grads = make_step(kind, module, config, batch=2, seq_len=8)()
    params = [p for p in module.parameters() if p.requires_grad]
    offset = 0 if kind == "head" else 1
    if kind != "head":
        assert grads[0].shape == (2, 8, config.hidden_size)  # the input's gradient
    assert len(grads) == len(params) + offset
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    out = make_step(kind, module, config, batch=2, seq_len=8, backward=False)()
    assert out.shape == (() if kind == "head" else (2, 8, config.hidden_size))

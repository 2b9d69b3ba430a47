"""moe.perf.floor: the bytes an inference step must read, counted by hand on tiny models with
forced routing, and the bandwidth measure."""

import math

import pytest
import torch

from moe import ModelConfig, MoEConfig, Transformer, load_config
from moe.errors import InputError
from moe.perf import floor

D, V, H, HKV, DH, FFN, E, K, F, SHARED_F = 16, 32, 4, 2, 4, 24, 8, 2, 8, 12


def one_moe_layer_model(dtype=torch.float32) -> Transformer:
    """Two blocks: a dense one, then one MoE layer (8 experts, top-2, one shared expert)."""
    cfg = ModelConfig(
        vocab_size=V,
        hidden_size=D,
        num_layers=2,
        num_heads=H,
        num_kv_heads=HKV,
        head_dim=DH,
        intermediate_size=FFN,
        max_seq_len=64,
        first_k_dense=1,
        moe=MoEConfig(
            num_experts=E,
            top_k=K,
            expert_ffn_size=F,
            num_shared_experts=1,
            shared_ffn_size=SHARED_F,
            score_func="sigmoid",
            expert_bias=True,
        ),
    )
    torch.manual_seed(0)
    return Transformer(cfg).to(dtype).eval()


def force_routing(model: Transformer, experts: list[int]) -> None:
    """Every token picks `experts`: zero gate (all scores 0.5), a selection bias only on them."""
    router = model.moe_layers()[0].router
    with torch.no_grad():
        router.weight.zero_()
        router.expert_bias.zero_()
        router.expert_bias[experts] = 1.0


def hand_count(ids: torch.Tensor, cache_len: int, distinct: int, elem: int) -> float:
    attention = (D * H * DH + 2 * D * HKV * DH + H * DH * D) * elem  # q, k, v, o
    norms = (2 * 2 + 1) * D * elem  # two per block, and the final norm
    dense = 3 * D * FFN * elem  # gate, up, down
    shared_expert = 3 * D * SHARED_F * elem
    router = E * D * elem + E * 4  # gate weight, and the fp32 selection bias
    lm_head = V * D * elem
    one_expert = (D * 2 * F + F * D) * elem  # w_in [D, 2F] and w_out [F, D] of one expert
    embedding_rows = len(set(ids.flatten().tolist())) * D * elem
    kv = ids.shape[0] * cache_len * 2 * (2 * HKV * DH) * elem  # k and v, two layers
    return (
        2 * attention + norms + dense + shared_expert + router + lm_head + distinct * one_expert + embedding_rows + kv
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_bytes_equal_a_hand_count(dtype):
    model = one_moe_layer_model(dtype)
    force_routing(model, [3, 5])
    prompt = torch.tensor([[1, 2, 3, 4, 5], [7, 7, 7, 7, 7], [9, 1, 2, 3, 4]])
    with torch.no_grad(), floor.RoutingRecorder(model) as routing:
        cache = model.new_cache()
        model(prompt, cache)
        routing.reset()
        step = torch.tensor([[4], [4], [11]])
        model(step, cache)
        distinct = routing.distinct()
    assert distinct == [2]
    counted = floor.step_bytes(model, step, cache_len=6, distinct_E=distinct)
    elem = torch.tensor([], dtype=dtype).element_size()
    assert counted.total == hand_count(step, 6, 2, elem)
    assert counted.experts == 2 * (D * 2 * F + F * D) * elem
    assert counted.embedding == 2 * D * elem  # ids 4 and 11


def test_prefill_bytes_equal_a_hand_count_with_the_routers_real_choices():
    model = one_moe_layer_model()
    prompt = torch.randint(V, (4, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), floor.RoutingRecorder(model) as routing:
        model(prompt, model.new_cache())
        distinct = routing.distinct()
    # 36 tokens x top-2: the layer's own load says which experts got any token
    assert distinct == [int((model.moe_layers()[0].stats["load"] > 0).sum())]
    counted = floor.step_bytes(model, prompt, cache_len=9, distinct_E=distinct)
    assert counted.total == hand_count(prompt, 9, distinct[0], 4)


def test_recorder_matches_the_load_the_layer_reports():
    model = one_moe_layer_model()
    prompt = torch.randint(V, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), floor.RoutingRecorder(model) as routing:
        model(prompt)
    layer = model.moe_layers()[0]
    assert routing.distinct() == [int((layer.stats["load"] > 0).sum())]
    assert not layer.router._forward_hooks  # the hooks are gone after the with-block


def test_mla_cache_holds_the_latent_and_the_rope_key_per_layer():
    cfg = load_config("deepseek-v3-mini")
    model = Transformer(cfg)
    expected = cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert floor.kv_bytes_per_position(model) == expected
    assert floor.kv_bytes_per_position(model.to(torch.bfloat16)) == expected // 2


def test_one_count_per_moe_layer_is_required():
    model = one_moe_layer_model()
    with pytest.raises(InputError, match="one distinct-expert count per MoE layer"):
        floor.step_bytes(model, torch.zeros(1, 1, dtype=torch.long), 1, [2, 2])


def test_mean_of_steps():
    a = floor.StepBytes(10.0, 5.0, 1.0, 2.0, [2.0])
    b = floor.StepBytes(20.0, 5.0, 3.0, 4.0, [4.0])
    m = floor.StepBytes.mean([a, b])
    assert (m.experts, m.shared, m.embedding, m.kv_cache, m.distinct_experts, m.total) == (15, 5, 2, 3, [3.0], 25)


def test_bandwidth_is_positive_and_finite():
    bw = floor.measure_bandwidth(torch.device("cpu"), nbytes=4 * 2**20, warmup=1, repeats=3)
    assert math.isfinite(bw["bytes_per_s"]) and bw["bytes_per_s"] > 0
    assert bw["copy_bytes"] == 4 * 2**20
    assert bw["bytes_per_s"] == pytest.approx(2 * bw["copy_bytes"] / bw["median_s"])


def test_floor_figures_divide_bytes_by_bandwidth():
    counted = floor.StepBytes(6e6, 3e6, 0.5e6, 0.5e6, [2.0])
    row = floor.floor_figures(0.02, counted, 1e9, tokens=8)
    assert row["floor_s"] == pytest.approx(0.01) and row["ratio"] == pytest.approx(2.0)
    assert row["tokens_per_s"] == pytest.approx(400) and row["bytes_per_step"] == 1e7

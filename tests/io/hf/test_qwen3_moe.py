"""Qwen3-MoE: logits and greedy continuations match transformers' Qwen3MoeForCausalLM both ways."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="parity tests need transformers (pip install -e '.[dev]')")

from hf_utils import assert_parity, hf_logits, randomize_  # noqa: E402

from moe import ModelConfig, MoEConfig, Transformer, layer_plan  # noqa: E402

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
HF_SHAPES = {
    "unnormalised": dict(
        vocab_size=64,
        hidden_size=24,
        intermediate_size=40,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    ),
    "dense-layers-normalised": dict(
        vocab_size=83,
        hidden_size=40,
        intermediate_size=36,
        moe_intermediate_size=12,
        num_hidden_layers=3,
        num_attention_heads=5,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        decoder_sparse_step=2,
    ),
    "yarn-bias-tied": dict(
        vocab_size=70,
        hidden_size=72,
        intermediate_size=48,
        moe_intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=12,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        attention_bias=True,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        rope_scaling=YARN,
        rope_theta=5000.0,
    ),
}


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_hf_checkpoint_loads_with_the_same_logits(shape, tmp_path):
    torch.manual_seed(0)
    hf = randomize_(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**HF_SHAPES[shape])), seed=1).eval()
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_hf(tmp_path)
    expected_plan = {"dense-layers-normalised": [False, True, False]}.get(shape, [True, True])
    assert layer_plan(ours.config) == expected_plan
    assert_parity(hf_logits(hf), ours, HF_SHAPES[shape]["vocab_size"])


OUR_SHAPES = {
    "dense-first-unnormalised": ModelConfig(
        vocab_size=64,
        hidden_size=30,
        num_layers=3,
        num_heads=3,
        num_kv_heads=1,
        head_dim=10,
        intermediate_size=30,
        qk_norm=True,
        first_k_dense=1,
        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=14, norm_topk_prob=False),
    ),
    "yarn-bias-tied": ModelConfig(
        vocab_size=57,
        hidden_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        qk_norm=True,
        attention_bias=True,
        attention_out_bias=True,
        tie_embeddings=True,
        max_seq_len=64,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        moe=MoEConfig(num_experts=6, top_k=3, expert_ffn_size=16, backend="eager"),
    ),
}


@pytest.mark.parametrize("shape", OUR_SHAPES)
def test_export_loads_in_transformers_with_the_same_logits(shape, tmp_path):
    torch.manual_seed(0)
    ours = randomize_(Transformer(OUR_SHAPES[shape]), seed=2, stacked_in_dim=True).eval()
    ours.save_pretrained(tmp_path, format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    assert_parity(hf_logits(hf), ours, ours.config.vocab_size)
    again = Transformer.from_hf(tmp_path)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name

"""DeepSeek-V3: logits and greedy continuations match transformers' DeepseekV3ForCausalLM both ways."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="parity tests need transformers (pip install -e '.[dev]')")

from hf_utils import assert_parity, hf_logits, randomize_  # noqa: E402

from moe import ModelConfig, MoEConfig, Transformer, layer_plan  # noqa: E402

MLA = dict(
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=12,
    kv_lora_rank=8,
    qk_nope_head_dim=4,
    qk_rope_head_dim=4,
    v_head_dim=6,
)
HF_SHAPES = {
    "groups-dense-first": dict(
        MLA,
        vocab_size=64,
        hidden_size=24,
        intermediate_size=40,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        n_shared_experts=1,
    ),
    "no-q-lora-unnormalised": dict(
        vocab_size=79,
        hidden_size=36,
        intermediate_size=30,
        moe_intermediate_size=10,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=3,
        q_lora_rank=None,
        kv_lora_rank=10,
        qk_nope_head_dim=6,
        qk_rope_head_dim=2,
        v_head_dim=4,
        n_routed_experts=6,
        num_experts_per_tok=3,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        n_shared_experts=2,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rope_interleave=False,
        rms_norm_eps=0.05,
    ),  # large enough to tell from the latent norms' 1e-6
    "yarn-mscale": dict(
        MLA,
        vocab_size=64,
        hidden_size=48,
        intermediate_size=40,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=2,
        n_shared_experts=1,
        max_position_embeddings=64,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    ),
}


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_hf_checkpoint_loads_with_the_same_logits(shape, tmp_path):
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(**HF_SHAPES[shape])
    hf = randomize_(transformers.DeepseekV3ForCausalLM(config), seed=1).eval()
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_hf(tmp_path)
    k = HF_SHAPES[shape]["first_k_dense_replace"]
    assert layer_plan(ours.config) == [i >= k for i in range(config.num_hidden_layers)]
    assert ours.config.moe.expert_bias and ours.config.latent_norm_eps == 1e-6
    assert_parity(hf_logits(hf), ours, config.vocab_size)


MLA_OURS = dict(
    attention="mla",
    kv_lora_rank=8,
    qk_nope_head_dim=4,
    qk_rope_head_dim=4,
    v_head_dim=6,
    rope_interleave=True,
    latent_norm_eps=1e-6,
)
OUR_SHAPES = {
    "groups-bias": ModelConfig(
        vocab_size=64,
        hidden_size=24,
        num_layers=3,
        num_heads=4,
        q_lora_rank=12,
        intermediate_size=40,
        norm_eps=1e-5,
        first_k_dense=1,
        **MLA_OURS,
        moe=MoEConfig(
            num_experts=8,
            top_k=2,
            expert_ffn_size=16,
            num_shared_experts=1,
            score_func="sigmoid",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            expert_bias=True,
        ),
    ),
    "no-bias-yarn-halves": ModelConfig(
        vocab_size=51,
        hidden_size=40,
        num_layers=2,
        num_heads=5,
        q_lora_rank=None,
        max_seq_len=64,
        **{**MLA_OURS, "rope_interleave": False},
        rope_scaling={
            "type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 8,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        moe=MoEConfig(
            num_experts=4,
            top_k=1,
            expert_ffn_size=12,
            num_shared_experts=2,
            score_func="sigmoid",
            norm_topk_prob=False,
            backend="eager",
        ),
    ),
}


@pytest.mark.parametrize("shape", OUR_SHAPES)
def test_export_loads_in_transformers_with_the_same_logits(shape, tmp_path):
    torch.manual_seed(0)
    ours = randomize_(Transformer(OUR_SHAPES[shape]), seed=2, stacked_in_dim=True).eval()
    ours.save_pretrained(tmp_path, format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert_parity(hf_logits(hf), ours, ours.config.vocab_size)
    again = Transformer.from_hf(tmp_path)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name

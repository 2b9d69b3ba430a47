"""The config.json of each published model translates to the architecture of our full config:
the same parameter counts, total and active. Values transcribed from the models' config.json as
published (docs/published_configs.md gives the sources); only the keys we read are kept."""

import dataclasses
from pathlib import Path

import pytest

from moe import layer_plan, load_config
from moe.io.hf import family_of
from moe.perf.flops import count

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "full"

PUBLISHED = {
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1e6,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 32000,
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "decoder_sparse_step": 1,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "max_position_embeddings": 40960,
        "mlp_only_layers": [],
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "num_attention_heads": 32,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 48,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1e6,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "deepseek-v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "attention_bias": False,
        "first_k_dense_replace": 3,
        "hidden_act": "silu",
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "moe_intermediate_size": 2048,
        "moe_layer_freq": 1,
        "n_group": 8,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "v_head_dim": 128,
        "vocab_size": 129280,
    },
    "ling-mini-2.0": {
        "architectures": ["BailingMoeV2ForCausalLM"],
        "model_type": "bailing_moe",
        "vocab_size": 157184,
        "hidden_size": 2048,
        "intermediate_size": 5120,
        "num_hidden_layers": 20,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "hidden_act": "silu",
        "use_qkv_bias": False,
        "use_bias": False,
        "use_qk_norm": True,
        "rms_norm_eps": 1e-06,
        "partial_rotary_factor": 0.5,
        "rope_theta": 600000,
        "rope_scaling": None,
        "max_position_embeddings": 32768,
        "num_experts": 256,
        "num_experts_per_tok": 8,
        "num_shared_experts": 1,
        "moe_intermediate_size": 512,
        "first_k_dense_replace": 1,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "score_function": "sigmoid",
        "num_nextn_predict_layers": 0,
        "tie_word_embeddings": False,
    },
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_translates_to_the_published_architecture(name):
    hf = PUBLISHED[name]
    ours = family_of(hf).to_config(hf, name=name)
    reference = load_config(CONFIGS / f"{name}.yaml")
    assert layer_plan(ours) == layer_plan(reference)
    # The published counts leave the multi-token-prediction modules out (DeepSeek-V3: 671B + 14B MTP):
    # config.json's num_nextn_predict_layers becomes num_mtp_layers, which configs/full/ leaves at 0.
    assert ours.num_mtp_layers == (hf.get("num_nextn_predict_layers") or 0)
    got, expected = count(dataclasses.replace(ours, num_mtp_layers=0)), count(reference)
    assert (got.params_total, got.params_active) == (expected.params_total, expected.params_active)


def test_deepseek_v3_keeps_its_yarn_scaling_and_fixed_latent_eps():
    config = family_of(PUBLISHED["deepseek-v3"]).to_config(PUBLISHED["deepseek-v3"], name="deepseek-v3")
    assert config.rope_scaling == {
        "type": "yarn",
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
    }
    assert config.latent_norm_eps == 1e-6 and config.num_layers == 61  # the MTP layer is not a decoder layer

"""Mixtral (`mixtral`): GQA, every layer an MoE of softmax top-k experts, renormalised weights.

On disk (every published checkpoint, and transformers' save_pretrained):
    model.layers.{i}.block_sparse_moe.gate.weight           [E, D]
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight [F, D]  gate
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight [F, D]  up
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight [D, F]  down
transformers v5 in memory (saved so with save_original_format=False): mlp.experts.gate_up_proj.
"""

from __future__ import annotations

from ...config import ModelConfig
from ...model import layer_plan
from .config_keys import config_error, expect, refuse, rope_from_hf, rope_to_hf
from .spec import Family, Names


class Mixtral(Family):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_local_experts",
    )
    # What MixtralConfig gives a key that config.json omits (transformers 5.24,
    # models/mixtral/configuration_mixtral.py; the same values in 4.57).
    defaults = {
        "num_experts_per_tok": 2,
        "num_key_value_heads": 8,  # an explicit null: num_attention_heads (v4's __init__)
        "head_dim": None,
        "hidden_act": "silu",
        "max_position_embeddings": 4096 * 32,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "sliding_window": None,
        "rope_theta": 1e6,  # MixtralConfig.default_theta
        "rope_scaling": None,
        "rope_parameters": None,
    }
    aliases = {"num_experts": "num_local_experts"}  # MixtralConfig.attribute_map
    hf_names = {"moe.num_experts": "num_local_experts", "moe.expert_ffn_size": "intermediate_size"}

    def names(self, stacked: bool) -> Names:
        if stacked:
            return Names(stacked=True)
        return Names(moe="block_sparse_moe", expert=("w1", "w3", "w2"))

    def to_config(self, hf: dict, name: str) -> ModelConfig:
        c = self.settings(hf)
        expect(c, "hidden_act", ("silu",))
        window, max_len = c["sliding_window"], c["max_position_embeddings"]
        if window is not None and window < max_len:  # a window over the whole context changes nothing
            raise config_error("sliding_window", window, f"is not supported (below max_position_embeddings={max_len})")
        theta, scaling = rope_from_hf(c)
        return self.build(
            dict(
                name=name,
                vocab_size=c["vocab_size"],
                hidden_size=c["hidden_size"],
                num_layers=c["num_hidden_layers"],
                num_heads=c["num_attention_heads"],
                num_kv_heads=c["num_key_value_heads"],
                head_dim=c["head_dim"],
                max_seq_len=max_len,
                norm_eps=c["rms_norm_eps"],
                tie_embeddings=c["tie_word_embeddings"],
                init_std=c["initializer_range"],
                rope_theta=theta,
                rope_scaling=scaling,
                moe=dict(
                    num_experts=c["num_local_experts"],
                    top_k=c["num_experts_per_tok"],
                    expert_ffn_size=c["intermediate_size"],
                    score_func="softmax",
                    norm_topk_prob=True,
                ),
            )
        )

    def to_hf(self, cfg: ModelConfig) -> dict:
        moe = cfg.moe
        refuse(
            self.model_type,
            {
                "MLA attention": cfg.attention != "gqa",
                "dense FFN layers (Mixtral's are all MoE)": moe is None or not all(layer_plan(cfg)),
            },
        )
        refuse(
            self.model_type,
            {
                "shared experts": moe.num_shared_experts > 0,
                "sigmoid router scores": moe.score_func != "softmax",
                "unnormalised top-k weights (norm_topk_prob false)": not moe.norm_topk_prob,
                "group-limited routing": moe.n_group > 1,
                "routed_scaling_factor != 1": moe.routed_scaling_factor != 1.0,
                "GELU experts": moe.activation != "swiglu",
                "QK-norm": cfg.qk_norm,
                "attention biases": cfg.attention_bias or cfg.attention_out_bias,
                "partial RoPE": cfg.rope_fraction != 1.0,
                "interleaved RoPE": cfg.rope_interleave,
            },
        )
        return {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": moe.ffn_size(cfg.hidden_size),
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.dim_per_head,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std,
            "sliding_window": None,
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            **rope_to_hf(cfg),
        }

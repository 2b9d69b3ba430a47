"""Qwen3-MoE (`qwen3_moe`): GQA with per-head QK-norm, softmax top-k experts (renormalised iff
`norm_topk_prob`), no shared experts; dense layers from `mlp_only_layers` / `decoder_sparse_step`.

On disk: model.layers.{i}.self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm [head_dim],
mlp.gate.weight [E, D], mlp.experts.{e}.{gate,up,down}_proj (dense layers: mlp.{gate,up,down}_proj).
"""

from __future__ import annotations

from ...config import ModelConfig
from ...model import layer_plan
from .config_keys import expect, plan_fields, refuse, rope_from_hf, rope_to_hf
from .spec import Family


class Qwen3Moe(Family):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_experts",
        "moe_intermediate_size",
    )
    # What Qwen3MoeConfig gives a key that config.json omits (transformers 5.24,
    # models/qwen3_moe/configuration_qwen3_moe.py; the same values in 4.57).
    defaults = {
        "num_experts_per_tok": 8,
        "num_key_value_heads": 4,  # an explicit null: num_attention_heads
        "head_dim": None,  # not a config field: the modeling code falls back to hidden_size // heads
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "use_sliding_window": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": None,  # null: [] (__post_init__)
        "norm_topk_prob": False,
        "rope_theta": 10000.0,  # RotaryEmbeddingConfigMixin.default_theta
        "rope_scaling": None,
        "rope_parameters": None,
    }
    aliases = {"num_local_experts": "num_experts"}  # transformers v5 writes num_local_experts
    hf_names = {"moe.num_experts": "num_experts"}

    def to_config(self, hf: dict, name: str) -> ModelConfig:
        c = self.settings(hf)
        expect(c, "hidden_act", ("silu",))
        expect(c, "use_sliding_window", (False,))
        theta, scaling = rope_from_hf(c)
        L, E = c["num_hidden_layers"], c["num_experts"]
        dense_only, step = set(c["mlp_only_layers"] or []), c["decoder_sparse_step"]
        plan = [i not in dense_only and E > 0 and (i + 1) % step == 0 for i in range(L)]
        bias = c["attention_bias"]  # transformers' Qwen3-MoE biases q, k, v and o alike
        return self.build(
            dict(
                name=name,
                vocab_size=c["vocab_size"],
                hidden_size=c["hidden_size"],
                num_layers=L,
                num_heads=c["num_attention_heads"],
                num_kv_heads=c["num_key_value_heads"],
                head_dim=c["head_dim"],
                intermediate_size=c["intermediate_size"],
                max_seq_len=c["max_position_embeddings"],
                norm_eps=c["rms_norm_eps"],
                tie_embeddings=c["tie_word_embeddings"],
                init_std=c["initializer_range"],
                qk_norm=True,
                attention_bias=bias,
                attention_out_bias=bias,
                rope_theta=theta,
                rope_scaling=scaling,
                **plan_fields(plan),
                moe=dict(
                    num_experts=E,
                    top_k=c["num_experts_per_tok"],
                    expert_ffn_size=c["moe_intermediate_size"],
                    score_func="softmax",
                    norm_topk_prob=c["norm_topk_prob"],
                )
                if any(plan)
                else None,
            )
        )

    def to_hf(self, cfg: ModelConfig) -> dict:
        moe = cfg.moe
        plan = layer_plan(cfg)
        refuse(
            self.model_type,
            {
                "MLA attention": cfg.attention != "gqa",
                "no MoE layer": not any(plan),
                "no QK-norm (Qwen3 always normalises q and k)": not cfg.qk_norm,
                "a bias on q/k/v but not on the output projection, or the reverse": cfg.attention_bias
                != cfg.attention_out_bias,
                "partial RoPE": cfg.rope_fraction != 1.0,
                "interleaved RoPE": cfg.rope_interleave,
            },
        )
        refuse(
            self.model_type,
            {
                "shared experts": moe.num_shared_experts > 0,
                "sigmoid router scores": moe.score_func != "softmax",
                "group-limited routing": moe.n_group > 1,
                "routed_scaling_factor != 1": moe.routed_scaling_factor != 1.0,
                "GELU experts": moe.activation != "swiglu",
            },
        )
        return {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.ffn_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.dim_per_head,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std,
            "attention_bias": cfg.attention_bias,
            "use_sliding_window": False,
            "sliding_window": None,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, is_moe in enumerate(plan) if not is_moe],
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": moe.ffn_size(cfg.hidden_size),
            "norm_topk_prob": moe.norm_topk_prob,
            **rope_to_hf(cfg),
        }

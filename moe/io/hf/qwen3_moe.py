"""Qwen3-MoE (`qwen3_moe`): GQA with per-head QK-norm, softmax top-k experts (renormalised iff
`norm_topk_prob`), no shared experts; dense layers from `mlp_only_layers` / `decoder_sparse_step`.

On disk: model.layers.{i}.self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm [head_dim],
mlp.gate.weight [E, D], mlp.experts.{e}.{gate,up,down}_proj (dense layers: mlp.{gate,up,down}_proj).
"""

from __future__ import annotations

from ...config import ModelConfig, MoEConfig
from ...model import layer_plan
from .spec import Family, expect, plan_fields, refuse, require, rope_from_hf, rope_to_hf


class Qwen3Moe(Family):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"

    def to_config(self, hf: dict, name: str) -> ModelConfig:
        if "num_experts" not in hf:  # transformers v5 writes its attribute name, num_local_experts
            hf = {**hf, "num_experts": hf.get("num_local_experts")}
        require(
            hf,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
        )
        expect(hf, "hidden_act", ("silu",), "silu")
        expect(hf, "use_sliding_window", (False,), False)
        theta, scaling = rope_from_hf(hf, default_theta=10000.0)
        L, E = hf["num_hidden_layers"], hf["num_experts"]
        dense_only, step = set(hf.get("mlp_only_layers") or []), hf.get("decoder_sparse_step", 1)
        plan = [i not in dense_only and E > 0 and (i + 1) % step == 0 for i in range(L)]
        bias = hf.get("attention_bias", False)  # transformers' Qwen3-MoE biases q, k, v and o alike
        return ModelConfig(
            name=name,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=L,
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            intermediate_size=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 32768),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            init_std=hf.get("initializer_range", 0.02),
            qk_norm=True,
            attention_bias=bias,
            attention_out_bias=bias,
            rope_theta=theta,
            rope_scaling=scaling,
            **plan_fields(plan),
            moe=MoEConfig(
                num_experts=E,
                top_k=hf["num_experts_per_tok"],
                expert_ffn_size=hf["moe_intermediate_size"],
                score_func="softmax",
                norm_topk_prob=hf.get("norm_topk_prob", False),
            )
            if any(plan)
            else None,
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

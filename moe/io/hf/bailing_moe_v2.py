"""Ling 2.0 (`BailingMoeV2ForCausalLM`, inclusionAI): GQA through one fused QKV projection,
per-head QK-norm, RoPE on the first `partial_rotary_factor` of each head, sigmoid group-limited
routing with an fp32 selection bias, one shared expert, `first_k_dense_replace` dense layers.

The published config.json says "model_type": "bailing_moe" (the name of Ling 1.0) with
architectures ["BailingMoeV2ForCausalLM"]; both that and "bailing_moe_v2" are read, and exports
write the published form. transformers has no implementation; the remote code
(inclusionAI/Ling-V2 models/modeling_bailing_moe_v2.py) defines the names:

    model.word_embeddings.weight                          [V, D]
    model.layers.{i}.attention.query_key_value.weight     [(H + 2 Hkv) Dh, D]  rows: all Q | all K | all V
    model.layers.{i}.attention.{query,key}_layernorm.weight [Dh]
    model.layers.{i}.attention.dense.weight               [D, H Dh]
    model.layers.{i}.mlp.gate.weight [E, D], mlp.gate.expert_bias [E] (fp32)
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj, mlp.shared_experts.{gate,up,down}_proj
The last `num_nextn_predict_layers` of `num_hidden_layers` are multi-token-prediction layers,
skipped here. The gate renormalises whenever top_k > 1, whatever norm_topk_prob says.
"""

from __future__ import annotations

from ...config import ModelConfig, MoEConfig
from ...model import layer_plan
from .spec import (
    Family,
    Names,
    Piece,
    config_error,
    dense_first,
    expect,
    norm,
    plan_fields,
    refuse,
    require,
    rope_from_hf,
    rope_to_hf,
)


class BailingMoeV2(Family):
    model_type = "bailing_moe_v2"
    architecture = "BailingMoeV2ForCausalLM"
    published_model_type = "bailing_moe"

    def names(self, stacked: bool) -> Names:
        return Names(embed="model.word_embeddings.weight", expert_bias="gate.expert_bias", stacked=stacked)

    def attention(self, cfg: ModelConfig, hf: str, ours: str) -> list[Piece]:
        D, H, Hkv, Dh = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        hf += "attention."
        qkv = (H + 2 * Hkv) * Dh
        rows = {"q_proj": (0, H * Dh), "k_proj": (H * Dh, (H + Hkv) * Dh), "v_proj": ((H + Hkv) * Dh, qkv)}
        pieces = []
        for proj, (start, end) in rows.items():
            pieces.append(
                Piece(hf + "query_key_value.weight", (qkv, D), ours + proj + ".weight", hf_index=(slice(start, end),))
            )
            if cfg.attention_bias:
                pieces.append(
                    Piece(hf + "query_key_value.bias", (qkv,), ours + proj + ".bias", hf_index=(slice(start, end),))
                )
        pieces.append(Piece(hf + "dense.weight", (D, H * Dh), ours + "o_proj.weight"))
        if cfg.attention_out_bias:
            pieces.append(Piece(hf + "dense.bias", (D,), ours + "o_proj.bias"))
        if cfg.qk_norm:
            pieces += norm(hf + "query_layernorm", ours + "q_norm", Dh)
            pieces += norm(hf + "key_layernorm", ours + "k_norm", Dh)
        return pieces

    def skipped_layers(self, hf: dict) -> range:
        L = hf["num_hidden_layers"]
        return range(L - (hf.get("num_nextn_predict_layers") or 0), L)

    def to_config(self, hf: dict, name: str) -> ModelConfig:
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
        expect(hf, "score_function", ("sigmoid",), "sigmoid")
        L = hf["num_hidden_layers"] - (hf.get("num_nextn_predict_layers") or 0)
        H = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // H
        fraction = _rope_fraction(hf, head_dim)
        theta, scaling = rope_from_hf(hf, default_theta=10000.0)
        k, top_k = hf.get("first_k_dense_replace", 0), hf["num_experts_per_tok"]
        n_shared = hf.get("num_shared_experts") or 0
        return ModelConfig(
            name=name,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=L,
            num_heads=H,
            num_kv_heads=hf.get("num_key_value_heads"),
            head_dim=head_dim,
            intermediate_size=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 32768),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            init_std=hf.get("initializer_range", 0.02),
            qk_norm=hf.get("use_qk_norm", False),
            attention_bias=hf.get("use_qkv_bias", False),
            attention_out_bias=hf.get("use_bias", False),
            rope_theta=theta,
            rope_fraction=fraction,
            rope_scaling=scaling,
            **plan_fields([i >= k for i in range(L)]),
            moe=MoEConfig(
                num_experts=hf["num_experts"],
                top_k=top_k,
                expert_ffn_size=hf["moe_intermediate_size"],
                num_shared_experts=n_shared,
                score_func="sigmoid",
                n_group=hf.get("n_group") or 1,
                topk_group=hf.get("topk_group") or 1,
                norm_topk_prob=top_k > 1,
                routed_scaling_factor=hf.get("routed_scaling_factor", 2.5),
                expert_bias=True,
            ),
        )

    def to_hf(self, cfg: ModelConfig) -> dict:
        moe, D = cfg.moe, cfg.hidden_size
        k = dense_first(layer_plan(cfg))
        refuse(
            self.model_type,
            {
                "MLA attention": cfg.attention != "gqa",
                "no MoE layer": moe is None or k == cfg.num_layers,
                "MoE layers that do not all follow the dense ones": k is None,
                "interleaved RoPE": cfg.rope_interleave,
            },
        )
        refuse(
            self.model_type,
            {
                "softmax router scores": moe.score_func != "sigmoid",
                "norm_topk_prob that differs from top_k > 1 (Ling renormalises exactly then)": moe.norm_topk_prob
                != (moe.top_k > 1),
                "a shared-expert width other than num_shared_experts x expert width": moe.shared_size(D)
                != moe.num_shared_experts * moe.ffn_size(D),
                "expert groups of fewer than 2 experts (group scores sum each group's best 2)": moe.num_experts
                // moe.n_group
                < 2,
                "GELU experts": moe.activation != "swiglu",
            },
        )
        return {
            "vocab_size": cfg.vocab_size,
            "hidden_size": D,
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
            "use_qkv_bias": cfg.attention_bias,
            "use_bias": cfg.attention_out_bias,
            "use_qk_norm": cfg.qk_norm,
            "partial_rotary_factor": cfg.rope_fraction,
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "num_shared_experts": moe.num_shared_experts or None,
            "moe_intermediate_size": moe.ffn_size(D),
            "first_k_dense_replace": k,
            "n_group": moe.n_group,
            "topk_group": moe.topk_group,
            "routed_scaling_factor": moe.routed_scaling_factor,
            "norm_topk_prob": moe.norm_topk_prob,
            "score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "router_dtype": "fp32",
            "num_nextn_predict_layers": 0,
            **rope_to_hf(cfg),
        }


def _rope_fraction(hf: dict, head_dim: int) -> float:
    """partial_rotary_factor, or rotary_dim / head_dim where a config gives rotary_dim instead."""
    factor, rotary_dim = hf.get("partial_rotary_factor"), hf.get("rotary_dim")
    if rotary_dim is not None:
        if factor is not None and int(head_dim * factor) != rotary_dim:
            raise config_error(
                "rotary_dim", rotary_dim, f"contradicts partial_rotary_factor={factor} with head_dim {head_dim}"
            )
        return rotary_dim / head_dim
    return 1.0 if factor is None else factor

"""DeepSeek-V3 (`deepseek_v3`): multi-head latent attention, sigmoid group-limited routing with a
selection-only bias, shared experts, `first_k_dense_replace` dense layers, YaRN RoPE.

On disk:
    model.layers.{i}.self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj, kv_a_proj_with_mqa,
                                kv_a_layernorm, kv_b_proj, o_proj}
    model.layers.{i}.mlp.gate.weight [E, D], mlp.gate.e_score_correction_bias [E] (fp32),
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj, mlp.shared_experts.{gate,up,down}_proj
    model.layers.{L}.* (L = num_hidden_layers): the multi-token-prediction module, skipped here.
The latent RMSNorms use eps 1e-6 whatever rms_norm_eps says (reference code and transformers).
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
    linear,
    norm,
    plan_fields,
    refuse,
    require,
    rope_from_hf,
    rope_to_hf,
)

LATENT_NORM_EPS = 1e-6


class DeepseekV3(Family):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"

    def names(self, stacked: bool) -> Names:
        return Names(expert_bias="gate.e_score_correction_bias", stacked=stacked)

    def attention(self, cfg: ModelConfig, hf: str, ours: str) -> list[Piece]:
        D, H = cfg.hidden_size, cfg.num_heads
        C, Dn, Dr, Dv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        hf += "self_attn."
        if cfg.q_lora_rank:
            pieces = (
                linear(hf + "q_a_proj", ours + "q_a_proj", cfg.q_lora_rank, D)
                + norm(hf + "q_a_layernorm", ours + "q_a_layernorm", cfg.q_lora_rank)
                + linear(hf + "q_b_proj", ours + "q_b_proj", H * (Dn + Dr), cfg.q_lora_rank)
            )
        else:
            pieces = linear(hf + "q_proj", ours + "q_proj", H * (Dn + Dr), D)
        return pieces + (
            linear(hf + "kv_a_proj_with_mqa", ours + "kv_a_proj_with_mqa", C + Dr, D)
            + norm(hf + "kv_a_layernorm", ours + "kv_a_layernorm", C)
            + linear(hf + "kv_b_proj", ours + "kv_b_proj", H * (Dn + Dv), C)
            + linear(hf + "o_proj", ours + "o_proj", D, H * Dv)
        )

    def skipped_layers(self, hf: dict) -> range:
        L = hf["num_hidden_layers"]
        return range(L, L + (hf.get("num_nextn_predict_layers") or 0))

    def to_config(self, hf: dict, name: str) -> ModelConfig:
        require(
            hf,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "n_routed_experts",
            "num_experts_per_tok",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        )
        if hf.get("quantization_config"):
            method = hf["quantization_config"].get("quant_method")
            raise config_error(
                "quantization_config.quant_method", method, "is not supported: dequantize the checkpoint to bf16 first"
            )
        expect(hf, "hidden_act", ("silu",), "silu")
        expect(hf, "scoring_func", ("sigmoid",), "sigmoid")
        expect(hf, "topk_method", ("noaux_tc",), "noaux_tc")
        expect(hf, "attention_bias", (False,), False)
        theta, scaling = rope_from_hf(hf, default_theta=10000.0)
        L, k, freq = hf["num_hidden_layers"], hf.get("first_k_dense_replace", 3), hf.get("moe_layer_freq", 1)
        plan = [i >= k and i % freq == 0 for i in range(L)]  # the reference rule; transformers ignores freq
        n_shared = hf.get("n_shared_experts") or 0
        nope, rope = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
        return ModelConfig(
            name=name,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=L,
            num_heads=hf["num_attention_heads"],
            head_dim=nope + rope,
            intermediate_size=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 4096),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            init_std=hf.get("initializer_range", 0.02),
            attention="mla",
            rope_theta=theta,
            rope_scaling=scaling,
            rope_interleave=hf.get("rope_interleave", True),
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope,
            v_head_dim=hf["v_head_dim"],
            latent_norm_eps=LATENT_NORM_EPS,
            **plan_fields(plan),
            moe=MoEConfig(
                num_experts=hf["n_routed_experts"],
                top_k=hf["num_experts_per_tok"],
                expert_ffn_size=hf["moe_intermediate_size"],
                num_shared_experts=n_shared,
                score_func="sigmoid",
                n_group=hf.get("n_group") or 1,
                topk_group=hf.get("topk_group") or 1,
                norm_topk_prob=hf.get("norm_topk_prob", True),
                routed_scaling_factor=hf.get("routed_scaling_factor", 2.5),
                expert_bias=True,
            ),
        )

    def to_hf(self, cfg: ModelConfig) -> dict:
        moe = cfg.moe
        k = dense_first(layer_plan(cfg))
        refuse(
            self.model_type,
            {
                "grouped-query attention (DeepSeek-V3 uses MLA)": cfg.attention != "mla",
                "no MoE layer": moe is None or k == cfg.num_layers,
                "MoE layers that do not all follow the dense ones": k is None,
                f"latent norm eps != {LATENT_NORM_EPS} (transformers fixes it)": (cfg.latent_norm_eps or cfg.norm_eps)
                != LATENT_NORM_EPS,
                "QK-norm": cfg.qk_norm,
                "attention biases": cfg.attention_bias or cfg.attention_out_bias,
            },
        )
        E, D = moe.num_experts, cfg.hidden_size
        refuse(
            self.model_type,
            {
                "softmax router scores": moe.score_func != "sigmoid",
                "no shared expert (transformers' DeepseekV3 always builds one)": moe.num_shared_experts == 0,
                "a shared-expert width other than num_shared_experts x expert width": moe.shared_size(D)
                != moe.num_shared_experts * moe.ffn_size(D),
                "expert groups of fewer than 2 experts (group scores sum each group's best 2)": E // moe.n_group < 2,
                "GELU experts": moe.activation != "swiglu",
            },
        )
        return {
            "vocab_size": cfg.vocab_size,
            "hidden_size": D,
            "intermediate_size": cfg.ffn_size,
            "moe_intermediate_size": moe.ffn_size(D),
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_heads,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std,
            "attention_bias": False,
            "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim,
            "rope_interleave": cfg.rope_interleave,
            "n_routed_experts": E,
            "num_experts_per_tok": moe.top_k,
            "n_shared_experts": moe.num_shared_experts,
            "first_k_dense_replace": k,
            "moe_layer_freq": 1,
            "n_group": moe.n_group,
            "topk_group": moe.topk_group,
            "norm_topk_prob": moe.norm_topk_prob,
            "routed_scaling_factor": moe.routed_scaling_factor,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "num_nextn_predict_layers": 0,
            **rope_to_hf(cfg),
        }

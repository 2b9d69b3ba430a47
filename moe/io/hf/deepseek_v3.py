"""DeepSeek-V3 (`deepseek_v3`): multi-head latent attention, sigmoid group-limited routing with a
selection-only bias, shared experts, `first_k_dense_replace` dense layers, YaRN RoPE.

On disk:
    model.layers.{i}.self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj, kv_a_proj_with_mqa,
                                kv_a_layernorm, kv_b_proj, o_proj}
    model.layers.{i}.mlp.gate.weight [E, D], mlp.gate.e_score_correction_bias [E] (fp32),
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj, mlp.shared_experts.{gate,up,down}_proj
    model.layers.{L+k}.* (L = num_hidden_layers, k < num_nextn_predict_layers): the multi-token-
        prediction modules (enorm, hnorm, eh_proj, shared_head.norm, a decoder layer, and copies of
        embed_tokens / shared_head.head), read into our `mtp` modules when present (a checkpoint
        saved by transformers, which does not build them, has none: then the model has none).
The latent RMSNorms use eps 1e-6 whatever rms_norm_eps says (reference code and transformers).
"""

from __future__ import annotations

from ...config import ModelConfig
from ...model import layer_plan
from .config_keys import config_error, dense_first, expect, plan_fields, refuse, rope_from_hf, rope_to_hf
from .spec import Family, Names, Piece, deepseek_mtp_pieces, linear, norm

LATENT_NORM_EPS = 1e-6


class DeepseekV3(Family):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "n_routed_experts",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
    )
    # What DeepseekV3Config gives a key that config.json omits (transformers 5.24,
    # models/deepseek_v3/configuration_deepseek_v3.py), then the keys only the reference code reads
    # (deepseek-ai/DeepSeek-V3 inference/configs/config_671B.json and modeling_deepseek.py).
    defaults = {
        "num_experts_per_tok": 8,
        "n_shared_experts": 1,  # an explicit null: none
        "routed_scaling_factor": 2.5,
        "q_lora_rank": 1536,  # an explicit null: q projected directly from the hidden state
        "n_group": 8,  # an explicit null: 1 (no group limit)
        "topk_group": 4,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_interleave": True,
        "attention_bias": False,
        "num_nextn_predict_layers": 1,  # num_mtp_layers in 5.24 (which builds no MTP module)
        "rope_theta": 10000.0,  # RotaryEmbeddingConfigMixin.default_theta
        "rope_scaling": None,
        "rope_parameters": None,
        "quantization_config": None,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
    }
    aliases = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}
    hf_names = {
        "moe.num_experts": "n_routed_experts",
        "moe.num_shared_experts": "n_shared_experts",
        "head_dim": "",  # ours is qk_nope_head_dim + qk_rope_head_dim
    }

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

    def pieces(self, cfg: ModelConfig, stacked: bool = False) -> list[Piece]:
        return super().pieces(cfg, stacked) + deepseek_mtp_pieces(cfg, self.names(stacked), self.attention)

    def mtp_layers(self, hf: dict) -> range:
        """Indices of the MTP modules' layers on disk (they follow the decoder's)."""
        c = self.settings(hf)
        L = c["num_hidden_layers"]
        return range(L, L + (c["num_nextn_predict_layers"] or 0))

    def to_config(self, hf: dict, name: str) -> ModelConfig:
        c = self.settings(hf)
        if c["quantization_config"]:
            method = c["quantization_config"].get("quant_method")
            raise config_error(
                "quantization_config.quant_method", method, "is not supported: dequantize the checkpoint to bf16 first"
            )
        expect(c, "hidden_act", ("silu",))
        expect(c, "scoring_func", ("sigmoid",))
        expect(c, "topk_method", ("noaux_tc",))
        expect(c, "attention_bias", (False,))
        theta, scaling = rope_from_hf(c)
        L, k, freq = c["num_hidden_layers"], c["first_k_dense_replace"], c["moe_layer_freq"]
        plan = [i >= k and i % freq == 0 for i in range(L)]  # the reference rule; transformers ignores freq
        nope, rope = c["qk_nope_head_dim"], c["qk_rope_head_dim"]
        return self.build(
            dict(
                name=name,
                vocab_size=c["vocab_size"],
                hidden_size=c["hidden_size"],
                num_layers=L,
                num_heads=c["num_attention_heads"],
                head_dim=nope + rope,
                intermediate_size=c["intermediate_size"],
                max_seq_len=c["max_position_embeddings"],
                norm_eps=c["rms_norm_eps"],
                tie_embeddings=c["tie_word_embeddings"],
                init_std=c["initializer_range"],
                attention="mla",
                rope_theta=theta,
                rope_scaling=scaling,
                rope_interleave=c["rope_interleave"],
                q_lora_rank=c["q_lora_rank"],
                kv_lora_rank=c["kv_lora_rank"],
                qk_nope_head_dim=nope,
                qk_rope_head_dim=rope,
                v_head_dim=c["v_head_dim"],
                latent_norm_eps=LATENT_NORM_EPS,
                num_mtp_layers=c["num_nextn_predict_layers"] or 0,
                **plan_fields(plan),
                moe=dict(
                    num_experts=c["n_routed_experts"],
                    top_k=c["num_experts_per_tok"],
                    expert_ffn_size=c["moe_intermediate_size"],
                    num_shared_experts=c["n_shared_experts"] or 0,
                    score_func="sigmoid",
                    n_group=c["n_group"] or 1,
                    topk_group=c["topk_group"] or 1,
                    norm_topk_prob=c["norm_topk_prob"],
                    routed_scaling_factor=c["routed_scaling_factor"],
                    expert_bias=True,
                ),
            )
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
            "num_nextn_predict_layers": cfg.num_mtp_layers,
            **rope_to_hf(cfg),
        }

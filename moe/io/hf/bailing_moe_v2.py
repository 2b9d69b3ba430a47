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
    model.layers.{L+k}.{enorm, hnorm, eh_proj, final_layernorm} + a decoder layer (MoE):
        multi-token-prediction layer k (L = num_hidden_layers, k < num_nextn_predict_layers)
The gate renormalises whenever top_k > 1, whatever norm_topk_prob says.

Where the MTP layers are. The authors' code (Ling-V2 af8837e, models/modeling_bailing_moe_v2.py
line 1162) builds num_hidden_layers decoder layers, then the n MTP layers after them (L..L+n-1),
as DeepSeek-V3 does and SGLang's BailingMoeForCausalLMNextN reads them (prefix
layers.{num_hidden_layers}). An earlier reading here took them as the LAST n of num_hidden_layers.
`for_tensors` decides from the folder: MTP tensors (enorm/hnorm/eh_proj/final_layernorm) at
L..L+n-1 are read into `model.mtp` over L main layers; at L-n..L-1, over L-n main layers; none
(the published chat checkpoints hold none): L main layers, no MTP; anything else is refused,
naming the layers. Exports write the authors' layout (after num_hidden_layers). Without
`for_tensors` (a loader that does not call it) the last n layers are skipped, as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from ...config import ModelConfig
from ...errors import InputError
from ...model import layer_plan
from .config_keys import config_error, dense_first, expect, plan_fields, refuse, rope_from_hf, rope_to_hf
from .spec import MTP_MARKERS, Family, Names, Piece, ling_mtp_pieces, norm


class BailingMoeV2(Family):
    model_type = "bailing_moe_v2"
    architecture = "BailingMoeV2ForCausalLM"
    published_model_type = "bailing_moe"
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_experts",
        "moe_intermediate_size",
    )
    # What the authors' BailingMoeV2Config gives a key that config.json omits (inclusionAI/Ling-V2
    # models/configuration_bailing_moe_v2.py, commit af8837e; transformers has no Ling 2.0), then
    # what their modeling code (models/modeling_bailing_moe_v2.py) assumes for keys it reads with hasattr.
    defaults = {
        "num_experts_per_tok": 8,
        "num_key_value_heads": 4,  # an explicit null: num_attention_heads
        "head_dim": 128,  # an explicit null: hidden_size // num_attention_heads
        "hidden_act": "silu",
        "use_qkv_bias": False,
        "use_bias": False,
        "use_qk_norm": True,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "rope_theta": 600000.0,
        "rope_scaling": None,
        "rope_parameters": None,
        "num_shared_experts": 1,  # an explicit null: none
        "n_group": 8,  # an explicit null: 1 (no group limit)
        "topk_group": 4,
        "first_k_dense_replace": 1,
        "num_nextn_predict_layers": 0,
        "routed_scaling_factor": 1.0,  # the published configs say 2.5
        "partial_rotary_factor": None,  # modeling code: 1.0 when absent
        "rotary_dim": None,
        "score_function": "sigmoid",  # the gate is always a sigmoid
    }
    hf_names = {"moe.num_experts": "num_experts", "moe.num_shared_experts": "num_shared_experts"}

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

    def pieces(self, cfg: ModelConfig, stacked: bool = False) -> list[Piece]:
        return super().pieces(cfg, stacked) + ling_mtp_pieces(cfg, self.names(stacked), self.attention)

    def for_tensors(self, hf: dict, tensor_names: Iterable[str]) -> dict:
        """config.json with the MTP layers placed after num_hidden_layers (MTP_AT = "after"), or
        marked absent (MTP_AT = "none"); see the module docstring for the rule."""
        c = self.settings(hf)
        L, n = c["num_hidden_layers"], c["num_nextn_predict_layers"] or 0
        if n == 0:
            return {**hf, MTP_AT: "none"}
        markers = _mtp_marker_layers(tensor_names)
        after, last = set(range(L, L + n)), set(range(L - n, L))
        if not markers:
            warnings.warn(
                f"config.json counts {n} multi-token-prediction layer(s) but the folder holds none "
                f"(no {'/'.join(MTP_MARKERS)} tensors): loading the {L} decoder layers without MTP",
                stacklevel=3,
            )
            return {**hf, MTP_AT: "none"}
        if markers == after:
            return {**hf, MTP_AT: "after"}
        if markers == last and L - n >= 1:
            warnings.warn(
                f"reading multi-token-prediction layer(s) {sorted(last)} as the last {n} of num_hidden_layers "
                f"= {L} (the main model has {L - n} layers); exports place them after the decoder layers",
                stacklevel=3,
            )
            return {**hf, "num_hidden_layers": L - n, MTP_AT: "after"}
        raise InputError(
            f"multi-token-prediction tensors ({'/'.join(MTP_MARKERS)}) at layer(s) {sorted(markers)} fit neither "
            f"convention for num_hidden_layers = {L}, num_nextn_predict_layers = {n}: after the decoder layers "
            f"{sorted(after)} (the authors' code) or the last {n} of them {sorted(last)}"
        )

    def mtp_layers(self, hf: dict) -> range:
        c = self.settings(hf)
        L, n = c["num_hidden_layers"], c["num_nextn_predict_layers"] or 0
        return range(L, L + n) if hf.get(MTP_AT) == "after" else range(0)

    def skipped_layers(self, hf: dict) -> range:
        if MTP_AT in hf:  # placed by for_tensors: nothing to skip
            return range(0)
        c = self.settings(hf)  # a loader that never asked the tensors: the last n layers, skipped
        L = c["num_hidden_layers"]
        return range(L - (c["num_nextn_predict_layers"] or 0), L)

    def to_config(self, hf: dict, name: str) -> ModelConfig:
        c = self.settings(hf)
        expect(c, "hidden_act", ("silu",))
        expect(c, "score_function", ("sigmoid",))
        n = c["num_nextn_predict_layers"] or 0
        L = c["num_hidden_layers"] - (0 if MTP_AT in hf else n)
        num_mtp = n if hf.get(MTP_AT) == "after" else 0
        H = c["num_attention_heads"]
        head_dim = c["head_dim"] or c["hidden_size"] // H
        fraction = _rope_fraction(c, head_dim)
        theta, scaling = rope_from_hf(c)
        k, top_k = c["first_k_dense_replace"], c["num_experts_per_tok"]
        return self.build(
            dict(
                name=name,
                vocab_size=c["vocab_size"],
                hidden_size=c["hidden_size"],
                num_layers=L,
                num_mtp_layers=num_mtp,
                num_heads=H,
                num_kv_heads=c["num_key_value_heads"],
                head_dim=head_dim,
                intermediate_size=c["intermediate_size"],
                max_seq_len=c["max_position_embeddings"],
                norm_eps=c["rms_norm_eps"],
                tie_embeddings=c["tie_word_embeddings"],
                init_std=c["initializer_range"],
                qk_norm=c["use_qk_norm"],
                attention_bias=c["use_qkv_bias"],
                attention_out_bias=c["use_bias"],
                rope_theta=theta,
                rope_fraction=fraction,
                rope_scaling=scaling,
                **plan_fields([i >= k for i in range(L)]),
                moe=dict(
                    num_experts=c["num_experts"],
                    top_k=top_k,
                    expert_ffn_size=c["moe_intermediate_size"],
                    num_shared_experts=c["num_shared_experts"] or 0,
                    score_func="sigmoid",
                    n_group=c["n_group"] or 1,
                    topk_group=c["topk_group"] or 1,
                    norm_topk_prob=top_k > 1,
                    routed_scaling_factor=c["routed_scaling_factor"],
                    expert_bias=True,
                ),
            )
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
            "num_nextn_predict_layers": cfg.num_mtp_layers,  # written after the decoder layers
            **rope_to_hf(cfg),
        }


MTP_AT = "_mtp_at"  # a key for_tensors adds to config.json's dict: "after" or "none"


def _mtp_marker_layers(tensor_names: Iterable[str]) -> set[int]:
    """Indices of the layers that hold any tensor only an MTP layer has."""
    layers = set()
    for name in tensor_names:
        parts = name.split(".")
        if len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[3] in MTP_MARKERS and parts[2].isdigit():
            layers.add(int(parts[2]))
    return layers


def _rope_fraction(c: dict, head_dim: int) -> float:
    """partial_rotary_factor, or rotary_dim / head_dim where a config gives rotary_dim instead."""
    factor, rotary_dim = c["partial_rotary_factor"], c["rotary_dim"]
    if rotary_dim is not None:
        if factor is not None and int(head_dim * factor) != rotary_dim:
            raise config_error(
                "rotary_dim", rotary_dim, f"contradicts partial_rotary_factor={factor} with head_dim {head_dim}"
            )
        return rotary_dim / head_dim
    return 1.0 if factor is None else factor

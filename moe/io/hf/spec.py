"""Tensor maps between `moe.Transformer` and Hugging Face checkpoints, shared by the families.

Legend: D = hidden size, F = expert (or dense) FFN size, E = experts, V = vocab size.

A checkpoint tensor and one of our tensors are tied by `Piece`s. A piece says "the part
`hf_index` of checkpoint tensor `hf` (of shape `hf_shape`), transposed if `transpose`, is the
part `our_index` of our tensor `ours`". Most pieces are whole tensors under another name; the
others are the reason this module exists:

    per-expert Linear   mlp.experts.3.gate_proj.weight [F, D]  -> experts.w_in[3, :, :F]   (transposed)
                        mlp.experts.3.up_proj.weight   [F, D]  -> experts.w_in[3, :, F:]   (transposed)
                        mlp.experts.3.down_proj.weight [D, F]  -> experts.w_out[3]         (transposed)
    stacked (>= v5)     mlp.experts.gate_up_proj [E, 2F, D]    -> experts.w_in             (transposed)
    fused QKV (Ling)    attention.query_key_value.weight rows [0, H*Dh) -> attn.q_proj.weight, ...

Loading fills each of our tensors from its pieces; export assembles each checkpoint tensor from
its pieces. The same list drives both directions, so they cannot drift apart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...config import ModelConfig
from ...model import layer_plan

EVERYTHING: tuple = ()  # an index that selects the whole tensor


@dataclass(frozen=True)
class Piece:
    hf: str  # tensor name in the checkpoint
    hf_shape: tuple[int, ...]
    ours: str | None  # name in Transformer.state_dict(); None: written as zeros, never read
    hf_index: tuple = EVERYTHING
    our_index: tuple = EVERYTHING
    transpose: bool = False  # swap the last two dims: nn.Linear's [out, in] vs our stacked [in, out]


@dataclass(frozen=True)
class Names:
    """How a family names the parts of a decoder layer, relative to `model.layers.{i}.`."""

    embed: str = "model.embed_tokens.weight"
    attn_norm: str = "input_layernorm"
    ffn_norm: str = "post_attention_layernorm"
    moe: str = "mlp"  # the MoE block (Mixtral on disk: block_sparse_moe)
    router: str = "gate.weight"
    expert_bias: str | None = None  # DeepSeek-V3: gate.e_score_correction_bias; Ling: gate.expert_bias
    expert: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # Mixtral: w1, w3, w2
    stacked: bool = False  # experts as gate_up_proj [E, 2F, D] + down_proj [E, D, F] (transformers v5)


AttentionPieces = Callable[[ModelConfig, str, str], list[Piece]]


def model_pieces(cfg: ModelConfig, names: Names, attention: AttentionPieces) -> list[Piece]:
    """Every piece of a decoder whose attention pieces come from the family's `attention`."""
    D, V = cfg.hidden_size, cfg.vocab_size
    pieces = [Piece(names.embed, (V, D), "embed_tokens.weight")]
    for i, is_moe in enumerate(layer_plan(cfg)):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        pieces += [
            Piece(hf + names.attn_norm + ".weight", (D,), ours + "attn_norm.weight"),
            Piece(hf + names.ffn_norm + ".weight", (D,), ours + "ffn_norm.weight"),
        ]
        pieces += attention(cfg, hf, ours + "attn.")
        if is_moe:
            pieces += moe_pieces(cfg, names, hf + names.moe + ".", ours + "ffn.")
        else:
            pieces += mlp_pieces(hf + "mlp.", ours + "ffn.", D, cfg.ffn_size)
    pieces.append(Piece("model.norm.weight", (D,), "norm.weight"))
    if not cfg.tie_embeddings:
        pieces.append(Piece("lm_head.weight", (V, D), "lm_head.weight"))
    return pieces


def linear(hf: str, ours: str, out_features: int, in_features: int, bias: bool = False) -> list[Piece]:
    pieces = [Piece(hf + ".weight", (out_features, in_features), ours + ".weight")]
    if bias:
        pieces.append(Piece(hf + ".bias", (out_features,), ours + ".bias"))
    return pieces


def norm(hf: str, ours: str, dim: int) -> list[Piece]:
    return [Piece(hf + ".weight", (dim,), ours + ".weight")]


def mlp_pieces(hf: str, ours: str, D: int, F: int) -> list[Piece]:
    """A SwiGLU MLP (dense layer or shared experts): gate_proj, up_proj [F, D], down_proj [D, F]."""
    return (
        linear(hf + "gate_proj", ours + "gate_proj", F, D)
        + linear(hf + "up_proj", ours + "up_proj", F, D)
        + linear(hf + "down_proj", ours + "down_proj", D, F)
    )


def gqa_pieces(cfg: ModelConfig, hf: str, ours: str) -> list[Piece]:
    """Llama-style attention (Mixtral, Qwen3): self_attn.{q,k,v,o}_proj and per-head q_norm/k_norm."""
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    hf, qkv_bias = hf + "self_attn.", cfg.attention_bias
    pieces = (
        linear(hf + "q_proj", ours + "q_proj", H * Dh, D, qkv_bias)
        + linear(hf + "k_proj", ours + "k_proj", Hkv * Dh, D, qkv_bias)
        + linear(hf + "v_proj", ours + "v_proj", Hkv * Dh, D, qkv_bias)
        + linear(hf + "o_proj", ours + "o_proj", D, H * Dh, cfg.attention_out_bias)
    )
    if cfg.qk_norm:
        pieces += norm(hf + "q_norm", ours + "q_norm", Dh) + norm(hf + "k_norm", ours + "k_norm", Dh)
    return pieces


def moe_pieces(cfg: ModelConfig, names: Names, hf: str, ours: str) -> list[Piece]:
    """Router, selection bias, routed experts (per-expert or stacked) and shared experts."""
    moe, D = cfg.moe, cfg.hidden_size
    E, F = moe.num_experts, moe.ffn_size(D)
    pieces = [Piece(hf + names.router, (E, D), ours + "router.weight")]
    if names.expert_bias is not None:  # the family always has the buffer; ours may not
        pieces.append(Piece(hf + names.expert_bias, (E,), ours + "router.expert_bias" if moe.expert_bias else None))
    w_in, w_out = ours + "experts.w_in", ours + "experts.w_out"
    if names.stacked:
        pieces += [
            Piece(hf + "experts.gate_up_proj", (E, 2 * F, D), w_in, transpose=True),
            Piece(hf + "experts.down_proj", (E, D, F), w_out, transpose=True),
        ]
    else:
        gate, up, down = names.expert
        all_ = slice(None)
        for e in range(E):
            x = f"{hf}experts.{e}."
            pieces += [
                Piece(x + gate + ".weight", (F, D), w_in, our_index=(e, all_, slice(0, F)), transpose=True),
                Piece(x + up + ".weight", (F, D), w_in, our_index=(e, all_, slice(F, 2 * F)), transpose=True),
                Piece(x + down + ".weight", (D, F), w_out, our_index=(e,), transpose=True),
            ]
    if moe.num_shared_experts:
        pieces += mlp_pieces(hf + "shared_experts.", ours + "shared_experts.", D, moe.shared_size(D))
    return pieces


# --------------------------------------------------------------------------- config helpers


def config_error(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.json key '{key}' = {value!r} {why}")


def require(hf: dict, *keys: str) -> None:
    missing = [k for k in keys if hf.get(k) is None]
    if missing:
        raise ValueError(f"config.json of a {hf.get('model_type')} model lacks required key(s): {', '.join(missing)}")


def expect(hf: dict, key: str, allowed: tuple, default: Any = None) -> None:
    """Refuse a feature we do not implement, naming the key."""
    value = hf.get(key, default)
    if value not in allowed:
        raise config_error(key, value, f"is not supported (supported: {', '.join(map(repr, allowed))})")


def rope_from_hf(hf: dict, default_theta: float) -> tuple[float, dict | None]:
    """(rope_theta, YaRN scaling or None) from either transformers v4 keys (rope_theta +
    rope_scaling) or v5 ones (rope_parameters)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", default_theta)))
    kind, legacy_kind = params.pop("rope_type", None), params.pop("type", None)
    kind = kind or legacy_kind or "default"
    params.pop("partial_rotary_factor", None)  # read by the family where it applies
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise config_error("rope_scaling.type", kind, "is not supported (supported: 'default', 'yarn')")
    scaling = {"type": "yarn", **{k: v for k, v in params.items() if v is not None}}
    scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return theta, scaling


def rope_to_hf(cfg: ModelConfig) -> dict:
    """transformers v4 keys (rope_theta + rope_scaling), which v4 and v5 both read."""
    scaling = None if cfg.rope_scaling is None else {**cfg.rope_scaling, "rope_type": "yarn"}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling}


def dense_first(plan: list[bool]) -> int | None:
    """k if the plan is k dense layers followed by MoE layers only, else None."""
    k = plan.index(True) if True in plan else len(plan)
    return k if all(plan[k:]) else None


def plan_fields(plan: list[bool]) -> dict:
    """Our layer-plan fields for a plan read from a checkpoint config."""
    k = dense_first(plan)
    if k is not None and k < len(plan):
        return {"first_k_dense": k}
    return {"moe_layers": [i for i, is_moe in enumerate(plan) if is_moe]}


def refuse(family: str, problems: dict[str, bool]) -> None:
    """Raise if any named setting of ours cannot be expressed in the family's config."""
    bad = [what for what, is_bad in problems.items() if is_bad]
    if bad:
        raise ValueError(f"cannot export as {family}: the model has {'; '.join(bad)}")


class Family(ABC):
    """One Hugging Face model family: config translation both ways and tensor names.

    A family must translate configs both ways; tensor names and attention default to the
    Llama-like layout and are overridden where a family differs."""

    model_type: str
    architecture: str

    @abstractmethod
    def to_config(self, hf: dict, name: str) -> ModelConfig:
        """Our ModelConfig from the family's config.json."""

    @abstractmethod
    def to_hf(self, cfg: ModelConfig) -> dict:
        """The family's config.json for `cfg`; ValueError naming what the family cannot express."""

    def names(self, stacked: bool) -> Names:
        return Names(stacked=stacked)

    def attention(self, cfg: ModelConfig, hf: str, ours: str) -> list[Piece]:
        return gqa_pieces(cfg, hf, ours)

    def pieces(self, cfg: ModelConfig, stacked: bool = False) -> list[Piece]:
        return model_pieces(cfg, self.names(stacked), self.attention)

    def skipped_layers(self, hf: dict) -> range:
        """Layer indices present on disk but not part of the decoder (multi-token prediction)."""
        return range(0)

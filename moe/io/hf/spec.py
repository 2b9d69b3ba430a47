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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from ...config import ModelConfig
from ...config_checks import (
    ConfigValueError,
)
from ...errors import InputError, excerpt
from ...model import layer_plan
from .config_keys import HF_NAMES, check_key, config_error

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
        pieces += block_pieces(cfg, names, attention, f"model.layers.{i}.", f"layers.{i}.", is_moe)
    pieces.append(Piece("model.norm.weight", (D,), "norm.weight"))
    if not cfg.tie_embeddings:
        pieces.append(Piece("lm_head.weight", (V, D), "lm_head.weight"))
    return pieces


def block_pieces(
    cfg: ModelConfig, names: Names, attention: AttentionPieces, hf: str, ours: str, is_moe: bool
) -> list[Piece]:
    """One decoder block: its two norms, attention and FFN (MoE or dense)."""
    D = cfg.hidden_size
    pieces = [
        Piece(hf + names.attn_norm + ".weight", (D,), ours + "attn_norm.weight"),
        Piece(hf + names.ffn_norm + ".weight", (D,), ours + "ffn_norm.weight"),
    ]
    pieces += attention(cfg, hf, ours + "attn.")
    if is_moe:
        return pieces + moe_pieces(cfg, names, hf + names.moe + ".", ours + "ffn.")
    return pieces + mlp_pieces(hf + "mlp.", ours + "ffn.", D, cfg.ffn_size)


def deepseek_mtp_pieces(cfg: ModelConfig, names: Names, attention: AttentionPieces) -> list[Piece]:
    """DeepSeek-V3's MTP modules, stored as decoder layers L..L+n-1 (L = num_hidden_layers):
    enorm, hnorm, eh_proj [D, 2D], shared_head.norm, a block like the others, and copies of the
    embedding and output head (embed_tokens, shared_head.head), which we share: they are read
    into our one embedding / head (the published copies equal them; the last read wins) and
    written from it."""
    D, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    last_is_moe = layer_plan(cfg)[-1]
    pieces = []
    for k in range(cfg.num_mtp_layers):
        hf, ours = f"model.layers.{L + k}.", f"mtp.{k}."
        pieces += [
            Piece(hf + "enorm.weight", (D,), ours + "enorm.weight"),
            Piece(hf + "hnorm.weight", (D,), ours + "hnorm.weight"),
            Piece(hf + "eh_proj.weight", (D, 2 * D), ours + "eh_proj.weight"),
            Piece(hf + "shared_head.norm.weight", (D,), ours + "norm.weight"),
            Piece(hf + "embed_tokens.weight", (V, D), "embed_tokens.weight"),
            Piece(hf + "shared_head.head.weight", (V, D), "lm_head.weight"),
        ]
        pieces += block_pieces(cfg, names, attention, hf, ours + "block.", last_is_moe)
    return pieces


MTP_MARKERS = ("enorm", "hnorm", "eh_proj", "final_layernorm")  # the tensors only a Ling 2.0 MTP layer has


def ling_mtp_pieces(cfg: ModelConfig, names: Names, attention: AttentionPieces) -> list[Piece]:
    """Ling 2.0's MTP layers (BailingMoeV2MTPLayer), stored as decoder layers L..L+n-1 (L = our
    num_layers): enorm, hnorm, eh_proj [D, 2D] (embedding half first), final_layernorm (our
    `norm`), and a decoder layer's norms, attention and MoE block. Unlike DeepSeek-V3 they hold
    no copy of the embedding or the output head."""
    D, L = cfg.hidden_size, cfg.num_layers
    last_is_moe = layer_plan(cfg)[-1]
    pieces = []
    for k in range(cfg.num_mtp_layers):
        hf, ours = f"model.layers.{L + k}.", f"mtp.{k}."
        pieces += [
            Piece(hf + "enorm.weight", (D,), ours + "enorm.weight"),
            Piece(hf + "hnorm.weight", (D,), ours + "hnorm.weight"),
            Piece(hf + "eh_proj.weight", (D, 2 * D), ours + "eh_proj.weight"),
            Piece(hf + "final_layernorm.weight", (D,), ours + "norm.weight"),
        ]
        pieces += block_pieces(cfg, names, attention, hf, ours + "block.", last_is_moe)
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


class Family(ABC):
    """One Hugging Face model family: config translation both ways and tensor names.

    A family must translate configs both ways; tensor names and attention default to the
    Llama-like layout and are overridden where a family differs.

    Reading a config.json goes through `settings`: every key the family reads is listed once,
    either in `required` (the sizes that set tensor shapes: a config.json without them is cut
    short, and the class defaults for them describe one particular model) or in `defaults`, with
    the value the family's own configuration class gives a key that config.json omits (not ours:
    a missing rope_theta is 1e6 for Mixtral, 600000 for Ling 2.0)."""

    model_type: str
    architecture: str
    required: ClassVar[tuple[str, ...]]
    defaults: ClassVar[dict[str, Any]]
    aliases: ClassVar[dict[str, str]] = {}  # another name of a key -> the name read (transformers' attribute_map)
    hf_names: ClassVar[dict[str, str]] = {}  # our key -> config.json key, beyond HF_NAMES ("" = none)

    @abstractmethod
    def to_config(self, hf: dict, name: str) -> ModelConfig:
        """Our ModelConfig from the family's config.json; InputError naming a refused key."""

    @abstractmethod
    def to_hf(self, cfg: ModelConfig) -> dict:
        """The family's config.json for `cfg`; InputError naming what the family cannot express."""

    def settings(self, hf: dict) -> dict[str, Any]:
        """Every key this family reads: config.json's value where given, else the family's default;
        each checked for type and bounds before anything is built from it."""
        hf = dict(hf)
        for alias, key in self.aliases.items():
            if alias in hf:
                if key in hf and hf[key] is not None and hf[alias] != hf[key]:
                    raise config_error(alias, hf[alias], f"contradicts {key} = {excerpt(hf[key])}")
                if hf.get(key) is None and hf[alias] is not None:
                    hf[key] = check_key(key, hf[alias], written=alias)
        missing = [key for key in self.required if hf.get(key) is None]
        if missing:
            raise InputError(f"config.json of a {self.model_type} model lacks required key(s): {', '.join(missing)}")
        keys = {**dict.fromkeys(self.required), **self.defaults}
        return {key: check_key(key, hf[key] if key in hf else default) for key, default in keys.items()}

    def build(self, fields: dict[str, Any]) -> ModelConfig:
        """ModelConfig(**fields) (with `moe` as a dict); a value it refuses is named by its config.json key."""
        try:
            return ModelConfig(**fields)
        except ConfigValueError as e:
            names = {**HF_NAMES, **self.hf_names}
            hf_key = names.get(e.key) or (e.key if e.key.startswith("rope_scaling.") else "")
            if not hf_key:  # a value of ours derived from several keys
                raise InputError(f"our config key '{e.key}' {e.detail}") from None
            ours = f" (our {e.key})" if hf_key != e.key else ""
            raise InputError(f"config.json key '{hf_key}'{ours} {e.detail}") from None

    def names(self, stacked: bool) -> Names:
        return Names(stacked=stacked)

    def attention(self, cfg: ModelConfig, hf: str, ours: str) -> list[Piece]:
        return gqa_pieces(cfg, hf, ours)

    def pieces(self, cfg: ModelConfig, stacked: bool = False) -> list[Piece]:
        return model_pieces(cfg, self.names(stacked), self.attention)

    def skipped_layers(self, hf: dict) -> range:
        """Layer indices present on disk but not part of the decoder (multi-token prediction)."""
        return range(0)

    def mtp_layers(self, hf: dict) -> range:
        """Layer indices on disk that hold multi-token-prediction modules loaded into `model.mtp`."""
        return range(0)

    def for_tensors(self, hf: dict, tensor_names: Iterable[str]) -> dict:
        """config.json as this folder's tensors read it, where the family's config alone is
        ambiguous (Ling 2.0: where the MTP layers are); InputError where the tensors fit no reading."""
        return hf

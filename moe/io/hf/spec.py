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

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from ...config import (
    MAX_EXPERTS,
    MAX_FFN,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_LAYERS,
    MAX_SEQ_LEN,
    MAX_VOCAB,
    ConfigValueError,
    ModelConfig,
)
from ...errors import InputError, excerpt
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


# --------------------------------------------------------------------------- reading config.json


@dataclass(frozen=True)
class Key:
    """What a config.json key may hold. Sizes are bounded by our own limits (moe/config.py), so a
    config.json of a few bytes cannot make the tool loop or allocate for minutes."""

    kind: type  # int, float, bool, str, dict, or list (of ints)
    lo: int = 0  # bounds of an int, or of each int of a list
    hi: int | None = None
    null: bool = False  # an explicit null is accepted: the family gives it a meaning


KEYS: dict[str, Key] = {
    "vocab_size": Key(int, 1, MAX_VOCAB),
    "hidden_size": Key(int, 1, MAX_HIDDEN),
    "intermediate_size": Key(int, 1, MAX_FFN),
    "moe_intermediate_size": Key(int, 1, MAX_FFN),
    "num_hidden_layers": Key(int, 1, MAX_LAYERS),
    "num_attention_heads": Key(int, 1, MAX_HEADS),
    "num_key_value_heads": Key(int, 1, MAX_HEADS, null=True),  # null: num_attention_heads
    "head_dim": Key(int, 1, MAX_HIDDEN, null=True),  # null: hidden_size // num_attention_heads
    "max_position_embeddings": Key(int, 1, MAX_SEQ_LEN),
    "num_local_experts": Key(int, 0, MAX_EXPERTS),
    "num_experts": Key(int, 0, MAX_EXPERTS),
    "n_routed_experts": Key(int, 0, MAX_EXPERTS),
    "num_experts_per_tok": Key(int, 1, MAX_EXPERTS),
    "n_shared_experts": Key(int, 0, MAX_EXPERTS, null=True),  # null: none
    "num_shared_experts": Key(int, 0, MAX_EXPERTS, null=True),  # null: none
    "n_group": Key(int, 1, MAX_EXPERTS, null=True),  # null: 1, no group limit
    "topk_group": Key(int, 1, MAX_EXPERTS, null=True),
    "first_k_dense_replace": Key(int, 0, MAX_LAYERS),
    "moe_layer_freq": Key(int, 1, MAX_LAYERS),
    "decoder_sparse_step": Key(int, 1, MAX_LAYERS),
    "mlp_only_layers": Key(list, 0, MAX_LAYERS - 1, null=True),  # null: []
    "num_nextn_predict_layers": Key(int, 0, MAX_LAYERS, null=True),  # null: 0
    "q_lora_rank": Key(int, 1, MAX_HIDDEN, null=True),  # null: q projected directly
    "kv_lora_rank": Key(int, 1, MAX_HIDDEN),
    "qk_nope_head_dim": Key(int, 0, MAX_HIDDEN),
    "qk_rope_head_dim": Key(int, 1, MAX_HIDDEN),
    "v_head_dim": Key(int, 1, MAX_HIDDEN),
    "rotary_dim": Key(int, 1, MAX_HIDDEN, null=True),
    "sliding_window": Key(int, 0, None, null=True),  # null: none
    "rms_norm_eps": Key(float),
    "initializer_range": Key(float),
    "rope_theta": Key(float),
    "routed_scaling_factor": Key(float),
    "partial_rotary_factor": Key(float, null=True),  # null: 1.0
    "tie_word_embeddings": Key(bool),
    "attention_bias": Key(bool),
    "use_qkv_bias": Key(bool),
    "use_bias": Key(bool),
    "use_qk_norm": Key(bool),
    "norm_topk_prob": Key(bool),
    "rope_interleave": Key(bool),
    "use_sliding_window": Key(bool),
    "hidden_act": Key(str),
    "scoring_func": Key(str),
    "score_function": Key(str),
    "topk_method": Key(str),
    "rope_scaling": Key(dict, null=True),
    "rope_parameters": Key(dict, null=True),
    "quantization_config": Key(dict, null=True),
    "model_type": Key(str, null=True),
    "architectures": Key(list, null=True),  # of str
    "torch_dtype": Key(str, null=True),
    "dtype": Key(str, null=True),
}

# Our config key -> the config.json key it is read from, to name a value our ModelConfig refuses.
# Families add their own (the experts' count has a different name in each).
HF_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "init_std": "initializer_range",
    "rope_theta": "rope_theta",
    "rope_fraction": "partial_rotary_factor",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "moe.top_k": "num_experts_per_tok",
    "moe.expert_ffn_size": "moe_intermediate_size",
    "moe.n_group": "n_group",
    "moe.topk_group": "topk_group",
    "moe.routed_scaling_factor": "routed_scaling_factor",
}


def config_error(key: str, value: Any, why: str) -> InputError:
    return InputError(f"config.json key '{key}' = {excerpt(value)} {why}")


def check_key(key: str, value: Any, written: str | None = None) -> Any:
    """`value` if it is what KEYS[key] allows, else InputError naming the key (as `written`, where
    config.json gives it under another name)."""
    spec, name = KEYS[key], written or key
    if value is None:
        if spec.null:
            return None
        raise config_error(name, value, "must not be null")
    if spec.kind is float:
        return _number(name, value)
    if spec.kind is int:
        _check_int(name, value, spec)
    elif spec.kind is list:
        if not isinstance(value, list) or len(value) > MAX_LAYERS:
            raise config_error(name, value, f"must be a list of at most {MAX_LAYERS} items")
        for i, item in enumerate(value):
            if key == "architectures":  # the only list of strings; the others hold layer indices
                if not isinstance(item, str):
                    raise config_error(f"{name}[{i}]", item, "must be a string")
            else:
                _check_int(f"{name}[{i}]", item, spec)
    elif not isinstance(value, spec.kind):
        raise config_error(name, value, f"must be a {_KIND_NAMES[spec.kind]}")
    return value


_KIND_NAMES = {bool: "boolean (true or false)", str: "string", dict: "JSON object"}


def _check_int(key: str, value: Any, spec: Key) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise config_error(key, value, "must be an integer")
    if value < spec.lo:
        raise config_error(key, value, f"must be >= {spec.lo}")
    if spec.hi is not None and value > spec.hi:
        raise config_error(key, value, f"must be <= {spec.hi} (a sanity bound far above published models)")


def expect(c: dict, key: str, allowed: tuple) -> None:
    """Refuse a feature we do not implement, naming the key."""
    if c[key] not in allowed:
        raise config_error(key, c[key], f"is not supported (supported: {', '.join(map(repr, allowed))})")


def rope_from_hf(c: dict) -> tuple[float, dict | None]:
    """(rope_theta, YaRN scaling or None) from the checked settings `c`, which carry either
    transformers v4 keys (rope_theta + rope_scaling) or v5 ones (rope_parameters)."""
    source = "rope_parameters" if c["rope_parameters"] else "rope_scaling"
    params = dict(c[source] or {})
    theta = params.pop("rope_theta", None)
    theta = c["rope_theta"] if theta is None else _number(f"{source}.rope_theta", theta)
    kind, legacy_kind = params.pop("rope_type", None), params.pop("type", None)
    kind = kind or legacy_kind or "default"
    params.pop("partial_rotary_factor", None)  # read by the family where it applies
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise config_error("rope_scaling.type", kind, "is not supported (supported: 'default', 'yarn')")
    scaling = {"type": "yarn", **{k: v for k, v in params.items() if v is not None}}
    scaling.setdefault("original_max_position_embeddings", c["max_position_embeddings"])
    return theta, scaling


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise config_error(key, value, "must be a finite number")
    return float(value)


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
        raise InputError(f"cannot export as {family}: the model has {'; '.join(bad)}")


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

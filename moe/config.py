"""Configs: the single source of truth for every size and switch.

`MoEConfig` describes one MoE layer (router, balancing, capacity, experts), `ModelConfig`
a whole decoder. Both validate themselves at construction and name the offending key and
value in a `ValueError`; `load_config` reads YAML or JSON strictly (unknown keys are
errors, not silently ignored).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .shipped_configs import resolve_config

ScoreFunc = Literal["softmax", "sigmoid"]
BiasUpdate = Literal["sign", "zero_mean"]
CapacityMode = Literal["static", "dynamic"]
Backend = Literal["eager", "torch", "triton"]
Activation = Literal["swiglu", "gelu"]
AttentionKind = Literal["gqa", "mla"]


@dataclass
class MoEConfig:
    """One MoE layer. Defaults give a plain Mixtral-style softmax top-k layer."""

    num_experts: int = 8
    top_k: int = 2
    expert_ffn_size: int | None = None  # None: 4 * hidden_size, a full FFN per expert
    activation: Activation = "swiglu"
    num_shared_experts: int = 0  # always-on experts added unweighted (DeepSeek-V3, Ling 2.0: 1)
    shared_ffn_size: int | None = None  # None: num_shared_experts * expert FFN size

    # Router. Scores are always computed in fp32: bf16 logits flip near-tied top-k choices.
    score_func: ScoreFunc = "softmax"
    n_group: int = 1  # group-limited routing: experts split into n_group groups ...
    topk_group: int = 1  # ... and only the best topk_group groups are eligible per token
    norm_topk_prob: bool = True  # renormalise the k selected weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies routed weights (DeepSeek-V3 2.5, Ling 2.0 2.5)

    # Balancing. Every coefficient 0 = off.
    aux_loss_coef: float = 0.0  # Switch Transformer load-balancing loss over the batch
    seq_aux_loss_coef: float = 0.0  # the same loss per sequence (DeepSeek-V3 alpha = 1e-4)
    z_loss_coef: float = 0.0  # ST-MoE router z-loss (Ling 2.0: 3.5e-6)
    expert_bias: bool = False  # aux-loss-free balancing: a per-expert bias used only for selection
    bias_update_rate: float = 1e-3  # u in b_i += u * sign(mean_load - load_i)
    bias_update: BiasUpdate = "sign"  # "sign" as DeepSeek-V3; "zero_mean" re-centres the update (Ling 2.0)

    # Capacity. None = dropless: every assignment is computed.
    capacity_factor: float | None = None
    capacity_mode: CapacityMode = "static"

    backend: Backend = "torch"  # "eager" is the readable reference loop over experts

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(self, "num_experts", "top_k", "n_group", "topk_group")
        _non_negative(
            self, "num_shared_experts", "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"
        )
        if self.top_k > self.num_experts:
            _fail("top_k", self.top_k, f"must be <= num_experts ({self.num_experts})")
        if self.num_experts % self.n_group:
            _fail("num_experts", self.num_experts, f"must be divisible by n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            _fail("topk_group", self.topk_group, f"must be <= n_group ({self.n_group})")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            _fail(
                "top_k",
                self.top_k,
                f"exceeds the experts in topk_group={self.topk_group} groups of {self.num_experts // self.n_group}",
            )
        for key in ("expert_ffn_size", "shared_ffn_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                _fail(key, value, "must be positive or null")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            _fail("capacity_factor", self.capacity_factor, "must be positive or null (dropless)")
        if self.routed_scaling_factor <= 0:
            _fail("routed_scaling_factor", self.routed_scaling_factor, "must be positive")

    def ffn_size(self, hidden_size: int) -> int:
        return self.expert_ffn_size or 4 * hidden_size

    def shared_size(self, hidden_size: int) -> int:
        return self.shared_ffn_size or self.num_shared_experts * self.ffn_size(hidden_size)


@dataclass
class ModelConfig:
    """A decoder-only transformer whose FFNs are dense SwiGLU MLPs or MoE layers."""

    name: str = "model"
    vocab_size: int = 256  # bytes: the default corpus needs no tokenizer
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: num_heads (MHA); fewer: GQA
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int | None = None  # dense SwiGLU FFN; None: 4 * hidden_size
    max_seq_len: int = 256  # context length used for training and for attention FLOPs
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02

    # Attention.
    attention: AttentionKind = "gqa"
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3, Ling 2.0)
    attention_bias: bool = False  # bias on the q/k/v projections
    attention_out_bias: bool = False  # bias on the output projection (Qwen3 attention_bias, Ling use_bias)
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # share of each head's dims that RoPE rotates (Ling 2.0: 0.5)
    rope_interleave: bool = False  # rotate adjacent pairs (DeepSeek's MLA) instead of halves
    # YaRN context extension, None = plain RoPE. Keys: type ("yarn"), factor,
    # original_max_position_embeddings, and optionally beta_fast (32), beta_slow (1), mscale,
    # mscale_all_dim (MLA also scales its softmax by yarn_mscale(factor, mscale_all_dim)^2),
    # attention_factor, truncate. DeepSeek-V3: factor 40 over 4096, mscale = mscale_all_dim = 1.
    rope_scaling: dict | None = None
    # MLA (DeepSeek-V3 multi-head latent attention); used when attention == "mla".
    q_lora_rank: int | None = None  # None: q is projected directly, without a latent
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    latent_norm_eps: float | None = None  # eps of the q/kv latent RMSNorms; None: norm_eps
    # (DeepSeek-V3's reference code fixes it at 1e-6 whatever rms_norm_eps says)

    # Layer plan: which layers use an MoE FFN. Exactly one scheme applies:
    # moe_layers (explicit list) > moe_pattern ("2-4-2-4": 2 dense, 4 MoE, repeating)
    # > first_k_dense + moe_every (after k dense layers, every n-th layer is MoE).
    first_k_dense: int = 0
    moe_every: int = 1
    moe_pattern: str | None = None
    moe_layers: list[int] | None = None
    moe: MoEConfig | None = field(default_factory=MoEConfig)  # None: a dense model

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = _from_dict(MoEConfig, self.moe, prefix="moe.")
        _check_types(self)
        _positive(
            self,
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "max_seq_len",
            "moe_every",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
        )
        _non_negative(self, "first_k_dense", "qk_nope_head_dim")
        for key in ("num_kv_heads", "head_dim", "intermediate_size", "q_lora_rank"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                _fail(key, value, "must be positive or null")
        if self.num_heads % self.kv_heads:
            _fail("num_heads", self.num_heads, f"must be divisible by num_kv_heads ({self.kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            _fail(
                "hidden_size",
                self.hidden_size,
                f"must be divisible by num_heads ({self.num_heads}) unless head_dim is set",
            )
        if not 0.0 < self.rope_fraction <= 1.0:
            _fail("rope_fraction", self.rope_fraction, "must be in (0, 1]")
        if self.attention == "gqa" and self.rotary_dim % 2:
            _fail(
                "rope_fraction",
                self.rope_fraction,
                f"gives an odd rotary dim {self.rotary_dim} for head_dim {self.dim_per_head}",
            )
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if self.latent_norm_eps is not None and not self.latent_norm_eps > 0:
            _fail("latent_norm_eps", self.latent_norm_eps, "must be positive or null")
        if self.attention == "mla" and self.qk_rope_head_dim % 2:
            _fail("qk_rope_head_dim", self.qk_rope_head_dim, "must be even")
        if self.first_k_dense > self.num_layers:
            _fail("first_k_dense", self.first_k_dense, f"exceeds num_layers ({self.num_layers})")
        if self.moe_pattern is not None:
            if not re.fullmatch(r"\d+(-\d+)*", self.moe_pattern) or len(self.moe_pattern.split("-")) % 2:
                _fail(
                    "moe_pattern", self.moe_pattern, "must alternate dense and MoE run lengths, e.g. '2-4' or '2-4-2-4'"
                )
            if not any(int(n) for n in self.moe_pattern.split("-")[1::2]):
                _fail("moe_pattern", self.moe_pattern, "has no MoE layers")
            if self.first_k_dense or self.moe_every != 1:
                _fail("moe_pattern", self.moe_pattern, "cannot be combined with first_k_dense/moe_every")
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
            if bad:
                _fail("moe_layers", self.moe_layers, f"has layers outside 0..{self.num_layers - 1}: {bad}")
        if self.moe is None and (self.moe_layers or self.moe_pattern):
            _fail("moe", None, "is null but the layer plan asks for MoE layers")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_per_head * self.rope_fraction)

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ROPE_SCALING_KEYS = {
    "type": str,
    "factor": float,
    "original_max_position_embeddings": int,
    "beta_fast": float,
    "beta_slow": float,
    "mscale": float,
    "mscale_all_dim": float,
    "attention_factor": float,
    "truncate": bool,
}


def _check_rope_scaling(scaling: dict) -> None:
    for key, value in scaling.items():
        if key not in ROPE_SCALING_KEYS:
            _fail(f"rope_scaling.{key}", value, f"is not a YaRN key (known: {', '.join(ROPE_SCALING_KEYS)})")
        if _coerce(value, ROPE_SCALING_KEYS[key]) is _BAD:
            _fail(f"rope_scaling.{key}", value, f"has the wrong type (expected {ROPE_SCALING_KEYS[key].__name__})")
    if scaling.get("type") != "yarn":
        _fail("rope_scaling.type", scaling.get("type"), "must be 'yarn' (the only scaling implemented)")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in scaling:
            _fail(f"rope_scaling.{key}", None, "is required for YaRN")
    if not scaling["factor"] >= 1:
        _fail("rope_scaling.factor", scaling["factor"], "must be >= 1")
    if scaling["original_max_position_embeddings"] <= 0:
        _fail(
            "rope_scaling.original_max_position_embeddings",
            scaling["original_max_position_embeddings"],
            "must be positive",
        )


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path) -> ModelConfig:
    """Read a YAML or JSON model config strictly into a `ModelConfig`.

    `path` is a file or the name of a shipped config ("tiny", "deepseek-v3"; `moe configs` lists them).
    """
    path = resolve_config(path)
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: malformed config: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}")
    try:
        return config_from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    return _from_dict(ModelConfig, data, prefix="")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key '{prefix}{unknown[0]}' (known keys: {', '.join(sorted(names))})")
    try:
        return cls(**data)
    except ValueError as e:
        # Name nested keys by their full path ("moe.top_k"), as the user wrote them.
        msg = str(e)
        if prefix and msg.startswith("config key '"):
            msg = msg.replace("config key '", f"config key '{prefix}", 1)
        raise ValueError(msg) from None


# --------------------------------------------------------------------------- validation


def _fail(key: str, value: Any, why: str) -> None:
    raise ValueError(f"config key '{key}' = {value!r} {why}")


def _positive(cfg: Any, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) <= 0:
            _fail(key, getattr(cfg, key), "must be positive")


def _non_negative(cfg: Any, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) < 0:
            _fail(key, getattr(cfg, key), "must be >= 0")


def _check_types(cfg: Any) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        coerced = _coerce(value, hints[f.name])
        if coerced is _BAD:
            _fail(f.name, value, f"has the wrong type (expected {_describe(hints[f.name])})")
        setattr(cfg, f.name, coerced)


_BAD = object()


def _coerce(value: Any, hint: Any) -> Any:
    """Return value as the hinted type (ints accepted for floats), or _BAD."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else _BAD
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner)
    if origin is Literal:
        return value if value in args else _BAD
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _BAD
        items = [_coerce(v, args[0]) for v in value]
        return _BAD if any(i is _BAD for i in items) else items
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else _BAD
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _BAD
    return value


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"list of {_describe(args[0])}"
    return getattr(hint, "__name__", str(hint))

"""Reading and writing a Hugging Face config.json: every key checked before it is used.

`KEYS` gives each key the families read its type and bounds (the sanity bounds of
moe/config_checks.py), so a 1 kB config.json with `num_experts: 1e8` or a string where an int
belongs is refused, naming the key, before anything is computed from it; `HF_NAMES` maps the keys
our errors name back to the config.json's own. The helpers below (RoPE scaling, the dense/MoE
layer plan, settings a family cannot express) are shared by the family modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...config import ModelConfig
from ...config_checks import (
    MAX_EXPERTS,
    MAX_FFN,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_LAYERS,
    MAX_SEQ_LEN,
    MAX_VOCAB,
)
from ...errors import InputError, excerpt


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

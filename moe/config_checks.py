"""How a config's fields are checked: the sanity bounds, the type rules and the one-line errors.

moe/config.py declares the dataclasses and their cross-field rules; this module holds the machinery
they share (and that moe/io/hf/spec.py applies to a Hugging Face config.json before it becomes
one): every int a true int within its bound, every float finite and in its range, and a bad value
reported as `ConfigValueError` naming the key by its dotted path with an excerpt of the value.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from .errors import InputError, excerpt

# Sanity bounds. Each is far above every published model (configs/full/, the seed-speculated 10T
# one included: E 256, D 12288, F 18432, L 120, V 157184, 163840 positions) and low enough that a
# config of a few bytes cannot make the tool allocate or loop for minutes.
MAX_EXPERTS = 2**16  # E, shared experts, top_k
MAX_HIDDEN = 2**20  # D, head dims, MLA ranks
MAX_FFN = 2**22  # F, dense and shared FFN widths, H * Dh
MAX_HEADS = 2**16  # H, Hkv
MAX_LAYERS = 10_000  # L
MAX_VOCAB = 2**24  # V
MAX_SEQ_LEN = 2**24  # max_seq_len, YaRN's original context and factor
MAX_EXPERT_LAYERS = 2**20  # E * L: loading a per-expert checkpoint maps 3 tensors per expert per layer
NAME = re.compile(r"\w[\w.+-]{0,127}")  # a config's name names its run folder: no path separators


class ConfigValueError(InputError):
    """An impossible config value. `key` is its dotted name ("moe.top_k"), `detail` the rest of
    the message ("= 9 must be <= num_experts (8)"), so that a caller can rename the key."""

    key: str = ""
    detail: str = ""


def config_error(key: str, detail: str) -> ConfigValueError:
    error = ConfigValueError(f"config key '{key}' {detail}")
    error.key, error.detail = key, detail
    return error


def fail(key: str, value: Any, why: str) -> typing.NoReturn:
    raise config_error(key, f"= {excerpt(value)} {why}")


def check_ints(cfg: Any, bounds: dict[str, tuple[int, int]]) -> None:
    """Each int field (or null where allowed) within [lo, hi]."""
    for key, (lo, hi) in bounds.items():
        value = getattr(cfg, key)
        if value is None:
            continue
        if value < lo:
            fail(key, value, "must be positive" if lo == 1 else f"must be >= {lo}")
        if value > hi:
            fail(key, value, f"must be <= {hi} (a sanity bound far above published models)")


def check_floats(cfg: Any, rules: dict[str, tuple[Callable[[float], bool], str]]) -> None:
    """Each float field (already finite) passes its rule, or is null where allowed."""
    for key, (ok, why) in rules.items():
        value = getattr(cfg, key)
        if value is not None and not ok(value):
            fail(key, value, why)


def check_types(cfg: Any) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        coerced = coerce(value, hints[f.name])
        if coerced is BAD:
            if isinstance(value, float) and not math.isfinite(value):
                fail(f.name, value, "must be a finite number")
            fail(f.name, value, f"has the wrong type (expected {describe(hints[f.name])})")
        setattr(cfg, f.name, coerced)


BAD = object()


def coerce(value: Any, hint: Any) -> Any:
    """Return value as the hinted type (ints accepted for floats), or BAD. Floats must be finite,
    ints must be true ints (not bools, not floats such as 1e8)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else BAD
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner)
    if origin is Literal:
        return value if isinstance(value, str) and value in args else BAD
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return BAD
        items = [coerce(v, args[0]) for v in value]
        return BAD if any(i is BAD for i in items) else items
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else BAD
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else BAD
    if isinstance(hint, type):
        return value if isinstance(value, hint) else BAD
    return value


def describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else describe(a) for a in args)
    if origin is list:
        return f"list of {describe(args[0])}"
    return getattr(hint, "__name__", str(hint))


# --------------------------------------------------------------------------- rope_scaling (YaRN)


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


def positive(value: float) -> bool:
    return value > 0


def non_negative(value: float) -> bool:
    return value >= 0


def unit(value: float) -> bool:
    return 0 < value <= 1


def up_to_max_seq_len(value: float) -> bool:
    return 1 <= value <= MAX_SEQ_LEN


# Beyond the types: YaRN's ramp takes log(beta) and divides by the mscale terms, which these keep > 0.
ROPE_SCALING_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "factor": (up_to_max_seq_len, f"must be in [1, {MAX_SEQ_LEN}]"),
    "original_max_position_embeddings": (up_to_max_seq_len, f"must be in [1, {MAX_SEQ_LEN}]"),
    "beta_fast": (positive, "must be positive"),
    "beta_slow": (positive, "must be positive"),
    "mscale": (non_negative, "must be >= 0"),
    "mscale_all_dim": (non_negative, "must be >= 0"),
    "attention_factor": (positive, "must be positive"),
}


def check_rope_scaling(scaling: dict) -> None:
    for key, value in scaling.items():
        if key not in ROPE_SCALING_KEYS:
            fail(f"rope_scaling.{key}", value, f"is not a YaRN key (known: {', '.join(ROPE_SCALING_KEYS)})")
        if coerce(value, ROPE_SCALING_KEYS[key]) is BAD:
            if isinstance(value, float) and not math.isfinite(value):
                fail(f"rope_scaling.{key}", value, "must be a finite number")
            fail(f"rope_scaling.{key}", value, f"has the wrong type (expected {ROPE_SCALING_KEYS[key].__name__})")
    if scaling.get("type") != "yarn":
        fail("rope_scaling.type", scaling.get("type"), "must be 'yarn' (the only scaling implemented)")
    for key in ("factor", "original_max_position_embeddings"):
        if key not in scaling:
            fail(f"rope_scaling.{key}", None, "is required for YaRN")
    for key, (ok, why) in ROPE_SCALING_RANGES.items():
        if scaling.get(key) is not None and not ok(scaling[key]):
            fail(f"rope_scaling.{key}", scaling[key], why)

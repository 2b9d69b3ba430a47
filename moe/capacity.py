"""Capacity: how many assignments each expert may take in one batch.

Legend: T = tokens, K = top-k, E = experts, A = T*K assignments, C = slots per expert (static).

- dropless (`capacity_factor: null`): no limit, nothing is dropped.
- static: every expert gets C = ceil(factor * T * K / E) slots (Switch / GShard). Skewed
  routing overflows the popular experts while slots of the idle ones go unused.
- dynamic: the same total budget of E * C slots, split per batch according to the observed
  load by water-filling: every expert gets min(load_e, tau), with tau the largest level
  whose total fits in E * C; the few slots left over go one each to the overloaded experts in
  expert order. Only load above the water level is dropped, so for the same memory
  (E * C rows of expert buffer) dynamic never drops more than static, and drops nothing at
  all when factor >= 1 (E * C >= A). This is the grouped-GEMM view of capacity: the buffer is
  one [E * C, D] block whose split between experts (the offsets) is free to change per batch.

Which assignments are dropped is decided in `dispatch.plan_dispatch`: first choices before
second choices, earlier tokens first. Capacities are device tensors: no host sync.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import MoEConfig


def static_slots(num_tokens: int, config: MoEConfig) -> int:
    """Slots per expert under a static capacity factor (the config must have one)."""
    factor = config.capacity_factor
    if factor is None:
        raise ValueError("a dropless config (capacity_factor: null) has no slot limit")
    return math.ceil(factor * num_tokens * config.top_k / config.num_experts)


def expert_capacity(load_E: Tensor, num_tokens: int, config: MoEConfig) -> Tensor | None:
    """Per-expert slot limits [E] (int64), or None for dropless."""
    if config.capacity_factor is None:
        return None
    slots = static_slots(num_tokens, config)
    if config.capacity_mode == "static":
        return torch.full_like(load_E, slots)
    return water_fill(load_E, slots * config.num_experts, max_load=num_tokens)


def water_fill(load_E: Tensor, budget: int, max_load: int) -> Tensor:
    """Split `budget` slots so that cap_e <= load_e and only the peaks are cut.

    Worked example: load = [9, 1, 4, 2], budget = 12. Levels: tau=5 uses 5+1+4+2 = 12 <= 12,
    tau=6 would use 13, so tau = 5 and cap = [5, 1, 4, 2] (4 assignments of expert 0 dropped).
    With budget = 13 the extra slot goes to expert 0: cap = [6, 1, 4, 2].
    """
    load_E = load_E.long()
    lo = torch.zeros((), dtype=torch.long, device=load_E.device)
    hi = torch.full_like(lo, max_load)
    # Binary search on tau with a fixed number of steps: no data-dependent host sync.
    for _ in range(max(1, math.ceil(math.log2(max_load + 1)))):
        mid = (lo + hi + 1) // 2
        fits = torch.minimum(load_E, mid).sum() <= budget
        lo = torch.where(fits, mid, lo)
        hi = torch.where(fits, hi, mid - 1)
    cap_E = torch.minimum(load_E, lo)
    spare = budget - cap_E.sum()
    over_E = load_E > lo
    extra_E = over_E & (torch.cumsum(over_E.long(), 0) <= spare)
    return cap_E + extra_E.long()

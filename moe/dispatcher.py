"""Dispatchers: how the rows of a dispatch plan reach the experts that hold them, and come back.

Legend: T = tokens, D = hidden size, A = T*K slots, R = rows sent to the experts here,
El = experts held here.

The plan (dispatch.py) says which expert each slot goes to, in grouped order; a dispatcher
moves the rows. The layer calls it in one place:

    out_TD = dispatcher(x_TD, plan, weight_TK, experts)
           # = combine(collect(experts(*dispatch(x_TD, plan))), weight_TK, plan)

    dispatch(x_TD, plan) -> Dispatched(rows [R, D], offs [El] int32 of the experts here, state)
    experts(rows, offs)  -> [R, D]
    collect(y_RD, dispatched, plan) -> [A, D] in slot order (dropped slots zero)
    combine(y_AD, weight_TK, plan) -> [T, D], each token's K outputs weighted and summed

A dispatcher that fuses the moves into the expert GEMMs overrides `__call__` (LocalDispatcher
does for the Triton backend, whose kernels also apply the routing weights and sum over top-k,
so that no per-slot output [A, D] is kept for the backward). Implementations:
- LocalDispatcher (here): every expert is in this process; dispatch is a gather (permute),
  collect a scatter (unpermute).
- moe.distributed.AllToAllDispatcher: experts split over an expert-parallel group, rows sent
  to their rank and back by all-to-all. Installed by moe.distributed.shard_experts.
- moe.perf.components.RankDispatcher: one expert-parallel rank's compute without the
  communication (calibration).
A new one (DeepEP-style, or overlapping the all-to-all with compute) implements the two
methods and is installed the same way: `layer.dispatcher = MyDispatcher(...)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple

from torch import Tensor

from .dispatch import DispatchPlan, combine, permute, unpermute
from .experts import Experts


class Dispatched(NamedTuple):
    rows: Tensor  # [R, D] rows grouped by the experts held here
    offs: Tensor  # [El] int32 cumulative end row of each of those experts
    state: Any = None  # what collect needs to send the outputs back (split sizes, orders)


class Dispatcher(ABC):
    @abstractmethod
    def dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> Dispatched:
        """Token rows [T, D] -> the rows of the experts held here, grouped by expert."""

    @abstractmethod
    def collect(self, y_RD: Tensor, dispatched: Dispatched, plan: DispatchPlan) -> Tensor:
        """The experts' outputs [R, D] -> [A, D] in slot order, dropped slots zero."""

    def __call__(self, x_TD: Tensor, plan: DispatchPlan, weight_TK: Tensor, experts: Experts) -> Tensor:
        """Token rows [T, D] and routing weights [T, K] -> the layer's routed output [T, D]."""
        y_AD = self.expert_outputs(x_TD, plan, experts)
        return combine(y_AD, weight_TK.to(y_AD.dtype), plan)

    def expert_outputs(self, x_TD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
        """Every slot's expert output, unweighted: [T, D] -> [A, D] in slot order."""
        sent = self.dispatch(x_TD, plan)
        return self.collect(experts(sent.rows, sent.offs), sent, plan)


class LocalDispatcher(Dispatcher):
    """Every expert lives in this process: gather the rows into expert order and back."""

    def dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> Dispatched:
        return Dispatched(permute(x_TD, plan), plan.offs)

    def collect(self, y_RD: Tensor, dispatched: Dispatched, plan: DispatchPlan) -> Tensor:
        return unpermute(y_RD, plan)

    def __call__(self, x_TD: Tensor, plan: DispatchPlan, weight_TK: Tensor, experts: Experts) -> Tensor:
        # the Triton backend gathers, weights and sums inside its kernels
        fused = experts.fused(x_TD, plan, weight_TK)
        return fused if fused is not None else super().__call__(x_TD, plan, weight_TK, experts)

"""Dispatchers: how the rows of a dispatch plan reach the experts that hold them, and come back.

Legend: T = tokens, D = hidden size, A = T*K slots, R = rows sent to the experts here,
El = experts held here.

The plan (dispatch.py) says which expert each slot goes to, in grouped order; a dispatcher
moves the rows. The layer calls it in one place:

    y_AD = dispatcher(x_TD, plan, experts)     # = collect(experts(*dispatch(x_TD, plan)))

    dispatch(x_TD, plan) -> Dispatched(rows [R, D], offs [El] int32 of the experts here, state)
    experts(rows, offs)  -> [R, D]
    collect(y_RD, dispatched, plan) -> [A, D] in slot order (dropped slots zero)

A dispatcher that fuses the moves into the expert GEMMs overrides `__call__` (LocalDispatcher
does for the Triton backend). Implementations:
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

from .dispatch import DispatchPlan, permute, unpermute
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

    def __call__(self, x_TD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
        sent = self.dispatch(x_TD, plan)
        return self.collect(experts(sent.rows, sent.offs), sent, plan)


class LocalDispatcher(Dispatcher):
    """Every expert lives in this process: gather the rows into expert order and back."""

    def dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> Dispatched:
        return Dispatched(permute(x_TD, plan), plan.offs)

    def collect(self, y_RD: Tensor, dispatched: Dispatched, plan: DispatchPlan) -> Tensor:
        return unpermute(y_RD, plan)

    def __call__(self, x_TD: Tensor, plan: DispatchPlan, experts: Experts) -> Tensor:
        fused = experts.fused(x_TD, plan)  # the Triton backend gathers and scatters inside its GEMMs
        return fused if fused is not None else super().__call__(x_TD, plan, experts)

"""Our expert FFN inside transformers: the experts implementation "moe_kernels".

    import moe.io.hf.experts_interface as experts_interface
    experts_interface.register()                      # once; idempotent
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_kernels")

Legend: T = tokens, D = hidden size, F = expert FFN size, E = experts, K = top-k, A = T*K slots,
R = A permuted rows (moe/dispatch.py).

transformers v5 decorates each family's experts class with `use_experts_implementation`; its
forward then calls the function registered under `config._experts_implementation` as
`fn(module, hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D]`, with the
module's stacked weights in nn.Linear's (out, in) layout:

    gate_up_proj [E, 2F, D]   rows [:F] the gate, [F:] the up projection ("concatenated")
    down_proj    [E, D, F]

Their transposes are exactly our `w_in [E, D, 2F]` and `w_out [E, F, D]`: strided views, no copy
(the kernels and F.grouped_mm take column-major matrices), so the gradients land in the
module's own parameters. Mixtral, Qwen3-MoE and DeepSeek-V3 all use this layout with SiLU;
a family with another (biases, interleaved or transposed weights, no gate, a custom gate, another
activation) is refused with its name instead of being computed wrongly.

The routing goes through the same plan as our layer (`plan_dispatch`, dropless), then one of
two paths, recorded on the module as `module.moe_kernels_path` after every call:

    "triton"  moe_kernels.moe_ffn: gather fused into the first grouped GEMM, the routing weights
              into its epilogue, each token's K rows summed in fp32 after the second (CUDA, or CPU
              tensors through the Triton interpreter, fp16 / fp32)
    "torch"   permute, torch.nn.functional.grouped_mm twice, unpermute (moe.experts'
              "torch" backend), then the K outputs of each token summed with the routing weights
              in fp32 (`combine`), where Triton cannot run; a RuntimeWarning says why, once per reason

Expert-parallel sentinels (ids >= E, which transformers' EP sends with zero weight) sort past
every expert and come out as zeros.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ...dispatch import DispatchPlan, combine, count_ids, permute, plan_dispatch, row_weights, unpermute
from ...errors import InputError
from ...experts import activate, torch_grouped_mm
from ...extras import MissingExtra, require

NAME = "moe_kernels"
MIN_TRANSFORMERS = "5.0"  # the first release with transformers.integrations.moe.ExpertsInterface

__all__ = ["MIN_TRANSFORMERS", "NAME", "experts_forward", "kernel_path", "register"]


def register() -> str:
    """Make `experts_implementation="moe_kernels"` known to transformers; returns the name.

    Idempotent: registering again puts the same function under the same name. Raises MissingExtra
    without transformers, or with a transformers that predates the experts interface."""
    transformers = require("transformers", "the transformers experts implementation")
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as e:
        raise MissingExtra(
            f"experts_implementation={NAME!r} needs transformers >= {MIN_TRANSFORMERS} (its ExpertsInterface), "
            f"found {getattr(transformers, '__version__', 'an unknown version')}: "
            f"pip install 'transformers>={MIN_TRANSFORMERS}'"
        ) from e
    ExpertsInterface.register(NAME, experts_forward)
    return NAME


def experts_forward(module: Any, hidden_states_TD: Tensor, top_k_index_TK: Tensor, top_k_weights_TK: Tensor) -> Tensor:
    """The registered function: transformers calls it in place of the experts module's forward.
    `module` is the family's experts nn.Module, read by the attributes transformers gives it."""
    _check_layout(module)
    E = module.num_experts
    w_in_EDN = module.gate_up_proj.transpose(1, 2)  # [E, D, 2F], gate columns first
    w_out_EFD = module.down_proj.transpose(1, 2)  # [E, F, D]
    # Under autocast (or with fp32 activations around bf16 weights) compute in the weights' dtype,
    # as transformers' own grouped_mm does.
    x_TD = hidden_states_TD.to(w_in_EDN.dtype)
    plan = _plan(top_k_index_TK, E)
    path, reason = kernel_path(x_TD.device, x_TD.dtype)
    if path == "triton":
        import moe_kernels

        row_weight_R = row_weights(top_k_weights_TK, plan)
        out_TD = moe_kernels.moe_ffn(x_TD, w_in_EDN, w_out_EFD, plan.offs, plan.row_token, row_weight_R, "swiglu")
    else:
        warnings.warn(
            f"experts_implementation={NAME!r}: Triton cannot run ({reason}); using torch", RuntimeWarning, stacklevel=2
        )
        h_RF = activate(torch_grouped_mm(permute(x_TD, plan), w_in_EDN, plan.offs), "swiglu")
        y_AD = unpermute(torch_grouped_mm(h_RF, w_out_EFD, plan.offs), plan)
        out_TD = combine(y_AD, top_k_weights_TK, plan)
    module.moe_kernels_path = path
    return out_TD.to(hidden_states_TD.dtype)


def _plan(top_k_index_TK: Tensor, num_experts: int) -> DispatchPlan:
    """The dropless plan of our layer. Ids >= E (expert-parallel sentinels) become E: they sort
    after every expert, outside every group, so their rows are dropped (zero output)."""
    idx_TK = top_k_index_TK.clamp(max=num_experts)
    load_E = count_ids(idx_TK.reshape(-1), num_experts + 1)[:num_experts]
    return plan_dispatch(idx_TK, load_E)


def kernel_path(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """("triton", how it runs) where moe_kernels.moe_ffn runs on (device, dtype), else
    ("torch", why not): no triton, CPU tensors without TRITON_INTERPRET=1, bf16 in the interpreter."""
    reason = _triton_unavailable(torch.device(device), dtype)
    return ("torch", reason) if reason else ("triton", "moe_kernels.moe_ffn")


@torch.compiler.assume_constant_result
def _triton_unavailable(device: torch.device, dtype: torch.dtype) -> str:
    return _availability(device, dtype)


@functools.cache
def _availability(device: torch.device, dtype: torch.dtype) -> str:
    """'' where the kernels run, else why not; fixed for the process (the interpreter is decided
    when triton is first imported), so asked once per (device, dtype)."""
    try:
        import moe_kernels
    except ImportError as e:  # triton missing: moe_kernels itself imports, its kernels do not
        return str(e)
    ok, reason = moe_kernels.triton_available(device, dtype)
    return "" if ok else reason


def _check_layout(module: nn.Module) -> None:
    """InputError naming what this module has that the SwiGLU kernels do not compute."""
    problem = _layout_problem(module)
    if problem:
        raise InputError(
            f"experts_implementation={NAME!r} computes SiLU-gated experts with [gate; up] weights and no "
            f"biases; {type(module).__name__} has {problem}: load it with experts_implementation='grouped_mm'"
        )


def _layout_problem(module: nn.Module) -> str:
    from transformers.integrations.moe import _default_apply_gate

    flags = {
        "has_gate": (False, "no gate (up_proj only)"),
        "has_bias": (True, "expert biases"),
        "is_transposed": (True, "transposed expert weights"),
        "is_concatenated": (False, "interleaved gate/up weights"),
        "has_post_expert_norm": (True, "a norm after each expert"),
    }
    for attribute, (bad, what) in flags.items():
        if getattr(module, attribute, not bad) == bad:
            return what
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return "its own gating function"
    act = getattr(module, "act_fn", None)
    if not _is_silu(act):
        return f"activation {type(act).__name__}"
    return ""


def _is_silu(act: object) -> bool:
    # ACT2FN["silu"] is transformers' SiLUActivation, ACT2FN["swish"] torch's nn.SiLU.
    from transformers import activations

    silu_types = tuple(t for t in (nn.SiLU, getattr(activations, "SiLUActivation", None)) if t is not None)
    return isinstance(act, silu_types)

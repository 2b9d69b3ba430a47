"""The implementations bench/moe_layer.py compares, each on the same expert weights and routing.

Legend: T = tokens, D = model dim, F = expert FFN dim, E = local experts, K = top-k.

Every implementation is called the same way, from a fixed routing:

    out_TD = impl.forward(x_TD, topk_idx_TK, topk_weight_TK)   # weighted sum over the K choices included

and built from one pair of canonical weights in our layout, w_in [E, D, 2F] (gate columns, then
up) and w_out [E, F, D], copied into its own layout once, outside the timing. Each holds its own
leaves (`weights`), and `to_ours` turns their gradients back into our layout, so that the bench
compares every implementation's weight gradients with one reference.

- "ours-triton", "ours-torch": our layer's routed experts (moe.MoE's dispatcher and experts) on
  backend "triton" (moe_kernels, gather and scatter fused into the GEMMs) or "torch"
  (F.grouped_mm with materialised permutes); the plan (moe.dispatch.plan_dispatch) is computed
  inside the timed call, as the peers sort inside theirs.
- "transformers": transformers' `grouped_mm` experts implementation (Qwen3MoeExperts with
  config._experts_implementation = "grouped_mm"; every family's decorated experts class runs the
  same function), in Hugging Face's layout gate_up_proj [E, 2F, D], down_proj [E, D, F].
- "sonicmoe": SonicMoE's `moe_general_routing_inputs` (CuTe DSL / QuACK GEMMs, Hopper and
  Blackwell only), in its layout: c_fc [E, 2F, D] with gate and up rows interleaved, c_proj
  [E, D, F], passed as the (2F, D, E) and (D, F, E) views its functional API takes. By default
  QuACK's autotuner is switched to its default config per architecture: it re-tunes every
  distinct shape (every case here), seconds each; `autotune=True` keeps it.

An implementation that cannot be built here (no transformers, no CUDA, no sonicmoe) comes back
with forward=None and the reason; the bench records it and goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe import MoE, MoEConfig
from moe.dispatch import expert_load, plan_dispatch

Forward = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class Impl:
    name: str
    forward: Forward | None  # None: unavailable here, see `reason`
    weights: tuple[Tensor, ...] = ()  # the leaves whose gradients the bench asks for
    to_ours: Callable[[tuple[Tensor, ...]], tuple[Tensor, Tensor]] | None = None  # their grads -> (dw_in, dw_out)
    reason: str = ""  # why unavailable
    notes: dict = field(default_factory=dict)  # what the JSON should say about how it ran


def canonical_weights(E: int, D: int, F: int, device, dtype, seed: int = 0) -> tuple[Tensor, Tensor]:
    """w_in [E, D, 2F], w_out [E, F, D] with unit-variance outputs for unit-variance inputs, so that
    bf16 relative errors are those of the arithmetic, not of tiny or huge values."""
    g = torch.Generator(device=device).manual_seed(seed)
    w_in = torch.randn(E, D, 2 * F, device=device, generator=g).div_(D**0.5)
    w_out = torch.randn(E, F, D, device=device, generator=g).div_(F**0.5)
    return w_in.to(dtype), w_out.to(dtype)


# --------------------------------------------------------------------------- ours


def our_layer(w_in: Tensor, w_out: Tensor, top_k: int, dtype) -> MoE:
    """A moe.MoE of these expert weights (converted to dtype); only its dispatcher and experts run."""
    E, D, F2 = w_in.shape
    config = MoEConfig(num_experts=E, top_k=top_k, expert_ffn_size=F2 // 2, num_shared_experts=0)
    with torch.device(w_in.device):  # initialised on the device: a CPU init of Ling-1T's experts takes seconds
        layer = MoE(config, D).to(dtype)
    with torch.no_grad():
        layer.experts.w_in.copy_(w_in)
        layer.experts.w_out.copy_(w_out)
    return layer


def routed_experts(layer: MoE, x_TD: Tensor, idx_TK: Tensor, weight_TK: Tensor) -> Tensor:
    """Our layer's routed experts on a fixed routing: plan, dispatch, experts, weighted combine."""
    plan = plan_dispatch(idx_TK, expert_load(idx_TK, layer.config.num_experts))
    return layer.dispatcher(x_TD, plan, weight_TK, layer.experts)


def ours(layer: MoE, backend: str) -> Impl:
    experts = layer.experts

    def forward(x_TD: Tensor, idx_TK: Tensor, weight_TK: Tensor) -> Tensor:
        experts.backend = backend  # the one switch; both backends share the weights
        return routed_experts(layer, x_TD, idx_TK, weight_TK)

    return Impl(
        f"ours-{backend}",
        forward,
        (experts.w_in, experts.w_out),
        lambda g: (g[0], g[1]),
        notes={"backend": backend, "dispatcher": type(layer.dispatcher).__name__},
    )


def wrong(layer: MoE) -> Impl:
    """Deliberately wrong (output 5% too large): proves that the correctness check can fail."""
    right = ours(layer, "torch")
    impl = Impl("wrong", lambda x, i, w: right.forward(x, i, w) * 1.05, right.weights, right.to_ours)
    impl.notes = {"purpose": "a deliberately wrong implementation (--with-wrong); must be recorded wrong, not timed"}
    return impl


# --------------------------------------------------------------------------- transformers


def transformers_grouped_mm(w_in: Tensor, w_out: Tensor, top_k: int) -> Impl:
    name = "transformers"
    try:
        import transformers
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    except Exception as e:  # missing, or a transformers without the v5 experts interface
        return Impl(name, None, reason=f"transformers experts unavailable: {type(e).__name__}: {e}")
    if "grouped_mm" not in ALL_EXPERTS_FUNCTIONS:
        return Impl(name, None, reason=f"transformers {transformers.__version__} has no 'grouped_mm' experts function")
    E, D, F2 = w_in.shape
    config = transformers.Qwen3MoeConfig(
        hidden_size=D, moe_intermediate_size=F2 // 2, num_experts=E, num_experts_per_tok=top_k, hidden_act="silu"
    )
    with torch.device("meta"):  # the weights are ours, copied below
        module = Qwen3MoeExperts(config)
    if not hasattr(module, "is_transposed"):  # not decorated: its forward would be the eager loop
        return Impl(
            name, None, reason=f"transformers {transformers.__version__}: Qwen3MoeExperts has no experts interface"
        )
    module.gate_up_proj = nn.Parameter(w_in.detach().transpose(1, 2).contiguous())  # [E, 2F, D], gate rows first
    module.down_proj = nn.Parameter(w_out.detach().transpose(1, 2).contiguous())  # [E, D, F]
    module.config._experts_implementation = "grouped_mm"

    def forward(x_TD: Tensor, idx_TK: Tensor, weight_TK: Tensor) -> Tensor:
        return module(x_TD, idx_TK, weight_TK)

    return Impl(
        name,
        forward,
        (module.gate_up_proj, module.down_proj),
        lambda g: (g[0].transpose(1, 2), g[1].transpose(1, 2)),
        notes={
            "class": type(module).__name__,
            "experts_implementation": module.config._experts_implementation,
            "transformers": transformers.__version__,
        },
    )


# --------------------------------------------------------------------------- SonicMoE


def sonicmoe(w_in: Tensor, w_out: Tensor, top_k: int, autotune: bool = False) -> Impl:
    name = "sonicmoe"
    device = w_in.device
    if device.type != "cuda":
        return Impl(name, None, reason="SonicMoE needs a CUDA GPU (Hopper or Blackwell)")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return Impl(
            name,
            None,
            reason=f"SonicMoE needs sm90+; this GPU is sm{major}{minor}",
        )
    try:
        import sonicmoe
        from sonicmoe.enums import ActivationType
        from sonicmoe.functional import moe_general_routing_inputs

        tuning = "quack autotuner (per shape)" if autotune else untune_quack()
    except Exception as e:  # not installed, or its CUTLASS DSL / QuACK stack does not load here
        return Impl(name, None, reason=f"import sonicmoe failed: {type(e).__name__}: {e}")
    E = w_in.shape[0]
    c_fc, c_proj = (nn.Parameter(w) for w in sonic_weights(w_in, w_out))
    tokens: dict[int, Tensor] = {}

    def forward(x_TD: Tensor, idx_TK: Tensor, weight_TK: Tensor) -> Tensor:
        T = x_TD.shape[0]
        if T not in tokens:  # token of each (token, choice) pair, ascending as the API requires
            tokens[T] = torch.arange(T, device=device, dtype=torch.int32).repeat_interleave(top_k)
        out, _ = moe_general_routing_inputs(
            x_TD,
            weight_TK.reshape(-1),
            tokens[T],
            idx_TK.reshape(-1).to(torch.int32),
            c_fc.permute(1, 2, 0),  # (2F, D, E), stride order (2, 0, 1)
            None,
            c_proj.permute(1, 2, 0),  # (D, F, E)
            None,
            E,
            torch.cuda.current_stream(device).cuda_stream,
            ActivationType.SWIGLU,
            False,  # is_inference_mode_enabled: keep what backward needs
        )
        return out

    return Impl(
        name,
        forward,
        (c_fc, c_proj),
        sonic_to_ours,
        notes={
            "api": "sonicmoe.functional.moe_general_routing_inputs",
            "sonicmoe": getattr(sonicmoe, "__version__", None),
            "tuning": tuning,
        },
    )


def sonic_weights(w_in: Tensor, w_out: Tensor) -> tuple[Tensor, Tensor]:
    """Our w_in [E, D, 2F] (gate columns, then up), w_out [E, F, D] -> SonicMoE's c_fc [E, 2F, D] with
    gate and up rows interleaved (gate 0, up 0, gate 1, ...: its default, non-concat layout) and
    c_proj [E, D, F], both contiguous (nn.Linear's (out, in) per expert)."""
    E, D, F2 = w_in.shape
    w_in_E2FD = w_in.detach().transpose(1, 2)
    gate, up = w_in_E2FD[:, : F2 // 2], w_in_E2FD[:, F2 // 2 :]
    return torch.stack((gate, up), dim=2).reshape(E, F2, D).contiguous(), w_out.detach().transpose(1, 2).contiguous()


def sonic_to_ours(grads: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Gradients of (c_fc, c_proj) -> of (w_in, w_out): the inverse of `sonic_weights`."""
    d_fc, d_proj = grads
    return torch.cat((d_fc[:, 0::2], d_fc[:, 1::2]), dim=1).transpose(1, 2), d_proj.transpose(1, 2)


def untune_quack() -> str:
    """Point every QuACK autotuner at its single default config (what tuned=False calls): the
    autotuner keys on every tensor shape, so each case here would compile and time ~10-40 configs
    per GEMM. Returns what the JSON records."""
    from quack import autotuner, gemm_interface

    tuners = [obj for obj in vars(gemm_interface).values() if isinstance(obj, autotuner.Autotuner)]
    for tuner in tuners:
        tuner.configs = [autotuner.AutotuneConfig(config=None)]  # config=None: quack's default_config
    return f"quack default config (autotuning off for {len(tuners)} GEMMs)"

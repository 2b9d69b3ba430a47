"""Routed experts: stacked FFN weights and the backends that run them.

Legend: T = tokens, D = hidden size, F = expert FFN size, E = experts, A = T*K slots,
R = A permuted rows (grouped by expert, see dispatch.py).

Weights are stacked in the [E, in, out] layout grouped GEMMs take directly:
    w_in  [E, D, 2F]  SwiGLU: columns [:F] are the gate, [F:] the up projection
          [E, D, F]   GELU
    w_out [E, F, D]

Backends (MoEConfig.backend), all computing the same function:
- "eager":  a Python loop of plain matmuls over experts, the readable reference
            (moe_kernels.grouped_mm_reference, the one eager twin of every grouped GEMM). It
            reads the offsets on the host (one sync per layer, by design).
- "torch":  torch.nn.functional.grouped_mm, one kernel per GEMM, no host sync. bf16 calls it
            directly; fp32 and fp16 through `moe::grouped_mm`, a torch.library op around the same
            kernel that torch.compile can trace in every dtype (see `torch_grouped_mm`).
- "triton": moe_kernels.moe_ffn, gather fused into the first GEMM's loads, routing weight into
            its epilogue, sum over top-k after the second (`fused`, which the local dispatcher
            calls); only the pre-activation is kept for the backward. Falls back
            to "torch" (one warning) where Triton cannot run: no triton, or CPU tensors
            without TRITON_INTERPRET=1. Behind another dispatcher the rows arrive already
            moved, and "triton" computes them with torch's grouped_mm.

Decode path ("torch" and "triton", without autograd): when a call has few rows (R <= E / 3, e.g.
decoding one token of DeepSeek-V3: R = 8 of E = 256), most experts get no row, and the step
should read only the weights of the experts it uses. `gathered_ffn` takes each row's expert's
weights (w_in[e_r], w_out[e_r]) and runs two batched matmuls of one row each (transformers'
`batched_mm`). Why E / 3: the gather reads R experts' weights, writes their copies and the
bmm reads the copies again, about 3R experts' worth of memory traffic against E for a GEMM that
reads every expert. The training path (autograd on) never takes it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig
from .dispatch import DispatchPlan, row_weights

# torch.nn.functional.grouped_mm takes these on CPU; on CUDA (torch 2.8-2.11) bf16 only.
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The decode path runs when rows * GATHER_TRAFFIC <= experts (see the module docstring).
GATHER_TRAFFIC = 3


class Experts(nn.Module):
    def __init__(self, config: MoEConfig, hidden_size: int):
        super().__init__()
        E, D, F_ = config.num_experts, hidden_size, config.ffn_size(hidden_size)
        self.activation = config.activation
        self.backend = config.backend
        in_width = 2 * F_ if config.activation == "swiglu" else F_
        self.w_in = nn.Parameter(torch.empty(E, D, in_width))
        self.w_out = nn.Parameter(torch.empty(E, F_, D))
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)

    def forward(self, x_RD: Tensor, offs: Tensor, weight_grad_scale: float = 1.0) -> Tensor:
        """Expert FFN on rows already grouped by expert: [R, D] -> [R, D].

        Rows past offs[-1] belong to no expert and come out unspecified; callers mask them.
        weight_grad_scale: the expert-parallel dispatcher passes 1 / (EP ranks), so that the
        weight gradients, which sum the losses of every rank in the group, come out as their
        mean (see moe/distributed/all_to_all.py).
        """
        w_in, w_out = self.w_in, self.w_out
        if self.takes_decode_path(x_RD.shape[0]):
            return gathered_ffn(x_RD, expert_of_rows(offs, x_RD.shape[0]), w_in, w_out, self.activation)
        if weight_grad_scale != 1.0:
            w_in, w_out = _ScaleGrad.apply(w_in, weight_grad_scale), _ScaleGrad.apply(w_out, weight_grad_scale)
        mm = eager_grouped_mm if self.backend == "eager" else torch_grouped_mm
        h_RF = activate(mm(x_RD, w_in, offs), self.activation)
        return mm(h_RF, w_out, offs)

    def fused(self, x_TD: Tensor, plan: DispatchPlan, weight_TK: Tensor) -> Tensor | None:
        """Token rows and routing weights in, the routed output out, [T, D] -> [T, D], with the
        gather, the weights and the sum over top-k inside the kernels; None where this backend
        has no fused path (or Triton cannot run)."""
        if self.backend != "triton" or self.takes_decode_path(plan.row_slot.numel()):
            return None
        moe_kernels = _triton_kernels(x_TD)
        if moe_kernels is None:
            return None
        row_weight_R = row_weights(weight_TK, plan)
        return moe_kernels.moe_ffn(
            x_TD, self.w_in, self.w_out, plan.offs, plan.row_token, row_weight_R, self.activation
        )

    def takes_decode_path(self, rows: int) -> bool:
        """Few rows and no autograd: `gathered_ffn` reads only the chosen experts' weights. `rows`
        is a static shape, so under torch.compile this is a constant, not a guard on data."""
        return (
            self.backend != "eager"  # the eager loop stays the readable reference at every size
            and rows * GATHER_TRAFFIC <= self.w_in.shape[0]
            and not (torch.is_grad_enabled() and self.w_in.requires_grad)
        )


def expert_of_rows(offs: Tensor, rows: int) -> Tensor:
    """The expert of each grouped row [R] int64: the number of group ends at or before the row.
    Rows past offs[-1] (drops) get the last expert; callers mask them (their output is unspecified)."""
    row_R = torch.arange(rows, device=offs.device, dtype=offs.dtype)
    return torch.searchsorted(offs, row_R, right=True).clamp(max=offs.numel() - 1)


def gathered_ffn(x_RD: Tensor, expert_R: Tensor, w_in: Tensor, w_out: Tensor, activation: str) -> Tensor:
    """Expert FFN of each row with its own expert's weights, gathered: [R, D] -> [R, D].
    Reads only the weights of the experts in expert_R (once per row); no host sync."""
    x_RD, w_in = _autocast(x_RD, w_in)
    h_R1F = torch.bmm(x_RD.unsqueeze(1), w_in[expert_R])  # [R, 1, D] @ [R, D, 2F]
    h_R1F = activate(h_R1F, activation)
    return torch.bmm(h_R1F, w_out[expert_R].to(h_R1F.dtype)).squeeze(1)  # [R, 1, F] @ [R, F, D]


def activate(h: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def eager_grouped_mm(a_RK: Tensor, b_EKN: Tensor, offs: Tensor) -> Tensor:
    """The reference: one matmul per expert over its rows; rows past offs[-1] are zeros.

    moe_kernels.reference holds the loop (the kernels' tests hold their Triton code to it); it is
    imported on first use because importing the kernels package imports triton (~0.2 s)."""
    from moe_kernels.reference import grouped_mm_reference

    return grouped_mm_reference(a_RK, b_EKN, offs)


def torch_grouped_mm(a_RK: Tensor, b_EKN: Tensor, offs: Tensor) -> Tensor:
    """torch.nn.functional.grouped_mm, padded where its 16-byte stride rule needs it; the eager
    loop where torch has no kernel for the dtype on this device (one warning).

    torch.compile traces grouped_mm through torch's fake (meta) implementation, which in torch
    2.13 accepts bf16 only: it copies the CUDA kernel's dtype check, although the CPU kernel
    also runs fp32 and fp16. So only bf16 calls torch's op directly (which inductor may lower
    to its own grouped-GEMM template); every other dtype calls our op `moe::grouped_mm`, a
    torch.library custom op that runs the same kernel and whose fake takes any dtype, so the
    layer compiles with fullgraph=True in fp32 too (as one opaque kernel call per GEMM).
    """
    a_RK, b_EKN = _autocast(a_RK, b_EKN)
    if a_RK.dtype in TRACEABLE_DTYPES and _native_takes(a_RK):
        return _ContiguousGrad.apply(_native_grouped_mm(a_RK, b_EKN, offs))
    return _grouped_mm_op(a_RK, b_EKN, offs)


# The dtypes whose grouped_mm torch.compile can trace through torch's own fake implementation.
TRACEABLE_DTYPES = (torch.bfloat16,)


def _native_takes(a: Tensor) -> bool:
    """Does torch's grouped_mm kernel take a's dtype on a's device?"""
    supported = GROUPED_MM_DTYPES if a.device.type == "cpu" else (torch.bfloat16,)
    return hasattr(F, "grouped_mm") and a.dtype in supported


def _native_grouped_mm(a_RK: Tensor, b_EKN: Tensor, offs: Tensor) -> Tensor:
    """F.grouped_mm with K and N zero-padded to 16 bytes: exact, padded columns of `a` meet
    padded rows of `b`. Returns a view when N was padded."""
    K, N = b_EKN.shape[1:]
    align = 16 // a_RK.element_size()
    pad_k, pad_n = -K % align, -N % align
    if pad_k or pad_n:
        a_RK = F.pad(a_RK, (0, pad_k))
        b_EKN = F.pad(b_EKN, (0, pad_n, 0, pad_k))
    # offs must be contiguous: on CUDA (torch 2.11) grouped_mm reads offs from its data pointer
    # with unit stride, so a strided view (offs[P-1::P]) silently groups the wrong rows; and
    # torch >= 2.14 refuses any stride but (1,), even that of a one-element view, which
    # .contiguous() leaves as it is (a size-1 dim counts as contiguous whatever its stride).
    if offs.stride(0) != 1:
        offs = offs.clone(memory_format=torch.contiguous_format)
    out = F.grouped_mm(a_RK, b_EKN, offs=offs)
    return out[:, :N] if pad_n else out


def _native_grouped_mm_dw(a_RK: Tensor, dy_RN: Tensor, offs: Tensor) -> Tensor:
    """dB [E, K, N], dB[e] = a_e^T dy_e over expert e's rows: F.grouped_mm's 2-D x 2-D form,
    padded like the forward (K columns of `a`, N columns of `dy`)."""
    K, N = a_RK.shape[1], dy_RN.shape[1]
    align = 16 // a_RK.element_size()
    if K % align:
        a_RK = F.pad(a_RK, (0, -K % align))
    if N % align:
        dy_RN = F.pad(dy_RN, (0, -N % align))
    return F.grouped_mm(a_RK.t(), dy_RN, offs=offs.contiguous())[:, :K, :N]


def _grouped_mm_dw_reference(a_RK: Tensor, dy_RN: Tensor, offs: Tensor) -> Tensor:
    """The readable twin of `_native_grouped_mm_dw`: one a_e^T dy_e per expert (host sync)."""
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    return torch.stack([a_RK[s:e].t() @ dy_RN[s:e] for s, e in zip(starts, ends)])


# ------------------------------------------------------------------ moe::grouped_mm, a custom op
#
# Semantics of F.grouped_mm(a [R, K], b [E, K, N], offs) -> [R, N]; rows past offs[-1] are
# unspecified. The op's outputs are always contiguous, as its fake says: inductor plans the
# memory of an opaque call from the fake's strides.


@torch.library.custom_op("moe::grouped_mm", mutates_args=())
def _grouped_mm_op(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if _native_takes(a):
        return _native_grouped_mm(a, b, offs).contiguous()
    _warn_once(
        f"torch.nn.functional.grouped_mm does not take {a.dtype} on {a.device.type} "
        f"in torch {torch.__version__}; the experts run the eager loop instead"
    )
    return eager_grouped_mm(a, b, offs)


@_grouped_mm_op.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[2])


@torch.library.custom_op("moe::grouped_mm_dw", mutates_args=())
def _grouped_mm_dw_op(a: Tensor, dy: Tensor, offs: Tensor) -> Tensor:
    if _native_takes(a):
        return _native_grouped_mm_dw(a, dy, offs).contiguous()
    return _grouped_mm_dw_reference(a, dy, offs)


@_grouped_mm_dw_op.register_fake
def _(a: Tensor, dy: Tensor, offs: Tensor) -> Tensor:
    return a.new_empty(offs.shape[0], a.shape[1], dy.shape[1])


def _grouped_mm_setup_context(ctx, inputs, output) -> None:
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    """dA = grouped_mm(dY, b^T) (b^T a view), dB[e] = a_e^T dY_e."""
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()  # e.g. the expanded gradient of a sum
    da = _grouped_mm_op(grad, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    db = _grouped_mm_dw_op(a, grad, offs) if ctx.needs_input_grad[1] else None
    return da, db, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup_context)


def _autocast(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Apply autocast's dtype by hand: grouped_mm is not on autocast's list of ops."""
    if autocasting(a.device) and a.dtype != torch.float64:  # autocast never casts fp64
        dtype = torch.get_autocast_dtype(a.device.type)
        return a.to(dtype), b.to(dtype)
    return a, b


def autocasting(device: torch.device) -> bool:
    """Is torch.autocast on for this device's type? False for types autocast does not know (meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # "unknown device type for autocast"
        return False


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def _triton_kernels(x: Tensor):
    """The kernels module if Triton can run on x's device, else None after one warning."""
    reason = _triton_unavailable(x.device, x.dtype)
    if reason:
        _warn_once(f"backend 'triton' unavailable ({reason}); using 'torch'")
        return None
    import moe_kernels

    return moe_kernels


@torch.compiler.assume_constant_result
def _triton_unavailable(device: torch.device, dtype: torch.dtype) -> str:
    """'' where the kernels can run on (device, dtype), else why not.

    torch.compile takes the answer as a constant instead of tracing the checks (device queries,
    isinstance on kernel objects) that Dynamo cannot follow."""
    try:
        import moe_kernels
    except ImportError as e:
        return str(e)
    ok, reason = moe_kernels.triton_available(device, dtype)
    return "" if ok else reason


def _warn_once(message: str) -> None:
    # The default warnings filter shows each (message, location) once per process.
    warnings.warn(message, RuntimeWarning, stacklevel=3)

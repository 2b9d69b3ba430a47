"""moe_ffn: the routed half of an MoE layer in four kernels, from token rows and routing
weights to the layer's output, keeping only the pre-activation for the backward.

Shapes: T = tokens, d = model dim, f = expert hidden dim, E = experts,
        R = permuted rows (one per (token, expert) assignment, grouped by expert; rows past
        offs[-1] are dropped assignments), n_in = 2f (swiglu) or f (gelu), s [R] = row weights.

    out[t] = sum over rows r < offs[-1] with row_token[r] == t of
             s[r] * act(x[t] @ w_in[e(r)]) @ w_out[e(r)]

Forward:
    1. up    z = x[row_token] @ w_in, h = s * act(z)   gather in the loads; act and s in the epilogue
    2. down  y = h @ w_out                             y [R, d] in the permuted order
    3. sum   out[t] = sum of y over token t's rows     fixed order, fp32 (permute.py)
Backward (dout [T, d]):
    4. dh    dh = dout[row_token] @ w_out^T; ds = <dh, act(z)>; dz = act'(z) * s * dh; h = s * act(z)
    5. dW_out[e] = h_e^T dout[row_token]_e             gather in the loads (gemm_dw.py)
    6. dW_in[e]  = x[row_token]_e^T dz_e
    7. dx_rows = dz @ w_in^T; dx[t] = sum of token t's rows (permute.py)

What this saves against expert_ffn followed by the caller's weighted sum over top-k:
- kept for the backward: z [R, n_in] only (plus x and the weights, which the caller keeps
  anyway, and R-sized index and weight vectors); not the per-slot outputs [R, d] that a
  weighted sum outside the kernels must keep for the weights' gradient;
- the weights' gradient is a row-wise dot in kernel 4's epilogue (it holds dh and act(z)),
  split in partial sums per column tile and summed in a fixed order;
- the output gradient is read through row_token: no [R, d] copy of it (expanded over top-k)
  is made.
y [R, d] lives only inside the forward. No kernel uses atomics: results are bitwise
reproducible run to run.
"""

from __future__ import annotations

import torch

from . import checks
from .expert_ffn import ffn_backward
from .ffn_kernels import launch_up
from .gemm_rows import launch_rows
from .permute import sum_rows_by_token


@torch.library.custom_op("moe_kernels::moe_ffn", mutates_args=())
def _moe_ffn_op(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offs: torch.Tensor,
    row_token: torch.Tensor,
    row_weight: torch.Tensor,
    activation: str,
    save_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    t, d, f, _, r = checks.moe_ffn_args(x, w_in, w_out, offs, row_token, row_weight, activation)
    z = x.new_empty(r if save_preact else 0, w_in.shape[2])
    if r == 0:
        return x.new_zeros(t, d), z
    h = x.new_empty(r, f)
    launch_up(x, w_in, offs, row_token, h, z if save_preact else None, activation, row_weight=row_weight)
    y = x.new_empty(r, d)
    launch_rows(h, w_out, y, offs, r)
    del h  # free before the sum: the forward's peak is x, y and z
    return sum_rows_by_token(y, row_token, t), z


@_moe_ffn_op.register_fake
def _(x, w_in, w_out, offs, row_token, row_weight, activation, save_preact):
    r = checks.moe_ffn_args(x, w_in, w_out, offs, row_token, row_weight, activation)[4]
    return torch.empty_like(x), x.new_empty(r if save_preact else 0, w_in.shape[2])


@torch.library.custom_op("moe_kernels::moe_ffn_backward", mutates_args=())
def _moe_ffn_backward_op(
    dout: torch.Tensor,
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offs: torch.Tensor,
    row_token: torch.Tensor,
    row_weight: torch.Tensor,
    z: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [T, d], dw_in, dw_out, d_row_weight [R]) of moe_ffn, given dout [T, d]."""
    ds = torch.zeros(row_token.numel(), device=x.device, dtype=torch.float32)  # stays 0 where f == 0
    dx, dw_in, dw_out = ffn_backward(
        dout, row_token, x, w_in, w_out, offs, row_token, z, activation, row_weight=row_weight, ds=ds
    )
    return dx, dw_in, dw_out, ds.to(row_weight.dtype)


@_moe_ffn_backward_op.register_fake
def _(dout, x, w_in, w_out, offs, row_token, row_weight, z, activation):
    return torch.empty_like(x), torch.empty_like(w_in), torch.empty_like(w_out), torch.empty_like(row_weight)


def _setup_context(ctx, inputs, output):
    x, w_in, w_out, offs, row_token, row_weight, activation, save_preact = inputs
    if not save_preact:
        raise RuntimeError(
            "moe_kernels::moe_ffn ran with save_preact=False but a gradient is required; "
            "call moe_kernels.moe_ffn, which decides this from requires_grad"
        )
    ctx.save_for_backward(x, w_in, w_out, offs, row_token, row_weight, output[1])
    ctx.activation = activation
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_z):
    x, w_in, w_out, offs, row_token, row_weight, z = ctx.saved_tensors
    dx, dw_in, dw_out, ds = _moe_ffn_backward_op(
        grad_out.contiguous(), x, w_in, w_out, offs, row_token, row_weight, z, ctx.activation
    )
    return dx, dw_in, dw_out, None, None, ds, None, None


_moe_ffn_op.register_autograd(_backward, setup_context=_setup_context)


def moe_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offs: torch.Tensor,
    row_token: torch.Tensor,
    row_weight: torch.Tensor,
    activation: str = "swiglu",
) -> torch.Tensor:
    """Routed experts with the routing weights and the sum over top-k fused in -> out [T, d].

    x [T, d] tokens (not permuted); w_in [E, d, 2f] (swiglu: gate = [..., :f], up = [..., f:])
    or [E, d, f] (gelu, exact erf); w_out [E, f, d]; offs int32 [E] cumulative end rows of each
    expert in the permuted order; row_token int64 [R]: permuted row r reads x[row_token[r]];
    row_weight [R] (any float dtype; fp32 keeps the router's precision): the weight of row r.
    out[t] sums row_weight[r] * expert_e(r)(x[t]) over token t's rows r < offs[-1]; rows past
    offs[-1] (dropped assignments) add nothing, and a token with no row gets zeros.
    Differentiable in x, w_in, w_out and row_weight (which receives 0 for dropped rows).

    Index values are not checked (that needs a host sync): see checks.check_routing.
    """
    checks.tensors(x=x, w_in=w_in, w_out=w_out, offs=offs, row_token=row_token, row_weight=row_weight)
    save_preact = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_in, w_out, row_weight))
    out, _ = _moe_ffn_op(x, w_in, w_out, offs, row_token, row_weight, activation, save_preact)
    return out

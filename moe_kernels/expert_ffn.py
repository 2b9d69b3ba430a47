"""expert_ffn: the MoE experts' FFN with permute and unpermute fused into the GEMMs.

Shapes: T = tokens, d = model dim, f = expert hidden dim, E = experts,
        R = permuted rows (one per kept or dropped (token, expert) assignment),
        n_in = 2f (swiglu) or f (gelu).

    y[row_slot[r]] = act(x[row_token[r]] @ w_in[e(r)]) @ w_out[e(r)]    for r < offs[-1]
    y[row_slot[r]] = 0                                                  for r >= offs[-1] (dropped)

Forward, two kernels:
    1. up    z = x[row_token] @ w_in, h = act(z)     gather fused into the loads, act into the epilogue
    2. down  y[row_slot] = h @ w_out                 scatter fused into the stores (gemm_rows.py)
Backward (dy [num_slots, d]), five kernels:
    3. dh    dh = dy[row_slot] @ w_out^T; dz = act'(z) * dh; h = act(z)     (ffn_kernels.py)
    4. dW_out[e] = h_e^T dy[row_slot]_e                 gather fused into the loads (gemm_dw.py)
    5. dW_in[e]  = x[row_token]_e^T dz_e                gather fused into the loads
    6. dx_rows   = dz @ w_in^T                          w_in^T a strided view
    7. dx[t]     = sum of dx_rows[r] over row_token[r] == t   deterministic (permute.py; plus a
                 torch argsort and searchsorted to group rows by token)
The pre-activation z [R, n_in] is saved for backward (not recomputed); h is
recomputed from it in kernel 3, so only z stays alive between the passes.

Layers: kernels -> launchers (ffn_kernels.py, gemm_*.py) -> custom ops
`moe_kernels::expert_ffn` (returns y and z) and `moe_kernels::expert_ffn_backward`
with fake implementations -> autograd registered on the forward op -> `expert_ffn`.
"""

from __future__ import annotations

import torch

from . import checks
from .ffn_kernels import launch_act_backward, launch_up
from .gemm_dw import launch_dw
from .gemm_rows import launch_rows
from .permute import sum_rows_by_token


def _outputs(x, w_in, num_slots, r, save_preact):
    """Allocations of y [num_slots, d] and z [R or 0, n_in].

    When R == num_slots and row_slot is a permutation (the MoE layer's case) every
    slot is written by exactly one row (dropped rows write zeros), so y needs no
    fill; slots named by no row (num_slots > R) must start at zero.
    """
    d, n_in = x.shape[1], w_in.shape[2]
    y = x.new_empty(num_slots, d) if num_slots == r else x.new_zeros(num_slots, d)
    z = x.new_empty(r if save_preact else 0, n_in)
    return y, z


@torch.library.custom_op("moe_kernels::expert_ffn", mutates_args=())
def _expert_ffn_op(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offs: torch.Tensor,
    row_token: torch.Tensor,
    row_slot: torch.Tensor,
    num_slots: int,
    activation: str,
    save_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, f, _, r = checks.expert_ffn_args(x, w_in, w_out, offs, row_token, row_slot, num_slots, activation)
    y, z = _outputs(x, w_in, num_slots, r, save_preact)
    h = x.new_empty(r, f)
    launch_up(x, w_in, offs, row_token, h, z if save_preact else None, activation)
    launch_rows(h, w_out, y, offs, r, c_rows=row_slot)
    return y, z


@_expert_ffn_op.register_fake
def _(x, w_in, w_out, offs, row_token, row_slot, num_slots, activation, save_preact):
    r = checks.expert_ffn_args(x, w_in, w_out, offs, row_token, row_slot, num_slots, activation)[4]
    return _outputs(x, w_in, num_slots, r, save_preact)


@torch.library.custom_op("moe_kernels::expert_ffn_backward", mutates_args=())
def _expert_ffn_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offs: torch.Tensor,
    row_token: torch.Tensor,
    row_slot: torch.Tensor,
    z: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [T, d], dw_in [E, d, n_in], dw_out [E, f, d]) of expert_ffn, given dy [num_slots, d]."""
    return ffn_backward(dy, row_slot, x, w_in, w_out, offs, row_token, z, activation)


def ffn_backward(
    dy: torch.Tensor,
    dy_rows: torch.Tensor,
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offs: torch.Tensor,
    row_token: torch.Tensor,
    z: torch.Tensor,
    activation: str,
    row_weight: torch.Tensor | None = None,
    ds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernels 3-7 (module doc), shared with moe_ffn: (dx, dw_in, dw_out) from dy, whose row r is
    dy[dy_rows[r]]; with row_weight (moe_ffn) the rows are weighted and ds [R] gets their gradient."""
    r, f = row_token.numel(), w_out.shape[1]
    dz, h = torch.empty_like(z), x.new_empty(r, f)
    launch_act_backward(dy, w_out, offs, dy_rows, z, dz, h, activation, row_weight=row_weight, ds=ds)
    dw_out = torch.empty_like(w_out)
    launch_dw(h, dy, dw_out, offs, r, dy_rows=dy_rows)
    del h  # free before the next [R, *] buffer
    dw_in = torch.empty_like(w_in)
    launch_dw(x, dz, dw_in, offs, r, a_rows=row_token)
    dx_rows = x.new_empty(r, x.shape[1])
    launch_rows(dz, w_in.transpose(1, 2), dx_rows, offs, r)
    return sum_rows_by_token(dx_rows, row_token, x.shape[0]), dw_in, dw_out


@_expert_ffn_backward_op.register_fake
def _(dy, x, w_in, w_out, offs, row_token, row_slot, z, activation):
    return torch.empty_like(x), torch.empty_like(w_in), torch.empty_like(w_out)


def _setup_context(ctx, inputs, output):
    x, w_in, w_out, offs, row_token, row_slot, _, activation, save_preact = inputs
    if not save_preact:
        raise RuntimeError(
            "moe_kernels::expert_ffn ran with save_preact=False but a gradient is required; "
            "call moe_kernels.expert_ffn, which decides this from requires_grad"
        )
    ctx.save_for_backward(x, w_in, w_out, offs, row_token, row_slot, output[1])
    ctx.activation = activation
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_z):
    x, w_in, w_out, offs, row_token, row_slot, z = ctx.saved_tensors
    dx, dw_in, dw_out = _expert_ffn_backward_op(
        grad_y.contiguous(), x, w_in, w_out, offs, row_token, row_slot, z, ctx.activation
    )
    return dx, dw_in, dw_out, None, None, None, None, None, None


_expert_ffn_op.register_autograd(_backward, setup_context=_setup_context)


def expert_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offs: torch.Tensor,
    row_token: torch.Tensor,
    row_slot: torch.Tensor,
    num_slots: int,
    activation: str = "swiglu",
) -> torch.Tensor:
    """Expert FFN over permuted rows with fused gather/scatter -> y [num_slots, d].

    x [T, d] tokens (not permuted); w_in [E, d, 2f] (swiglu: gate = [..., :f],
    up = [..., f:]) or [E, d, f] (gelu, exact erf); w_out [E, f, d];
    offs int32 [E] cumulative end rows of each expert in the permuted order;
    row_token int64 [R]: permuted row r reads x[row_token[r]];
    row_slot int64 [R]: permuted row r writes y[row_slot[r]] (no two rows may share a slot);
    num_slots >= R. Rows r >= offs[-1] are dropped: their slots are exactly zero,
    as are slots named by no row. Differentiable in x, w_in and w_out; the caller
    applies routing weights and sums over top-k itself.

    Index values are not checked (that needs a host sync): see checks.check_routing.
    """
    checks.tensors(x=x, w_in=w_in, w_out=w_out, offs=offs, row_token=row_token, row_slot=row_slot)
    save_preact = torch.is_grad_enabled() and (x.requires_grad or w_in.requires_grad or w_out.requires_grad)
    y, _ = _expert_ffn_op(x, w_in, w_out, offs, row_token, row_slot, num_slots, activation, save_preact)
    return y

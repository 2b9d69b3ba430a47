"""grouped_mm: one GEMM per group of rows, differentiable, as a torch.library op.

Shapes: M = rows (sorted by group), K = in dim, N = out dim, G = groups.

    grouped_mm(a [M, K], b [G, K, N], offs int32 [G]) -> [M, N]
    out[offs[g-1]:offs[g]] = a[offs[g-1]:offs[g]] @ b[g]        (offs[-1] := 0)

Same semantics as torch.nn.functional.grouped_mm(a, b, offs=offs), with one
definition added: rows at or past offs[-1] belong to no group and are zeros in
the output (torch leaves them uninitialised), so their gradient is zero too.

Backward (dY [M, N]):
    dA = grouped_mm(dY, b^T)               b^T = b.transpose(1, 2): a view, no copy
    dB[g] = a_g^T dY_g                     per-group reduction over rows (gemm_dw.py)

Layers: Triton kernels (gemm_rows.py, gemm_dw.py) -> launchers that check and
allocate (below) -> torch.library custom ops `moe_kernels::grouped_mm` and
`moe_kernels::grouped_mm_dw` with fake implementations (torch.compile) ->
autograd registered on the op -> the public function `grouped_mm`.
"""

from __future__ import annotations

import torch

from . import checks
from .gemm_dw import launch_dw
from .gemm_rows import launch_rows


@torch.library.custom_op("moe_kernels::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    m, _, n, _ = checks.grouped_mm_args(a, b, offs)
    out = a.new_empty(m, n)  # every element is written: rows of no group as zeros
    launch_rows(a, b, out, offs, m)
    return out


@_grouped_mm_op.register_fake
def _(a, b, offs):
    m, _, n, _ = checks.grouped_mm_args(a, b, offs)
    return a.new_empty(m, n)


@torch.library.custom_op("moe_kernels::grouped_mm_dw", mutates_args=())
def _grouped_mm_dw_op(
    a: torch.Tensor,
    dy: torch.Tensor,
    offs: torch.Tensor,
    a_rows: torch.Tensor | None = None,
    dy_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """dB [G, K, N]: dB[g] = sum over rows r of group g of outer(a[a_rows[r]], dy[dy_rows[r]]).

    The number of permuted rows is dy.shape[0] without dy_rows, else dy_rows.numel().
    """
    g, k, n, num_rows = _dw_shape(a, dy, offs, dy_rows)
    out = a.new_empty(g, k, n)
    launch_dw(a, dy, out, offs, num_rows, a_rows, dy_rows)
    return out


@_grouped_mm_dw_op.register_fake
def _(a, dy, offs, a_rows=None, dy_rows=None):
    g, k, n, _ = _dw_shape(a, dy, offs, dy_rows)
    return a.new_empty(g, k, n)


def _dw_shape(a, dy, offs, dy_rows):
    if a.dim() != 2 or dy.dim() != 2 or a.dtype != dy.dtype:
        raise ValueError(
            f"grouped_mm_dw needs 2-D a and dy of one dtype, got {tuple(a.shape)} {a.dtype} "
            f"and {tuple(dy.shape)} {dy.dtype}"
        )
    num_rows = dy.shape[0] if dy_rows is None else dy_rows.numel()
    return offs.numel(), a.shape[1], dy.shape[1], num_rows


def _setup_context(ctx, inputs, output):
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()  # e.g. the expanded gradient of a sum
    da = db = None
    if ctx.needs_input_grad[0]:
        da = _grouped_mm_op(grad, b.transpose(1, 2), offs)
    if ctx.needs_input_grad[1]:
        db = _grouped_mm_dw_op(a, grad, offs)
    return da, db, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM: out[rows of group g] = a[rows of group g] @ b[g].

    a [M, K] rows sorted by group; b [G, K, N]; offs int32 [G] cumulative end rows
    (group g owns rows offs[g-1]..offs[g], offs[-1] := 0; groups may be empty).
    Returns [M, N] in a's dtype (fp16, bf16 or fp32; fp32 accumulation); rows at
    or past offs[-1] are zeros. Differentiable in a and b.

    a must be row- or column-major, b row- or column-major in its last two dims.
    offs values are not checked (that needs a host sync): see checks.check_offs.
    Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (see triton_available).
    """
    checks.tensors(a=a, b=b, offs=offs)
    return _grouped_mm_op(a, b, offs)

"""The expert FFN kernels' epilogues (ffn_kernels.py): what the up kernel and the dh kernel do
with a finished accumulator tile, one column half at a time.

Shapes: R = permuted rows, f = expert hidden dim, n_in = 2f (swiglu) or f (gelu); a tile is
BLOCK_M rows x BLOCK_N hidden columns; s [R] = routing weights (moe_ffn; none: s = 1).

    up:  h = s * act(z), and z itself when a backward will need it, from z = the accumulators
    dh:  dz = act'(z) * s * dh, h = s * act(z) and a partial ds = <dh, act(z)>, from dh and z

Why halves: an activation epilogue holds several fp32 tiles at once (the accumulators, z's
tiles, their products). Built whole for sm_90, the dh kernel's 128 x 256 tile (8 warps)
spilled 8,772 bytes per thread to local memory and its 128 x 128 tile 2,040; in halves, 1,768
and 0 (ptxas -v, as tests/kernels/test_sm90_build.py reads it; the up kernel's gelu tile went
from 1,260 to 0). On a Hopper accumulator the split moves no data (each thread holds columns of
both halves): the compiler finishes one half before it needs registers for the other, and
converts each half's accumulator to the loads' layout once instead of moving several
intermediate tiles back and forth between the two layouts.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .activations import gelu, gelu_backward, swiglu, swiglu_backward


@triton.jit
def column_halves(tile, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(left, right): columns [0, BLOCK_N / 2) and [BLOCK_N / 2, BLOCK_N) of a [BLOCK_M, BLOCK_N] tile
    (see the module doc for why the epilogues take them one at a time)."""
    return tl.split(tl.permute(tl.reshape(tile, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def up_halves(
    acc,
    acc_up,
    rows,
    row_mask,
    n0,
    h_ptr,
    z_ptr,
    row_weight_ptr,
    F,
    stride_hm,
    stride_hn,
    stride_zm,
    stride_zn,
    ACTIVATION: tl.constexpr,
    STORE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """up_epilogue on the two column halves of the tile whose first column is n0."""
    left, right = column_halves(acc, BLOCK_M, BLOCK_N)
    left_up, right_up = column_halves(acc_up, BLOCK_M, BLOCK_N)
    cols = n0 + tl.arange(0, BLOCK_N // 2)
    up_epilogue(
        left, left_up, rows, row_mask, cols, cols < F, h_ptr, z_ptr, row_weight_ptr, F,
        stride_hm, stride_hn, stride_zm, stride_zn, ACTIVATION, STORE_Z,
    )  # fmt: skip
    cols += BLOCK_N // 2
    up_epilogue(
        right, right_up, rows, row_mask, cols, cols < F, h_ptr, z_ptr, row_weight_ptr, F,
        stride_hm, stride_hn, stride_zm, stride_zn, ACTIVATION, STORE_Z,
    )  # fmt: skip


@triton.jit
def up_epilogue(
    acc,
    acc_up,
    rows,
    row_mask,
    cols,
    col_mask,
    h_ptr,
    z_ptr,
    row_weight_ptr,
    F,
    stride_hm,
    stride_hn,
    stride_zm,
    stride_zn,
    ACTIVATION: tl.constexpr,
    STORE_Z: tl.constexpr,
):
    """h = s * act(z) of one tile, and z itself (STORE_Z), from the accumulators z = (acc, acc_up)."""
    if ACTIVATION == "swiglu":
        h = swiglu(acc, acc_up)
    else:
        h = gelu(acc)
    if row_weight_ptr is not None:  # moe_ffn: weight the row before the down projection
        h *= tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    rows64 = rows.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(h_ptr + rows64[:, None] * stride_hm + cols[None, :] * stride_hn, h.to(h_ptr.dtype.element_ty), mask=mask)
    if STORE_Z:
        z_ptrs = z_ptr + rows64[:, None] * stride_zm + cols[None, :] * stride_zn
        tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=mask)
        if ACTIVATION == "swiglu":
            tl.store(z_ptrs + F * stride_zn, acc_up.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def act_backward_halves(
    dh,
    rows,
    row_mask,
    tile_n,
    z_ptr,
    dz_ptr,
    h_ptr,
    row_weight_ptr,
    ds_ptr,
    R,
    F,
    stride_zm,
    stride_zn,
    stride_dzm,
    stride_dzn,
    stride_hm,
    stride_hn,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """act_backward_epilogue on the two column halves of column tile `tile_n` (see column_halves),
    then the tile's share of ds (both halves' sums) into row tile_n of ds's partial sums."""
    left, right = column_halves(dh, BLOCK_M, BLOCK_N)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
    ds_left = act_backward_epilogue(
        left, rows, row_mask, cols, cols < F, z_ptr, dz_ptr, h_ptr, row_weight_ptr, F,
        stride_zm, stride_zn, stride_dzm, stride_dzn, stride_hm, stride_hn, ACTIVATION, BLOCK_M,
    )  # fmt: skip
    cols += BLOCK_N // 2
    ds_right = act_backward_epilogue(
        right, rows, row_mask, cols, cols < F, z_ptr, dz_ptr, h_ptr, row_weight_ptr, F,
        stride_zm, stride_zn, stride_dzm, stride_dzn, stride_hm, stride_hn, ACTIVATION, BLOCK_M,
    )  # fmt: skip
    if ds_ptr is not None:  # without it the sums are dead code, dropped by the compiler
        tl.store(ds_ptr + tile_n.to(tl.int64) * R + rows.to(tl.int64), ds_left + ds_right, mask=row_mask)


@triton.jit
def act_backward_epilogue(
    dh,
    rows,
    row_mask,
    cols,
    col_mask,
    z_ptr,
    dz_ptr,
    h_ptr,
    row_weight_ptr,
    F,
    stride_zm,
    stride_zn,
    stride_dzm,
    stride_dzn,
    stride_hm,
    stride_hn,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dz and h = s * act(z) of one tile, from dh and the saved z; returns the tile's share of
    ds[r] = <dh[r], act(z[r])> (unweighted), one value per row."""
    rows64 = rows.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]
    z_ptrs = z_ptr + rows64[:, None] * stride_zm + cols[None, :] * stride_zn
    dz_ptrs = dz_ptr + rows64[:, None] * stride_dzm + cols[None, :] * stride_dzn
    z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
    weight = tl.full((BLOCK_M,), 1.0, tl.float32)
    if row_weight_ptr is not None:
        weight = tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    # the activation's backward is linear in dh: pass s * dh, get act'(z) * s * dh
    if ACTIVATION == "swiglu":
        up = tl.load(z_ptrs + F * stride_zn, mask=mask, other=0.0).to(tl.float32)
        dgate, dup, h = swiglu_backward(z, up, dh * weight[:, None])
        tl.store(dz_ptrs, dgate.to(dz_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptrs + F * stride_dzn, dup.to(dz_ptr.dtype.element_ty), mask=mask)
    else:
        dz, h = gelu_backward(z, dh * weight[:, None])
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    ds_part = tl.sum(dh * h, axis=1)
    h *= weight[:, None]  # dW_out needs the weighted h the down projection read
    tl.store(h_ptr + rows64[:, None] * stride_hm + cols[None, :] * stride_hn, h.to(h_ptr.dtype.element_ty), mask=mask)
    return ds_part

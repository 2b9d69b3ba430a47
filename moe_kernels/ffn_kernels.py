"""The expert FFN's fused GEMMs: gathered up projection with the activation (and, for
moe_ffn, the routing weight) in its epilogue, and the dh GEMM with the activation's backward
(and the routing weight's gradient) in its epilogue.

Shapes: R = permuted rows (sorted by expert), T = tokens, d = model dim,
        f = expert hidden dim, E = experts, n_in = 2f (swiglu) or f (gelu),
        s [R] = routing weight of each row (moe_ffn; expert_ffn has none: s = 1).

    up (forward):   z[r] = x[row_token[r]] @ w_in[e(r)]       z [R, n_in], x [T, d], w_in [E, d, n_in]
                    h[r] = s[r] * act(z[r])                    h [R, f]
    dh (backward):  dh[r] = dy[dy_rows[r]] @ w_out[e(r)]^T     dy [*, d], w_out^T [E, d, f]
                    ds[r] = <dh[r], act(z[r])>                 (row-wise dot, with s only)
                    dz[r] = act'(z[r]) * s[r] * dh[r],  h[r] = s[r] * act(z[r])

Why the weight goes before the down projection: y = s * act(z) @ W_out is the same
function as s * (act(z) @ W_out), but then the gradient of s is a row-wise dot of two
tiles the dh epilogue already holds (dh and the recomputed act(z)), and nothing weighted,
no per-expert output [R, d], has to be kept for the backward.

Both tile (R, f): for swiglu, a program owns hidden columns [n0, n0 + BLOCK_N)
of the gate *and* of the up half (columns f + n0...), so the activation is
elementwise within the tile. The up kernel then carries two accumulators that
share each A tile (one load of x for two products). A program sees BLOCK_N of the f
columns (and runs its epilogue on each half of them: ffn_epilogues.py), so ds comes out as one
partial sum per column tile, [cdiv(f, BLOCK_N), R] in fp32, which the launcher sums in a fixed
order (no atomics: deterministic).

What fusion saves: the gathered x[row_token] [R, d] and dy[dy_rows] [R, d]
copies are never written; z is read back by no separate activation pass; dz and
h come out of one epilogue. z is stored (STORE_Z) only when a backward will
need it; h is then recomputed from z in the dh epilogue, so between forward and
backward only z [R, n_in] is kept alive, not h as well.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ffn_epilogues import act_backward_halves, up_epilogue, up_halves
from .gemm_rows import b_descriptor, dot_precision, mma_loop, mma_loop_tma, row_index
from .runtime import interpreting, require_runnable
from .schedule import group_block, max_row_tiles, num_programs, row_tile, tail_tile, tile_loops
from .tuning import get_config


@triton.jit
def mma_loop_pair(
    acc1,
    acc2,
    a_rows_ptrs,
    row_mask,
    stride_ak,
    b1_cols_ptrs,
    b2_cols_ptrs,
    col_mask,
    stride_bk,
    K,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Like gemm_rows.mma_loop, with two B column blocks multiplied by one A tile per step."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_rows_ptrs + ks[None, :] * stride_ak
    b1_ptrs = b1_cols_ptrs + ks[:, None] * stride_bk
    b2_ptrs = b2_cols_ptrs + ks[:, None] * stride_bk
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            b1 = tl.load(b1_ptrs, mask=col_mask[None, :], other=0.0)
            b2 = tl.load(b2_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = ks < K - k0
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b1 = tl.load(b1_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            b2 = tl.load(b2_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc1 = tl.dot(a, b1, acc1, input_precision=PRECISION)
        acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b1_ptrs += BLOCK_K * stride_bk
        b2_ptrs += BLOCK_K * stride_bk
    return acc1, acc2


@triton.jit
def mma_loop_pair_tma(
    acc1,
    acc2,
    a_rows_ptrs,
    row_mask,
    stride_ak,
    w_desc,
    g,
    n1,
    n2,
    K,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """mma_loop_pair with the two B tiles (columns n1.. and n2.. of w [E, K, 2f]) read through
    a tensor descriptor (TMA on Hopper). A gate tile that runs past f reads up columns instead
    of zeros: those accumulator columns are never stored (col_mask), and the activation is
    elementwise, so they touch nothing that is."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_rows_ptrs + ks[None, :] * stride_ak
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_mask[:, None] & (ks < K - k0)[None, :], other=0.0)
        b1 = w_desc.load([g, k0, n1]).reshape(BLOCK_K, BLOCK_N)
        b2 = w_desc.load([g, k0, n2]).reshape(BLOCK_K, BLOCK_N)
        acc1 = tl.dot(a, b1, acc1, input_precision=PRECISION)
        acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
    return acc1, acc2


@triton.jit
def ffn_up_kernel(
    x_ptr,
    row_token_ptr,
    w_ptr,
    h_ptr,
    z_ptr,
    row_weight_ptr,
    offs_ptr,
    R,
    F,
    D,
    E,
    stride_xm,
    stride_xk,
    stride_wg,
    stride_wk,
    stride_wn,
    stride_hm,
    stride_hn,
    stride_zm,
    stride_zn,
    ACTIVATION: tl.constexpr,
    STORE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    w_desc=None,  # a TensorDescriptor of w_in [E, d, n_in] (TMA loads; w_ptr unused); None: pointer loads
    PERSISTENT: tl.constexpr = False,  # programs loop over tiles (schedule.tile_loops): flatten the loop
):
    first, step, group_tiles, group_rows, tail_first, tail_end, tail_start = tile_loops(
        offs_ptr, E, R, F, BLOCK_M, BLOCK_N, BLOCK_G
    )
    for tile in tl.range(first, group_tiles, step, flatten=PERSISTENT):
        g, rows, row_mask, cols, col_mask, tile_n, _ = row_tile(
            tile, offs_ptr, E, R, F, group_rows, BLOCK_M, BLOCK_N, BLOCK_G, GROUP_M
        )
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # gate (swiglu) or z (gelu)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # up (swiglu only)
        x_rows = row_index(row_token_ptr, rows, row_mask)
        a_ptrs = x_ptr + x_rows[:, None] * stride_xm
        w_cols = w_ptr + g.to(tl.int64) * stride_wg + cols[None, :] * stride_wn
        n0 = tile_n * BLOCK_N  # = cols[0]
        if w_desc is not None and ACTIVATION == "swiglu":
            acc, acc_up = mma_loop_pair_tma(
                acc, acc_up, a_ptrs, row_mask, stride_xk, w_desc, g, n0, F + n0, D, BLOCK_K, BLOCK_N, EVEN_K, PRECISION
            )
        elif w_desc is not None:
            acc = mma_loop_tma(acc, a_ptrs, row_mask, stride_xk, w_desc, g, n0, D, BLOCK_K, BLOCK_N, EVEN_K, PRECISION)
        elif ACTIVATION == "swiglu":
            w_up = w_cols + F * stride_wn
            acc, acc_up = mma_loop_pair(
                acc,
                acc_up,
                a_ptrs,
                row_mask,
                stride_xk,
                w_cols,
                w_up,
                col_mask,
                stride_wk,
                D,
                BLOCK_K,
                EVEN_K,
                PRECISION,
            )
        else:
            acc = mma_loop(acc, a_ptrs, row_mask, stride_xk, w_cols, col_mask, stride_wk, D, BLOCK_K, EVEN_K, PRECISION)
        up_halves(
            acc, acc_up, rows, row_mask, n0, h_ptr, z_ptr, row_weight_ptr, F,
            stride_hm, stride_hn, stride_zm, stride_zn, ACTIVATION, STORE_Z, BLOCK_M, BLOCK_N,
        )  # fmt: skip
    for tile in tl.range(tail_first, tail_end, step):  # rows of no group: zeros, act(0) = 0
        rows, row_mask, cols, col_mask, _ = tail_tile(tile - group_tiles, tail_start, R, F, BLOCK_M, BLOCK_N)
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up_epilogue(
            zeros, zeros, rows, row_mask, cols, col_mask, h_ptr, z_ptr, row_weight_ptr, F,
            stride_hm, stride_hn, stride_zm, stride_zn, ACTIVATION, STORE_Z,
        )  # fmt: skip


@triton.jit
def ffn_act_backward_kernel(
    dy_ptr,
    dy_rows_ptr,
    w_ptr,
    z_ptr,
    dz_ptr,
    h_ptr,
    row_weight_ptr,
    ds_ptr,
    offs_ptr,
    R,
    F,
    D,
    E,
    stride_dym,
    stride_dyk,
    stride_wg,
    stride_wk,
    stride_wn,
    stride_zm,
    stride_zn,
    stride_dzm,
    stride_dzn,
    stride_hm,
    stride_hn,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    w_desc=None,  # a TensorDescriptor of w_out [E, f, d] (TMA loads, tiles transposed); None: pointer loads
    PERSISTENT: tl.constexpr = False,  # programs loop over tiles (schedule.tile_loops): flatten the loop
):
    first, step, group_tiles, group_rows, tail_first, tail_end, tail_start = tile_loops(
        offs_ptr, E, R, F, BLOCK_M, BLOCK_N, BLOCK_G
    )
    for tile in tl.range(first, group_tiles, step, flatten=PERSISTENT):
        g, rows, row_mask, cols, col_mask, tile_n, _ = row_tile(
            tile, offs_ptr, E, R, F, group_rows, BLOCK_M, BLOCK_N, BLOCK_G, GROUP_M
        )
        dh = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        dy_rows = row_index(dy_rows_ptr, rows, row_mask)
        a_ptrs = dy_ptr + dy_rows[:, None] * stride_dym
        if w_desc is not None:
            n0 = tile_n * BLOCK_N  # = cols[0]
            dh = mma_loop_tma(
                dh, a_ptrs, row_mask, stride_dyk, w_desc, g, n0, D, BLOCK_K, BLOCK_N, EVEN_K, PRECISION, True
            )
        else:
            w_cols = w_ptr + g.to(tl.int64) * stride_wg + cols[None, :] * stride_wn
            dh = mma_loop(dh, a_ptrs, row_mask, stride_dyk, w_cols, col_mask, stride_wk, D, BLOCK_K, EVEN_K, PRECISION)
        act_backward_halves(
            dh, rows, row_mask, tile_n, z_ptr, dz_ptr, h_ptr, row_weight_ptr, ds_ptr, R, F,
            stride_zm, stride_zn, stride_dzm, stride_dzn, stride_hm, stride_hn, ACTIVATION, BLOCK_M, BLOCK_N,
        )  # fmt: skip
    for tile in tl.range(tail_first, tail_end, step):  # rows of no group: dh = 0, hence dz = 0
        rows, row_mask, _, _, tile_n = tail_tile(tile - group_tiles, tail_start, R, F, BLOCK_M, BLOCK_N)
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        act_backward_halves(
            zeros, rows, row_mask, tile_n, z_ptr, dz_ptr, h_ptr, row_weight_ptr, ds_ptr, R, F,
            stride_zm, stride_zn, stride_dzm, stride_dzn, stride_hm, stride_hn, ACTIVATION, BLOCK_M, BLOCK_N,
        )  # fmt: skip


def _launch_args(
    kind: str, a: torch.Tensor, num_rows: int, f: int, e: int, k: int, config: dict | None = None
) -> tuple[tuple, dict, dict]:
    """(grid, launch metadata, configuration) of a row-tiled FFN kernel over [num_rows, f]."""
    cfg = config or get_config(kind, a.dtype, num_rows, e, a.device, interpreting())
    tiles = max_row_tiles(num_rows, e, cfg["BLOCK_M"]) * triton.cdiv(f, cfg["BLOCK_N"])
    grid = (num_programs(tiles, cfg, a.device),)
    meta = dict(
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_G=group_block(e),
        GROUP_M=cfg["GROUP_M"],
        EVEN_K=k % cfg["BLOCK_K"] == 0,
        PRECISION=dot_precision(a.dtype),
        PERSISTENT=bool(cfg.get("PERSISTENT")),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return grid, meta, cfg


def launch_up(
    x: torch.Tensor,
    w_in: torch.Tensor,
    offs: torch.Tensor,
    row_token: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor | None,
    activation: str,
    config: dict | None = None,
    row_weight: torch.Tensor | None = None,
) -> None:
    """Fill h [R, f] (and z [R, n_in] unless None) from x [T, d] and w_in [E, d, n_in];
    with row_weight [R], h[r] is scaled by row_weight[r] (z is not).

    `config` overrides the tuning table (bench/grouped_gemm_tune.py sweeps it).
    """
    r, f = h.shape
    e, d = w_in.shape[0], w_in.shape[1]
    if r == 0 or f == 0:
        return
    require_runnable(x.device, x.dtype)
    kind = "swiglu_up" if activation == "swiglu" else "rows"
    grid, meta, cfg = _launch_args(kind, x, r, f, e, d, config)
    zs = z.stride() if z is not None else (0, 0)
    desc = b_descriptor(w_in, cfg)  # w_in is [E, d, n_in] as it lies: never the transposed case
    ffn_up_kernel[grid](
        x,
        row_token,
        w_in,
        h,
        z,
        row_weight,
        offs,
        r,
        f,
        d,
        e,
        x.stride(0),
        x.stride(1),
        w_in.stride(0),
        w_in.stride(1),
        w_in.stride(2),
        h.stride(0),
        h.stride(1),
        zs[0],
        zs[1],
        ACTIVATION=activation,
        STORE_Z=z is not None,
        w_desc=desc[0] if desc and not desc[1] else None,
        **meta,
    )


def launch_act_backward(
    dy: torch.Tensor,
    w_out: torch.Tensor,
    offs: torch.Tensor,
    dy_rows: torch.Tensor,
    z: torch.Tensor,
    dz: torch.Tensor,
    h: torch.Tensor,
    activation: str,
    row_weight: torch.Tensor | None = None,
    ds: torch.Tensor | None = None,
    config: dict | None = None,
) -> None:
    """Fill dz [R, n_in] and h [R, f] from dy [*, d] (row r reads dy[dy_rows[r]]), w_out [E, f, d]
    and z [R, n_in]. With row_weight [R] (moe_ffn), dz and h are those of the weighted rows and
    ds [R] (fp32, written in place) gets the gradient of each row's weight. `config` overrides
    the tuning table (bench/grouped_gemm_tune.py sweeps it)."""
    r, f = h.shape
    e, d = w_out.shape[0], w_out.shape[2]
    if r == 0 or f == 0:
        return
    require_runnable(dy.device, dy.dtype)
    w_t = w_out.transpose(1, 2)  # [E, d, f], a view: dh = dy_perm @ w_out^T
    grid, meta, cfg = _launch_args("act_backward", dy, r, f, e, d, config)
    desc = b_descriptor(w_t, cfg)  # w_t = w_out^T: the descriptor of w_out, tiles transposed in the kernel
    # one partial sum of ds per column tile, summed below in a fixed order
    ds_parts = (
        None if ds is None else torch.empty(triton.cdiv(f, meta["BLOCK_N"]), r, device=dy.device, dtype=torch.float32)
    )
    ffn_act_backward_kernel[grid](
        dy,
        dy_rows,
        w_t,
        z,
        dz,
        h,
        row_weight,
        ds_parts,
        offs,
        r,
        f,
        d,
        e,
        dy.stride(0),
        dy.stride(1),
        w_t.stride(0),
        w_t.stride(1),
        w_t.stride(2),
        z.stride(0),
        z.stride(1),
        dz.stride(0),
        dz.stride(1),
        h.stride(0),
        h.stride(1),
        ACTIVATION=activation,
        w_desc=desc[0] if desc and desc[1] else None,
        **meta,
    )
    if ds is not None:
        torch.sum(ds_parts, dim=0, out=ds)

"""Row GEMMs over groups: C[rows of g] = A[rows of g] @ B[g], output rows optionally scattered.

Shapes: M = rows (the permuted rows, sorted by group), K = in dim, N = out dim,
        G = groups, B [G, K, N] with any strides (so B^T is a free view).

One program computes one BLOCK_M x BLOCK_N tile of C; `schedule.row_tile`
tells it which group and rows it owns. Rows of no group (the tail past offs[-1])
are written as zeros, so every element of C that belongs to a row is defined.

An index map fuses a permutation into the stores instead of materialising it:
    c_rows [M]: row r of the product writes C[c_rows[r]]    (scatter)
Without it row r writes C[r]. (The gathered variants of the main loop, which read
A[idx[r]], are in ffn_kernels.py and gemm_dw.py.)

Used for grouped_mm's forward (C = A B) and dA (dY B^T: B passed as a transposed
view), and for the expert FFN's down projection (scatter) and dx GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import interpreting, require_runnable
from .schedule import group_block, max_row_tiles, row_tile
from .tuning import get_config


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch.backends.cuda.matmul.allow_tf32, as torch.mm does
    (default False: true fp32 products); 16-bit inputs ignore the setting."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def row_index(idx_ptr, rows, row_mask):
    """The operand row that permuted row `rows` maps to: idx[rows], or rows itself
    when there is no index map (idx_ptr is None, resolved at compile time).
    int64 either way: row * stride can pass 2**31 at MoE sizes."""
    if idx_ptr is not None:
        idx = tl.load(idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        idx = rows.to(tl.int64)
    return idx


@triton.jit
def mma_loop(
    acc,
    a_rows_ptrs,
    row_mask,
    stride_ak,
    b_cols_ptrs,
    col_mask,
    stride_bk,
    K,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc [BLOCK_M, BLOCK_N] += A tile rows @ B tile columns over all of K.

    a_rows_ptrs [BLOCK_M, 1] point at the rows' first element, b_cols_ptrs
    [1, BLOCK_N] at the columns' first element; masked rows and columns load 0.
    """
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_rows_ptrs + ks[None, :] * stride_ak
    b_ptrs = b_cols_ptrs + ks[:, None] * stride_bk
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = ks < K - k0
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def grouped_rows_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    c_rows_ptr,
    offs_ptr,
    M,
    N,
    K,
    G,
    n_row_tiles,
    stride_am,
    stride_ak,
    stride_bg,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    g, rows, row_mask, cols, col_mask = row_tile(offs_ptr, G, M, N, n_row_tiles, BLOCK_M, BLOCK_N, BLOCK_G, GROUP_M)
    if g > G:  # past the last tile of the grid's upper bound
        return
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if g < G:  # the tail (g == G) keeps acc = 0
        acc = mma_loop(
            acc,
            a_ptr + rows.to(tl.int64)[:, None] * stride_am,
            row_mask,
            stride_ak,
            b_ptr + g.to(tl.int64) * stride_bg + cols[None, :] * stride_bn,
            col_mask,
            stride_bk,
            K,
            BLOCK_K,
            EVEN_K,
            PRECISION,
        )
    c_rows = row_index(c_rows_ptr, rows, row_mask)
    tl.store(
        c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


def launch_rows(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    offs: torch.Tensor,
    num_rows: int,
    c_rows: torch.Tensor | None = None,
    config: dict | None = None,
) -> None:
    """c[c_rows[r]] = a[r] @ b[group(r)] for the num_rows rows r.

    a [M, K], b [G, K, N], c [*, N] (written in place); rows past offs[-1] write
    zeros. Arguments are checked by the callers (checks.py); this only launches.
    `config` overrides the tuning table (bench/grouped_gemm_tune.py sweeps it).
    """
    n, k, g = c.shape[1], a.shape[1], b.shape[0]
    if num_rows == 0 or n == 0:
        return
    require_runnable(a.device, a.dtype)
    cfg = config or get_config("rows", a.dtype, num_rows, g, a.device, interpreting())
    n_row_tiles = max_row_tiles(num_rows, g, cfg["BLOCK_M"])
    grid = (n_row_tiles * triton.cdiv(n, cfg["BLOCK_N"]),)
    grouped_rows_kernel[grid](
        a,
        b,
        c,
        c_rows,
        offs,
        num_rows,
        n,
        k,
        g,
        n_row_tiles,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        c.stride(0),
        c.stride(1),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_G=group_block(g),
        GROUP_M=cfg["GROUP_M"],
        EVEN_K=k % cfg["BLOCK_K"] == 0,
        PRECISION=dot_precision(a.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )

"""Weight gradients of grouped GEMMs: dB[g] = A_g^T dY_g, a reduction over each group's rows.

Shapes: M = rows (sorted by group), K = in dim, N = out dim, G = groups;
        A [*, K], dY [*, N] -> dB [G, K, N].

One program per (group, K tile, N tile) walks all rows of its group, BLOCK_M at a
time, and owns its output tile alone: no atomics, no split-K, deterministic.
The grid (G * cdiv(K, BLOCK_K) * cdiv(N, BLOCK_N)) depends on shapes only.
Empty groups get dB[g] = 0. A skewed group makes its programs run longer; with
K x N tiles per group (e.g. 56 x 16 for d = 7168, f = 2048) there are still many
programs per group to fill the GPU.

Index maps fuse the permutations of the expert FFN into the loads:
    a_rows [M]:  row r of the group reads A[a_rows[r]]    (dW_in: x gathered by row_token)
    dy_rows [M]: row r of the group reads dY[dy_rows[r]]  (dW_out: dy gathered by row_slot)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm_rows import dot_precision, row_index
from .runtime import interpreting, require_runnable
from .schedule import swizzle
from .tuning import get_config


@triton.jit
def grouped_dw_kernel(
    a_ptr,
    a_rows_ptr,
    dy_ptr,
    dy_rows_ptr,
    out_ptr,
    offs_ptr,
    M,
    K,
    N,
    stride_am,
    stride_ak,
    stride_dm,
    stride_dn,
    stride_og,
    stride_ok,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    n_k, n_n = tl.cdiv(K, BLOCK_K), tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    g = pid // (n_k * n_n)
    tile_k, tile_n = swizzle(pid % (n_k * n_n), n_k, n_n, GROUP_M)
    # rows of group g, clamped to [0, M] like schedule.group_of_tile
    start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
    end = tl.load(offs_ptr + g)
    end = tl.minimum(tl.maximum(end, 0), M)
    start = tl.minimum(tl.maximum(start, 0), end)
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask, n_mask = ks < K, ns < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        a_rows = row_index(a_rows_ptr, rows, row_mask)
        dy_rows = row_index(dy_rows_ptr, rows, row_mask)
        a_t = tl.load(
            a_ptr + ks[:, None] * stride_ak + a_rows[None, :] * stride_am,
            mask=k_mask[:, None] & row_mask[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_M]
        dy = tl.load(
            dy_ptr + dy_rows[:, None] * stride_dm + ns[None, :] * stride_dn,
            mask=row_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_N]
        acc = tl.dot(a_t, dy, acc, input_precision=PRECISION)
    tl.store(
        out_ptr + g.to(tl.int64) * stride_og + ks[:, None] * stride_ok + ns[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=k_mask[:, None] & n_mask[None, :],
    )


def launch_dw(
    a: torch.Tensor,
    dy: torch.Tensor,
    out: torch.Tensor,
    offs: torch.Tensor,
    num_rows: int,
    a_rows: torch.Tensor | None = None,
    dy_rows: torch.Tensor | None = None,
    config: dict | None = None,
) -> None:
    """out[g] = sum over rows r of group g of outer(a[a_rows[r]], dy[dy_rows[r]]).

    a [*, K], dy [*, N], out [G, K, N] (written in place, every element).
    Arguments are checked by the callers (checks.py); this only launches.
    `config` overrides the tuning table (bench/grouped_gemm_tune.py sweeps it).
    """
    g, k, n = out.shape
    if out.numel() == 0:
        return
    require_runnable(a.device, a.dtype)
    cfg = config or get_config("dw", a.dtype, num_rows, g, a.device, interpreting())
    grid = (g * triton.cdiv(k, cfg["BLOCK_K"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    grouped_dw_kernel[grid](
        a,
        a_rows,
        dy,
        dy_rows,
        out,
        offs,
        num_rows,
        k,
        n,
        a.stride(0),
        a.stride(1),
        dy.stride(0),
        dy.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_N=cfg["BLOCK_N"],
        GROUP_M=cfg["GROUP_M"],
        PRECISION=dot_precision(a.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )

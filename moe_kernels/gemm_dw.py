"""Weight gradients of grouped GEMMs: dB[g] = A_g^T dY_g, a reduction over each group's rows.

Shapes: M = rows (sorted by group), K = in dim, N = out dim, G = groups, S = SPLIT;
        A [*, K], dY [*, N] -> dB [G, K, N].

One program per (group, K tile, N tile) walks all rows of its group, BLOCK_M at a
time, and owns its output tile alone: no atomics, deterministic.
The grid (G * cdiv(K, BLOCK_K) * cdiv(N, BLOCK_N)) depends on shapes only.
Empty groups get dB[g] = 0. A skewed group makes its programs run longer; with
K x N tiles per group (e.g. 56 x 16 for d = 7168, f = 2048) there are still many
programs per group to fill the GPU.

Opt-in split (a tile configuration with "SPLIT": S > 1, see tuning.py): a second
grid dimension of S programs shares each output tile. Program s reduces the s-th
chunk of the group's rows (chunks of whole BLOCK_M steps) into its own fp32 tile of
a workspace [S, G, K, N]; a second kernel adds the S tiles in the fixed order
s = 0, 1, ..., S-1 and casts. Still no atomics and bitwise reproducible; it
shortens the longest program when one group holds most rows (skewed routing) or
when there are few groups and tiles. Cost: S * G * K * N * 4 bytes of workspace
and one extra pass over it. Worked example (one group of 10 rows, BLOCK_M = 4, S = 2):

    chunk = cdiv(cdiv(10, 2), 4) * 4 = 8 rows
    s = 0: rows [0, 8)   two steps      -> workspace[0, g]
    s = 1: rows [8, 10)  one step       -> workspace[1, g]
    dB[g] = workspace[0, g] + workspace[1, g]   (in that order, fp32, then cast)

Index maps fuse the permutations of the expert FFN into the loads:
    a_rows [M]:  row r of the group reads A[a_rows[r]]    (dW_in: x gathered by row_token)
    dy_rows [M]: row r of the group reads dY[dy_rows[r]]  (dW_out: dy gathered by row_slot in expert_ffn,
                                                          by row_token in moe_ffn)
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
    stride_os=None,  # split: out is a workspace [S, G, K, N], split s writes out + s * stride_os; None: no split
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
    # this program's chunk of the group's rows: split s of S (grid axis 1; S = 1: the whole group)
    split, n_split = tl.program_id(1), tl.num_programs(1)
    chunk = tl.cdiv(tl.cdiv(end - start, n_split), BLOCK_M) * BLOCK_M
    start = tl.minimum(start + split * chunk, end)
    end = tl.minimum(start + chunk, end)
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
    out_ptrs = out_ptr + g.to(tl.int64) * stride_og + ks[:, None] * stride_ok + ns[None, :] * stride_on
    if stride_os is not None:  # resolved at compile time (like row_index's None): no split, out is dB
        out_ptrs += split.to(tl.int64) * stride_os
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])


@triton.jit
def sum_splits_kernel(ws_ptr, out_ptr, numel, S, BLOCK: tl.constexpr):
    """out.flat[i] = sum over s = 0, 1, ..., S-1 of ws[s].flat[i], in that order, in fp32, cast on store.

    ws [S, *out.shape] fp32 contiguous, out contiguous; one program per BLOCK elements.
    """
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    ws_ptrs = ws_ptr + i
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, S):
        total += tl.load(ws_ptrs, mask=mask, other=0.0)
        ws_ptrs += numel  # pointer arithmetic: no int32 overflow past 2**31 workspace elements
    tl.store(out_ptr + i, total.to(out_ptr.dtype.element_ty), mask=mask)


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
    `config` overrides the tuning table (bench/grouped_gemm_tune.py sweeps it); its
    optional "SPLIT" (default 1) splits each group's rows over that many programs
    (module doc), through an fp32 workspace of SPLIT x out's size.
    """
    g, k, n = out.shape
    if out.numel() == 0:
        return
    require_runnable(a.device, a.dtype)
    cfg = config or get_config("dw", a.dtype, num_rows, g, a.device, interpreting())
    split = cfg.get("SPLIT", 1)
    # split > 1: partial tiles go to the workspace [split, G, K, N] fp32, summed below
    dst = out if split == 1 else torch.empty((split, g, k, n), dtype=torch.float32, device=out.device)
    dst_g, dst_k, dst_n = dst.stride()[-3:]
    grid = (g * triton.cdiv(k, cfg["BLOCK_K"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    grouped_dw_kernel[grid](
        a,
        a_rows,
        dy,
        dy_rows,
        dst,
        offs,
        num_rows,
        k,
        n,
        a.stride(0),
        a.stride(1),
        dy.stride(0),
        dy.stride(1),
        dst_g,
        dst_k,
        dst_n,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_N=cfg["BLOCK_N"],
        GROUP_M=cfg["GROUP_M"],
        PRECISION=dot_precision(a.dtype),
        stride_os=dst.stride(0) if split > 1 else None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if split > 1:
        # out may be a strided view: sum into a contiguous tensor then, and copy
        total = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
        block = 1024
        sum_splits_kernel[(triton.cdiv(total.numel(), block),)](dst, total, total.numel(), split, BLOCK=block)
        if total is not out:
            out.copy_(total)

"""Row GEMMs over groups: C[rows of g] = A[rows of g] @ B[g], output rows optionally scattered.

Shapes: M = rows (the permuted rows, sorted by group), K = in dim, N = out dim,
        G = groups, B [G, K, N] with any strides (so B^T is a free view).

Each program computes BLOCK_M x BLOCK_N tiles of C (one, or with the PERSISTENT
option several: `schedule.tile_loops`); `schedule.row_tile` tells it which group and
rows a tile owns. Rows of no group (the tail past offs[-1])
are written as zeros, so every element of C that belongs to a row is defined.

An index map fuses a permutation into the stores instead of materialising it:
    c_rows [M]: row r of the product writes C[c_rows[r]]    (scatter)
Without it row r writes C[r]. (The gathered variants of the main loop, which read
A[idx[r]], are in ffn_kernels.py and gemm_dw.py.)

Used for grouped_mm's forward (C = A B) and dA (dY B^T: B passed as a transposed
view), and for the expert FFN's down projection (scatter) and dx GEMM.

Opt-in TMA (a tile configuration with "TMA": true, see tuning.py): the B tiles are
loaded through a host-side tensor descriptor of B [G, K, N] with block
[1, BLOCK_K, BLOCK_N] (TMA copies into shared memory on Hopper; plain loads
elsewhere and in the interpreter). The descriptor bounds each dimension, so a
K tail or N tail reads zeros and a tile never crosses into the next group's
weights: no masks on B. A transposed view B = W^T (dA, and the expert FFN's dx,
with W [G, N, K] contiguous along K) gets a descriptor of W itself, block
[1, BLOCK_N, BLOCK_K], and each tile is transposed in the kernel (B_TRANSPOSED): the
MMA reads it from shared memory as it lies. TMA needs the descriptor's last dim
contiguous and 16-byte aligned strides and base; otherwise the launcher falls back
to pointer loads. A (never gathered here: its rows are a range) is then read through a
descriptor of A [M, K] too, block [BLOCK_M, BLOCK_K] at the tile's first row, where its layout
allows (a_descriptor): a tile's rows past its group belong to the next group (or are zeros past
M), are multiplied like the others and never stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # host-side tensor descriptors (triton >= 3.4; the same API in 3.6 and 3.9)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older triton: the TMA option falls back to pointer loads
    TensorDescriptor = None

from .runtime import interpreting, require_runnable
from .schedule import group_block, max_row_tiles, num_programs, row_tile, tail_tile, tile_loops
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
def mma_loop_tma(
    acc,
    a_rows_ptrs,
    row_mask,
    stride_ak,
    b_desc,
    g,
    n0,
    K,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    B_TRANSPOSED: tl.constexpr = False,
    a_desc=None,
    m0=0,
):
    """Like mma_loop, with B's tiles read through a tensor descriptor of B [G, K, N].

    b_desc's block is [1, BLOCK_K, BLOCK_N]; the tile at (g, k0, n0) is B[g, k0:k0+BLOCK_K,
    n0:n0+BLOCK_N] with zeros past K and N (the descriptor's padding), so only A is masked.
    B_TRANSPOSED: b_desc describes W [G, N, K] with B = W^T, block [1, BLOCK_N, BLOCK_K].
    a_desc: a descriptor of A [M, K] itself (rows not gathered), block [BLOCK_M, BLOCK_K], read at
    rows m0...; its rows past the group are other groups' (or zeros past M) and are not stored.
    """
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_rows_ptrs + ks[None, :] * stride_ak
    for k0 in range(0, K, BLOCK_K):
        if a_desc is not None:
            a = a_desc.load([m0, k0])
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_mask[:, None] & (ks < K - k0)[None, :], other=0.0)
        if B_TRANSPOSED:
            b = tl.trans(b_desc.load([g, n0, k0]).reshape(BLOCK_N, BLOCK_K))
        else:
            b = b_desc.load([g, k0, n0]).reshape(BLOCK_K, BLOCK_N)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
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
    b_desc=None,  # a TensorDescriptor of B: TMA loads of B (b_ptr and B's strides unused); None: pointer loads
    B_TRANSPOSED: tl.constexpr = False,  # b_desc describes W [G, N, K], B = W^T (see b_descriptor)
    a_desc=None,  # with b_desc, a TensorDescriptor of A [M, K] (a_descriptor); None: pointer loads of A
    PERSISTENT: tl.constexpr = False,  # programs loop over tiles (schedule.tile_loops): flatten the loop
):
    first, step, group_tiles, group_rows, tail_first, tail_end, tail_start = tile_loops(
        offs_ptr, G, M, N, BLOCK_M, BLOCK_N, BLOCK_G
    )
    for tile in tl.range(first, group_tiles, step, flatten=PERSISTENT):
        g, rows, row_mask, cols, col_mask, tile_n, m0 = row_tile(
            tile, offs_ptr, G, M, N, group_rows, BLOCK_M, BLOCK_N, BLOCK_G, GROUP_M
        )
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_rows_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am
        if b_desc is not None:  # resolved at compile time, like row_index's None
            n0 = tile_n * BLOCK_N  # = cols[0]
            acc = mma_loop_tma(
                acc,
                a_rows_ptrs,
                row_mask,
                stride_ak,
                b_desc,
                g,
                n0,
                K,
                BLOCK_K,
                BLOCK_N,
                EVEN_K,
                PRECISION,
                B_TRANSPOSED,
                a_desc,
                m0,
            )
        else:
            b_cols_ptrs = b_ptr + g.to(tl.int64) * stride_bg + cols[None, :] * stride_bn
            acc = mma_loop(
                acc, a_rows_ptrs, row_mask, stride_ak, b_cols_ptrs, col_mask, stride_bk, K, BLOCK_K, EVEN_K, PRECISION
            )
        store_rows(c_ptr, c_rows_ptr, acc, rows, row_mask, cols, col_mask, stride_cm, stride_cn)
    for tile in tl.range(tail_first, tail_end, step):  # rows of no group: zeros
        rows, row_mask, cols, col_mask, _ = tail_tile(tile - group_tiles, tail_start, M, N, BLOCK_M, BLOCK_N)
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        store_rows(c_ptr, c_rows_ptr, zeros, rows, row_mask, cols, col_mask, stride_cm, stride_cn)


@triton.jit
def store_rows(c_ptr, c_rows_ptr, acc, rows, row_mask, cols, col_mask, stride_cm, stride_cn):
    """C[c_rows[rows], cols] = acc (C[rows, cols] without an index map), masked."""
    c_rows = row_index(c_rows_ptr, rows, row_mask)
    tl.store(
        c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


def b_descriptor(b: torch.Tensor, config: dict) -> tuple[object, bool] | None:
    """(descriptor, transposed) for TMA loads of B when `config` asks for them ("TMA": true) and
    B's layout allows them, else None (pointer loads).

    B [G, K, N] contiguous along N: a descriptor of B, block [1, BLOCK_K, BLOCK_N].
    B = W^T, a view of W [G, N, K] contiguous along K (dA's and dx's B): a descriptor of W,
    block [1, BLOCK_N, BLOCK_K], transposed = True. Either way TMA needs the described
    tensor's base and its other strides 16-byte aligned: e.g. bf16 with N % 8 == 0.
    """
    if not config.get("TMA", False) or TensorDescriptor is None or 0 in b.shape:
        return None
    transposed = b.stride(2) != 1 and b.stride(1) == 1
    described = b.transpose(1, 2) if transposed else b
    size = described.element_size()
    if described.stride(2) != 1 or described.data_ptr() % 16:
        return None
    if any(s * size % 16 for s in (described.stride(0), described.stride(1))):
        return None
    block = [1, config["BLOCK_N"], config["BLOCK_K"]] if transposed else [1, config["BLOCK_K"], config["BLOCK_N"]]
    return TensorDescriptor.from_tensor(described, block), transposed


def a_descriptor(a: torch.Tensor, config: dict) -> object | None:
    """A descriptor of A [M, K], block [BLOCK_M, BLOCK_K], for TMA loads of A when `config` asks for
    TMA and A's layout allows it (last dim contiguous, base and row stride 16-byte aligned), else None.
    Only the row GEMM takes it: its A rows are a range, where the FFN kernels gather theirs."""
    if not config.get("TMA", False) or TensorDescriptor is None or 0 in a.shape:
        return None
    if a.stride(1) != 1 or a.data_ptr() % 16 or a.stride(0) * a.element_size() % 16:
        return None
    return TensorDescriptor.from_tensor(a, [config["BLOCK_M"], config["BLOCK_K"]])


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
    `config` overrides the tuning table (bench/grouped_gemm_tune.py sweeps it); its
    optional "TMA" asks for TMA loads of b where b's layout allows them (b_descriptor).
    """
    n, k, g = c.shape[1], a.shape[1], b.shape[0]
    if num_rows == 0 or n == 0:
        return
    require_runnable(a.device, a.dtype)
    cfg = config or get_config("rows", a.dtype, num_rows, g, a.device, interpreting())
    tiles = max_row_tiles(num_rows, g, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    grid = (num_programs(tiles, cfg, a.device),)
    desc = b_descriptor(b, cfg)
    a_desc = a_descriptor(a, cfg) if desc else None  # A through TMA only beside B through TMA
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
        b_desc=desc[0] if desc else None,
        B_TRANSPOSED=bool(desc and desc[1]),
        a_desc=a_desc,
        PERSISTENT=bool(cfg.get("PERSISTENT")),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )

"""Tile schedule of the grouped GEMMs: which group, and which rows, each program owns.

Shapes: M = rows (sorted by group), G = groups, BLOCK_M = rows per tile,
        offs int32 [G] = cumulative end row of each group.

A grouped GEMM over jagged groups cannot size its grid from the group sizes
without reading `offs` on the host (a sync). Instead the grid is an upper bound
that depends on shapes only, and every program finds its group on device:

    virtual row tiles = cdiv(M, BLOCK_M) + min(G + 1, M)     (`max_row_tiles`)

Each group g owns rows [offs[g-1], offs[g]) (offs[-1] := 0) and
ceil(size_g / BLOCK_M) consecutive virtual tiles; a pseudo-group G, the *tail*,
owns the rows [offs[G-1], M) that belong to no group, and its tiles write zeros
so that every output row is defined. Each non-empty group adds at most one
partial tile, hence the bound. Tiles past the last one exit at once.

Worked example: M = 10, BLOCK_M = 4, offs = [3, 3, 9] (G = 3; group 1 empty)

    group            0         1        2          tail (3)
    rows             0..2      -        3..8       9
    tiles            1         0        2          1
    cumulative       1         1        3          4

    tile 0 -> group 0, rows [0, 3)
    tile 1 -> group 2, rows [3, 7)
    tile 2 -> group 2, rows [7, 9)
    tile 3 -> tail,    rows [9, 10)   written as zeros
    tile 4 -> none (grid bound cdiv(10, 4) + min(4, 10) = 7: tiles 4..6 exit)

`group_of_tile` does this lookup in a kernel's prologue: one vector load of
`offs`, a cumulative sum of tile counts, and a count of the groups whose tiles
end at or before the program's tile. `offs` is clamped to [0, M] first, so that
malformed offsets (never checked on the hot path: that needs a sync) produce
wrong numbers but never an out-of-bounds access.

Every row-tiled kernel runs two loops (`tile_loops`): one over the groups'
tiles (row tiles of groups < G times column tiles; 3 x N/BLOCK_N in the example),
then one over the tail's, which only writes zeros. Launched with one program per
virtual tile (the default) each program takes at most one tile of either loop, and
those past the last take none. With the "PERSISTENT" tile option the grid is
PERSISTENT programs per SM instead (`num_programs`), and program p takes tiles p,
p + grid, p + 2 grid, ...: no wave of programs that exit at once, and the groups'
loop is flattened with its K loop (tl.range's `flatten`) so that the compiler can
issue the next tile's loads under this tile's epilogue. Flattening needs the K
loop's bounds to be the same for every tile, which is why the tail, whose tiles
would run no K steps, has a loop of its own.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def max_row_tiles(m: int, g: int, block_m: int) -> int:
    """Upper bound on the row tiles of G groups and a tail over M rows (see module doc)."""
    return triton.cdiv(m, block_m) + min(g + 1, m)


def group_block(g: int) -> int:
    """Vector width that holds the G groups and the tail in `group_of_tile`."""
    return triton.next_power_of_2(g + 1)


@triton.jit
def _group_tiles(offs_ptr, G, M, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """Per group (index G: the tail; past it: empty) its rows [start, end) and its row tiles."""
    gi = tl.arange(0, BLOCK_G)
    # index G is the tail, whose end is M; indices past it are empty
    end = tl.load(offs_ptr + gi, mask=gi < G, other=M)
    end = tl.minimum(tl.maximum(end, 0), M)
    start = tl.load(offs_ptr + gi - 1, mask=(gi >= 1) & (gi <= G), other=0)
    start = tl.minimum(tl.maximum(start, 0), M)
    size = tl.where(gi <= G, tl.maximum(end - start, 0), 0)
    return gi, start, end, (size + BLOCK_M - 1) // BLOCK_M


@triton.jit
def group_of_tile(offs_ptr, G, M, tile, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """Virtual row tile -> (g, row_start, row_end).

    g < G: a group; g == G: the tail (rows of no group); g > G: no such tile.
    Rows [row_start, min(row_start + BLOCK_M, row_end)) are the tile's rows.
    """
    gi, start, end, n_tiles = _group_tiles(offs_ptr, G, M, BLOCK_M, BLOCK_G)
    cum = tl.cumsum(n_tiles, axis=0)
    # the owner is the first group whose cumulative count exceeds `tile`
    g = tl.sum((cum <= tile).to(tl.int32), axis=0)
    mine = gi == g
    first_tile = tl.sum(tl.where(mine, cum - n_tiles, 0), axis=0)
    row_start = tl.sum(tl.where(mine, start, 0), axis=0) + (tile - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, end, 0), axis=0)
    return g, row_start, row_end


@triton.jit
def swizzle(pid, n_row_tiles, n_col_tiles, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP_M row tiles at a time.

    Programs that run together then share GROUP_M row tiles of A and the column
    tiles of B, which keeps both in L2 (as in the Triton matmul tutorial).
    """
    per_band = GROUP_M * n_col_tiles
    band = pid // per_band
    first_row = band * GROUP_M
    band_rows = tl.minimum(n_row_tiles - first_row, GROUP_M)
    row_tile = first_row + (pid % per_band) % band_rows
    col_tile = (pid % per_band) // band_rows
    return row_tile, col_tile


@triton.jit
def tile_map_kernel(offs_ptr, out_ptr, G, M, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    tile = tl.program_id(0)
    g, row_start, row_end = group_of_tile(offs_ptr, G, M, tile, BLOCK_M, BLOCK_G)
    tl.store(out_ptr + tile * 3 + 0, g)
    tl.store(out_ptr + tile * 3 + 1, row_start)
    tl.store(out_ptr + tile * 3 + 2, row_end)


def tile_map(offs: torch.Tensor, num_rows: int, block_m: int) -> torch.Tensor:
    """int32 [max_row_tiles, 3]: (group, row_start, row_end) of every virtual tile;
    the tile's rows are [row_start, min(row_start + block_m, row_end)).

    The schedule exactly as the GEMM kernels see it, for tests and inspection;
    the GEMMs themselves compute it in their prologue and never call this.
    Entries of tiles with group > G are meaningless (those programs exit).
    """
    g = offs.numel()
    n = max_row_tiles(num_rows, g, block_m)
    out = torch.empty(n, 3, dtype=torch.int32, device=offs.device)
    if n:
        tile_map_kernel[(n,)](offs, out, g, num_rows, BLOCK_M=block_m, BLOCK_G=group_block(g))
    return out


def tile_map_reference(offs: list[int], num_rows: int, block_m: int) -> list[tuple[int, int, int]]:
    """Plain-Python twin of `tile_map` for valid offsets: the (group, row_start, row_end)
    of the tiles that exist, in order."""
    bounds = [0] + list(offs) + [num_rows]
    tiles = []
    for g in range(len(offs) + 1):
        start, end = bounds[g], bounds[g + 1]
        for row in range(start, end, block_m):
            tiles.append((g, row, end))
    return tiles


@triton.jit
def tile_loops(offs_ptr, G, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """The bounds of this program's two loops over the tiles of an [M, N] output (module doc):

        for tile in tl.range(first, group_tiles, step, flatten=PERSISTENT):  # row_tile(tile, ..., group_rows)
        for tile in tl.range(tail_first, tail_end, step):                     # tail_tile(tile - group_tiles, ...)

    Returns (first, step, group_tiles, group_rows, tail_first, tail_end, tail_start): the group
    tiles count row tiles x column tiles; the tail's tiles follow them in one numbering, so a grid
    of one program per tile gives every program at most one tile of either loop.
    """
    gi, start, _, n_tiles = _group_tiles(offs_ptr, G, M, BLOCK_M, BLOCK_G)
    n_cols = tl.cdiv(N, BLOCK_N)
    group_rows = tl.sum(tl.where(gi < G, n_tiles, 0), axis=0)
    tail_rows = tl.sum(tl.where(gi == G, n_tiles, 0), axis=0)
    tail_start = tl.sum(tl.where(gi == G, start, 0), axis=0)
    first, step = tl.program_id(0), tl.num_programs(0)
    group_tiles = group_rows * n_cols
    # the first tile of this program's residue class (tiles first, first + step, ...) in the tail
    tail_first = first + tl.cdiv(tl.maximum(group_tiles - first, 0), step) * step
    return first, step, group_tiles, group_rows, tail_first, group_tiles + tail_rows * n_cols, tail_start


@triton.jit
def row_tile(
    tile,
    offs_ptr,
    G,
    M,
    N,
    group_rows,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Tile `tile` of the groups' tiles (tile_loops' first loop): (g, rows, row_mask, cols,
    col_mask, tile_n, row_start) with g < G its group; tile_n the column tile, cols = tile_n *
    BLOCK_N + arange, rows = row_start + arange (TMA loads and per-tile partial sums address by
    them). `group_rows` is the groups' row tile count, over which `swizzle` bands the tiles.
    """
    tile_m, tile_n = swizzle(tile, group_rows, tl.cdiv(N, BLOCK_N), GROUP_M)
    g, row_start, row_end = group_of_tile(offs_ptr, G, M, tile_m, BLOCK_M, BLOCK_G)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return g, rows, rows < row_end, cols, cols < N, tile_n, row_start


@triton.jit
def tail_tile(tile, tail_start, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile `tile` (counted from 0) of the tail, the rows [tail_start, M) of no group: (rows, row_mask,
    cols, col_mask, tile_n) as row_tile's; the kernels write their zeros."""
    n_cols = tl.cdiv(N, BLOCK_N)
    rows = tail_start + (tile // n_cols) * BLOCK_M + tl.arange(0, BLOCK_M)
    tile_n = tile % n_cols
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < M, cols, cols < N, tile_n


def num_programs(tiles: int, config: dict, device: torch.device) -> int:
    """The grid of a row-tiled kernel with at most `tiles` virtual tiles: one program per tile,
    or with the "PERSISTENT" option P (tuning.py), at most P programs per SM, each looping."""
    per_sm = config.get("PERSISTENT", 0)
    return min(tiles, per_sm * sm_count(device)) if per_sm else tiles


# the interpreter has no SMs; two make a persistent grid of two programs, each looping over tiles
INTERPRETER_SMS = 2


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a persistent grid's unit); INTERPRETER_SMS off CUDA."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count

"""Summing permuted rows per token: the x gradient, and moe_ffn's output (sum over top-k).

Shapes: R = permuted rows, T = tokens, d = model dim.

In the expert FFN, permuted row r reads token row_token[r], so the backward owes
each token the sum of its rows' gradients (K rows per token with top-K routing), and
moe_ffn's forward owes each token the sum of its K weighted expert outputs:

    dx[t]  = sum over r with row_token[r] == t of dx_rows[r]
    out[t] = sum over r with row_token[r] == t of y_rows[r]

`index_add_` would do this with atomics on CUDA: fast, but the order of the
additions (hence the low bits of dx) changes from run to run. Here instead:

    order  = argsort(row_token, stable)             rows grouped by token, r ascending
    bounds = searchsorted(row_token[order], 0..T)   token t's rows are order[bounds[t]:bounds[t+1]]

and one program per (token, column block) adds its rows in that fixed order in
fp32: deterministic, no atomics, no host sync. Tokens with no rows get zeros.
Example: row_token = [2, 0, 2, 1] (T = 3) -> order = [1, 3, 0, 2],
bounds = [0, 1, 2, 4]: dx[0] = rows[1], dx[1] = rows[3], dx[2] = rows[0] + rows[2].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import interpreting, require_runnable


@triton.jit
def sum_rows_kernel(
    src_ptr, order_ptr, bounds_ptr, out_ptr, D, stride_sm, stride_sd, stride_om, stride_od, BLOCK_D: tl.constexpr
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    first = tl.load(bounds_ptr + t)
    last = tl.load(bounds_ptr + t + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(first, last):
        row = tl.load(order_ptr + i)
        acc += tl.load(src_ptr + row * stride_sm + cols * stride_sd, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_om + cols * stride_od, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


def token_rows(row_token: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [R], bounds [T + 1]): the rows of token t are order[bounds[t]:bounds[t + 1]]."""
    order = torch.argsort(row_token, stable=True)
    tokens = torch.arange(num_tokens + 1, device=row_token.device, dtype=row_token.dtype)
    bounds = torch.searchsorted(row_token[order], tokens)
    return order, bounds


def sum_rows_by_token(rows: torch.Tensor, row_token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[T, d]: out[t] = sum of rows[r] over r with row_token[r] == t, in a fixed order."""
    r, d = rows.shape
    out = rows.new_empty(num_tokens, d)
    if num_tokens == 0 or d == 0:
        return out
    if r == 0:
        return out.zero_()
    require_runnable(rows.device, rows.dtype)
    order, bounds = token_rows(row_token, num_tokens)
    block_d = 32 if interpreting() else min(1024, triton.next_power_of_2(d))
    grid = (num_tokens, triton.cdiv(d, block_d))
    sum_rows_kernel[grid](
        rows, order, bounds, out, d, rows.stride(0), rows.stride(1), out.stride(0), out.stride(1), BLOCK_D=block_d
    )
    return out

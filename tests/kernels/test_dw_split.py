"""The weight-gradient kernel with its opt-in split (SPLIT > 1) against a float64 per-group loop.

Shapes: M = rows (sorted by group), K = in dim, N = out dim, G = groups, S = SPLIT;
        dB [G, K, N] = per group g, A_g^T dY_g.

SPLIT is forced through launch_dw's `config` (the tuning table leaves it off); each
split reduces a chunk of a group's rows into an fp32 workspace [S, G, K, N] that a
second kernel sums in a fixed order, so results are checked for accuracy, for
exact zeros on empty groups, and for bitwise equality run to run.
"""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, assert_close, offsets

from moe_kernels.gemm_dw import launch_dw
from moe_kernels.runtime import interpreting
from moe_kernels.tuning import get_config

# name: (M, K, N, group sizes); rows past sum(sizes) belong to no group
CASES = {
    # one group holds most rows (the case SPLIT is for); empty first and middle groups;
    # 25 rows past offs[-1]; K and N not multiples of any block
    "skewed_one_big_group": (150, 37, 100, [0, 120, 0, 5]),
    # a single group with every row, more output columns than rows
    "one_group_odd_dims": (70, 100, 37, [70]),
}


def _config(dtype: torch.dtype, m: int, g: int, split: int) -> dict:
    return {**get_config("dw", dtype, m, g, torch.device(DEVICE), interpreting()), "SPLIT": split}


def _inputs(m, k, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(DEVICE, dtype), torch.randn(m, n, generator=gen).to(DEVICE, dtype)


def _dw_loop(a, dy, sizes, a_rows=None, dy_rows=None):
    """float64 dB[g] = sum over the group's rows r of outer(a[a_rows[r]], dy[dy_rows[r]])."""
    rows = range(sum(sizes))
    a_idx = list(rows) if a_rows is None else a_rows.tolist()
    dy_idx = list(rows) if dy_rows is None else dy_rows.tolist()
    out = torch.zeros(len(sizes), a.shape[1], dy.shape[1], dtype=torch.float64)
    start = 0
    for g, size in enumerate(sizes):
        for r in range(start, start + size):
            out[g] += torch.outer(a[a_idx[r]].double().cpu(), dy[dy_idx[r]].double().cpu())
        start += size
    return out


def _run(a, dy, sizes, config, m, a_rows=None, dy_rows=None, out=None):
    if out is None:
        out = torch.empty(len(sizes), a.shape[1], dy.shape[1], device=DEVICE, dtype=a.dtype)
    launch_dw(a, dy, out, offsets(sizes), m, a_rows, dy_rows, config=config)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("split", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_split_matches_loop(case, dtype, split):
    m, k, n, sizes = CASES[case]
    a, dy = _inputs(m, k, n, dtype, seed=split)
    out = _run(a, dy, sizes, _config(dtype, m, len(sizes), split), m)
    assert_close(out, _dw_loop(a, dy, sizes).to(DEVICE), dtype, f"dB with SPLIT={split}")
    for g, size in enumerate(sizes):
        if size == 0:
            assert torch.equal(out[g], torch.zeros_like(out[g])), f"empty group {g} must be exactly 0"


def test_split_with_row_gathers_and_more_splits_than_steps():
    """The expert FFN's gathered dW (index maps on both operands); SPLIT = 8 leaves most chunks of
    the small groups empty (their workspace tiles must still be written, as zeros)."""
    m, k, n, sizes = 60, 40, 24, [3, 0, 50, 7]
    a, dy = _inputs(m, k, n, torch.float32, seed=7)
    gen = torch.Generator().manual_seed(8)
    a_rows = torch.randperm(m, generator=gen).to(DEVICE)
    dy_rows = torch.randperm(m, generator=gen).to(DEVICE)
    out = _run(a, dy, sizes, _config(torch.float32, m, len(sizes), 8), m, a_rows, dy_rows)
    assert_close(out, _dw_loop(a, dy, sizes, a_rows, dy_rows).to(DEVICE), torch.float32, "gathered dB, SPLIT=8")
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_split_writes_a_strided_output():
    """out may be any strided [G, K, N] view: the fixed-order sum goes through a contiguous buffer."""
    m, k, n, sizes = 40, 24, 20, [25, 15]
    a, dy = _inputs(m, k, n, torch.float32, seed=3)
    out = torch.empty(len(sizes), n, k, device=DEVICE).transpose(1, 2)  # [G, K, N], stride 1 along K
    _run(a, dy, sizes, _config(torch.float32, m, len(sizes), 2), m, out=out)
    assert_close(out, _dw_loop(a, dy, sizes).to(DEVICE), torch.float32, "dB into a transposed view")


def test_split_is_bitwise_reproducible():
    m, k, n, sizes = CASES["skewed_one_big_group"]
    a, dy = _inputs(m, k, n, torch.float16, seed=11)
    config = _config(torch.float16, m, len(sizes), 3)
    first, second = _run(a, dy, sizes, config, m), _run(a, dy, sizes, config, m)
    assert torch.equal(first, second)

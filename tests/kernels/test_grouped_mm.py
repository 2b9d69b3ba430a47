"""moe_kernels.grouped_mm against a float64 per-group loop and torch.nn.functional.grouped_mm.

Shapes: M = rows, K = in dim, N = out dim, G = groups.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, DTYPES, assert_close, double_leaf, offsets

import moe_kernels

# name: (M, K, N, group sizes); rows past sum(sizes) belong to no group
CASES = {
    "empty_first_middle_last": (70, 48, 40, [0, 25, 0, 45, 0]),
    "single_row": (1, 32, 48, [0, 1, 0]),
    "all_rows_one_group": (100, 64, 48, [100]),
    "odd_k600": (100, 600, 37, [40, 0, 60]),
    "odd_n600": (37, 100, 600, [20, 17]),
    "rows_past_last_group": (50, 40, 24, [10, 20]),
}


def _inputs(m, k, n, g, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    b = (torch.randn(g, k, n, generator=gen) / k**0.5).to(DEVICE, dtype).requires_grad_(True)
    dy = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
    return a, b, dy


def _torch_grouped_mm_runs(a, b):
    """torch's grouped_mm needs 16-byte aligned rows, and bf16 alone on CUDA."""
    aligned = (a.shape[1] * a.element_size()) % 16 == 0 and (b.shape[2] * b.element_size()) % 16 == 0
    return aligned and (a.device.type == "cpu" or a.dtype == torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients(case, dtype):
    m, k, n, sizes = CASES[case]
    offs = offsets(sizes)
    used = offs[-1].item()
    a, b, dy = _inputs(m, k, n, len(sizes), dtype, seed=list(CASES).index(case))

    out = moe_kernels.grouped_mm(a, b, offs)
    da, db = torch.autograd.grad(out, (a, b), dy)

    a64, b64 = double_leaf(a), double_leaf(b)
    ref = moe_kernels.grouped_mm_reference(a64, b64, offs)
    da_ref, db_ref = torch.autograd.grad(ref, (a64, b64), dy.double())
    assert_close(out, ref, dtype, "out")
    assert_close(da, da_ref, dtype, "da")
    assert_close(db, db_ref, dtype, "db")
    # rows of no group: zero output, zero gradient
    assert torch.equal(out[used:], torch.zeros_like(out[used:]))
    assert torch.equal(da[used:], torch.zeros_like(da[used:]))
    # empty groups get an exactly zero weight gradient
    for g, size in enumerate(sizes):
        if size == 0:
            assert torch.equal(db[g], torch.zeros_like(db[g]))

    if _torch_grouped_mm_runs(a, b):
        out_t = F.grouped_mm(a, b, offs=offs)
        da_t, db_t = torch.autograd.grad(out_t, (a, b), dy)
        assert_close(out[:used], out_t[:used], dtype, "out vs F.grouped_mm", factor=2)
        assert_close(da[:used], da_t[:used], dtype, "da vs F.grouped_mm", factor=2)
        assert_close(db, db_t, dtype, "db vs F.grouped_mm", factor=2)


def test_zero_rows():
    a, b, _ = _inputs(0, 16, 24, 3, torch.float32, seed=1)
    out = moe_kernels.grouped_mm(a, b, offsets([0, 0, 0]))
    assert out.shape == (0, 24)
    da, db = torch.autograd.grad(out.sum(), (a, b))
    assert da.shape == (0, 16)
    assert torch.equal(db, torch.zeros_like(db))


def test_column_major_b_and_expanded_grad():
    """b as a transposed view (the layout dA uses) and the stride-0 gradient of a sum."""
    m, k, n, sizes = 45, 40, 33, [20, 0, 25]
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(m, k, generator=gen).to(DEVICE).requires_grad_(True)
    b_nk = torch.randn(len(sizes), n, k, generator=gen).to(DEVICE)
    b = b_nk.transpose(1, 2).requires_grad_(True)  # [G, K, N] with stride 1 along K
    offs = offsets(sizes)
    out = moe_kernels.grouped_mm(a, b, offs)
    da, db = torch.autograd.grad(out.sum(), (a, b))
    a64, b64 = double_leaf(a), double_leaf(b)
    ref = moe_kernels.grouped_mm_reference(a64, b64, offs)
    da_ref, db_ref = torch.autograd.grad(ref.sum(), (a64, b64))
    assert_close(out, ref, torch.float32, "out")
    assert_close(da, da_ref, torch.float32, "da")
    assert_close(db, db_ref, torch.float32, "db")

"""The row GEMM kernel with its opt-in TMA loads of B (tensor descriptors) against grouped_mm_reference.

Shapes: M = rows (sorted by group), K = in dim, N = out dim, G = groups; B [G, K, N].

TMA is forced through launch_rows's `config` (the tuning table leaves it off). The
descriptor path runs only where B allows it (last dim contiguous, 16-byte aligned
base and strides); each case asserts it did, and the fallback to pointer loads is
checked on layouts that do not allow it. Under the interpreter the descriptor's
bounds and zero padding are emulated, so the K and N tails are exercised on CPU too.
"""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, assert_close, offsets

import moe_kernels
from moe_kernels.gemm_rows import a_descriptor, b_descriptor, launch_rows
from moe_kernels.runtime import interpreting
from moe_kernels.tuning import get_config

# name: (M, K, N per dtype size, group sizes); rows past sum(sizes) belong to no group.
# N keeps B's rows 16-byte aligned (fp32: N % 4 == 0, 16-bit: N % 8 == 0) yet is no block multiple.
CASES = {
    "empty_groups_odd_k": (70, 37, {4: 100, 2: 40}, [0, 25, 0, 40]),  # 5 rows past offs[-1]
    "one_big_group_even_k": (90, 64, {4: 36, 2: 72}, [85, 1]),
}


def _config(dtype: torch.dtype, m: int, g: int, tma: bool = True) -> dict:
    return {**get_config("rows", dtype, m, g, torch.device(DEVICE), interpreting()), "TMA": tma}


def _inputs(m, k, n, g, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    b = (torch.randn(g, k, n, generator=gen) / k**0.5).to(DEVICE, dtype)
    return a, b


def _run(a, b, sizes, config, c_rows=None):
    m = a.shape[0]
    c = torch.empty(m, b.shape[2], device=DEVICE, dtype=a.dtype)
    launch_rows(a, b, c, offsets(sizes), m, c_rows=c_rows, config=config)
    return c


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_tma_matches_reference(case, dtype):
    m, k, n_by_size, sizes = CASES[case]
    n = n_by_size[dtype.itemsize]
    a, b = _inputs(m, k, n, len(sizes), dtype, seed=len(case))
    config = _config(dtype, m, len(sizes))
    assert b_descriptor(b, config) is not None, "this case must take the TMA path"
    out = _run(a, b, sizes, config)
    ref = moe_kernels.grouped_mm_reference(a.double(), b.double(), offsets(sizes))
    assert_close(out, ref, dtype, "out with TMA loads of B")
    used = sum(sizes)
    assert torch.equal(out[used:], torch.zeros_like(out[used:])), "rows of no group must be zeros"


def test_tma_with_row_scatter():
    """The expert FFN's down projection: output rows scattered through c_rows."""
    m, k, n, sizes = 48, 40, 36, [20, 0, 28]
    a, b = _inputs(m, k, n, len(sizes), torch.float32, seed=5)
    c_rows = torch.randperm(m, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    config = _config(torch.float32, m, len(sizes))
    assert b_descriptor(b, config) is not None
    out = _run(a, b, sizes, config, c_rows=c_rows)
    ref = torch.empty_like(out, dtype=torch.float64)
    ref[c_rows] = moe_kernels.grouped_mm_reference(a.double(), b.double(), offsets(sizes))
    assert_close(out, ref, torch.float32, "scattered out with TMA loads of B")


def test_layouts_tma_cannot_read_fall_back_to_pointer_loads():
    m, k, n, sizes = 30, 40, 24, [10, 20]
    a, _ = _inputs(m, k, n, len(sizes), torch.float16, seed=9)
    config = _config(torch.float16, m, len(sizes))
    b_nk = (torch.randn(len(sizes), n, k) / k**0.5).to(DEVICE, torch.float16)
    storage = torch.randn(len(sizes), k, n + 8).to(DEVICE, torch.float16)  # aligned strides
    layouts = {
        "transposed view, rows 43 halves apart": torch.randn(len(sizes), n, 43)
        .to(DEVICE, torch.float16)[:, :, :k]
        .transpose(1, 2),
        "rows of 37 halves (74 bytes)": torch.randn(len(sizes), k, 37).to(DEVICE, torch.float16),
        "base 2 bytes past alignment": storage[:, :, 1 : n + 1],
    }
    for name, b in layouts.items():
        assert b_descriptor(b, config) is None, name
        out = _run(a, b, sizes, config)
        ref = moe_kernels.grouped_mm_reference(a.double(), b.double(), offsets(sizes))
        assert_close(out, ref, torch.float16, f"fallback: {name}")
    b = b_nk.transpose(1, 2).contiguous()
    assert b_descriptor(b, config) is not None
    assert b_descriptor(b, _config(torch.float16, m, len(sizes), tma=False)) is None, "TMA off: pointer loads"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_transposed_view_reads_its_source_through_tma(dtype):
    """dA and dx multiply by W^T, a view of W [G, N, K]: the descriptor is W's, each tile transposed."""
    m, k, n, sizes = 30, 40, 24, [10, 0, 20]
    a, _ = _inputs(m, k, n, len(sizes), dtype, seed=10)
    w = (torch.randn(len(sizes), n, k) / k**0.5).to(DEVICE, dtype)
    config = _config(dtype, m, len(sizes))
    desc = b_descriptor(w.transpose(1, 2), config)
    assert desc is not None and desc[1], "W^T must take the transposed TMA path"
    out = _run(a, w.transpose(1, 2), sizes, config)
    ref = moe_kernels.grouped_mm_reference(a.double(), w.transpose(1, 2).double(), offsets(sizes))
    assert_close(out, ref, dtype, "out with TMA loads of W^T")


def test_tma_is_bitwise_reproducible():
    m, k, n_by_size, sizes = CASES["empty_groups_odd_k"]
    a, b = _inputs(m, k, n_by_size[2], len(sizes), torch.float16, seed=12)
    config = _config(torch.float16, m, len(sizes))
    assert torch.equal(_run(a, b, sizes, config), _run(a, b, sizes, config))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_through_tma_reads_past_its_group_and_pads_k(dtype):
    """A tile whose rows run past its group reads the next group's rows and the tail through A's
    descriptor: multiplied by this group's B, never stored. K = 40 leaves a partial K tile that
    both descriptors pad with zeros. A row stride TMA cannot take falls back to pointer loads."""
    sizes = [33, 0, 30]  # group 0's second row tile holds one of its rows and the next group's
    m, k, n = sum(sizes) + 7, 40, 24
    a, b = _inputs(m, k, n, len(sizes), dtype, seed=13)
    config = _config(dtype, m, len(sizes))
    assert a_descriptor(a, config) is not None and b_descriptor(b, config) is not None
    ref = moe_kernels.grouped_mm_reference(a.double(), b.double(), offsets(sizes))
    out = _run(a, b, sizes, config)
    assert_close(out, ref, dtype, "out with TMA loads of A and B")
    assert torch.equal(out[sum(sizes) :], torch.zeros_like(out[sum(sizes) :])), "rows of no group must be zeros"

    a_odd = torch.zeros(m, k + 1, device=DEVICE, dtype=dtype)[:, :k]  # rows k + 1 elements apart
    a_odd.copy_(a)
    assert a_descriptor(a_odd, config) is None
    assert_close(_run(a_odd, b, sizes, config), ref, dtype, "out with pointer loads of A, TMA of B")
    assert a_descriptor(a, _config(dtype, m, len(sizes), tma=False)) is None, "TMA off: pointer loads"

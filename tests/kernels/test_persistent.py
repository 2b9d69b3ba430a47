"""The "PERSISTENT" tile option: fewer programs than tiles, each looping over tiles, gives
bitwise the results of one program per tile, and matches the float64 reference.

Under the interpreter a device has schedule.INTERPRETER_SMS (2) SMs, so PERSISTENT 1 launches two
programs that each take every other tile of the groups' loop and then of the tail's; the cases
have empty groups, rows past offs[-1] (the tail, written as zeros) and dims that are no block
multiple. On a GPU the same test runs with the device's SM count (a grid that may cover every tile:
the bitwise comparison still holds). The sm_90 build of the flattened loop is test_sm90_options.py's.
"""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, assert_close, check_moe_ffn, offsets, routing, weights

import moe_kernels
from moe_kernels import ffn_kernels, gemm_rows, schedule, tuning
from moe_kernels.runtime import interpreting
from moe_kernels.schedule import sm_count


@pytest.fixture
def grids(monkeypatch):
    """Record (tiles, programs) of every row-tiled launch; `persistent(p)` turns the option on."""
    seen = []

    def recording(tiles, config, device):
        programs = schedule.num_programs(tiles, config, device)
        seen.append((tiles, programs))
        return programs

    monkeypatch.setattr(gemm_rows, "num_programs", recording)
    monkeypatch.setattr(ffn_kernels, "num_programs", recording)

    def persistent(per_sm: int | None):
        get = tuning.get_config

        def with_option(*args):
            return {**get(*args), "PERSISTENT": per_sm} if per_sm else get(*args)

        monkeypatch.setattr(gemm_rows, "get_config", with_option)
        monkeypatch.setattr(ffn_kernels, "get_config", with_option)
        seen.clear()

    return seen, persistent


def _grouped_mm_with_grads(a, b, offs, seed):
    a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    out = moe_kernels.grouped_mm(a, b, offs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, a.dtype)
    return (out, *torch.autograd.grad(out, (a, b), dout)), dout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_mm_persistent_equals_one_program_per_tile(grids, dtype):
    seen, persistent = grids
    sizes = [0, 37, 5, 0, 41]  # empty groups; 13 rows past offs[-1] form the tail
    m, k, n = sum(sizes) + 13, 45, 70
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    b = (torch.randn(len(sizes), k, n, generator=gen) / k**0.5).to(DEVICE, dtype)
    offs = offsets(sizes)

    persistent(None)
    expected, dout = _grouped_mm_with_grads(a, b, offs, seed=1)
    assert all(programs == tiles for tiles, programs in seen)
    persistent(1)
    got, _ = _grouped_mm_with_grads(a, b, offs, seed=1)
    assert seen and all(programs == min(tiles, sm_count(a.device)) for tiles, programs in seen)
    if interpreting():
        assert all(programs < tiles for tiles, programs in seen), "the programs must loop over tiles"

    for name, x, y in zip(("out", "da", "db"), got, expected):
        assert torch.equal(x, y), f"{name}: persistent differs from one program per tile"
    ref = moe_kernels.grouped_mm_reference(a.double(), b.double(), offs)
    assert_close(got[0], ref, dtype, "out")
    assert torch.equal(got[0][sum(sizes) :], torch.zeros_like(got[0][sum(sizes) :])), "the tail must be zeros"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_moe_ffn_persistent_equals_one_program_per_tile(grids, activation, dtype):
    seen, persistent = grids
    t, d, f, e, k = 14, 40, 24, 4, 2
    offs, row_token, _ = routing(t, k, e, n_dropped=5, seed=2, empty_expert=2)
    x, w_in, w_out = weights(t, d, f, e, activation, dtype, seed=3)
    s = torch.rand(t * k, generator=torch.Generator().manual_seed(4)).to(DEVICE).requires_grad_(True)

    persistent(None)
    expected = check_moe_ffn(x, w_in, w_out, offs, row_token, s, activation, dtype, seed=5)
    persistent(1)
    got = check_moe_ffn(x, w_in, w_out, offs, row_token, s, activation, dtype, seed=5)
    # up, down, dh and dx launches all took the persistent grid
    assert len(seen) >= 4 and all(programs == min(tiles, sm_count(x.device)) for tiles, programs in seen)

    assert torch.equal(got[0], expected[0]), "out: persistent differs from one program per tile"
    for name, g, h in zip(("dx", "dw_in", "dw_out", "d_row_weight"), got[1], expected[1]):
        assert torch.equal(g, h), f"{name}: persistent differs from one program per tile"
    assert torch.equal(got[1][3][offs[-1] :], torch.zeros(5, device=DEVICE)), "dropped rows: no weight gradient"


def test_persistent_with_tma_loads_matches_reference(grids):
    """Both options at once: the flattened loop reads B through a descriptor."""
    seen, _ = grids
    sizes = [30, 0, 33]
    m, k, n = sum(sizes) + 6, 64, 72
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(m, k, generator=gen).to(DEVICE)
    b = (torch.randn(len(sizes), k, n, generator=gen) / k**0.5).to(DEVICE)
    config = {
        **tuning.get_config("rows", a.dtype, m, len(sizes), a.device, interpreting()),
        "TMA": True,
        "PERSISTENT": 2,
    }
    assert gemm_rows.b_descriptor(b, config) is not None, "this case must take the TMA path"
    c = torch.empty(m, n, device=DEVICE)
    gemm_rows.launch_rows(a, b, c, offsets(sizes), m, config=config)
    assert seen and all(programs == min(tiles, 2 * sm_count(a.device)) for tiles, programs in seen)
    assert_close(c, moe_kernels.grouped_mm_reference(a.double(), b.double(), offsets(sizes)), torch.float32, "out")


def test_grid_is_programs_per_sm_capped_by_the_tiles():
    device = torch.device(DEVICE)
    sms = sm_count(device)
    assert schedule.num_programs(1000 * sms, {}, device) == 1000 * sms
    assert schedule.num_programs(1000 * sms, {"PERSISTENT": 2}, device) == 2 * sms
    assert schedule.num_programs(3, {"PERSISTENT": 2}, device) == 3

"""The expert FFN kernels with TMA loads of their weights (the "TMA" tile option, forced on)
against the pointer-load path and the float64 reference: the up projection reads w_in through
a descriptor (two tiles per step for SwiGLU, the gate tile may run past f into the up half),
the dh GEMM reads w_out through a descriptor of w_out with each tile transposed."""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, check_moe_ffn, routing, weights

from moe_kernels import ffn_kernels
from moe_kernels.gemm_rows import b_descriptor


@pytest.fixture
def tma_on(monkeypatch):
    """Every FFN launch asks for TMA; the descriptors it builds are recorded."""
    made = []
    launch_args = ffn_kernels._launch_args

    def with_tma(*args, **kwargs):
        grid, meta, cfg = launch_args(*args, **kwargs)
        return grid, meta, {**cfg, "TMA": True}

    def recording(b, cfg):
        desc = b_descriptor(b, cfg)
        made.append(desc)
        return desc

    monkeypatch.setattr(ffn_kernels, "_launch_args", with_tma)
    monkeypatch.setattr(ffn_kernels, "b_descriptor", recording)
    return made


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_moe_ffn_with_tma_weight_loads_matches_reference(tma_on, activation, dtype):
    t, d, f, e, k = 12, 40, 24, 4, 2  # f = 24 < BLOCK_N: the gate tile reads into the up half
    offs, row_token, _ = routing(t, k, e, n_dropped=3, seed=0, empty_expert=1)
    x, w_in, w_out = weights(t, d, f, e, activation, dtype, seed=1)
    s = torch.rand(t * k, generator=torch.Generator().manual_seed(2)).to(DEVICE).requires_grad_(True)
    check_moe_ffn(x, w_in, w_out, offs, row_token, s, activation, dtype, seed=3)
    # the up kernel took w_in's descriptor, the dh kernel w_out's (transposed)
    assert tma_on[0] is not None and not tma_on[0][1]
    assert any(desc is not None and desc[1] for desc in tma_on[1:])

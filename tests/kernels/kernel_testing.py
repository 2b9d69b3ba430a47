"""Shared helpers of the kernel tests: device, dtypes, tolerances, comparisons."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter cannot multiply bf16 blocks, so bf16 is tested on CUDA only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# relative error ||out - ref|| / ||ref|| against a float64 reference (fp32: tf32 off)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    scale = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / scale if scale > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, factor: float = 1.0) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not out.isnan().any(), f"{what}: NaN in the output (an element was never written)"
    err, tol = rel_err(out, ref), TOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def offsets(sizes: list[int]) -> torch.Tensor:
    """Group sizes -> int32 cumulative end rows, as grouped_mm takes them."""
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32).to(DEVICE)


def double_leaf(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy that is a fresh autograd leaf."""
    return t.detach().double().requires_grad_(True)

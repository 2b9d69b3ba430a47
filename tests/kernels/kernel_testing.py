"""Shared helpers of the kernel tests: device, dtypes, tolerances, comparisons."""

from __future__ import annotations

import torch

import moe_kernels

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


def routing(t, k, e, n_dropped, seed, empty_expert=None):
    """MoE-layer style index maps: (offs, row_token, row_slot).

    Each token picks k distinct experts (never `empty_expert`); assignment
    (token, j) owns output slot token * k + j. n_dropped assignments are dropped:
    their rows go last, past offs[-1]. Kept rows are sorted by expert.
    """
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(t, e, generator=gen)
    if empty_expert is not None:
        scores[:, empty_expert] = -1.0
    expert = scores.topk(k, dim=1).indices.reshape(-1)  # [T * K], slot order
    dropped = torch.zeros(t * k, dtype=torch.bool)
    dropped[torch.randperm(t * k, generator=gen)[:n_dropped]] = True
    key = torch.where(dropped, e, expert)  # dropped rows sort last
    row_slot = torch.argsort(key, stable=True)
    counts = torch.bincount(expert[~dropped], minlength=e)
    offs = counts.cumsum(0).to(torch.int32)
    return offs.to(DEVICE), (row_slot // k).to(DEVICE), row_slot.to(DEVICE)


def weights(t, d, f, e, activation, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    n_in = 2 * f if activation == "swiglu" else f
    x = torch.randn(t, d, generator=gen)
    w_in = torch.randn(e, d, n_in, generator=gen) / d**0.5
    w_out = torch.randn(e, f, d, generator=gen) / f**0.5
    return [w.to(DEVICE, dtype).requires_grad_(True) for w in (x, w_in, w_out)]


def check_moe_ffn(x, w_in, w_out, offs, row_token, s, activation, dtype, seed):
    """moe_ffn's output and its four gradients against moe_ffn_reference in float64."""
    out = moe_kernels.moe_ffn(x, w_in, w_out, offs, row_token, s, activation)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (x, w_in, w_out, s), dout)

    leaves = [double_leaf(w) for w in (x, w_in, w_out, s)]
    ref = moe_kernels.moe_ffn_reference(*leaves[:3], offs, row_token, leaves[3], activation)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    assert_close(out, ref, dtype, "out")
    for name, grad, ref_grad in zip(("dx", "dw_in", "dw_out", "d_row_weight"), grads, ref_grads):
        assert_close(grad, ref_grad, dtype, name)
    return out, grads

"""Expert activations as GEMM epilogues, forward and backward (torch twin: reference.py).

Shapes: per element; z = pre-activation, h = activation output, dh = its gradient.

    swiglu: z = [gate | up] (2f wide), h = silu(gate) * up
            dgate = dh * up * sig(gate) * (1 + gate * (1 - sig(gate))),  dup = dh * silu(gate)
    gelu:   z (f wide), h = gelu(z) with the exact erf form (torch's default)
            dz = dh * (Phi(z) + z * phi(z)),  Phi = normal CDF, phi = normal density

All math is in fp32 on the accumulator; both activations map 0 to 0, so the tail
tiles (rows of no group, accumulator 0) need no special case.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

INV_SQRT2 = tl.constexpr(1.0 / math.sqrt(2.0))
INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))


@triton.jit
def swiglu(gate, up):
    return gate * tl.sigmoid(gate) * up


@triton.jit
def swiglu_backward(gate, up, dh):
    """-> (dgate, dup, h) from the pre-activations and the output gradient."""
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    return dgate, dh * silu, silu * up


@triton.jit
def gelu(z):
    return 0.5 * z * (1.0 + tl.erf(z * INV_SQRT2))


@triton.jit
def gelu_backward(z, dh):
    """-> (dz, h)."""
    cdf = 0.5 * (1.0 + tl.erf(z * INV_SQRT2))
    pdf = tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    return dh * (cdf + z * pdf), z * cdf

"""Triton kernels of the MoE layer: grouped GEMM and the fused expert FFN.

Imports only torch and triton. Without triton (or where it cannot run, see
`triton_available`) the references below still work and the kernels raise.

    grouped_mm(a [M, K], b [G, K, N], offs int32 [G]) -> [M, N]
    expert_ffn(x [T, d], w_in [E, d, 2f|f], w_out [E, f, d], offs int32 [E],
               row_token int64 [R], row_slot int64 [R], num_slots, activation="swiglu") -> [num_slots, d]
    moe_ffn(x [T, d], w_in, w_out, offs, row_token, row_weight [R], activation="swiglu") -> [T, d]
               expert_ffn with the routing weights and the sum over top-k fused in (the MoE layer's path)
    grouped_mm_reference / expert_ffn_reference / moe_ffn_reference: their readable pure-PyTorch twins
    triton_available(device=None, dtype=None) -> (ok, reason)
    check_offs / check_routing: value checks that sync with the host (debugging only)
"""

from .checks import check_offs, check_routing
from .reference import expert_ffn_reference, grouped_mm_reference, moe_ffn_reference
from .runtime import triton_available

try:
    import triton  # noqa: F401  (only to learn whether it is there)
except ImportError as err:
    _MISSING = f"moe kernels need triton, which is not importable ({err})"

    def grouped_mm(*args, **kwargs):
        raise RuntimeError(_MISSING)

    def expert_ffn(*args, **kwargs):
        raise RuntimeError(_MISSING)

    def moe_ffn(*args, **kwargs):
        raise RuntimeError(_MISSING)
else:
    from .expert_ffn import expert_ffn
    from .grouped_gemm import grouped_mm
    from .moe_ffn import moe_ffn
    from .runtime import interpreting

    interpreting()  # fix the answer now, before any torch.compile trace asks for it

__all__ = [
    "grouped_mm",
    "expert_ffn",
    "moe_ffn",
    "grouped_mm_reference",
    "expert_ffn_reference",
    "moe_ffn_reference",
    "triton_available",
    "check_offs",
    "check_routing",
]

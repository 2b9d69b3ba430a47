"""Readable pure-PyTorch twins of the kernels, used by the tests and as documentation.

Shapes: M = rows, K = in dim, N = out dim, G = groups/experts, R = permuted rows,
        T = tokens, d = model dim, f = expert hidden dim.

Slow (a Python loop over groups, and a host sync to read offs) but obviously
correct; they compute in the dtype they are given, so a test passes float64
copies to get an exact-enough reference. No triton import: these work anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm_reference(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [M, K], b [G, K, N], offs int32 [G] -> [M, N]; rows past offs[-1] are zeros."""
    ends = offs.tolist()  # host sync: fine in a reference
    starts = [0] + ends[:-1]
    parts = [a[s:e] @ b[g] for g, (s, e) in enumerate(zip(starts, ends))]
    parts.append(a.new_zeros(a.shape[0] - ends[-1], b.shape[2]))
    return torch.cat(parts)


def activation_reference(z: torch.Tensor, activation: str) -> torch.Tensor:
    """z [R, 2f] (swiglu: [gate | up]) or [R, f] (gelu, exact erf form) -> h [R, f]."""
    if activation == "swiglu":
        gate, up = z.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(z)


def expert_ffn_reference(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offs: torch.Tensor,
    row_token: torch.Tensor,
    row_slot: torch.Tensor,
    num_slots: int,
    activation: str = "swiglu",
) -> torch.Tensor:
    """Twin of moe_kernels.expert_ffn: gather, per-expert loop, activation, scatter.

    y[row_slot[r]] = act(x[row_token[r]] @ w_in[e(r)]) @ w_out[e(r)] for r < offs[-1];
    the slots of rows past offs[-1] (dropped assignments) and slots named by no row are zeros.
    """
    x_rows = x[row_token]  # [R, d] gather
    h = activation_reference(grouped_mm_reference(x_rows, w_in, offs), activation)  # [R, f]
    y_rows = grouped_mm_reference(h, w_out, offs)  # [R, d], dropped rows zero
    return x.new_zeros(num_slots, x.shape[1]).index_copy(0, row_slot, y_rows)  # scatter


def moe_ffn_reference(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offs: torch.Tensor,
    row_token: torch.Tensor,
    row_weight: torch.Tensor,
    activation: str = "swiglu",
) -> torch.Tensor:
    """Twin of moe_kernels.moe_ffn: gather, per-expert loop, activation, weight, sum per token.

    out[t] = sum over rows r < offs[-1] with row_token[r] == t of
             row_weight[r] * act(x[t] @ w_in[e(r)]) @ w_out[e(r)]
    """
    x_rows = x[row_token]  # [R, d] gather
    h = activation_reference(grouped_mm_reference(x_rows, w_in, offs), activation)  # [R, f]
    y_rows = grouped_mm_reference(h * row_weight.to(h.dtype)[:, None], w_out, offs)  # [R, d], dropped rows zero
    return x.new_zeros(x.shape).index_add(0, row_token, y_rows)  # sum over each token's rows

"""Rotary position embeddings (RoPE), full or partial, in halves or interleaved pairs.

Legend: B = batch, H = heads, T = tokens, R = rotary dims (even), P = R / 2 frequency pairs.

Halves (Llama, Qwen3, Mixtral, Ling 2.0): dims i and i + P form a pair.
Interleaved (DeepSeek's MLA reference): dims 2i and 2i + 1 form a pair.
Partial RoPE rotates only the first R dims of each head and passes the rest through
(Ling 2.0 rotates half of each 128-dim head).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Rotary(nn.Module):
    def __init__(self, rotary_dim: int, theta: float, interleave: bool = False):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.interleave = interleave
        inv_freq_P = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
        self.register_buffer("inv_freq", inv_freq_P, persistent=False)

    def angles(self, positions_T: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of each position's angles: [T] -> 2 x [T, P] (fp32)."""
        freqs_TP = positions_T.float()[:, None] * self.inv_freq.float()[None, :]
        return freqs_TP.cos(), freqs_TP.sin()

    def forward(self, x: Tensor, cos_TP: Tensor, sin_TP: Tensor) -> Tensor:
        """Rotate the first R dims of x [..., T, head_dim]; the rest pass through."""
        R = self.rotary_dim
        rot, rest = x[..., :R].float(), x[..., R:]
        if self.interleave:
            a, b = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack((a * cos_TP - b * sin_TP, b * cos_TP + a * sin_TP), dim=-1).flatten(-2)
        else:
            a, b = rot[..., : R // 2], rot[..., R // 2 :]
            rotated = torch.cat((a * cos_TP - b * sin_TP, b * cos_TP + a * sin_TP), dim=-1)
        return torch.cat((rotated.to(x.dtype), rest), dim=-1)

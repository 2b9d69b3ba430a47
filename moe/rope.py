"""Rotary position embeddings (RoPE), full or partial, in halves or interleaved pairs, with
optional YaRN context extension.

Legend: B = sequences, H = heads, N = positions, Dr = rotary dims (even), Fr = Dr / 2 frequency pairs.

Halves (Llama, Qwen3, Mixtral, Ling 2.0): dims i and i + Fr form a pair.
Interleaved (DeepSeek's MLA reference): dims 2i and 2i + 1 form a pair.
Partial RoPE rotates only the first Dr dims of each head and passes the rest through
(Ling 2.0 rotates half of each 128-dim head).

YaRN (arXiv 2309.00071; DeepSeek-V3 ships with it, Qwen3 and Ling 2.0 recommend it past
32K tokens) divides the slow frequencies by `factor`, keeps the fast ones, blends the band
in between linearly, and scales cos/sin by an attention factor. The formulas follow
transformers' `_compute_yarn_parameters`, so that imported checkpoints match it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context `factor` times longer: 0.1 * m * ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(rotary_dim: int, theta: float, scaling: dict | None = None) -> tuple[Tensor, float]:
    """inv_freq [Fr] (fp32) and the factor that multiplies cos and sin (1.0 without YaRN)."""
    inv_freq_Fr = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    if scaling is None:
        return inv_freq_Fr, 1.0
    factor = scaling["factor"]
    original_len = scaling["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:  # the dim whose wavelength fits `rotations` turns in original_len
        return rotary_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(scaling.get("beta_fast") or 32), dim_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    # 0 below `low` (fast frequencies, kept), 1 above `high` (slow ones, interpolated).
    ramp_Fr = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq_Fr = inv_freq_Fr / factor * ramp_Fr + inv_freq_Fr * (1 - ramp_Fr)

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq_Fr, float(attention_factor)


class Rotary(nn.Module):
    inv_freq: Tensor  # [Fr] fp32, a buffer

    def __init__(self, rotary_dim: int, theta: float, interleave: bool = False, scaling: dict | None = None):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.interleave = interleave
        self.scaling = scaling
        inv_freq_Fr, self.attention_factor = rope_frequencies(rotary_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq_Fr, persistent=False)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating buffer, but the frequencies must stay fp32:
        # in bf16, angles of positions past a few hundred are off by whole radians.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and not self.inv_freq.is_meta:
            fp32 = rope_frequencies(self.rotary_dim, self.theta, self.scaling)[0]
            self.inv_freq = fp32.to(self.inv_freq.device)
        return self

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute inv_freq (fp32) on `device`, e.g. after building the model on the meta device."""
        self.inv_freq = rope_frequencies(self.rotary_dim, self.theta, self.scaling)[0].to(device)

    def angles(self, positions_N: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of each position's angles: [N] -> 2 x [N, Fr] (fp32); per-sequence positions
        [B, N] -> 2 x [B, 1, N, Fr], which broadcast over the heads of x [B, H, N, head_dim]."""
        freqs_NFr = positions_N.float()[..., None] * self.inv_freq.float()
        if positions_N.dim() == 2:
            freqs_NFr = freqs_NFr.unsqueeze(1)  # [B, 1, N, Fr]
        if self.attention_factor == 1.0:
            return freqs_NFr.cos(), freqs_NFr.sin()
        return freqs_NFr.cos() * self.attention_factor, freqs_NFr.sin() * self.attention_factor

    def forward(self, x: Tensor, cos_NFr: Tensor, sin_NFr: Tensor) -> Tensor:
        """Rotate the first Dr dims of x [..., N, head_dim]; the rest pass through."""
        Dr = self.rotary_dim
        rot, rest = x[..., :Dr].float(), x[..., Dr:]
        if self.interleave:
            a, b = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack((a * cos_NFr - b * sin_NFr, b * cos_NFr + a * sin_NFr), dim=-1).flatten(-2)
        else:
            a, b = rot[..., : Dr // 2], rot[..., Dr // 2 :]
            rotated = torch.cat((a * cos_NFr - b * sin_NFr, b * cos_NFr + a * sin_NFr), dim=-1)
        return torch.cat((rotated.to(x.dtype), rest), dim=-1)

"""Attention: grouped-query attention (GQA) and DeepSeek-V3's multi-head latent attention
(MLA), both through `scaled_dot_product_attention`, both with a KV cache for decoding.

Legend: B = sequences, N = tokens this call adds per sequence (all of them in training),
S = the positions keys cover per sequence (cached + new), D = hidden size, H = query heads,
Hkv = key/value heads, Dh = head dim, C = MLA's compressed KV rank (kv_lora_rank),
Dn / Dr / Dv = MLA's no-RoPE q/k dims, RoPE q/k dims, value dims.

Projection names follow the Hugging Face implementations (q_proj, kv_a_proj_with_mqa, ...)
so that checkpoints map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .norm import RMSNorm
from .rope import Rotary, yarn_mscale


class KVCache:
    """Per-layer tensors kept across decoding steps, grown along the time axis (dim -2).

    GQA layers keep (k [B, Hkv, S, Dh], v [B, Hkv, S, Dh]); MLA layers keep the compressed
    latent (c_kv [B, S, C], k_rope [B, 1, S, Dr]): the memory saving that motivates MLA.
    """

    static = False

    def __init__(self, num_layers: int):
        self.layers: list[tuple[Tensor, ...] | None] = [None] * num_layers
        self.seq_len = 0  # tokens already in the cache; the model advances it after each call

    def slots(self, n: int, device: torch.device) -> Tensor:
        """The cache slots [N] the next n tokens take (also their default positions)."""
        return torch.arange(self.seq_len, self.seq_len + n, device=device)

    def key_len(self, n: int) -> int:
        """S, the keys a call adding n tokens attends over."""
        return self.seq_len + n

    def update(self, layer_idx: int, *new: Tensor) -> tuple[Tensor, ...]:
        old = self.layers[layer_idx]
        full = new if old is None else tuple(torch.cat((o, n), dim=-2) for o, n in zip(old, new))
        self.layers[layer_idx] = full
        return full

    def advance(self, n: int) -> None:
        self.seq_len += n


class StaticKVCache:
    """A KV cache preallocated to max_len slots per sequence: every decoding step has the same
    shapes, so `torch.compile(fullgraph=True)` captures it once (with mode="reduce-overhead", as a
    CUDA graph). Same per-layer layouts as KVCache, with S = max_len.

    New keys are written in place at slots index .. index + N - 1 (`index_copy_`); `index` is a
    0-d int64 tensor, not a Python int, so that the compiled step does not specialise on it. Every
    call attends over all max_len slots under a mask that hides the slots not yet written (the
    causal mask in slot order does that). Writing past max_len fails (CPU: an index error; CUDA:
    a device-side assert): the caller keeps count (moe.generate slides its window first).
    """

    static = True

    def __init__(self, shapes: list[tuple[tuple[int, ...], ...]], dtype: torch.dtype, device: torch.device | str):
        self.layers = [tuple(torch.zeros(shape, dtype=dtype, device=device) for shape in layer) for layer in shapes]
        self.max_len = shapes[0][0][-2] if shapes else 0
        self.index = torch.zeros((), dtype=torch.long, device=device)
        # Fixed addresses: CUDA graphs may then write into them (and into `index`) in place.
        for t in [self.index, *(t for layer in self.layers for t in layer)]:
            torch._dynamo.mark_static_address(t)

    def slots(self, n: int, device: torch.device) -> Tensor:
        return self.index + torch.arange(n, device=device)

    def key_len(self, n: int) -> int:
        return self.max_len

    def update(self, layer_idx: int, *new: Tensor) -> tuple[Tensor, ...]:
        full = self.layers[layer_idx]
        slots_N = self.slots(new[0].shape[-2], new[0].device)
        for buffer, n in zip(full, new):
            buffer.index_copy_(buffer.dim() - 2, slots_N, n.to(buffer.dtype))
        return full

    def advance(self, n: int) -> None:
        self.index += n

    def reset(self) -> None:
        """Empty the cache for a new batch (the buffers are kept; old keys are masked out)."""
        self.index.zero_()


def causal_mask(slots_N: Tensor, key_len: int, key_mask_BS: Tensor | None = None) -> Tensor:
    """Boolean attention mask [1 or B, 1, N, S] (True = attend): the query in cache slot
    slots_N[i] sees the keys in slots 0..slots_N[i] (in a static cache, never a slot not yet
    written) that key_mask_BS [B, S] marks as real tokens. Each query always sees its own slot,
    so that the row of a padding token has one key and stays finite (an all-masked row is NaN,
    and NaN values would leak through zero attention weights: 0 * NaN = NaN)."""
    keys_S = torch.arange(key_len, device=slots_N.device)
    causal_NS = keys_S[None, :] <= slots_N[:, None]
    if key_mask_BS is None:
        return causal_NS[None, None]
    own_NS = keys_S[None, :] == slots_N[:, None]
    return (causal_NS & key_mask_BS.bool()[:, None, None, :]) | own_NS


def attend(q_BHNd: Tensor, k_BHSd: Tensor, v_BHSd: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
    """Causal attention of N new queries over S keys, the last N of which are the new tokens;
    with `mask` (from `causal_mask`: padding, a static cache), the keys it allows."""
    N, S = q_BHNd.shape[-2], k_BHSd.shape[-2]
    causal = mask is None and N == S
    if mask is None and 1 < N < S:  # a chunk after a cached prefix: query i sees keys 0..S-N+i
        mask = torch.arange(S, device=q_BHNd.device)[None, :] <= torch.arange(N, device=q_BHNd.device)[:, None] + S - N
    return F.scaled_dot_product_attention(
        q_BHNd,
        k_BHSd,
        v_BHSd,
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=k_BHSd.shape[1] != q_BHNd.shape[1],
    )


Cache = KVCache | StaticKVCache


class Attention(nn.Module):
    """GQA with optional per-head QK-norm (applied before RoPE) and partial RoPE."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.Hkv, self.Dh = config.num_heads, config.kv_heads, config.dim_per_head
        D, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(D, self.H * self.Dh, bias=bias)
        self.k_proj = nn.Linear(D, self.Hkv * self.Dh, bias=bias)
        self.v_proj = nn.Linear(D, self.Hkv * self.Dh, bias=bias)
        self.o_proj = nn.Linear(self.H * self.Dh, D, bias=config.attention_out_bias)
        self.q_norm: RMSNorm | None
        self.k_norm: RMSNorm | None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.Dh, config.norm_eps)
            self.k_norm = RMSNorm(self.Dh, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = Rotary(config.rotary_dim, config.rope_theta, config.rope_interleave, config.rope_scaling)

    def cache_shapes(self, batch_size: int, max_len: int) -> tuple[tuple[int, ...], ...]:
        """Shapes of this layer's static cache: k and v [B, Hkv, max_len, Dh]."""
        return ((batch_size, self.Hkv, max_len, self.Dh),) * 2

    def forward(
        self, x_BND: Tensor, positions_N: Tensor, cache: Cache | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """positions [N] or per sequence [B, N]; mask from `causal_mask` or None (plain causal)."""
        B, N, _ = x_BND.shape
        q = self.q_proj(x_BND).view(B, N, self.H, self.Dh).transpose(1, 2)  # [B, H, N, Dh]
        k = self.k_proj(x_BND).view(B, N, self.Hkv, self.Dh).transpose(1, 2)  # [B, Hkv, N, Dh]
        v = self.v_proj(x_BND).view(B, N, self.Hkv, self.Dh).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary.angles(positions_N)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attend(q, k, v, scale=self.Dh**-0.5, mask=mask)  # [B, H, N, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(B, N, self.H * self.Dh))


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values are expanded from a
    small shared latent c_kv; a separate RoPE part of the key is shared by all heads."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        D, self.H = config.hidden_size, config.num_heads
        self.C, self.Dn, self.Dr, self.Dv = (
            config.kv_lora_rank,
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.v_head_dim,
        )
        q_dim = self.H * (self.Dn + self.Dr)
        latent_eps = config.latent_norm_eps or config.norm_eps
        if config.q_lora_rank:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, latent_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_dim, bias=False)
        else:
            self.q_proj = nn.Linear(D, q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.C + self.Dr, bias=False)
        self.kv_a_layernorm = RMSNorm(self.C, latent_eps)
        self.kv_b_proj = nn.Linear(self.C, self.H * (self.Dn + self.Dv), bias=False)
        self.o_proj = nn.Linear(self.H * self.Dv, D, bias=False)
        self.rotary = Rotary(self.Dr, config.rope_theta, config.rope_interleave, config.rope_scaling)
        self.scale = (self.Dn + self.Dr) ** -0.5
        scaling = config.rope_scaling or {}
        if scaling.get("mscale_all_dim"):  # DeepSeek-V3 with YaRN: sharper softmax for the longer context
            self.scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2

    def cache_shapes(self, batch_size: int, max_len: int) -> tuple[tuple[int, ...], ...]:
        """Shapes of this layer's static cache: the latent c_kv [B, max_len, C], k_rope [B, 1, max_len, Dr]."""
        return (batch_size, max_len, self.C), (batch_size, 1, max_len, self.Dr)

    def forward(
        self, x_BND: Tensor, positions_N: Tensor, cache: Cache | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """positions [N] or per sequence [B, N]; mask from `causal_mask` or None (plain causal)."""
        B, N, _ = x_BND.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BND)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BND)))
        q = q.view(B, N, self.H, self.Dn + self.Dr).transpose(1, 2)  # [B, H, N, Dn+Dr]
        q_nope, q_rope = q.split((self.Dn, self.Dr), dim=-1)

        c_kv, k_rope = self.kv_a_proj_with_mqa(x_BND).split((self.C, self.Dr), dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, N, C]
        k_rope = k_rope.view(B, 1, N, self.Dr)  # one RoPE key shared by all heads
        cos, sin = self.rotary.angles(positions_N)
        q_rope, k_rope = self.rotary(q_rope, cos, sin), self.rotary(k_rope, cos, sin)
        if cache is not None:
            c_kv, k_rope = cache.update(self.layer_idx, c_kv, k_rope)
        S = c_kv.shape[1]

        kv = self.kv_b_proj(c_kv).view(B, S, self.H, self.Dn + self.Dv).transpose(1, 2)
        k_nope, v = kv.split((self.Dn, self.Dv), dim=-1)  # [B, H, S, Dn], [B, H, S, Dv]
        k = torch.cat((k_nope, k_rope.expand(B, self.H, S, self.Dr)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        out = attend(q, k, v, scale=self.scale, mask=mask)  # [B, H, N, Dv]
        return self.o_proj(out.transpose(1, 2).reshape(B, N, self.H * self.Dv))

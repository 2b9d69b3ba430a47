"""Multi-token prediction (MTP): DeepSeek-V3's sequential extra heads (report section 2.2), also
used by Ling 2.0.

Legend: B = sequences, S = tokens per sequence, D = hidden size, V = vocab size, k = depth (1-based).

Module k continues the normed hidden state of depth k-1 with the embedding of the next token,
through one transformer block:

    g^0_i = final_norm(h_i)                (the main model's last block, normed as for its logits)
    g^k_i = norm(Block(eh_proj([enorm(embed(t_{i+k})); hnorm(g^{k-1}_i)])))     # [B, S-k, D]
    logits^k_i = lm_head(g^k_i)            predicts t_{i+k+1}

The input is the state *after* the final norm because that is what the published weights were
trained on: the Ling 2.0 authors' code feeds `self.norm(hidden)` to its MTP layer and each MTP
layer's `final_layernorm` output to the next (Ling-V2 af8837e, modeling_bailing_moe_v2.py
around lines 1309-1350), and vLLM feeds DeepSeek-V3's MTP layer the main model's normed output.
(Depth 2 and beyond exist only in Ling's code, so the chaining follows Ling's.)

The embedding and lm_head are the main model's (shared, as in DeepSeek-V3). The concatenation puts
the embedding first, as DeepSeek-V3's published weights expect (eh_proj [D, 2D]: the embedding
half, then the hidden half; vLLM and SGLang read them so). The block is built by the caller like
the main model's last layer (MoE or dense), so its MoE layer, if any, is one more MoE layer of the
model: its balancing losses enter `model.aux_loss()` at its own coefficients and its expert bias
is updated with the others. Names (enorm, hnorm, eh_proj) are the checkpoints'; `norm` is
DeepSeek-V3's shared_head.norm (Ling 2.0: final_layernorm).

Training truncates rather than pads: depth k sees positions 0..S-k-1 (their targets t_{i+k+1}
exist in the window), so no position predicts past the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .norm import RMSNorm

if TYPE_CHECKING:
    from .attention import KVCache


class MTPModule(nn.Module):
    """One depth: (h^{k-1} [B, N, D], embeddings of the next tokens [B, N, D]) -> h^k [B, N, D]."""

    def __init__(self, config: ModelConfig, block: nn.Module):
        super().__init__()
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.norm_eps)
        self.hnorm = RMSNorm(D, config.norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = block  # a moe.model.Block with layer_idx 0: it keeps its keys in its own KVCache(1)
        self.norm = RMSNorm(D, config.norm_eps)

    def forward(self, h_BND: Tensor, emb_BND: Tensor, positions_N: Tensor, cache: KVCache | None = None) -> Tensor:
        x_BND = self.eh_proj(torch.cat((self.enorm(emb_BND), self.hnorm(h_BND)), dim=-1))  # [B, N, 2D] -> [B, N, D]
        out = self.block(x_BND, positions_N, cache)
        if cache is not None:
            cache.seq_len += h_BND.shape[1]
        return out


class HasMTP(Protocol):
    """What the MTP functions need of a moe.Transformer (named structurally: moe.model imports
    this module, so this module cannot import moe.model)."""

    mtp: nn.ModuleList
    embed_tokens: nn.Embedding
    norm: RMSNorm
    lm_head: nn.Linear


def mtp_logits(model: HasMTP, h_BSD: Tensor, input_ids_BS: Tensor) -> list[Tensor]:
    """Training-time logits of every depth: element k-1 is [B, S-k, V], position i predicting
    t_{i+k+1}; h_BSD is `model.hidden(input_ids_BS)`. Depths with no position left (S <= k) are
    omitted."""
    S = input_ids_BS.shape[1]
    out, g = [], model.norm(h_BSD)
    modules: list[MTPModule] = list(model.mtp)  # type: ignore[arg-type]
    for k, module in enumerate(modules, start=1):
        if S <= k:
            break
        positions = torch.arange(S - k, device=input_ids_BS.device)
        g = module.norm(module(g[:, : S - k], model.embed_tokens(input_ids_BS[:, k:]), positions))
        out.append(model.lm_head(g))
    return out


def mtp_loss(model: HasMTP, h_BSD: Tensor, input_ids_BS: Tensor, targets_BS: Tensor) -> Tensor:
    """Mean over depths of the cross-entropy (fp32) of depth k's predictions against targets[:, k:]
    (targets[i] = t_{i+1}: the usual next-token targets, so targets[i+k] = t_{i+k+1}). Zero when
    no depth has a position (S <= 1) or the model has no MTP module."""
    losses = [
        F.cross_entropy(logits.float().flatten(0, 1), targets_BS[:, k:].flatten())
        for k, logits in enumerate(mtp_logits(model, h_BSD, input_ids_BS), start=1)
    ]
    return torch.stack(losses).mean() if losses else h_BSD.new_zeros((), dtype=torch.float32)

"""Self-speculative greedy decoding: the model's own MTP modules draft, the main model verifies.

Legend: P = prompt tokens, K = draft length, D = hidden size, n = tokens confirmed so far
(t_0..t_{n-1} in the main KV cache; t_n, the main model's greedy choice, known but not yet read).

One round:
    draft   depth k = 1..K at position n-1 proposes d_{n+k}: module k continues depth k-1's
            hidden state with the embedding of t_{n+k-1} (t_n, then the drafts); depths past
            num_mtp_layers reuse the last module (as vLLM does for DeepSeek-V3's single module).
    verify  the main model reads [t_n, d_{n+1}, ..., d_{n+K}] in one forward (K+1 positions);
            draft j is accepted while it equals the main model's greedy choice at the position
            before it; the first mismatch is replaced by that choice (so every round confirms
            at least one token, and the output is exactly plain greedy decoding's).
    roll back  the caches are cut (`truncate_cache`) to the positions whose inputs are confirmed.

Each depth keeps its own KV cache (one layer) and the hidden states it produced (`hs[k]`
[1, n_k, D], those of confirmed positions); each round runs a depth only over the positions
its cache lacks. Depth k's output at position i stays once the token it read, t_{i+k}, is
confirmed: i + k <= n + accepted (the draft after the accepted ones was replaced).
Greedy only, one sequence, no sliding window (prompt + new tokens + K must fit max_seq_len).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import KVCache
from .errors import InputError
from .generate import generate
from .model import Transformer
from .mtp import MTPModule


@dataclass
class SpeculativeStats:
    """drafted / accepted: draft tokens proposed / kept; rounds: main-model verify forwards."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """New tokens per verify forward (plain decoding: 1)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def truncate_cache(cache: KVCache, length: int) -> None:
    """Keep the first `length` positions of every layer (all cached tensors hold time at dim -2:
    GQA k, v [B, Hkv, S, Dh]; MLA c_kv [B, S, C], k_rope [B, 1, S, Dr])."""
    if not 0 <= length <= cache.seq_len:
        raise ValueError(f"cannot truncate a cache of {cache.seq_len} positions to {length}")
    cache.layers = [None if t is None else tuple(x[..., :length, :] for x in t) for t in cache.layers]
    cache.seq_len = length


@torch.inference_mode()
def speculative_generate(
    model: Transformer, prompt_1P: Tensor, max_new_tokens: int, draft_len: int | None = None
) -> tuple[Tensor, SpeculativeStats]:
    """Prompt [1, P] -> (prompt + greedy continuation [1, P + max_new_tokens], statistics).
    draft_len: K, tokens drafted per round (default: num_mtp_layers)."""
    K = model.config.num_mtp_layers if draft_len is None else draft_len
    _check(model, prompt_1P, max_new_tokens, K)
    model.eval()
    stats = SpeculativeStats()
    ids = prompt_1P.to(model.lm_head.weight.device)
    if max_new_tokens == 0:
        return ids, stats
    main = KVCache(len(model.layers))  # a growing cache: truncate_cache cuts it
    g0 = model.norm(model.hidden(ids, main))  # [1, P, D], normed: what the head and depth 1 read
    tokens = ids[0].tolist() + [int(model.lm_head(g0[:, -1]).argmax(-1))]  # t_0..t_n
    depth_caches = [KVCache(1) for _ in range(K)]
    hs: list[Tensor] = [g0] + [g0[:, :0] for _ in range(K)]  # normed states of confirmed positions
    goal = ids.shape[1] + max_new_tokens
    while len(tokens) < goal:
        n = main.seq_len
        drafts = _draft(model, tokens, n, hs, depth_caches)
        # Verify: [t_n, d_{n+1}, ..., d_{n+K}] at positions n..n+K.
        candidates = torch.tensor([[tokens[n], *drafts]], device=ids.device)
        g_new = model.norm(model.hidden(candidates, main))  # [1, K+1, D]
        greedy = model.lm_head(g_new).argmax(-1)[0].tolist()  # greedy[j] follows candidate j
        accepted = 0
        while accepted < K and drafts[accepted] == greedy[accepted]:
            accepted += 1
        stats.rounds, stats.drafted, stats.accepted = stats.rounds + 1, stats.drafted + K, stats.accepted + accepted
        tokens += drafts[:accepted] + [greedy[accepted]]
        n_new = n + accepted + 1  # t_n and the accepted drafts are now in the main cache
        truncate_cache(main, n_new)
        hs[0] = torch.cat((hs[0], g_new[:, : accepted + 1]), dim=1)
        for k in range(1, K + 1):  # depth k at i read t_{i+k}: right iff i + k <= n + accepted = n_new - 1
            keep = min(depth_caches[k - 1].seq_len, n_new - k)
            truncate_cache(depth_caches[k - 1], keep)
            hs[k] = hs[k][:, :keep]
    out = torch.tensor([tokens[:goal]], device=ids.device, dtype=ids.dtype)
    return out, stats


def _draft(model: Transformer, tokens: list[int], n: int, hs: list[Tensor], caches: list[KVCache]) -> list[int]:
    """Run depths 1..K over the positions each lacks, up to n-1; returns d_{n+1}..d_{n+K}. Appends
    every depth's new hidden states to hs[k] (the caller cuts the unconfirmed ones)."""
    seq = list(tokens)  # t_0..t_n, then the drafts as they come
    device = hs[0].device
    for k in range(1, len(caches) + 1):
        module: MTPModule = model.mtp[min(k, len(model.mtp)) - 1]  # type: ignore[assignment]
        start = caches[k - 1].seq_len
        positions = torch.arange(start, n, device=device)
        next_ids = torch.tensor([seq[start + k : n + k]], device=device)  # t_{i+k} for i in start..n-1
        g = module.norm(module(hs[k - 1][:, start:n], model.embed_tokens(next_ids), positions, caches[k - 1]))
        hs[k] = torch.cat((hs[k], g), dim=1)
        seq.append(int(model.lm_head(g[:, -1]).argmax(-1)))
    return seq[n + 1 :]


def _check(model: Transformer, prompt_1P: Tensor, max_new_tokens: int, K: int) -> None:
    if len(model.mtp) == 0:
        raise InputError("speculative decoding needs a model with MTP modules (num_mtp_layers > 0)")
    if prompt_1P.dim() != 2 or prompt_1P.shape[0] != 1 or prompt_1P.shape[1] == 0:
        raise InputError(f"the prompt must be [1, tokens] with at least one token, got {tuple(prompt_1P.shape)}")
    if K < 1 or max_new_tokens < 0:
        raise InputError(f"draft_len must be >= 1 and max_new_tokens >= 0, got {K}, {max_new_tokens}")
    total = prompt_1P.shape[1] + max_new_tokens + K
    if total > model.config.max_seq_len:
        raise InputError(
            f"prompt + max_new_tokens + draft_len = {total} exceeds max_seq_len ({model.config.max_seq_len}): "
            "speculative decoding does not slide the window"
        )


def benchmark(model: Transformer, prompt_1P: Tensor, max_new_tokens: int, draft_len: int | None = None) -> dict:
    """Speculative vs plain greedy decoding on one prompt: acceptance rate, tokens per verify
    forward, wall times and speedup (plain / speculative); checks the two outputs agree."""
    t0 = time.perf_counter()
    plain = generate(model, prompt_1P, max_new_tokens, temperature=0)
    t1 = time.perf_counter()
    spec, stats = speculative_generate(model, prompt_1P, max_new_tokens, draft_len)
    t2 = time.perf_counter()
    assert isinstance(plain, Tensor)
    return {
        "draft_len": draft_len or model.config.num_mtp_layers,
        "new_tokens": max_new_tokens,
        "identical": bool(torch.equal(plain, spec)),
        "acceptance_rate": stats.acceptance_rate,
        "tokens_per_round": stats.tokens_per_round,
        "plain_s": t1 - t0,
        "speculative_s": t2 - t1,
        "speedup": (t1 - t0) / (t2 - t1),
    }

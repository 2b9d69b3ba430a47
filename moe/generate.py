"""Sampling with the KV cache (the command line is `moe generate`, moe/cli/generate.py).

Legend: B = sequences, S = prompt tokens (P: the longest prompt of a batch), N = new tokens,
V = vocab size, M = a static cache's slots.

The prompt is read once (prefill), then each new token costs one single-token forward that
attends over the cached keys and values (GQA: k, v per layer; MLA: the compressed latent).
When prompt + output reach the model's max_seq_len the window slides: the cache is rebuilt
from the last max_seq_len / 2 tokens, so positions stay within the range the model was
trained on. Models trained on the default corpus are byte-level: the prompt is its UTF-8
bytes and the output is decoded with errors="replace".

    generate(model, prompt_BS, N)                  # equal-length prompts -> ids [B, S + N]
    generate_batch(model, [[1, 2, 3], [4]], N)     # any lengths -> each prompt's new tokens

Batches of prompts of different lengths are left-padded: every row's last prompt token sits
in the same column, so one decode step appends one column for all rows. Each row's positions
count only its real tokens (the padding shifts no RoPE angle) and an attention mask hides the
padding keys, so each row computes what it would alone (up to float rounding; with an MoE
capacity limit, tokens of other rows compete for the same expert slots: only dropless layers
make rows independent). Left padding rather than a ragged cache: the cache stays one
rectangular tensor per layer, so the same code serves the growing and the static cache, and a
decode step keeps fixed shapes (torch.compile, CUDA graphs); the price is the padding's
attention over at most P - S_b masked keys per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .attention import KVCache, StaticKVCache
from .errors import InputError
from .model import Transformer


def sample_next(
    logits_BV: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None = None
) -> Tensor:
    """One token per row [B, 1]: greedy at temperature 0, else from softmax(logits / T) over the top k."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator)


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_BS: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    stop_ids: Sequence[int] = (),
) -> Tensor | tuple[Tensor, Tensor]:
    """Prompt [B, S] -> prompt + continuation [B, S + N]; with return_logits also the logits
    [B, N, V] each new token was drawn from.

    stop_ids: generation ends early once every row has drawn one of these (N is then the step at
    which the last row stopped; tokens a row draws after its own stop id are still in its row:
    cut each row at its first stop id)."""
    vocab = model.config.vocab_size
    if prompt_BS.dim() != 2 or prompt_BS.shape[1] == 0:
        raise InputError(f"the prompt must be [batch, tokens] with at least one token, got {tuple(prompt_BS.shape)}")
    _check_ids(prompt_BS, vocab)
    _check_sampling(temperature, top_k)
    model.eval()
    window = model.config.max_seq_len
    ids_BS = prompt_BS.to(model.lm_head.weight.device)
    stops = _stop_tensor(stop_ids, ids_BS.device)
    done_B = torch.zeros(ids_BS.shape[0], dtype=torch.bool, device=ids_BS.device)
    cache = _growing_cache(model)
    logits_BV = model(ids_BS[:, -window:], cache)[:, -1]
    seen = []  # the logits of each step, kept only when asked for (N x [B, V] fp32 otherwise wasted)
    for i in range(max_new_tokens):
        if return_logits:
            seen.append(logits_BV.float())
        next_B1 = sample_next(logits_BV, temperature, top_k, generator)
        ids_BS = torch.cat((ids_BS, next_B1), dim=1)
        if i + 1 == max_new_tokens or (stops is not None and _all_stopped(done_B, next_B1, stops)):
            break
        if cache.seq_len >= window:  # slide: re-read the last half window into a fresh cache
            cache = _growing_cache(model)
            logits_BV = model(ids_BS[:, -(window // 2) :], cache)[:, -1]
        else:
            logits_BV = model(next_B1, cache)[:, -1]
    if return_logits:
        empty = ids_BS.new_zeros((ids_BS.shape[0], 0, vocab), dtype=torch.float32)
        return ids_BS, torch.stack(seen, dim=1) if seen else empty
    return ids_BS


@torch.inference_mode()
def generate_batch(
    model: Transformer,
    prompts: Sequence[Sequence[int] | Tensor],
    max_new_tokens: int | Sequence[int],
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = (),
    static_cache: bool = False,
) -> list[list[int]]:
    """Prompts of any lengths (lists of ids or 1-D tensors), decoded together -> each prompt's
    new tokens, a list of ids per prompt, in order.

    A row stops after max_new_tokens (one int, or one per prompt) or after drawing one of
    stop_ids, which ends its list. The batch runs until every row has stopped; rows that stopped
    keep decoding (their tokens are discarded) so that the shapes stay rectangular. Greedy at
    temperature 0: each row's tokens are those `generate` gives it alone, for dropless MoE layers
    (see the module docstring). Sampling draws the rows' tokens from one generator.

    static_cache: decode into a `StaticKVCache` of max_seq_len slots (fixed shapes; pass a
    `torch.compile(model, fullgraph=True)` to have the decode step compiled once, with
    mode="reduce-overhead" as a CUDA graph). The window slides as in `generate`, for the whole
    batch at once: when the longest row fills max_seq_len, every row keeps its last
    max_seq_len / 2 columns (shorter rows keep their padding in them).
    """
    vocab, window = model.config.vocab_size, model.config.max_seq_len
    device = model.lm_head.weight.device
    rows = [_prompt_ids(p, i) for i, p in enumerate(prompts)]
    limits = [max_new_tokens] * len(rows) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(rows) or any(n < 0 for n in limits):
        raise InputError(f"max_new_tokens must be >= 0, one int or one per prompt ({len(rows)}), got {max_new_tokens}")
    _check_sampling(temperature, top_k)
    if not rows or max(limits) == 0:
        return [[] for _ in rows]
    ids_BP, real_BP = _left_pad(rows, device)
    _check_ids(ids_BP[real_BP], vocab)
    model.eval()
    B, P = ids_BP.shape
    stops = _stop_tensor(stop_ids, device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    cache = model.new_cache(static=True, batch_size=B, max_len=window) if static_cache else model.new_cache()
    logits_BV, next_pos_B, filled = _prefill(model, cache, ids_BP[:, -window:], real_BP[:, -window:])
    drawn = []
    for i in range(max(limits)):
        next_B1 = sample_next(logits_BV, temperature, top_k, generator)
        drawn.append(next_B1)
        ids_BP = torch.cat((ids_BP, next_B1), dim=1)
        real_BP = torch.cat((real_BP, real_BP.new_ones(B, 1)), dim=1)
        if i + 1 == max(limits) or (stops is not None and _all_stopped(done_B, next_B1, stops)):
            break
        if filled >= window:  # slide, as in `generate`, for the batch
            if isinstance(cache, StaticKVCache):
                cache.reset()
            else:
                cache = model.new_cache()
            half = window // 2
            logits_BV, next_pos_B, filled = _prefill(model, cache, ids_BP[:, -half:], real_BP[:, -half:])
            continue
        cached_BK = real_BP[:, -(filled + 1) :]  # the columns in the cache, with the new token
        key_mask = _static_mask(cached_BK, window) if static_cache else cached_BK
        logits_BV = model(next_B1, cache, next_pos_B[:, None], key_mask)[:, -1]
        next_pos_B, filled = next_pos_B + 1, filled + 1
    tokens_BN = torch.cat(drawn, dim=1).tolist()
    return [_cut(tokens, limit, stop_ids) for tokens, limit in zip(tokens_BN, limits)]


def _prefill(
    model: Transformer, cache: KVCache | StaticKVCache, ids_BP: Tensor, real_BP: Tensor
) -> tuple[Tensor, Tensor, int]:
    """Read left-padded prompts into the cache: the last logits [B, V], the next position of
    each row [B], and the slots now filled."""
    positions_BP = (real_BP.long().cumsum(dim=1) - 1).clamp(min=0)  # padding: 0, never attended
    key_mask = _static_mask(real_BP, cache.max_len) if isinstance(cache, StaticKVCache) else real_BP
    logits_BV = model(ids_BP, cache, positions_BP, key_mask)[:, -1]
    return logits_BV, positions_BP[:, -1] + 1, ids_BP.shape[1]


def _growing_cache(model: Transformer) -> KVCache:
    cache = model.new_cache()
    assert isinstance(cache, KVCache)
    return cache


def _static_mask(real_BP: Tensor, slots: int) -> Tensor:
    """The real-token mask over a static cache's slots [B, M]: slots not yet written count as
    real (the causal mask keeps every query off them)."""
    return torch.cat((real_BP, real_BP.new_ones(real_BP.shape[0], slots - real_BP.shape[1])), dim=1)


def _left_pad(rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Rows of ids -> ids [B, P] with each row right-aligned (padding id 0) and real [B, P] bool."""
    P = max(len(r) for r in rows)
    ids_BP = torch.zeros(len(rows), P, dtype=torch.long)
    real_BP = torch.zeros(len(rows), P, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids_BP[b, P - len(r) :] = torch.tensor(r, dtype=torch.long)
        real_BP[b, P - len(r) :] = True
    return ids_BP.to(device), real_BP.to(device)


def _prompt_ids(prompt: Sequence[int] | Tensor, i: int) -> list[int]:
    if isinstance(prompt, Tensor):
        if prompt.dim() != 1 or prompt.is_floating_point():
            raise InputError(f"prompt {i} must be a 1-D tensor of token ids, got {prompt.dtype} {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    ids = [int(t) for t in prompt]
    if not ids:
        raise InputError(f"prompt {i} is empty: every prompt needs at least one token")
    return ids


def _check_ids(ids: Tensor, vocab: int) -> None:
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)][0]
        raise InputError(f"prompt token id {int(bad)} is outside the vocabulary (vocab_size {vocab})")


def _check_sampling(temperature: float, top_k: int | None) -> None:
    if temperature < 0 or (top_k is not None and top_k <= 0):
        raise InputError(f"temperature must be >= 0 and top_k positive, got {temperature}, {top_k}")


def _stop_tensor(stop_ids: Sequence[int], device: torch.device) -> Tensor | None:
    return torch.tensor(list(stop_ids), dtype=torch.long, device=device) if len(stop_ids) else None


def _all_stopped(done_B: Tensor, next_B1: Tensor, stops: Tensor) -> bool:
    """Mark the rows that drew a stop id; True once every row has (one host sync per step)."""
    done_B |= torch.isin(next_B1[:, 0], stops)
    return bool(done_B.all())


def _cut(tokens: list[int], limit: int, stop_ids: Sequence[int]) -> list[int]:
    """A row's tokens up to its limit, ending at (and keeping) its first stop id."""
    tokens = tokens[:limit]
    stops = set(stop_ids)
    for n, t in enumerate(tokens):
        if t in stops:
            return tokens[: n + 1]
    return tokens


def decode(ids: list[int]) -> str:
    """Bytes to text; ids past 255 (models trained on token files) show as U+FFFD."""
    return b"".join(bytes([i]) if i < 256 else "\ufffd".encode() for i in ids).decode("utf-8", errors="replace")

"""Sampling with the KV cache (the command line is `moe generate`, moe/cli/generate.py).

Legend: B = sequences, S = prompt tokens, N = new tokens, V = vocab size.

The prompt is read once (prefill), then each new token costs one single-token forward that
attends over the cached keys and values (GQA: k, v per layer; MLA: the compressed latent).
When prompt + output reach the model's max_seq_len the window slides: the cache is rebuilt
from the last max_seq_len / 2 tokens, so positions stay within the range the model was
trained on. Models trained on the default corpus are byte-level: the prompt is its UTF-8
bytes and the output is decoded with errors="replace".
"""

from __future__ import annotations

import torch
from torch import Tensor

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


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_BS: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Prompt [B, S] -> prompt + continuation [B, S + N]; with return_logits also the logits
    [B, N, V] each new token was drawn from."""
    vocab = model.config.vocab_size
    if prompt_BS.dim() != 2 or prompt_BS.shape[1] == 0:
        raise InputError(f"the prompt must be [batch, tokens] with at least one token, got {tuple(prompt_BS.shape)}")
    if prompt_BS.min() < 0 or prompt_BS.max() >= vocab:
        bad = prompt_BS[(prompt_BS < 0) | (prompt_BS >= vocab)][0]
        raise InputError(f"prompt token id {int(bad)} is outside the vocabulary (vocab_size {vocab})")
    if temperature < 0 or (top_k is not None and top_k <= 0):
        raise InputError(f"temperature must be >= 0 and top_k positive, got {temperature}, {top_k}")
    model.eval()
    window = model.config.max_seq_len
    ids_BS = prompt_BS.to(model.lm_head.weight.device)
    cache = model.new_cache()
    logits_BV = model(ids_BS[:, -window:], cache)[:, -1]
    seen = []
    for i in range(max_new_tokens):
        seen.append(logits_BV.float())
        next_B1 = sample_next(logits_BV, temperature, top_k, generator)
        ids_BS = torch.cat((ids_BS, next_B1), dim=1)
        if i + 1 == max_new_tokens:
            break
        if cache.seq_len >= window:  # slide: re-read the last half window into a fresh cache
            cache = model.new_cache()
            logits_BV = model(ids_BS[:, -(window // 2) :], cache)[:, -1]
        else:
            logits_BV = model(next_B1, cache)[:, -1]
    if return_logits:
        empty = ids_BS.new_zeros((ids_BS.shape[0], 0, vocab), dtype=torch.float32)
        return ids_BS, torch.stack(seen, dim=1) if seen else empty
    return ids_BS


def decode(ids: list[int]) -> str:
    """Bytes to text; ids past 255 (models trained on token files) show as U+FFFD."""
    return b"".join(bytes([i]) if i < 256 else "\ufffd".encode() for i in ids).decode("utf-8", errors="replace")

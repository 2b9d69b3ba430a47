"""Helpers of the Hugging Face parity tests: random weights that make every tensor matter, and
logits / greedy-continuation comparisons in fp32."""

from __future__ import annotations

import torch
from torch import nn

ATOL = 1e-4  # max abs logit difference allowed in fp32
PROMPT_LEN, NEW_TOKENS = 7, 6


@torch.no_grad()
def randomize_(model: nn.Module, seed: int, stacked_in_dim: bool = False) -> nn.Module:
    """Weights with activations of order 1 throughout, norms away from 1 and selection biases away
    from 0 (default inits leave those at 1 and 0, which would hide a swapped or dropped tensor).

    stacked_in_dim: our stacked experts keep the input dim at -2 ([E, D, 2F], [E, F, D]); every
    other matrix (nn.Linear, transformers' stacked experts) keeps it at -1.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g) + (0.0 if name.endswith("bias") else 1.0))
            continue
        fan_in = p.shape[-2] if stacked_in_dim and name.endswith(("w_in", "w_out")) else p.shape[-1]
        sharp = 3.0 if "gate.weight" in name or "router.weight" in name else 1.0  # clear top-k margins
        p.copy_(sharp * torch.randn(p.shape, generator=g) / fan_in**0.5)
    for name, b in model.named_buffers():
        if name.endswith(("expert_bias", "e_score_correction_bias")):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def prompt(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_full(logits_fn, ids: torch.Tensor, steps: int = NEW_TOKENS) -> torch.Tensor:
    """Greedy continuation, recomputing the whole sequence each step (the reference side)."""
    for _ in range(steps):
        ids = torch.cat((ids, logits_fn(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids


@torch.no_grad()
def greedy_cached(model, ids: torch.Tensor, steps: int = NEW_TOKENS) -> torch.Tensor:
    """Greedy continuation with our KV cache: the prompt once, then one token at a time."""
    cache = model.new_cache()
    logits = model(ids, cache)
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, token), dim=1)
        logits = model(token, cache)
    return ids


@torch.no_grad()
def assert_parity(reference_fn, ours, vocab_size: int) -> None:
    """Same logits (fp32, max abs difference < ATOL) and the same greedy continuation."""
    ids = prompt(vocab_size)
    expected, got = reference_fn(ids), ours(ids)
    assert expected.std() > 0.3, "logits too flat for the comparison to mean anything"
    diff = (expected - got).abs().max().item()
    assert diff < ATOL, f"max abs logit difference {diff:.2e}"
    torch.testing.assert_close(greedy_cached(ours, ids), greedy_full(reference_fn, ids), rtol=0, atol=0)


def hf_logits(hf_model):
    """The logits function of a transformers model, on its readable per-expert loop: the default
    grouped_mm path of transformers v5 rejects odd sizes on CPU ("strides should be multiple of 16")."""
    if hasattr(hf_model, "set_experts_implementation"):
        hf_model.set_experts_implementation("eager")
    return lambda ids: hf_model(ids).logits.float()

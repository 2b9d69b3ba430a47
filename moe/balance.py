"""Load-balancing: auxiliary losses and the aux-loss-free bias update.

Legend: B = sequences, S = tokens per sequence, T = B*S tokens, E = experts, K = top-k.

All three losses equal a known constant when routing is perfectly uniform, which is how
the tests pin them to their papers:
- Switch aux loss (arXiv 2101.03961, eq. 4, top-k form of DeepSeek-V3 eq. 17-19):
  L = E * sum_i f_i * P_i, f_i = share of the T*K assignments sent to expert i,
  P_i = mean router probability of expert i. Uniform routing gives 1.
- Sequence-wise aux loss (DeepSeek-V3 eq. 17-20): the same quantity per sequence,
  averaged over sequences, so one sequence cannot hide its imbalance in the batch.
- Router z-loss (ST-MoE, arXiv 2202.08906, eq. 5): mean over tokens of logsumexp(logits)^2.

The aux-loss-free update (DeepSeek-V3 sec. 2.1.2) nudges a selection-only bias after every
optimizer step: b_i += u * sign(mean_load - load_i). Ling 2.0 re-centres the update to zero
mean so the biases do not drift together ("zero_mean").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import MoEConfig
from .errors import InputError
from .router import Routing


def expert_counts(idx_BA: Tensor, num_experts: int) -> Tensor:
    """Per row of expert ids [N, A], how many point at each expert: [N, E] float."""
    counts_BE = torch.zeros(idx_BA.shape[0], num_experts, device=idx_BA.device)
    return counts_BE.scatter_add_(1, idx_BA, torch.ones_like(idx_BA, dtype=counts_BE.dtype))


def switch_aux_loss(probs_TE: Tensor, topk_idx_TK: Tensor) -> Tensor:
    """E * sum_i f_i P_i over the whole batch; 1.0 when routing is uniform."""
    num_experts = probs_TE.shape[-1]
    f_E = expert_counts(topk_idx_TK.reshape(1, -1), num_experts)[0] / topk_idx_TK.numel()
    p_E = probs_TE.mean(dim=0)
    return num_experts * (f_E * p_E).sum()


def seq_aux_loss(probs_BSE: Tensor, topk_idx_BSK: Tensor) -> Tensor:
    """The Switch loss computed within each sequence, then averaged over sequences."""
    return probs_BSE.shape[-1] * sequence_fp(probs_BSE, topk_idx_BSK).mean()


def sequence_fp(probs_BSE: Tensor, topk_idx_BSK: Tensor) -> Tensor:
    """sum_i f_i P_i within each sequence: [B] (the sequence-wise loss is E times their mean).
    Sequences of no tokens (S = 0) give 0."""
    B, S, E = probs_BSE.shape
    K = topk_idx_BSK.shape[-1]
    f_BE = expert_counts(topk_idx_BSK.reshape(B, S * K), E) / max(S * K, 1)
    p_BE = probs_BSE.sum(dim=1) / max(S, 1)
    return (f_BE * p_BE).sum(dim=-1)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """Penalises large router logits, which make the softmax brittle in low precision."""
    return router_z_losses(logits_TE).mean()


def router_z_losses(logits_TE: Tensor) -> Tensor:
    """The z-loss of each token: [T]."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square()


# --------------------------------------------------------------------------- over a batch scope
#
# The layer computes the losses of the whole batch (moe/scope.py) from sums that processes can
# add up: each loss above is a mean, so it is a sum over tokens (or sequences) divided by their
# count. The functions above stay as the definitions; tests hold the two forms together.


def partial_sums(route: Routing, num_sequences: int | None, config: MoEConfig) -> dict[str, Tensor]:
    """This process's differentiable sums for the enabled losses: "probs" [E] (the Switch form,
    also the sequence-wise loss when the input is one sequence: num_sequences None), "seq" [1]
    (sum_i f_i P_i summed over sequences), "z" [1] (summed over tokens)."""
    sums = {}
    if config.aux_loss_coef or (config.seq_aux_loss_coef and num_sequences is None):
        sums["probs"] = route.probs.sum(dim=0)
    if config.seq_aux_loss_coef and num_sequences is not None:
        (T, E), K, B = route.probs.shape, route.topk_idx.shape[-1], num_sequences
        S = T // B if B else 0  # spelled out: view(B, -1, E) cannot infer S from zero elements
        sums["seq"] = sequence_fp(route.probs.view(B, S, E), route.topk_idx.view(B, S, K)).sum().reshape(1)
    if config.z_loss_coef:
        sums["z"] = router_z_losses(route.logits).sum().reshape(1)
    return sums


def losses_from_sums(
    sums: dict[str, Tensor], load_E: Tensor, tokens: Tensor, sequences: Tensor, top_k: int, config: MoEConfig
) -> dict[str, Tensor]:
    """The enabled losses of the batch, unweighted, from its summed partials. A batch of no
    tokens (or no sequences) has losses of exactly 0: its sums are 0, and the counts they are
    divided by are taken as at least 1."""
    losses = {}
    tokens, sequences = tokens.clamp(min=1), sequences.clamp(min=1)
    if "probs" in sums:
        f_E = load_E.to(tokens.dtype) / (tokens * top_k)
        switch = load_E.numel() * (f_E * (sums["probs"] / tokens)).sum()
        if config.aux_loss_coef:
            losses["switch_aux"] = switch
        if config.seq_aux_loss_coef and "seq" not in sums:
            losses["seq_aux"] = switch
    if "seq" in sums:
        losses["seq_aux"] = load_E.numel() * (sums["seq"][0] / sequences)
    if "z" in sums:
        losses["z_loss"] = sums["z"][0] / tokens
    return losses


@torch.no_grad()
def bias_update(load_E: Tensor, rate: float, mode: str) -> Tensor:
    """The step to add to the expert bias given the load (assignments) since the last step.

    Underloaded experts (load below the mean) get +rate, overloaded ones -rate, balanced 0.
    """
    load_E = load_E.float()
    step = rate * torch.sign(load_E.mean() - load_E)
    if mode == "zero_mean":
        step = step - step.mean()
    elif mode != "sign":
        raise InputError(f"unknown bias_update mode {mode!r} (expected 'sign' or 'zero_mean')")
    return step

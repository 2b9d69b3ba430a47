"""Router: which k experts each token goes to, and with what weight.

Legend: T = tokens, D = hidden size, E = experts, K = top-k, G = expert groups, Eg = E / G experts
per group.

The same module is the Mixtral / Qwen3 gate (softmax over all experts, top-k, optional
renormalisation) and the DeepSeek-V3 / Ling 2.0 gate (sigmoid scores, a selection-only
expert bias, group-limited top-k, renormalisation, `routed_scaling_factor`), depending on
the `MoEConfig`. Scores are computed in fp32: in bf16, near-tied logits flip the top-k
choice between otherwise identical runs.

Worked example (softmax, E=4, K=2, no groups, renormalised):
    scores = softmax([2, 1, 0, -1]) = [0.644, 0.237, 0.087, 0.032]
    topk_idx = [0, 1]; topk_weight = [0.644, 0.237] / 0.881 = [0.731, 0.269]
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig
from .experts import autocasting

# Added to the renormalisation denominator so that all-zero sigmoid scores cannot divide by 0.
RENORM_EPS = 1e-20


@dataclass
class Routing:
    topk_idx: Tensor  # [T, K] int64, chosen experts, best first
    topk_weight: Tensor  # [T, K] fp32, combine weights (unbiased scores, renormalised, scaled)
    probs: Tensor  # [T, E] fp32, scores normalised to sum to 1 per token (for balancing losses)
    logits: Tensor  # [T, E] fp32, raw router logits (for the z-loss)


class Router(nn.Module):
    """x_TD [T, D] -> Routing; the gate weight [E, D] follows the model's dtype, the scores are fp32.

    `expert_bias` [E] (with `MoEConfig.expert_bias`) stays float32 whatever the model's dtype:
    `.to(torch.bfloat16)`, `.half()`, `.double()` and `.to(device, dtype)` move it but keep its
    dtype (see `_apply`), because bf16 has 8 bits of mantissa and a bias near 0.5 takes steps
    of 2**-9: an update of 1e-3 would round to nothing. It is saved and loaded as float32.
    """

    expert_bias: Tensor | None

    def __init__(self, config: MoEConfig, hidden_size: int):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))  # [E, D]
        # Aux-loss-free balancing (DeepSeek-V3 sec. 2.1.2): a bias that only shifts which
        # experts are selected, updated outside autograd after each optimizer step.
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        nn.init.normal_(self.weight, std=0.02)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) (and .half(), .bfloat16(), ...) casts every floating buffer. The bias
        # keeps its fp32 values: the converted tensor only tells us the device to move them to.
        fp32_bias = self.expert_bias
        super()._apply(fn, recurse)
        moved = self.expert_bias
        if fp32_bias is not None and moved is not None and moved.dtype != torch.float32:
            self.expert_bias = moved.float() if fp32_bias.is_meta or moved.is_meta else fp32_bias.to(moved.device)
        return self

    def forward(self, x_TD: Tensor) -> Routing:
        cfg = self.config
        logits_TE = _Fp32Linear.apply(x_TD, self.weight)
        if cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + RENORM_EPS)

        choice_TE = scores_TE if self.expert_bias is None else scores_TE + self.expert_bias.float()
        if cfg.n_group > 1:
            choice_TE = limit_to_top_groups(choice_TE, cfg.n_group, cfg.topk_group)
        topk_idx = choice_TE.topk(cfg.top_k, dim=-1).indices  # [T, K]

        weight_TK = scores_TE.gather(1, topk_idx)  # weights never see the bias
        if cfg.norm_topk_prob:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + RENORM_EPS)
        weight_TK = weight_TK * cfg.routed_scaling_factor
        return Routing(topk_idx, weight_TK, probs_TE, logits_TE)


def limit_to_top_groups(choice_TE: Tensor, n_group: int, topk_group: int) -> Tensor:
    """Mask (to -inf) every expert outside the token's `topk_group` best groups.

    A group's score is the sum of its two best selection scores (DeepSeek-V3 / Ling 2.0),
    or its one score when groups hold a single expert.
    """
    T, E = choice_TE.shape
    grouped_TGEg = choice_TE.view(T, n_group, E // n_group)
    best = min(2, E // n_group)
    group_score_TG = grouped_TGEg.topk(best, dim=-1).values.sum(dim=-1)
    keep_idx = group_score_TG.topk(topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, keep_idx, True)
    keep_TE = keep_TG.repeat_interleave(E // n_group, dim=1)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))


class _Fp32Linear(torch.autograd.Function):
    """F.linear(x.float(), w.float()), keeping x and w in their own dtypes for the backward.

    Plain autograd would keep the fp32 copy of x [T, D] for the gate's gradient: 4D bytes per
    token, 28% of what the whole layer kept per token on the Triton backend at Ling-1T shapes
    (bench/activation_memory.py). The backward upcasts again and computes in fp32.
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, weight_ED: Tensor) -> Tensor:
        ctx.save_for_backward(x_TD, weight_ED)
        return F.linear(x_TD.float(), weight_ED.float())

    @staticmethod
    def backward(ctx, grad_TE: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_TD, weight_ED = ctx.saved_tensors
        grad_TE = grad_TE.float()
        # autocast would run these in bf16; where it is on, turn it off (it never is on meta)
        with torch.autocast(grad_TE.device.type, enabled=False) if autocasting(grad_TE.device) else nullcontext():
            grad_x = (grad_TE @ weight_ED.float()).to(x_TD.dtype) if ctx.needs_input_grad[0] else None
            grad_w = (grad_TE.t() @ x_TD.float()).to(weight_ED.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w

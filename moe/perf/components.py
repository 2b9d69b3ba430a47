"""The pieces of a decoder, built one at a time, timed and FLOP-counted on their own.

Legend: B = sequences, S = tokens per sequence, T = B*S tokens, D = hidden size, V = vocab,
E = routed experts, K = top-k, A = T*K assignments, P = expert-parallel degree.

A full-size model does not fit one GPU, but one of its layers does. `moe calibrate` and
`moe bench layers` time these components and add them up:

    attention  attn_norm + attention (GQA or MLA) on [B, S, D]          x num_layers
    moe        ffn_norm + one expert-parallel rank's share of the MoE    x MoE layers
    dense      ffn_norm + dense SwiGLU MLP                               x dense layers
    head       embedding lookup + final norm + LM head + cross-entropy   x 1

FLOPs follow moe/perf/flops.py exactly (6 x active matmul params per token + causal attention),
so the components of a model sum to `flops.count(config).train_flops_per_token`.

One expert-parallel rank (`RankMoE`): with P ranks each holding E/P experts and balanced
routing, a rank sends away its T tokens' A = T*K assignments and receives as many back from
the other ranks, for its own experts. Its compute is therefore: the router over all E
experts for its T tokens, A rows through E/P experts, the combine, and the shared experts.
RankMoE does exactly that without the all-to-all (modelled in moe/perf/projection.py): an MoE
layer whose dispatcher (RankDispatcher) routes over all E experts, then hands the A permuted
rows to its E/P local experts, local expert j taking the rows of global experts
j*P .. j*P+P-1 (contiguous after the sort).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import Attention, MLAttention
from ..config import ModelConfig, MoEConfig
from ..dispatch import DispatchPlan, permute, unpermute
from ..dispatcher import Dispatched, Dispatcher
from ..errors import InputError
from ..experts import Experts
from ..layer import MoE
from ..mlp import MLP
from ..model import layer_plan
from ..norm import RMSNorm
from .flops import active_params, attention_flops_per_token

KINDS = ("attention", "moe", "dense", "head")


class RankDispatcher(Dispatcher):
    """One expert-parallel rank's rows without the all-to-all: all A rows go to the E/P local
    experts, local expert j taking global experts j*P .. j*P+P-1."""

    def __init__(self, ep_degree: int):
        self.ep_degree = ep_degree

    def dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> Dispatched:
        # [E/P] end rows of each local expert: a strided view, which torch_grouped_mm makes contiguous
        return Dispatched(permute(x_TD, plan), plan.offs[self.ep_degree - 1 :: self.ep_degree])

    def collect(self, y_RD: Tensor, dispatched: Dispatched, plan: DispatchPlan) -> Tensor:
        return unpermute(y_RD, plan)


class RankMoE(MoE):
    """The compute of one expert-parallel rank of an MoE layer (see the module docstring).

    Built on the meta device and then materialised, so the E - E/P experts it does not hold
    never take memory. With P = 1 it computes exactly what `MoE` computes.
    """

    def __init__(self, config: MoEConfig, hidden_size: int, ep_degree: int, device: torch.device | str):
        if ep_degree < 1 or config.num_experts % ep_degree:
            raise InputError(f"expert-parallel degree {ep_degree} must divide num_experts ({config.num_experts})")
        with torch.device("meta"):
            super().__init__(config, hidden_size)
            local = dataclasses.replace(
                config,
                num_experts=config.num_experts // ep_degree,
                n_group=1,
                topk_group=1,
                top_k=min(config.top_k, config.num_experts // ep_degree),
            )
            self.experts = Experts(local, hidden_size)
        self.ep_degree = ep_degree
        self.dispatcher = RankDispatcher(ep_degree)
        self.to_empty(device=device)
        self.aux_loss = torch.zeros((), device=device)
        with torch.no_grad():
            for p in self.parameters():
                nn.init.normal_(p, std=0.02)
            for b in self.buffers():
                b.zero_()  # expert bias and load counters start at zero, as in MoE


class AttentionPart(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = (MLAttention if config.attention == "mla" else Attention)(config, 0)

    def forward(self, x_BSD: Tensor) -> Tensor:
        positions_S = torch.arange(x_BSD.shape[1], device=x_BSD.device)
        return self.attn(self.norm(x_BSD), positions_S)


class FFNPart(nn.Module):
    def __init__(self, config: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn = ffn

    def forward(self, x_BSD: Tensor) -> Tensor:
        return self.ffn(self.norm(x_BSD))


class HeadPart(nn.Module):
    """Token ids in, next-token loss out: the lookup, the final norm, the LM head, the loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids_BS: Tensor) -> Tensor:
        logits = self.lm_head(self.norm(self.embed_tokens(ids_BS)))  # [B, S, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), ids_BS.flatten())


def layer_counts(config: ModelConfig) -> dict[str, int]:
    """How many of each component the model has."""
    plan = layer_plan(config)
    return {"attention": config.num_layers, "moe": plan.count(True), "dense": plan.count(False), "head": 1}


def build(kind: str, config: ModelConfig, ep_degree: int = 1, device: torch.device | str = "cpu") -> nn.Module:
    """One component with random weights on `device` (fp32; cast it for other dtypes)."""
    if kind == "moe":
        if config.moe is None:
            raise InputError(f"config {config.name!r} has no MoE layers")
        return FFNPart(config, RankMoE(config.moe, config.hidden_size, ep_degree, device)).to(device)
    with torch.device(device):
        if kind == "attention":
            return AttentionPart(config)
        if kind == "dense":
            return FFNPart(config, MLP(config.hidden_size, config.ffn_size))
        if kind == "head":
            return HeadPart(config)
    raise ValueError(f"unknown component {kind!r} (expected one of {', '.join(KINDS)})")


def train_flops_per_token(kind: str, config: ModelConfig, seq_len: int, ep_degree: int = 1) -> float:
    """Forward + backward FLOPs per token of one component, by moe/perf/flops.py's conventions;
    counted on the meta device, so full-size components cost nothing."""
    module = build(kind, config, ep_degree, device="meta")
    if kind == "moe":
        return 6.0 * active_params(module)
    if kind == "head":
        # The lookup is no matmul; a tied table is used once more, as the LM head.
        matmul = sum(p.numel() for p in module.parameters()) - module.embed_tokens.weight.numel()
        return 6.0 * (matmul + (module.lm_head.weight.numel() if config.tie_embeddings else 0))
    params = sum(p.numel() for p in module.parameters())
    attention = attention_flops_per_token(config, seq_len) / config.num_layers if kind == "attention" else 0.0
    return 6.0 * params + attention


def make_step(
    kind: str, module: nn.Module, config: ModelConfig, batch: int, seq_len: int, backward: bool = True
) -> Callable[[], object]:
    """A closure running the component on random input: forward, or forward + backward.

    The backward computes the input's gradient (what the layer below needs) and every
    weight's, through torch.autograd.grad so that nothing accumulates between calls.
    """
    device = next(module.parameters()).device
    dtype = next(p for p in module.parameters() if p.dim() > 1).dtype
    params = [p for p in module.parameters() if p.requires_grad]
    if kind == "head":
        ids = torch.randint(config.vocab_size, (batch, seq_len), device=device)
        if not backward:
            return lambda: module(ids)
        return lambda: torch.autograd.grad(module(ids), params)
    x = torch.randn(batch, seq_len, config.hidden_size, device=device, dtype=dtype)
    if not backward:
        return lambda: module(x)
    x.requires_grad_(True)
    grad_out = torch.randn_like(x)
    return lambda: torch.autograd.grad(module(x), [x, *params], grad_out, allow_unused=True)


def scale_config(config: ModelConfig, factor: int) -> ModelConfig:
    """`config` with every width divided by `factor` (experts, top-k, layers, head dims kept),
    for timing full-size shapes where they do not fit or take too long (CPU runs in CI).
    Times measured on the scaled component are extrapolated by the FLOP ratio: that assumes
    the same FLOP/s at both sizes, which is false on a GPU and rough on a CPU; say so."""
    if factor == 1:
        return config

    def cut(value: int | None) -> int | None:
        return None if value is None else max(1, value // factor)

    heads = cut(config.num_heads)
    kv = config.num_kv_heads and max(d for d in range(1, heads + 1) if heads % d == 0 and d <= cut(config.num_kv_heads))
    moe = config.moe and dataclasses.replace(
        config.moe, expert_ffn_size=cut(config.moe.expert_ffn_size), shared_ffn_size=cut(config.moe.shared_ffn_size)
    )
    head_dim = config.head_dim or config.dim_per_head  # keep per-head widths
    return dataclasses.replace(
        config,
        name=f"{config.name}.div{factor}"[:128],  # a config name: letters, digits, "_.+-" (at most 128)
        vocab_size=cut(config.vocab_size),
        hidden_size=cut(config.hidden_size),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=cut(config.ffn_size),
        q_lora_rank=cut(config.q_lora_rank),
        kv_lora_rank=cut(config.kv_lora_rank),
        moe=moe,
    )

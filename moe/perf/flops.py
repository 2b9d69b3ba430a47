"""Parameter counts and training FLOPs per token, from a model built on the meta device.

Conventions (those of the published totals):
- total params count every weight once (tied embeddings once), MTP modules excluded;
- active params count what one token touches: every non-expert weight, the shared experts,
  and top_k / num_experts of the routed experts of each MoE layer (routers included);
- training FLOPs per token = 6 x active params other than the input embedding (forward 2,
  backward 4; the lookup is no matmul, the LM head is; norm weights are counted but too few
  to matter) + causal attention: per layer and token, the forward
  does 2*H*(Dqk + Dv) multiply-adds over on average (S+1)/2 earlier positions, times 3
  for forward + backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..layer import MoE
from ..model import Transformer

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp8": 1}


@dataclass
class ModelCounts:
    params_total: int
    params_active: int
    params_embedding: int  # input embedding table (not a matmul)
    params_routed: int  # all routed-expert weights
    matmul_params_active: int
    attention_flops_per_token: float
    seq_len: int

    @property
    def train_flops_per_token(self) -> float:
        return 6.0 * self.matmul_params_active + self.attention_flops_per_token

    @property
    def forward_flops_per_token(self) -> float:
        return self.train_flops_per_token / 3.0

    def weight_bytes(self, dtype: str) -> int:
        return self.params_total * BYTES_PER_PARAM[dtype]


def count(config: ModelConfig, seq_len: int | None = None) -> ModelCounts:
    """Counts for `config` at context `seq_len` (default: config.max_seq_len); no memory used."""
    seq_len = seq_len or config.max_seq_len
    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    routed = sum(moe.experts.w_in.numel() + moe.experts.w_out.numel() for moe in model.moe_layers())
    active = active_params(model)
    # A tied table is one parameter but two uses: a lookup (free) and the LM head (a matmul).
    matmul_active = active - embedding + (embedding if config.tie_embeddings else 0)
    return ModelCounts(
        total, active, embedding, routed, matmul_active, attention_flops_per_token(config, seq_len), seq_len
    )


def active_params(module: nn.Module) -> int:
    """Weights one token touches in `module` (a model, or any piece of one): every parameter
    (tied ones once), less the routed experts it skips: each MoE layer's token uses top_k of
    the experts in its stack (a calibration RankMoE's stack holds only one rank's experts)."""
    active = sum(p.numel() for p in module.parameters())
    for layer in module.modules():
        if isinstance(layer, MoE):
            stack = layer.experts.w_in.numel() + layer.experts.w_out.numel()
            active -= stack - layer.config.top_k * (stack // layer.experts.w_in.shape[0])
    return active


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """QK^T and AV FLOPs per token for training (fwd + bwd), causal, at context seq_len."""
    if config.attention == "mla":
        d_qk, d_v = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    else:
        d_qk = d_v = config.dim_per_head
    mean_context = (seq_len + 1) / 2
    return 3 * config.num_layers * 2 * config.num_heads * (d_qk + d_v) * mean_context

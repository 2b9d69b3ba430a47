"""RMSNorm, computed in fp32 whatever the input dtype (as Llama, Mixtral, DeepSeek-V3 and
Qwen3 do): in bf16 the mean of squares loses the precision the normalisation relies on."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

"""The decoder: embeddings -> blocks (attention + dense MLP or MoE FFN) -> norm -> logits.

Legend: B = sequences, S = tokens per sequence (with a KV cache: the new ones), D = hidden size,
V = vocab size, L = layers.

    model = Transformer(load_config("configs/tiny.yaml"))
    logits = model(input_ids)                  # [B, S] -> [B, S, V]
    loss = cross_entropy(logits, targets) + model.aux_loss()
    loss.backward(); opt.step(); update_expert_biases(model)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .attention import Attention, KVCache, MLAttention
from .config import ModelConfig
from .layer import MoE
from .mlp import MLP
from .norm import RMSNorm


def layer_plan(config: ModelConfig) -> list[bool]:
    """Which layers have an MoE FFN (True) rather than a dense one.

    Precedence: an explicit `moe_layers` list; else `moe_pattern` ("2-4": 2 dense layers then
    4 MoE layers, repeated to the depth); else `first_k_dense` dense layers followed by an MoE
    layer every `moe_every`-th layer (moe_every=2: dense, MoE, dense, MoE, ...).
    """
    L = config.num_layers
    if config.moe is None:
        return [False] * L
    if config.moe_layers is not None:
        chosen = set(config.moe_layers)
        return [i in chosen for i in range(L)]
    if config.moe_pattern is not None:
        runs = [int(n) for n in config.moe_pattern.split("-")]
        period = [is_moe for i, n in enumerate(runs) for is_moe in [i % 2 == 1] * n]
        return [period[i % len(period)] for i in range(L)]
    k, n = config.first_k_dense, config.moe_every
    return [i >= k and (i - k + 1) % n == 0 for i in range(L)]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, use_moe: bool):
        super().__init__()
        D = config.hidden_size
        self.attn_norm = RMSNorm(D, config.norm_eps)
        self.attn = (MLAttention if config.attention == "mla" else Attention)(config, layer_idx)
        self.ffn_norm = RMSNorm(D, config.norm_eps)
        self.ffn = MoE(config.moe, D) if use_moe and config.moe is not None else MLP(D, config.ffn_size)

    def forward(self, x_BSD: Tensor, positions_S: Tensor, cache: KVCache | None = None) -> Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), positions_S, cache)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, use_moe) for i, use_moe in enumerate(layer_plan(config)))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) weights; residual-output projections scaled by 1/sqrt(2L) (GPT-2),
        so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm weights stay 1, biases 0
            residual_out = name.endswith(("o_proj.weight", "down_proj.weight", "experts.w_out"))
            nn.init.normal_(p, std=out_std if residual_out else std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()

    def forward(self, input_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits [B, S, V] for input_ids [B, S]; with a cache, the S tokens continue it."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        start = cache.seq_len if cache is not None else 0
        positions_S = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x_BSD = self.embed_tokens(input_ids)
        for block in self.layers:
            x_BSD = block(x_BSD, positions_S, cache)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        return self.lm_head(self.norm(x_BSD))

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def aux_loss(self) -> Tensor:
        """Sum of the weighted balancing losses of every MoE layer from the last forward."""
        losses = [m.aux_loss for m in self.moe_layers()]
        return torch.stack(losses).sum() if losses else self.lm_head.weight.new_zeros(())

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    # Checkpoints. The file layouts live in moe.io, which stands above this module and registers
    # them in CHECKPOINT_FORMATS when `import moe` loads it: the model does not import its readers.

    def save_pretrained(self, directory: str | Path, format: str = "moe") -> None:
        """Write config.json + safetensors: our layout ("moe") or Hugging Face's ("hf")."""
        checkpoint_format(format).save(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> Transformer:
        """Load a folder written by `save_pretrained` (or a training checkpoint)."""
        return checkpoint_format("moe").load(directory, **kwargs)

    @classmethod
    def from_hf(cls, directory: str | Path, **kwargs) -> Transformer:
        """Load a Hugging Face model folder (Mixtral, Qwen3-MoE, DeepSeek-V3, Ling 2.0)."""
        return checkpoint_format("hf").load(directory, **kwargs)


class CheckpointFormat(NamedTuple):
    save: Callable[[Transformer, str | Path], None]
    load: Callable[..., Transformer]


CHECKPOINT_FORMATS: dict[str, CheckpointFormat] = {}  # filled by moe.io: "moe" and "hf"


def checkpoint_format(name: str) -> CheckpointFormat:
    if name not in CHECKPOINT_FORMATS:
        raise ValueError(f"unknown checkpoint format {name!r} (expected one of {', '.join(CHECKPOINT_FORMATS)})")
    return CHECKPOINT_FORMATS[name]

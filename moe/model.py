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
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from .attention import Attention, Cache, KVCache, MLAttention, StaticKVCache, causal_mask
from .config import ModelConfig
from .errors import InputError
from .layer import MoE
from .mlp import MLP
from .mtp import MTPModule, mtp_loss
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
        self.attn: Attention | MLAttention = (MLAttention if config.attention == "mla" else Attention)(
            config, layer_idx
        )
        self.ffn_norm = RMSNorm(D, config.norm_eps)
        self.ffn = MoE(config.moe, D) if use_moe and config.moe is not None else MLP(D, config.ffn_size)

    def forward(
        self, x_BSD: Tensor, positions_S: Tensor, cache: Cache | None = None, mask: Tensor | None = None
    ) -> Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), positions_S, cache, mask)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class Transformer(nn.Module):
    """A decoder-only transformer: input_ids [B, S] -> logits [B, S, V].

    `Transformer(config)` builds embed_tokens [V, D], L blocks (attention, GQA or MLA, then a
    dense SwiGLU MLP or an MoE layer as `layer_plan(config)` says), a final RMSNorm and
    lm_head [V, D], initialised by `reset_parameters`. Parameters follow `.to(dtype)`; the
    routers' expert_bias and the RoPE frequencies stay float32. `aux_loss()` sums the MoE
    layers' weighted balancing losses of the last forward.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, use_moe) for i, use_moe in enumerate(layer_plan(config)))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Multi-token prediction modules (moe/mtp.py), each with a block like the last layer's;
        # built before reset_parameters so that they are initialised with the rest.
        last_is_moe = layer_plan(config)[-1]
        self.mtp = nn.ModuleList(MTPModule(config, Block(config, 0, last_is_moe)) for _ in range(config.num_mtp_layers))
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

    def forward(
        self,
        input_ids: Tensor,
        cache: Cache | None = None,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """input_ids [B, S] (int64 or int32, each in 0..V-1) -> logits [B, S, V] in the model's dtype.

        With a cache (`new_cache()`), the S tokens continue the ones already in it (positions
        cache.seq_len .. cache.seq_len + S - 1) and the cache grows by S. S = 0 or B = 0 give
        empty logits. A wrong ndim, a non-integer dtype, another device than the model's, or
        (for ids on the CPU) an id outside 0..V-1 raise `moe.errors.InputError`. Ids on a GPU
        are not range-checked here (that would cost a host sync per call; `moe train` checks
        its corpus and `generate` its prompt once): an id outside the vocabulary fails inside
        the embedding, as a device-side assert. Compiled on a CPU, inductor's bounds check
        raises a RuntimeError instead.

        Batches of sequences of different lengths (left-padded, see moe.generate.generate_batch):
        `positions` [B, S] gives each token's RoPE position (default: its cache slot), and
        `attention_mask` [B, K] (bool or 0/1; K = the keys this call attends over: cached + new
        tokens, or a static cache's max_len) marks the real tokens; padding keys are never
        attended. With a static cache (`new_cache(static=True, ...)`) every call attends over
        max_len slots under a mask, so that a decode step has fixed shapes.
        """
        return self.lm_head(self.norm(self.hidden(input_ids, cache, positions, attention_mask)))

    def hidden(
        self,
        input_ids: Tensor,
        cache: Cache | None = None,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """input_ids [B, S] -> the last block's output h [B, S, D], before the final norm: what
        `forward` turns into logits, and what a multi-token-prediction head continues from.
        Same arguments, checks and cache behaviour as `forward`."""
        self._check_ids(input_ids)
        B, S = input_ids.shape
        slots_S = cache.slots(S, input_ids.device) if cache is not None else torch.arange(S, device=input_ids.device)
        key_len = cache.key_len(S) if cache is not None else S
        self._check_positions(positions, attention_mask, B, S, key_len)
        mask = None  # None: plain causal attention, the fast path of scaled_dot_product_attention
        if attention_mask is not None or (cache is not None and cache.static):
            mask = causal_mask(slots_S, key_len, attention_mask)
        positions = slots_S if positions is None else positions
        x_BSD = self.embed_tokens(input_ids)
        for block in self.layers:
            x_BSD = block(x_BSD, positions, cache, mask)
        if cache is not None:
            cache.advance(S)
        return x_BSD

    @staticmethod
    def _check_positions(positions: Tensor | None, attention_mask: Tensor | None, B: int, S: int, K: int) -> None:
        if positions is not None and tuple(positions.shape) not in ((B, S), (S,)):
            raise InputError(f"positions must be [batch, tokens] = [{B}, {S}] or [{S}], got {tuple(positions.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, K):
            raise InputError(
                f"attention_mask must be [batch, keys] = [{B}, {K}] (cached + new tokens, or a static "
                f"cache's max_len), got {tuple(attention_mask.shape)}"
            )

    def _check_ids(self, input_ids: Tensor) -> None:
        vocab, device = self.config.vocab_size, self.embed_tokens.weight.device
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
        if input_ids.device != device:
            raise InputError(f"input_ids must be on the model's device {device}, got {input_ids.device}")
        # On the CPU the range check costs no sync; under torch.compile it would be a graph break.
        if input_ids.device.type == "cpu" and input_ids.numel() and not torch.compiler.is_compiling():
            bad = (input_ids < 0) | (input_ids >= vocab)
            if bad.any():
                b, s = (int(i) for i in bad.nonzero()[0])
                raise InputError(
                    f"token id {int(input_ids[b, s])} at [{b}, {s}] is outside the vocabulary (0..{vocab - 1})"
                )

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def aux_loss(self) -> Tensor:
        """Sum of the weighted balancing losses of every MoE layer from the last forward."""
        losses = [m.aux_loss for m in self.moe_layers()]
        return torch.stack(losses).sum() if losses else self.lm_head.weight.new_zeros(())

    def new_cache(
        self, static: bool = False, batch_size: int | None = None, max_len: int | None = None
    ) -> KVCache | StaticKVCache:
        """An empty KV cache for `forward(ids, cache)`: per layer, GQA keeps k and v
        [B, Hkv, S, Dh], MLA its latent c_kv [B, S, C] and k_rope [B, 1, S, Dr]. One cache per
        batch of sequences.

        Default: a growing cache, S growing with each call; `cache.seq_len` counts the tokens in
        it. static=True: a `StaticKVCache` preallocated to S = max_len (default: the config's
        max_seq_len) for batch_size sequences, in the model's dtype and on its device, whose
        decode steps have fixed shapes (torch.compile, CUDA graphs); `cache.index` (a tensor)
        counts the tokens in it."""
        if not static:
            return KVCache(len(self.layers))
        if batch_size is None or batch_size < 1:
            raise InputError(f"a static cache needs batch_size >= 1, got {batch_size}")
        max_len = self.config.max_seq_len if max_len is None else max_len
        if max_len < 1:
            raise InputError(f"a static cache needs max_len >= 1, got {max_len}")
        shapes = [cast(Block, block).attn.cache_shapes(batch_size, max_len) for block in self.layers]
        weight = self.lm_head.weight
        return StaticKVCache(shapes, weight.dtype, weight.device)

    # Checkpoints. The file layouts live in moe.io, which stands above this module and registers
    # them in CHECKPOINT_FORMATS when `import moe` loads it: the model does not import its readers.

    def save_pretrained(self, directory: str | Path, format: str = "moe", **kwargs) -> None:
        """Write config.json + safetensors into `directory`.

        format "moe" (ours): every tensor under its name here (layers.{i}.ffn.experts.w_in
        [E, D, 2F], ..., the routers' expert_bias [E] in float32), sharded above 2 GiB;
        `overwrite=True` replaces the model files of a folder that has them. format "hf": a
        folder transformers loads, as the first Hugging Face family that expresses the model
        (per-expert tensors under the published checkpoints' names); `family=`, `dtype=`,
        `max_shard_bytes=`. kwargs go to the format's writer (moe.io.save_pretrained,
        moe.io.hf.save_hf); an unknown format raises InputError.
        """
        checkpoint_format(format).save(self, directory, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> Transformer:
        """The model in a folder written by `save_pretrained` (or a training checkpoint, also a
        sharded one): the config from config.json, every tensor checked against the shape the
        config gives it (misnamed, missing or misshapen: InputError naming it), exact round
        trip. `device=`, `dtype=`: where and in what dtype to put the parameters (expert_bias
        stays float32)."""
        return checkpoint_format("moe").load(directory, **kwargs)

    @classmethod
    def from_hf(cls, directory: str | Path, **kwargs) -> Transformer:
        """A Hugging Face model folder (config.json + safetensors; Mixtral, Qwen3-MoE,
        DeepSeek-V3, Ling 2.0) -> model in eval mode whose logits [B, S, V] match transformers'.
        Per-expert tensors are stacked into w_in [E, D, 2F] / w_out [E, F, D]. `dtype=` (default:
        the checkpoint's), `device=`, `backend=` (the experts backend), `progress=`; see
        moe.io.hf.load_hf."""
        return checkpoint_format("hf").load(directory, **kwargs)

    # Multi-token prediction (moe/mtp.py); forward() never runs the MTP modules.

    def mtp_loss(self, h_BSD: Tensor, input_ids_BS: Tensor, targets_BS: Tensor) -> Tensor:
        """Mean cross-entropy of the MTP modules (depth k at position i predicts t_{i+k+1} =
        targets[:, i+k]) from h_BSD = `hidden(input_ids_BS)`; zero without MTP modules."""
        return mtp_loss(self, h_BSD, input_ids_BS, targets_BS)


class CheckpointFormat(NamedTuple):
    save: Callable[..., object]  # (model, directory, **options)
    load: Callable[..., Transformer]  # (directory, **options)


CHECKPOINT_FORMATS: dict[str, CheckpointFormat] = {}  # filled by moe.io: "moe" and "hf"


def checkpoint_format(name: str) -> CheckpointFormat:
    if name not in CHECKPOINT_FORMATS:
        raise InputError(f"unknown checkpoint format {name!r} (expected one of {', '.join(CHECKPOINT_FORMATS)})")
    return CHECKPOINT_FORMATS[name]

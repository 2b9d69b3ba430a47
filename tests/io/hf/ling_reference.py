"""An independent reference of Ling 2.0's forward (BailingMoeV2ForCausalLM, inclusionAI), for tests.

transformers has no implementation of it, so this file is one, written from the published
remote code's description (docs/published_configs.md, Part B) in plain torch. It shares no code
with `moe`: it reads the checkpoint's own tensor names and config.json keys, and computes the way
the remote code does (fused QKV split as [all Q | all K | all V], per-head RMSNorm on q and k
before RoPE, NeoX-style RoPE on the first partial_rotary_factor of each head, fp32 sigmoid gate
with a selection-only bias, best-2 group scores, -inf masking, renormalisation when top_k > 1,
routed_scaling_factor, an unweighted shared expert). Only the plain RoPE of the published
configs is implemented (no rope_scaling).

Legend: B = batch, T = tokens, D = hidden, H / Hkv = query / key-value heads, Dh = head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def config(**overrides) -> dict:
    """A small config.json in the published form (model_type "bailing_moe" + the V2 architecture)."""
    base = {
        "architectures": ["BailingMoeV2ForCausalLM"],
        "model_type": "bailing_moe",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "hidden_act": "silu",
        "use_qkv_bias": False,
        "use_bias": False,
        "use_qk_norm": True,
        "rms_norm_eps": 1e-6,
        "partial_rotary_factor": 0.5,
        "rope_theta": 600000.0,
        "rope_scaling": None,
        "max_position_embeddings": 64,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "num_shared_experts": 1,
        "moe_intermediate_size": 12,
        "first_k_dense_replace": 1,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "router_dtype": "fp32",
        "num_nextn_predict_layers": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    return {**base, **overrides}


def random_weights(cfg: dict, seed: int) -> dict[str, Tensor]:
    """Every tensor of the published layout, with activations of order 1 and non-trivial norms/biases."""
    g = torch.Generator().manual_seed(seed)
    D, H, Hkv, Dh = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    E, Fe, L = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["num_hidden_layers"]

    def mat(out_f, in_f, sharp=1.0):
        return sharp * torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    def vec(n, center):
        return center + 0.1 * torch.randn(n, generator=g)

    def mlp(prefix, width):
        return {
            f"{prefix}.gate_proj.weight": mat(width, D),
            f"{prefix}.up_proj.weight": mat(width, D),
            f"{prefix}.down_proj.weight": mat(D, width),
        }

    w = {"model.word_embeddings.weight": mat(cfg["vocab_size"], D), "model.norm.weight": vec(D, 1.0)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(cfg["vocab_size"], D)
    mtp_start = L - (cfg["num_nextn_predict_layers"] or 0)
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = vec(D, 1.0)
        w[p + "post_attention_layernorm.weight"] = vec(D, 1.0)
        w[p + "attention.query_key_value.weight"] = mat((H + 2 * Hkv) * Dh, D)
        if cfg["use_qkv_bias"]:
            w[p + "attention.query_key_value.bias"] = vec((H + 2 * Hkv) * Dh, 0.0)
        w[p + "attention.dense.weight"] = mat(D, H * Dh)
        if cfg["use_bias"]:
            w[p + "attention.dense.bias"] = vec(D, 0.0)
        if cfg["use_qk_norm"]:
            w[p + "attention.query_layernorm.weight"] = vec(Dh, 1.0)
            w[p + "attention.key_layernorm.weight"] = vec(Dh, 1.0)
        if i < cfg["first_k_dense_replace"]:
            w.update(mlp(p + "mlp", cfg["intermediate_size"]))
            continue
        w[p + "mlp.gate.weight"] = mat(E, D, sharp=3.0)
        w[p + "mlp.gate.expert_bias"] = vec(E, 0.0)
        for e in range(E):
            w.update(mlp(f"{p}mlp.experts.{e}", Fe))
        if cfg["num_shared_experts"]:
            w.update(mlp(p + "mlp.shared_experts", Fe * cfg["num_shared_experts"]))
        if i >= mtp_start:  # multi-token prediction layer extras
            w.update(
                {
                    p + "enorm.weight": vec(D, 1.0),
                    p + "hnorm.weight": vec(D, 1.0),
                    p + "eh_proj.weight": mat(D, 2 * D),
                    p + "final_layernorm.weight": vec(D, 1.0),
                }
            )
    return w


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def attention(cfg: dict, w: dict, p: str, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    B, T, _ = x.shape
    H, Hkv, Dh = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    qkv = F.linear(x, w[p + "query_key_value.weight"], w.get(p + "query_key_value.bias"))
    q, k, v = qkv.view(B, T, H + 2 * Hkv, Dh).split([H, Hkv, Hkv], dim=-2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, Dh]
    if cfg["use_qk_norm"]:
        q = rms_norm(q, w[p + "query_layernorm.weight"], cfg["rms_norm_eps"])
        k = rms_norm(k, w[p + "key_layernorm.weight"], cfg["rms_norm_eps"])
    r = cos.shape[-1]  # rotary dims: the first r channels of each head
    q = torch.cat((q[..., :r] * cos + rotate_half(q[..., :r]) * sin, q[..., r:]), dim=-1)
    k = torch.cat((k[..., :r] * cos + rotate_half(k[..., :r]) * sin, k[..., r:]), dim=-1)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(2, 3) / math.sqrt(Dh)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v
    return F.linear(out.transpose(1, 2).reshape(B, T, H * Dh), w[p + "dense.weight"], w.get(p + "dense.bias"))


def swiglu(w: dict, p: str, x: Tensor) -> Tensor:
    return F.linear(
        F.silu(F.linear(x, w[p + "gate_proj.weight"])) * F.linear(x, w[p + "up_proj.weight"]), w[p + "down_proj.weight"]
    )


def sparse_moe(cfg: dict, w: dict, p: str, x: Tensor) -> Tensor:
    B, T, D = x.shape
    E, K, G, KG = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["n_group"], cfg["topk_group"]
    flat = x.view(-1, D)
    logits = F.linear(flat.float(), w[p + "gate.weight"].float())
    scores = logits.sigmoid()
    biased = scores + w[p + "gate.expert_bias"]
    group_scores = biased.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(KG, dim=-1).indices, 1)
    expert_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E).bool()
    idx = biased.masked_fill(~expert_mask, float("-inf")).topk(K, dim=-1).indices
    weight = scores.gather(1, idx)
    if K > 1:
        weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
    weight = weight * cfg["routed_scaling_factor"]
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):  # token by token: slow and obvious
        for j in range(K):
            out[t] += weight[t, j].to(flat.dtype) * swiglu(w, f"{p}experts.{int(idx[t, j])}.", flat[t])
    if cfg["num_shared_experts"]:
        out = out + swiglu(w, p + "shared_experts.", flat)
    return out.view(B, T, D)


@torch.no_grad()
def forward(cfg: dict, w: dict[str, Tensor], input_ids: Tensor) -> Tensor:
    """Logits [B, T, V] of input_ids [B, T]; the MTP layers take no part in them."""
    assert not cfg.get("rope_scaling"), "the reference implements plain RoPE only"
    eps, Dh = cfg["rms_norm_eps"], cfg["head_dim"]
    r = int(Dh * cfg["partial_rotary_factor"])
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
    freqs = torch.arange(input_ids.shape[1], dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    h = F.embedding(input_ids, w["model.word_embeddings.weight"])
    for i in range(cfg["num_hidden_layers"] - (cfg["num_nextn_predict_layers"] or 0)):
        p = f"model.layers.{i}."
        h = h + attention(cfg, w, p + "attention.", rms_norm(h, w[p + "input_layernorm.weight"], eps), cos, sin)
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        moe = i >= cfg["first_k_dense_replace"]
        h = h + (sparse_moe(cfg, w, p + "mlp.", x) if moe else swiglu(w, p + "mlp.", x))
    head = w["model.word_embeddings.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return F.linear(rms_norm(h, w["model.norm.weight"], eps), head).float()

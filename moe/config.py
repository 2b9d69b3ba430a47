"""Configs: the single source of truth for every size and switch.

`MoEConfig` describes one MoE layer (router, balancing, capacity, experts), `ModelConfig` a whole
decoder. Both validate themselves completely at construction, before anything is built: every
field's type, every size against a sanity bound far above any published model (moe/config_checks.py),
every float finite and in range, and the cross-field rules (top_k <= num_experts, heads divide
dims, ...). A bad value raises `InputError` with one line naming the key by its full dotted path
(`moe.top_k`) and an excerpt of the value. `load_config` reads YAML or JSON strictly (unknown and
duplicate keys are errors; see moe/shipped_configs.py for how a file is read).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config_checks import (
    MAX_EXPERT_LAYERS,
    MAX_EXPERTS,
    MAX_FFN,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_LAYERS,
    MAX_SEQ_LEN,
    MAX_VOCAB,
    NAME,
    ConfigValueError,
    check_floats,
    check_ints,
    check_rope_scaling,
    check_types,
    config_error,
    fail,
    non_negative,
    positive,
    unit,
)
from .errors import InputError, excerpt
from .shipped_configs import read_config_file, resolve_config

ScoreFunc = Literal["softmax", "sigmoid"]
BiasUpdate = Literal["sign", "zero_mean"]
CapacityMode = Literal["static", "dynamic"]
Backend = Literal["eager", "torch", "triton"]
Activation = Literal["swiglu", "gelu"]
AttentionKind = Literal["gqa", "mla"]


@dataclass
class MoEConfig:
    """One MoE layer. Defaults give a plain Mixtral-style softmax top-k layer.

    Letters are those of docs/architecture.md's legend: E experts, K top-k, F expert FFN size,
    D hidden size (from the ModelConfig), G expert groups, T tokens, A = T*K assignments,
    C slots per expert.

    Experts:
        num_experts: E, routed experts per layer (not counting shared ones). Router weight [E, D],
            expert weights w_in [E, D, 2F] and w_out [E, F, D]. 1..2**16.
        top_k: K, experts each token is sent to; A = T*K assignments per batch. 1..E.
        expert_ffn_size: F, the hidden width of one routed expert; null: 4 * D (each a full FFN).
        activation: "swiglu" (w_in [E, D, 2F]: gate columns, then up) or "gelu" (w_in [E, D, F]).
        num_shared_experts: always-on experts applied to every token and added unweighted
            (DeepSeek-V3, Ling 2.0: 1); they form one MLP of width shared_ffn_size. 0 = none.
        shared_ffn_size: width of that shared MLP; null: num_shared_experts * F.

    Router (scores always in fp32: bf16 logits flip near-tied top-k choices):
        score_func: "softmax" over the E logits, or "sigmoid" per expert (DeepSeek-V3, Ling 2.0).
        n_group: G, group-limited routing: the E experts form G groups of Eg = E / G, ranked by the
            sum of each group's best 2 scores ... 1 = off. Must divide E.
        topk_group: ... and only the best topk_group groups are eligible for each token. 1..G.
        norm_topk_prob: renormalise the K selected weights to sum to 1.
        routed_scaling_factor: multiplies the routed weights (DeepSeek-V3 2.5; > 0).

    Balancing (every coefficient >= 0; 0 = off):
        aux_loss_coef: Switch Transformer load-balancing loss over the batch (1.0 when uniform).
        seq_aux_loss_coef: the same loss per sequence, averaged (DeepSeek-V3 alpha = 1e-4).
        z_loss_coef: ST-MoE router z-loss, mean logsumexp(logits)^2 (Ling 2.0: 3.5e-6).
        expert_bias: aux-loss-free balancing: a per-expert bias [E] added to the scores for the
            selection only (never to the weights), updated after every optimizer step.
        bias_update_rate: u in b_i += u * sign(mean_load - load_i).
        bias_update: "sign" (DeepSeek-V3) or "zero_mean" (the update re-centred to mean 0, Ling 2.0).

    Capacity:
        capacity_factor: null = dropless (every assignment computed). Else each expert gets
            C = ceil(factor * T * K / E) slots; 0 < factor <= E (E already gives every expert
            room for all A assignments).
        capacity_mode: "static" (C slots each) or "dynamic" (the same E * C slots split per batch
            by the observed load: only the peaks are dropped).

    backend: the experts' implementation: "eager" (the readable loop over experts), "torch"
        (torch.nn.functional.grouped_mm) or "triton" (moe_kernels). Same results, different speed.
    """

    num_experts: int = 8
    top_k: int = 2
    expert_ffn_size: int | None = None
    activation: Activation = "swiglu"
    num_shared_experts: int = 0
    shared_ffn_size: int | None = None

    # Router.
    score_func: ScoreFunc = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    # Balancing.
    aux_loss_coef: float = 0.0
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    bias_update: BiasUpdate = "sign"

    # Capacity. None = dropless.
    capacity_factor: float | None = None
    capacity_mode: CapacityMode = "static"

    backend: Backend = "torch"

    def __post_init__(self) -> None:
        check_types(self)
        check_ints(
            self,
            {
                "num_experts": (1, MAX_EXPERTS),
                "top_k": (1, MAX_EXPERTS),
                "expert_ffn_size": (1, MAX_FFN),
                "num_shared_experts": (0, MAX_EXPERTS),
                "shared_ffn_size": (1, MAX_FFN),
                "n_group": (1, MAX_EXPERTS),
                "topk_group": (1, MAX_EXPERTS),
            },
        )
        check_floats(
            self,
            {
                "routed_scaling_factor": (positive, "must be positive"),
                "aux_loss_coef": (non_negative, "must be >= 0"),
                "seq_aux_loss_coef": (non_negative, "must be >= 0"),
                "z_loss_coef": (non_negative, "must be >= 0"),
                "bias_update_rate": (non_negative, "must be >= 0"),
            },
        )
        if self.top_k > self.num_experts:
            fail("top_k", self.top_k, f"must be <= num_experts ({self.num_experts})")
        if self.num_experts % self.n_group:
            fail("num_experts", self.num_experts, f"must be divisible by n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            fail("topk_group", self.topk_group, f"must be <= n_group ({self.n_group})")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            fail(
                "top_k",
                self.top_k,
                f"exceeds the experts in topk_group={self.topk_group} groups of {self.num_experts // self.n_group}",
            )
        factor = self.capacity_factor
        if factor is not None and not 0 < factor <= self.num_experts:
            fail(
                "capacity_factor",
                factor,
                f"must be in (0, num_experts={self.num_experts}] (more gives no expert more slots than "
                "there are assignments), or null (dropless)",
            )

    def ffn_size(self, hidden_size: int) -> int:
        return self.expert_ffn_size or 4 * hidden_size

    def shared_size(self, hidden_size: int) -> int:
        return self.shared_ffn_size or self.num_shared_experts * self.ffn_size(hidden_size)


@dataclass
class ModelConfig:
    """A decoder-only transformer whose FFNs are dense SwiGLU MLPs or MoE layers.

    Letters are those of docs/architecture.md's legend: V vocabulary, D hidden size, L layers,
    H / Hkv query / key-value heads, Dh head dim, S tokens per sequence; MLA adds C (kv_lora_rank)
    and Dn / Dr / Dv (no-RoPE, RoPE and value head dims).

    Sizes:
        name: names the run folder (runs/<name>) and reports: letters, digits, "_", ".", "+", "-".
        vocab_size: V, token ids 0..V-1; embedding and output head [V, D].
        hidden_size: D, the residual stream width.
        num_layers: L, decoder layers (dense or MoE, see the layer plan).
        num_heads: H, query heads.
        num_kv_heads: Hkv, key/value heads; null: H (multi-head). Fewer: grouped-query. Divides H.
        head_dim: Dh; null: D / H (then H must divide D).
        intermediate_size: width of the dense layers' SwiGLU FFN; null: 4 * D.
        max_seq_len: the context S trained on by default and used for attention FLOPs.
        norm_eps: RMSNorm epsilon, in (0, 1].
        tie_embeddings: the output head reuses the embedding matrix.
        init_std: standard deviation of the random initialisation (> 0).

    Attention:
        attention: "gqa" (grouped-query) or "mla" (DeepSeek-V3's multi-head latent attention).
        qk_norm: RMSNorm over each head's q and k before RoPE (Qwen3, Ling 2.0).
        attention_bias: a bias on the q/k/v projections.
        attention_out_bias: a bias on the output projection (Qwen3's attention_bias, Ling's use_bias).
        rope_theta: RoPE base (> 1): the slowest rotation turns once in about 2 pi theta tokens.
        rope_fraction: share of each head's dims that RoPE rotates, in (0, 1] (Ling 2.0: 0.5).
        rope_interleave: rotate adjacent pairs (DeepSeek's MLA) instead of the two halves.
        rope_scaling: YaRN context extension; null = plain RoPE. Keys: type ("yarn"), factor (>= 1),
            original_max_position_embeddings, and optionally beta_fast (32), beta_slow (1) (> 0),
            mscale, mscale_all_dim (>= 0; MLA also scales its softmax by
            yarn_mscale(factor, mscale_all_dim)^2), attention_factor (> 0), truncate.
            DeepSeek-V3: factor 40 over 4096, mscale = mscale_all_dim = 1.

    MLA (used when attention is "mla"):
        q_lora_rank: rank of q's latent; null: q is projected directly from D.
        kv_lora_rank: C, the compressed key/value latent cached per token.
        qk_nope_head_dim: Dn, the per-head query/key dims without RoPE (>= 0).
        qk_rope_head_dim: Dr, the RoPE dims, one key part shared by all heads (even).
        v_head_dim: Dv, per-head value dims.
        latent_norm_eps: eps of the q/kv latent RMSNorms; null: norm_eps (DeepSeek-V3's
            reference code fixes it at 1e-6 whatever rms_norm_eps says).

    Layer plan: which layers have an MoE FFN. Exactly one scheme applies, in this order:
        moe_layers: an explicit list of MoE layer indices (each in 0..L-1, no repeats).
        moe_pattern: "2-4-2-4": 2 dense, 4 MoE, repeating to the depth (a period of at most 10000 layers).
        first_k_dense, moe_every: after first_k_dense dense layers, every moe_every-th layer is MoE.
        moe: the MoE layers' MoEConfig; null: a dense model.

    Multi-token prediction (DeepSeek-V3 section 2.2; Ling 2.0), see moe/mtp.py:
        num_mtp_layers: MTP modules chained after the main model; module k (1-based) at position i
            predicts token i+k+1 from module k-1's hidden state and the embedding of token i+k.
            Each adds one block like the last layer's (MoE or dense), two norms and a projection;
            embedding and output head are shared. 0 = none (DeepSeek-V3: 1). 0..L.
        mtp_loss_coef: lambda, the weight of the mean MTP cross-entropy over the modules in the
            training loss (DeepSeek-V3: 0.3 for the first 10T tokens, then 0.1). >= 0.
    """

    name: str = "model"
    vocab_size: int = 256  # bytes: the default corpus needs no tokenizer
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02

    # Attention.
    attention: AttentionKind = "gqa"
    qk_norm: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0
    rope_interleave: bool = False
    rope_scaling: dict | None = None
    # MLA.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    latent_norm_eps: float | None = None

    # Layer plan.
    first_k_dense: int = 0
    moe_every: int = 1
    moe_pattern: str | None = None
    moe_layers: list[int] | None = None
    moe: MoEConfig | None = field(default_factory=MoEConfig)

    # Multi-token prediction.
    num_mtp_layers: int = 0
    mtp_loss_coef: float = 0.3

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = _from_dict(MoEConfig, self.moe, prefix="moe.")
        check_types(self)
        if not NAME.fullmatch(self.name):
            fail("name", self.name, "must be 1-128 letters, digits or '_.+-', starting with a letter, digit or '_'")
        check_ints(
            self,
            {
                "vocab_size": (1, MAX_VOCAB),
                "hidden_size": (1, MAX_HIDDEN),
                "num_layers": (1, MAX_LAYERS),
                "num_heads": (1, MAX_HEADS),
                "num_kv_heads": (1, MAX_HEADS),
                "head_dim": (1, MAX_HIDDEN),
                "intermediate_size": (1, MAX_FFN),
                "max_seq_len": (1, MAX_SEQ_LEN),
                "q_lora_rank": (1, MAX_HIDDEN),
                "kv_lora_rank": (1, MAX_HIDDEN),
                "qk_nope_head_dim": (0, MAX_HIDDEN),
                "qk_rope_head_dim": (1, MAX_HIDDEN),
                "v_head_dim": (1, MAX_HIDDEN),
                "first_k_dense": (0, MAX_LAYERS),
                "moe_every": (1, MAX_LAYERS),
                "num_mtp_layers": (0, MAX_LAYERS),
            },
        )
        check_floats(
            self,
            {
                "norm_eps": (unit, "must be in (0, 1]"),
                "init_std": (positive, "must be positive"),
                "rope_theta": (lambda v: v > 1, "must be > 1 (a base <= 1 gives no decaying frequencies)"),
                "rope_fraction": (unit, "must be in (0, 1]"),
                "latent_norm_eps": (unit, "must be in (0, 1] or null"),
                "mtp_loss_coef": (non_negative, "must be >= 0"),
            },
        )
        if self.num_mtp_layers > self.num_layers:  # each module is as large as a main layer
            fail("num_mtp_layers", self.num_mtp_layers, f"must be <= num_layers ({self.num_layers})")
        self._check_attention()
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        self._check_layer_plan()
        if self.moe is not None:
            self._check_moe_sizes(self.moe)

    def _check_attention(self) -> None:
        if self.num_heads % self.kv_heads:
            fail("num_heads", self.num_heads, f"must be divisible by num_kv_heads ({self.kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            fail(
                "hidden_size",
                self.hidden_size,
                f"must be divisible by num_heads ({self.num_heads}) unless head_dim is set",
            )
        if self.attention == "gqa":
            if self.num_heads * self.dim_per_head > MAX_FFN:
                fail("num_heads", self.num_heads, f"x head dim {self.dim_per_head} must be <= {MAX_FFN}")
            if self.rotary_dim % 2:
                fail(
                    "rope_fraction",
                    self.rope_fraction,
                    f"gives an odd rotary dim {self.rotary_dim} for head_dim {self.dim_per_head}",
                )
        else:
            if self.qk_rope_head_dim % 2:
                fail("qk_rope_head_dim", self.qk_rope_head_dim, "must be even")
            widest = max(self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim)
            if self.num_heads * widest > MAX_FFN:
                fail("num_heads", self.num_heads, f"x MLA head dim {widest} must be <= {MAX_FFN}")

    def _check_layer_plan(self) -> None:
        if self.first_k_dense > self.num_layers:
            fail("first_k_dense", self.first_k_dense, f"exceeds num_layers ({self.num_layers})")
        if self.moe_pattern is not None:
            pattern = self.moe_pattern
            if len(pattern) > 256 or not re.fullmatch(r"\d{1,5}(-\d{1,5})*", pattern) or len(pattern.split("-")) % 2:
                fail("moe_pattern", pattern, "must alternate dense and MoE run lengths, e.g. '2-4' or '2-4-2-4'")
            runs = [int(n) for n in pattern.split("-")]
            if sum(runs) > MAX_LAYERS:  # layer_plan expands one period of the pattern
                fail("moe_pattern", pattern, f"has a period of {sum(runs)} layers (at most {MAX_LAYERS})")
            if not any(runs[1::2]):
                fail("moe_pattern", pattern, "has no MoE layers")
            if self.first_k_dense or self.moe_every != 1:
                fail("moe_pattern", pattern, "cannot be combined with first_k_dense/moe_every")
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
            if bad:
                fail("moe_layers", self.moe_layers, f"has layers outside 0..{self.num_layers - 1}: {excerpt(bad)}")
            if len(set(self.moe_layers)) != len(self.moe_layers):
                fail("moe_layers", self.moe_layers, "lists a layer twice")
        if self.moe is None and (self.moe_layers or self.moe_pattern):
            fail("moe", None, "is null but the layer plan asks for MoE layers")

    def _check_moe_sizes(self, moe: MoEConfig) -> None:
        """The MoE limits that depend on the model: expert widths from D, experts times layers."""
        if moe.shared_size(self.hidden_size) > MAX_FFN:
            fail("moe.num_shared_experts", moe.num_shared_experts, f"gives a shared FFN wider than {MAX_FFN}")
        if moe.num_experts * self.num_layers > MAX_EXPERT_LAYERS:
            fail(
                "moe.num_experts",
                moe.num_experts,
                f"x num_layers ({self.num_layers}) must be <= {MAX_EXPERT_LAYERS} experts in all",
            )

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_per_head * self.rope_fraction)

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path) -> ModelConfig:
    """Read a YAML or JSON model config strictly into a `ModelConfig`.

    `path` is a file or the name of a shipped config ("tiny", "deepseek-v3"; `moe configs` lists them).
    The file is read as moe.shipped_configs.read_config_file reads it (size cap, regular files
    only, no duplicate keys, no YAML aliases); every problem is an InputError naming the file.
    """
    path = resolve_config(path)
    data = read_config_file(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}")
    try:
        return config_from_dict(data)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    return _from_dict(ModelConfig, data, prefix="")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise InputError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {excerpt(data)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in names), key=str)
    if unknown:
        key = unknown[0] if isinstance(unknown[0], str) and len(unknown[0]) <= 80 else excerpt(unknown[0])
        raise InputError(f"unknown config key '{prefix}{key}' (known keys: {', '.join(sorted(names))})")
    try:
        return cls(**data)
    except ConfigValueError as e:
        # Name nested keys by their full path ("moe.top_k"), as the user wrote them.
        raise config_error(prefix + e.key, e.detail) from None

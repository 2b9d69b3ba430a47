"""From measured per-layer times to full-scale training cost: pure arithmetic, no torch.

Model of one training step, per GPU and per token (every assumption is a field of `Cluster`
and printed by `moe calibrate`):

    compute   = sum over components of count x measured forward+backward seconds per token
    all-to-all (expert parallelism), per MoE layer and token: dispatch sends K copies of the
              D-wide hidden vector to the experts' ranks and combine brings them back, in the
              forward and again in the backward: 4 * K * D * a2a_bytes bytes sent. Of it,
              (min(P, gpus_per_node) - 1) / P goes over NVLink and (P - gpus_per_node) / P
              over InfiniBand (uniform routing); the two run at once, so the time is the slower.
    FSDP      (ZeRO-3), per step: all-gather the weights for the forward and again for the
              backward, reduce-scatter the gradients; a ring moves (n - 1) / n of the data
              through each GPU. Non-expert weights are sharded over all N GPUs, each rank's
              experts over the N / P GPUs holding the same experts. Spread over the tokens a
              GPU processes per step; over InfiniBand once the job spans more than one node.
    exposed   = comm - overlap * min(comm, compute): overlap 0 serialises everything, 1 hides
              all communication that fits under the compute.

Not modelled (say so whenever a projection is shown): pipeline bubbles, tensor parallelism,
the optimizer step, activation recomputation, load imbalance between experts and ranks,
node-limited routing, stragglers and failures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from ..errors import InputError

SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class Cluster:
    gpus: int = 2048
    gpus_per_node: int = 8
    ep_degree: int = 8
    nvlink_GBps: float = 450.0  # per GPU and direction: H100 SXM NVLink 4 is 900 GB/s both ways
    ib_GBps: float = 50.0  # per GPU: one 400 Gb/s InfiniBand NIC per GPU
    overlap: float = 0.0  # share of communication hidden under compute (0: none)
    a2a_bytes: float = 2.0  # bytes per element the all-to-all sends (bf16; DeepSeek-V3 dispatched FP8: 1)
    param_bytes: float = 2.0  # FSDP all-gather dtype (bf16 weights)
    grad_bytes: float = 4.0  # FSDP reduce-scatter dtype (fp32 gradients)
    global_batch_tokens: float = 15360 * 4096  # DeepSeek-V3's final batch: 15,360 sequences of 4,096

    def __post_init__(self) -> None:
        for key in (
            "gpus",
            "gpus_per_node",
            "ep_degree",
            "nvlink_GBps",
            "ib_GBps",
            "a2a_bytes",
            "param_bytes",
            "grad_bytes",
            "global_batch_tokens",
        ):
            if not getattr(self, key) > 0:
                raise InputError(f"{key} must be positive, got {getattr(self, key)!r}")
        if not 0.0 <= self.overlap <= 1.0:
            raise InputError(f"overlap must be in [0, 1], got {self.overlap!r}")
        if self.gpus % self.ep_degree:
            raise InputError(f"expert-parallel degree {self.ep_degree} must divide the GPU count {self.gpus}")

    @property
    def tokens_per_gpu_step(self) -> float:
        return self.global_batch_tokens / self.gpus


@dataclass(frozen=True)
class Component:
    """One timed piece of the model, at full size (see moe/perf/components.py)."""

    name: str
    count: int  # how many the model has
    seconds_per_token: float  # forward + backward, measured (or extrapolated from a scaled run)
    flops_per_token: float  # forward + backward FLOPs of one


@dataclass(frozen=True)
class ModelShape:
    """What the communication model needs to know about the model."""

    hidden_size: int
    top_k: int
    moe_layers: int
    dense_params: int  # every weight outside the routed experts (embeddings included)
    expert_params: int  # all routed-expert weights of all layers
    flops_per_token: float  # training FLOPs per token of the whole model (moe.perf.flops)


def all_to_all_seconds_per_token(shape: ModelShape, c: Cluster) -> float:
    bytes_sent = 4.0 * shape.top_k * shape.hidden_size * c.a2a_bytes * shape.moe_layers
    local = min(c.ep_degree, c.gpus_per_node)
    intra = bytes_sent * (local - 1) / c.ep_degree
    inter = bytes_sent * (c.ep_degree - local) / c.ep_degree
    return max(intra / (c.nvlink_GBps * 1e9), inter / (c.ib_GBps * 1e9))


def fsdp_seconds_per_token(shape: ModelShape, c: Cluster) -> float:
    per_param = 2 * c.param_bytes + c.grad_bytes  # two all-gathers and one reduce-scatter

    def ring(params: float, ranks: int) -> float:
        return params * per_param * (ranks - 1) / ranks

    moved = ring(shape.dense_params, c.gpus) + ring(shape.expert_params / c.ep_degree, c.gpus // c.ep_degree)
    bandwidth = (c.nvlink_GBps if c.gpus <= c.gpus_per_node else c.ib_GBps) * 1e9
    return moved / bandwidth / c.tokens_per_gpu_step


@dataclass
class Projection:
    compute_s: float  # seconds per token per GPU, each term
    all_to_all_s: float
    fsdp_s: float
    exposed_comm_s: float
    seconds_per_token: float
    tokens_per_s_per_gpu: float
    achieved_tflops: float  # model FLOPs (moe.perf.flops) per second per GPU
    step_s: float  # one optimizer step: tokens_per_gpu_step tokens
    gpu_hours_per_trillion: float
    mfu: dict[str, float | None] = field(default_factory=dict)  # against each named peak

    def to_dict(self) -> dict:
        return asdict(self)


def project(
    components: list[Component], shape: ModelShape, c: Cluster, peaks_tflops: dict[str, float | None] | None = None
) -> Projection:
    compute = sum(k.count * k.seconds_per_token for k in components)
    a2a = all_to_all_seconds_per_token(shape, c) if shape.moe_layers else 0.0
    fsdp = fsdp_seconds_per_token(shape, c)
    comm = a2a + fsdp
    exposed = comm - c.overlap * min(comm, compute)
    per_token = compute + exposed
    tokens_per_s = 1.0 / per_token
    achieved = tokens_per_s * shape.flops_per_token / 1e12
    mfu = {name: (achieved / peak if peak else None) for name, peak in (peaks_tflops or {}).items()}
    return Projection(
        compute,
        a2a,
        fsdp,
        exposed,
        per_token,
        tokens_per_s,
        achieved,
        per_token * c.tokens_per_gpu_step,
        1e12 / tokens_per_s / SECONDS_PER_HOUR,
        mfu,
    )


@dataclass
class TrainingRun:
    tokens: float
    gpus: int
    gpu_hours: float
    days: float
    cost: float
    price_per_gpu_hour: float


def training_run(p: Projection, tokens: float, gpus: int, price_per_gpu_hour: float) -> TrainingRun:
    gpu_hours = tokens / p.tokens_per_s_per_gpu / SECONDS_PER_HOUR
    return TrainingRun(
        tokens, gpus, gpu_hours, gpu_hours / gpus / 24.0, gpu_hours * price_per_gpu_hour, price_per_gpu_hour
    )


# --------------------------------------------------------------------------- published figures

Metric = Literal["gpu_hours", "tflops_per_gpu", "tokens_per_s_per_gpu"]


@dataclass(frozen=True)
class Claim:
    """A published or claimed training figure (data in moe/perf/published.py)."""

    label: str
    config: str  # the ModelConfig.name it is about
    metric: Metric
    low: float
    high: float | None = None  # a range's upper end; None: a single value
    kind: str = "published"  # "published", "derived" (arithmetic on published figures) or "seed claim"
    hardware: str | None = None  # moe.perf.device_peaks key of the GPUs it ran on; None: not stated
    gpus: int | None = None
    tokens: float | None = None  # training tokens, for GPU-hour figures ...
    flops: float | None = None  # ... or the total FLOPs the claim itself states
    source: str = ""
    note: str = ""

    @property
    def top(self) -> float:
        return self.low if self.high is None else self.high


def workload_tokens(claim: Claim, flops_per_token: float) -> float | None:
    if claim.tokens is not None:
        return claim.tokens
    return None if claim.flops is None else claim.flops / flops_per_token


def implied_tflops_per_gpu(claim: Claim, flops_per_token: float) -> tuple[float, float] | None:
    """The per-GPU throughput a claim implies, whatever device we run on: (low, high)."""
    if claim.metric == "tflops_per_gpu":
        return claim.low, claim.top
    if claim.metric == "tokens_per_s_per_gpu":
        return claim.low * flops_per_token / 1e12, claim.top * flops_per_token / 1e12
    tokens = workload_tokens(claim, flops_per_token)
    if tokens is None:
        return None
    total = tokens * flops_per_token
    # More GPU-hours for the same work means fewer FLOP/s: the ends swap.
    return total / (claim.top * SECONDS_PER_HOUR) / 1e12, total / (claim.low * SECONDS_PER_HOUR) / 1e12


def projected_value(claim: Claim, p: Projection, flops_per_token: float) -> float | None:
    """Our projection of the quantity the claim states."""
    if claim.metric == "tflops_per_gpu":
        return p.achieved_tflops
    if claim.metric == "tokens_per_s_per_gpu":
        return p.tokens_per_s_per_gpu
    tokens = workload_tokens(claim, flops_per_token)
    return None if tokens is None else tokens / p.tokens_per_s_per_gpu / SECONDS_PER_HOUR


def compare(claim: Claim, projected: float | None) -> dict:
    """Claimed / projected and whether the claim is off by more than 2x from the projection
    (a range counts as off only if all of it is: every ratio above 2 or below 1/2)."""
    if projected is None or projected <= 0:
        return {"projected": projected, "ratio": None, "off_by_more_than_2x": None}
    ratio = (claim.low / projected, claim.top / projected)
    return {"projected": projected, "ratio": ratio, "off_by_more_than_2x": ratio[0] > 2.0 or ratio[1] < 0.5}

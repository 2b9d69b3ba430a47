"""The memory-bandwidth floor of an inference step: the bytes it must read, over the bandwidth
this device really moves.

    bandwidth = measure_bandwidth(device)               # bytes/s of a large device copy
    with RoutingRecorder(model) as routing:
        model(ids_BS, cache)                            # one step: a prefill or a decode step
    counted = step_bytes(model, ids_BS, cache_len=cache.seq_len, distinct_E=routing.distinct())
    floor_s = counted.total / bandwidth["bytes_per_s"]  # no step can be faster than this

What a step must read, each weight once (perfect reuse across the step's tokens), in the dtype
each tensor has:
- routed experts: per MoE layer, only the experts the router actually picked for any token of
  the step (distinct experts x bytes of one expert: w_in[e] + w_out[e]). A decode step at batch 1
  reads top_k experts per layer; at batch 64 nearly all of them: that is why MoE decode cost
  grows with the batch long before it becomes compute bound.
- shared weights: everything else the step runs through (attention, norms, dense FFNs, shared
  experts, routers and their selection biases, the final norm and lm_head), read whole.
- embedding rows: one row per distinct token id of the step (a gather, not the whole table).
- KV cache: every attention layer reads the keys and values of all `cache_len` positions of
  every sequence (GQA: k and v, 2 x kv_heads x head_dim a token; MLA: the latent and the shared
  RoPE key, kv_lora_rank + rope_dim a token).
Activations, logits and the cache's own write of the new tokens are left out: the floor is a
lower bound, and at decode sizes those are small next to the weights. Capacity drops are not
subtracted (inference runs dropless). A prefill is compute bound, so its ratio to this floor is
large by nature; the floor is the figure of merit of decode steps.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import Attention, MLAttention
from ..errors import InputError
from ..experts import Experts
from ..layer import MoE
from ..model import Transformer
from ..router import Routing
from . import timing

# Size of the copy that measures bandwidth, when the caller gives none: far above the last-level
# cache, so the copy streams from memory, and bounded so that two copies fit a small machine.
CPU_COPY_BYTES = (256 * 2**20, 1024 * 2**20)  # at least, at most
CUDA_COPY_BYTES = 2 * 2**30


# --------------------------------------------------------------------------- bytes


@dataclass
class StepBytes:
    """Bytes one forward step must read, by kind (see the module docstring)."""

    experts: float  # routed experts actually picked
    shared: float  # every other weight, read whole
    embedding: float  # rows of the distinct token ids
    kv_cache: float  # keys and values (or MLA latents) of the cached positions
    distinct_experts: list[float]  # per MoE layer, in layer order

    @property
    def total(self) -> float:
        return self.experts + self.shared + self.embedding + self.kv_cache

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    @staticmethod
    def mean(steps: list[StepBytes]) -> StepBytes:
        """The average step of a decode run (the cache grows and routing changes from step to step)."""
        n = len(steps)
        per_layer = [sum(col) / n for col in zip(*(s.distinct_experts for s in steps))]
        return StepBytes(
            sum(s.experts for s in steps) / n,
            sum(s.shared for s in steps) / n,
            sum(s.embedding for s in steps) / n,
            sum(s.kv_cache for s in steps) / n,
            per_layer,
        )


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def expert_bytes(layer: MoE) -> int:
    """Bytes of one routed expert of `layer`: its slice of every stacked expert tensor ([E, ...])."""
    E = layer.config.num_experts
    return sum(_nbytes(p) for p in layer.experts.parameters()) // E


def shared_bytes(model: Transformer) -> int:
    """Bytes of every weight a step reads whole: all parameters and the routers' selection biases,
    less the routed experts and the embedding table (lm_head stays, tied or not: it is read whole)."""
    skip = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    tied = model.lm_head.weight is model.embed_tokens.weight
    if not tied:
        skip.add(id(model.embed_tokens.weight))
    total = sum(_nbytes(p) for p in model.parameters() if id(p) not in skip)
    biases = [m.router.expert_bias for m in model.moe_layers() if m.router.expert_bias is not None]
    return total + sum(_nbytes(b) for b in biases)


def kv_bytes_per_position(model: Transformer) -> int:
    """Cache bytes one position of one sequence holds, summed over layers, in the model's dtype."""
    total = 0
    for m in model.modules():
        if isinstance(m, Attention):
            w = m.k_proj.weight  # k and v: kv_heads x head_dim each
            total += 2 * m.k_proj.out_features * w.element_size()
        elif isinstance(m, MLAttention):
            w = m.kv_a_proj_with_mqa.weight  # the latent c_kv and the shared RoPE key
            total += m.kv_a_proj_with_mqa.out_features * w.element_size()
    return total


def step_bytes(model: Transformer, ids_BS: Tensor, cache_len: int, distinct_E: list[int]) -> StepBytes:
    """Bytes the step that read `ids_BS` [B, S] must read, the cache holding `cache_len` positions
    per sequence after it, its MoE layers having picked `distinct_E[i]` distinct experts each."""
    layers = model.moe_layers()
    if len(distinct_E) != len(layers):
        raise InputError(f"need one distinct-expert count per MoE layer ({len(layers)}), got {len(distinct_E)}")
    experts = sum(n * expert_bytes(layer) for n, layer in zip(distinct_E, layers))
    row = model.embed_tokens.weight[0]
    embedding = int(torch.unique(ids_BS).numel()) * _nbytes(row)
    kv = ids_BS.shape[0] * cache_len * kv_bytes_per_position(model)
    return StepBytes(
        float(experts), float(shared_bytes(model)), float(embedding), float(kv), [float(n) for n in distinct_E]
    )


class RoutingRecorder:
    """Forward hooks on every MoE layer's router: the distinct experts each layer picked since
    the last `reset()` (one count per layer; a step calls each router once)."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, MoE)]
        self._picked: list[list[Tensor]] = [[] for _ in self.layers]
        self._handles: list[Any] = []

    def __enter__(self) -> RoutingRecorder:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.router.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int):
        def record(module: nn.Module, args: object, out: Routing) -> None:
            self._picked[i].append(out.topk_idx.detach().reshape(-1))

        return record

    def reset(self) -> None:
        self._picked = [[] for _ in self.layers]

    def distinct(self) -> list[int]:
        """Distinct experts per MoE layer since the last reset (a sync: call it outside timing)."""
        return [int(torch.unique(torch.cat(p)).numel()) if p else 0 for p in self._picked]


# --------------------------------------------------------------------------- bandwidth


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache Linux reports (sysfs), or None where it says nothing."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def default_copy_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return CUDA_COPY_BYTES
    low, high = CPU_COPY_BYTES
    llc = last_level_cache_bytes() or 0
    return min(max(4 * llc, low), high)


def measure_bandwidth(
    device: torch.device, nbytes: int | None = None, warmup: int = 2, repeats: int = 5
) -> dict[str, Any]:
    """Memory bandwidth this device moves in a large copy (`dst.copy_(src)`, fp32, `nbytes` per
    tensor): bytes/s = 2 x nbytes (read + write) / median copy time. On CUDA timed with
    triton.testing.do_bench (moe.perf.timing), on a CPU with perf_counter after `warmup` copies
    (the first one also faults in the destination's pages)."""
    nbytes = nbytes or default_copy_bytes(device)
    if nbytes < 4 or warmup < 0 or repeats < 1:
        raise InputError(
            f"bandwidth copy needs >= 4 bytes, warmup >= 0, repeats >= 1; got {nbytes}, {warmup}, {repeats}"
        )
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        measured = timing.measure(lambda: dst.copy_(src), device, warmup, repeats)
        median_s, timer = measured.median_s, measured.timer
    else:
        for _ in range(max(warmup, 1)):
            dst.copy_(src)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
        median_s, timer = statistics.median(times), "time.perf_counter"
    moved = 2 * n * 4
    return {
        "bytes_per_s": moved / median_s,
        "copy_bytes": n * 4,
        "median_s": median_s,
        "timer": timer,
        "method": "dst.copy_(src) of fp32 tensors; bytes = 2 x size (read + write)",
        "last_level_cache_bytes": last_level_cache_bytes() if device.type == "cpu" else None,
    }


def floor_figures(measured_s: float, counted: StepBytes, bytes_per_s: float, tokens: int) -> dict[str, Any]:
    """One step's row: its time, tokens/s, bytes, the floor time and measured / floor."""
    floor_s = counted.total / bytes_per_s
    return {
        "step_s": measured_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / measured_s,
        "bytes_per_step": counted.total,
        "bytes": counted.to_dict(),
        "achieved_bytes_per_s": counted.total / measured_s,
        "floor_s": floor_s,
        "ratio": measured_s / floor_s,
    }

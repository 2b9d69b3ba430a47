"""`moe calibrate --config CONFIG`: time a full-size model's layers on this device and project the
cost of training it on a cluster, beside the published and claimed figures.

    moe calibrate --config deepseek-v3 --ep 64 --gpus 2048 --tokens 14.8e12
    moe calibrate --config ling-1t --json --save

Measured: one attention block, one MoE layer as one expert-parallel rank runs it (E/P local
experts, see moe/perf/components.py), one dense FFN layer, the embedding + LM head + loss; each
forward + backward at the per-GPU micro-batch. Projected (moe/perf/projection.py): everything else.
On a CPU the layers are timed at a fraction of their width and a short sequence and
extrapolated by the FLOP ratio, so the run takes seconds; such output is labelled as a check
of the machinery, not a projection anyone should use.
"""

from __future__ import annotations

from dataclasses import asdict

from . import components, device_peaks, timing
from .projection import Cluster, compare, implied_tflops_per_gpu, project, projected_value
from .published import claims_for

CPU_SCALE = 16  # CPU runs time every width / 16 ...
CPU_MIN_WIDTH = 128  # ... but not below a hidden size of 128 ...
CPU_TIMED_SEQ = 128  # ... on sequences of 128 tokens


def time_layer(kind, config, timed_config, ep, batch, seq_len, timed_seq, device, dtype, warmup, repeats) -> dict:
    module = components.build(kind, timed_config, ep, device).to(timing.DTYPES[dtype])
    step = components.make_step(kind, module, timed_config, batch, timed_seq)
    timing.reset_peak_memory(device)
    measured = timing.measure(step, device, warmup, repeats)
    memory = timing.peak_memory(device)["bytes"] if device.type == "cuda" else None
    del module, step
    timed_tokens = batch * timed_seq
    timed_flops = components.train_flops_per_token(kind, timed_config, timed_seq, ep)
    full_flops = components.train_flops_per_token(kind, config, seq_len, ep)
    per_token = measured.median_s / timed_tokens
    return {
        "kind": kind,
        "count": components.layer_counts(config)[kind],
        "timed_config": timed_config.name,
        "timed_tokens": timed_tokens,
        "measured": measured.to_dict(),
        "peak_memory_bytes": memory,
        "timed_flops_per_token": timed_flops,
        "timed_tflops": timed_flops / per_token / 1e12,
        "full_flops_per_token": full_flops,
        "full_seconds_per_token": per_token * full_flops / timed_flops,
    }


def check_plausible(measured: list[dict], peak_tflops: float, device: str, slack: float = 1.1) -> None:
    """Refuse a layer timed faster than the dense matmul peak measured in the same run.

    No layer does its counted FLOPs faster than one large torch.mm: such a figure means the layer
    skipped work (the first H100 run timed a MoE layer at 1,514 TFLOP/s against a 789 peak, when
    grouped_mm read strided offsets) or the FLOP count is wrong. `slack` leaves room for measured noise.
    """
    for m in measured:
        if m["timed_tflops"] > slack * peak_tflops:
            raise ValueError(
                f"the {m['kind']} layer ran at {m['timed_tflops']:.4g} TFLOP/s, faster than the "
                f"{peak_tflops:.4g} TFLOP/s matmul peak measured on {device} in this run: the "
                f"layer skipped work or its FLOPs are miscounted; nothing was projected or saved"
            )


def comparison(name, parts, shape, cluster, peaks, flops_per_token) -> list[dict]:
    rows = []
    for claim in claims_for(name):
        # Re-project on the claim's own GPU count: FSDP traffic per token depends on it.
        c = (
            cluster
            if claim.gpus is None or claim.gpus % cluster.ep_degree
            else Cluster(**{**asdict(cluster), "gpus": claim.gpus})
        )
        p = project(parts, shape, c, peaks)
        implied = implied_tflops_per_gpu(claim, flops_per_token)
        peak = device_peaks.datasheet_tflops(claim.hardware, "bf16") if claim.hardware else None
        rows.append(
            {
                **asdict(claim),
                "gpus_projected": c.gpus,
                "implied_tflops_per_gpu": implied,
                "implied_mfu_bf16": None if implied is None or peak is None else (implied[0] / peak, implied[1] / peak),
                **compare(claim, projected_value(claim, p, flops_per_token)),
            }
        )
    return rows


def assumptions(c: Cluster, scale: int, timed_seq: int, seq_len: int, on_gpu: bool) -> list[str]:
    lines = [
        f"{c.gpus} GPUs, {c.gpus_per_node} per node; expert parallelism over {c.ep_degree} GPUs; FSDP (ZeRO-3) "
        f"over all of them; no pipeline or tensor parallelism",
        f"tokens per GPU per optimizer step: {c.tokens_per_gpu_step:,.0f} (global batch {c.global_batch_tokens:,.0f})",
        f"all-to-all: 4 x top_k x hidden x {c.a2a_bytes:g} bytes per token and MoE layer (dispatch + combine, "
        f"forward + backward), routing uniform over ranks",
        f"FSDP: weights all-gathered twice in {c.param_bytes:g}-byte, gradients reduce-scattered in "
        f"{c.grad_bytes:g}-byte, ring (n-1)/n",
        f"bandwidth per GPU: NVLink {c.nvlink_GBps:g} GB/s per direction inside a node, InfiniBand "
        f"{c.ib_GBps:g} GB/s between nodes",
        f"overlap of communication with compute: {c.overlap:.0%}",
        "not modelled: pipeline bubbles, the optimizer step, recomputation, expert load imbalance, "
        "node-limited routing, failures and restarts",
        "layer times are this device's; published figures ran on other GPUs, often in FP8",
    ]
    if scale != 1 or timed_seq != seq_len:
        lines.insert(
            0,
            f"layers timed at width / {scale} on {timed_seq}-token sequences and extrapolated to full "
            f"size by the FLOP ratio (assumes equal FLOP/s at both sizes)",
        )
    if not on_gpu:
        lines.insert(0, "CPU RUN: a check of the machinery, not a projection of any real training")
    return lines

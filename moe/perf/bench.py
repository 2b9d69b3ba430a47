"""`moe bench train|infer|layers --config C`: what this device really does on a model.

    moe bench train  --config deepseek-v3-mini   # forward + backward + AdamW step
    moe bench infer  --config tiny               # prefill and KV-cached decode
    moe bench layers --config qwen3-moe-mini     # each layer, MoE per expert backend

Figures: tokens/s = tokens per call / median call time (warm-up excluded); achieved TFLOP/s =
tokens/s x FLOPs per token (moe/perf/flops.py: 6 x active matmul params + causal attention for
training, a third of it for a forward); MFU against the dense matmul peak this run measures
(torch.mm in the same dtype) and against the datasheet peak (moe/perf/device_peaks.py; none for
CPUs). Inputs are random tokens, so routing is close to uniform: real data's expert skew is
not in these numbers. `--save` writes bench/results/<device>/<bench>-<config>.json.
"""

from __future__ import annotations

import dataclasses
import time
from typing import get_args

import torch

from ..config import Backend, ModelConfig
from ..errors import InputError, excerpt
from ..extras import require
from ..model import Transformer
from ..train.args import TrainArgs
from ..train.step import build_model, build_optimizer, train_step
from . import components, floor, flops, timing

# Bytes per parameter to train with fp32 weights, fp32 gradients and two fp32 AdamW moments.
TRAIN_BYTES_PER_PARAM = 16


def with_backend(config: ModelConfig, backend: str) -> ModelConfig:
    """`config` with its MoE layers on expert backend `backend`, a name the user gave (--backend)."""
    check_backend(backend, "--backend")
    if config.moe is None:
        raise InputError(f"--backend {backend}: config {config.name!r} has no MoE layers")
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, backend=backend))


def check_backend(backend: str, flag: str) -> None:
    """Refuse an unknown backend. One asked for by name must not fall back unseen either: the
    "triton" backend runs torch's path where Triton is missing, and a bench would label that Triton."""
    known = get_args(Backend)
    if backend not in known:
        raise InputError(f"{flag}: unknown expert backend {excerpt(backend)} (expected {', '.join(known)})")
    if backend == "triton":
        require("triton", f"{flag} triton")


def _check_fits(needed_bytes: float, device: torch.device, what: str) -> None:
    capacity = timing.memory_capacity(device)
    if capacity is not None and needed_bytes > capacity:
        raise InputError(
            f"{what} needs about {needed_bytes / 2**30:.1f} GiB but {device.type} has "
            f"{capacity / 2**30:.1f} GiB: use a -mini config, or `moe calibrate` for full-size models"
        )


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=timing.DTYPES[dtype], enabled=dtype != "fp32")


# --------------------------------------------------------------------------- train


class _FixedBatch:
    """The same batch at every call: moe.train's train_step draws its micro-batches from next_batch()."""

    def __init__(self, inputs_BS: torch.Tensor, targets_BS: torch.Tensor):
        self.batch = inputs_BS, targets_BS

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


def run_train(args, config: ModelConfig, device: torch.device, dtype: str) -> tuple[dict, dict]:
    """Time `moe train`'s own step (moe.train.step.train_step: forward, CE + aux loss, backward,
    gradient clipping, AdamW, expert-bias update) on one random batch, in `dtype` autocast."""
    seq = args.seq_len or config.max_seq_len
    counts = flops.count(config, seq)
    _check_fits(counts.params_total * TRAIN_BYTES_PER_PARAM, device, f"training {config.name}")
    torch.manual_seed(0)
    model = build_model(config, device)  # fp32 master weights; matmuls in `dtype` under autocast
    # moe train's defaults (gradient clip 1.0, one micro-batch); the lr does not change the time.
    train_args = TrainArgs(batch_size=args.batch_size, seq_len=seq, lr=1e-4, min_lr=1e-5)
    opt = build_optimizer(model, train_args, fused=device.type == "cuda")
    ids = torch.randint(config.vocab_size, (args.batch_size, seq + 1), device=device)  # [B, S + 1]
    batch = _FixedBatch(ids[:, :-1], ids[:, 1:])  # inputs, and targets: the inputs shifted by one
    autocast = _autocast(device, dtype)

    def step() -> dict[str, torch.Tensor]:
        return train_step(model, model, opt, batch, train_args, device, autocast=autocast)

    timing.reset_peak_memory(device)
    measured = timing.measure(step, device, args.warmup, args.repeats)
    memory = timing.peak_memory(device)
    out = step()
    last_loss = float(out["loss"] + out["aux_loss"])  # sync, once, after timing: the steps must have produced a number
    tokens = args.batch_size * seq
    tokens_per_s = tokens / measured.median_s
    settings = {
        "batch_size": args.batch_size,
        "seq_len": seq,
        "backend": config.moe and config.moe.backend,
        "optimizer": f"AdamW (fused on CUDA), gradient clip {train_args.grad_clip}",
        "precision": f"fp32 weights, {dtype} autocast",
    }
    return settings, {
        "tokens_per_step": tokens,
        "step": measured.to_dict(),
        "tokens_per_s": tokens_per_s,
        "train_flops_per_token": counts.train_flops_per_token,
        "achieved_tflops": tokens_per_s * counts.train_flops_per_token / 1e12,
        "params_total": counts.params_total,
        "params_active": counts.params_active,
        "peak_memory": memory,
        "last_loss": last_loss,
    }


# --------------------------------------------------------------------------- infer


def run_infer(args, config: ModelConfig, device: torch.device, dtype: str) -> tuple[dict, dict]:
    """Prefill and KV-cached greedy decoding at each batch size of `--batch-sizes` (else
    `--batch-size`), each step set against its memory-bandwidth floor (moe/perf/floor.py). The
    top-level prefill/decode figures are those of the first batch size; `batches` has them all."""
    prompt_len = args.prompt_len or min(128, config.max_seq_len)
    batch_sizes = getattr(args, "batch_sizes", None) or [args.batch_size]
    counts = flops.count(config, prompt_len)
    _check_fits(counts.params_total * timing.DTYPES[dtype].itemsize, device, f"inference of {config.name}")
    bandwidth = floor.measure_bandwidth(device, warmup=max(args.warmup, 1), repeats=args.repeats)
    torch.manual_seed(0)
    model = Transformer(config).to(device=device, dtype=timing.DTYPES[dtype]).eval()
    timing.reset_peak_memory(device)
    rows = [_infer_at(model, B, prompt_len, args, device, bandwidth["bytes_per_s"]) for B in batch_sizes]
    memory = timing.peak_memory(device)
    first, B0 = rows[0], batch_sizes[0]
    prefill_tps = B0 * prompt_len / first["prefill"]["timing"]["median_s"]
    settings = {
        "batch_size": B0,
        "batch_sizes": batch_sizes,
        "prompt_len": prompt_len,
        "new_tokens": args.new_tokens,
        "backend": config.moe and config.moe.backend,
        "precision": f"{dtype} weights",
        "decoding": "greedy",
    }
    return settings, {
        "prefill": first["prefill"]["timing"],
        "prefill_tokens_per_s": prefill_tps,
        "prefill_forward_flops_per_token": counts.forward_flops_per_token,
        "prefill_achieved_tflops": prefill_tps * counts.forward_flops_per_token / 1e12,
        "decode": first["decode"]["timing"],
        "decode_tokens_per_s": B0 * args.new_tokens / first["decode"]["timing"]["median_s"],
        "decode_ms_per_step": first["decode"]["timing"]["median_s"] / args.new_tokens * 1e3,
        "peak_memory": memory,
        "bandwidth": bandwidth,
        "batches": rows,
    }


def _infer_at(model: Transformer, B: int, prompt_len: int, args, device: torch.device, bytes_per_s: float) -> dict:
    """One batch size: the prefill of B x prompt_len tokens and `new_tokens` greedy decode steps,
    timed, then replayed once untimed with the routers recorded to count each step's bytes."""
    prompt = torch.randint(model.config.vocab_size, (B, prompt_len), device=device)
    with torch.no_grad():
        prefill = timing.measure(lambda: model(prompt, model.new_cache()), device, args.warmup, args.repeats)
        decoding = _time_decode(model, prompt, args.new_tokens, device, args.warmup, args.repeats)
        with floor.RoutingRecorder(model) as routing:
            cache = model.new_cache()
            token = model(prompt, cache)[:, -1:].argmax(-1)  # [B, 1]
            prefill_bytes = floor.step_bytes(model, prompt, prompt_len, routing.distinct())
            steps = []
            for i in range(args.new_tokens):
                routing.reset()
                step_ids = token
                token = model(token, cache)[:, -1:].argmax(-1)
                # the positions a step must read: the prompt and every token so far, its own included
                steps.append(floor.step_bytes(model, step_ids, prompt_len + i + 1, routing.distinct()))
    step_s = decoding.median_s / args.new_tokens
    return {
        "batch_size": B,
        "prefill": {
            "timing": prefill.to_dict(),
            **floor.floor_figures(prefill.median_s, prefill_bytes, bytes_per_s, B * prompt_len),
        },
        "decode": {
            "timing": decoding.to_dict(),
            **floor.floor_figures(step_s, floor.StepBytes.mean(steps), bytes_per_s, B),
        },
    }


def _time_decode(
    model: Transformer, prompt: torch.Tensor, new_tokens: int, device: torch.device, warmup: int, repeats: int
) -> timing.Timing:
    """Wall time of `new_tokens` greedy KV-cached decode steps after an untimed prefill, each
    repeat from a fresh prefill (whatever the cache does in place, every repeat decodes the same
    tokens). Timed with perf_counter around the steps, synchronized on a GPU."""
    times = []
    for i in range(warmup + repeats):
        cache = model.new_cache()
        token = model(prompt, cache)[:, -1:].argmax(-1)  # [B, 1]
        timing.synchronize(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, cache)[:, -1:].argmax(-1)  # greedy; stays on the device
        timing.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return timing._summary(times, warmup, repeats, "time.perf_counter around the decode steps (prefill untimed)")


# --------------------------------------------------------------------------- layers


def run_layers(args, config: ModelConfig, device: torch.device, dtype: str) -> tuple[dict, dict]:
    seq = args.seq_len or config.max_seq_len
    backends = (
        args.backends.split(",")
        if args.backends
        else ["eager", "torch"] + (["triton"] if device.type == "cuda" else [])
    )
    for b in backends:
        check_backend(b, "--backends")
    counts = components.layer_counts(config)
    jobs = [(kind, None) for kind in ("attention", "dense", "head") if counts[kind]]
    jobs += [("moe", b) for b in backends] if counts["moe"] else []
    rows = []
    for kind, backend in jobs:
        cfg = with_backend(config, backend) if backend else config
        largest = sum(p.numel() for p in components.build(kind, cfg, device="meta").parameters())
        _check_fits(largest * 4 * 3, device, f"the {kind} layer of {config.name}")  # weights, grads, activations
        torch.manual_seed(0)
        module = components.build(kind, cfg, device=device).to(timing.DTYPES[dtype])
        train_flops = components.train_flops_per_token(kind, cfg, seq)
        row = {"layer": kind, "backend": backend, "train_flops_per_token": train_flops}
        for mode, backward in (("forward", False), ("forward_backward", True)):
            step = components.make_step(kind, module, cfg, args.batch_size, seq, backward=backward)
            with torch.no_grad() if not backward else torch.enable_grad():
                measured = timing.measure(step, device, args.warmup, args.repeats)
            tps = args.batch_size * seq / measured.median_s
            row[mode] = {
                **measured.to_dict(),
                "tokens_per_s": tps,
                "tflops": tps * train_flops / (1 if backward else 3) / 1e12,
            }
        rows.append(row)
        del module
    return {"batch_size": args.batch_size, "seq_len": seq, "backends": backends}, {"layers": rows}

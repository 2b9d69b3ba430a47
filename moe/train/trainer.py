"""Training: `moe train --config CONFIG` and its Python API, `run(config, TrainArgs(...))`.

Legend: B = batch size, T = tokens per sequence, V = vocab size.

One step, as in nanoGPT's train.py:
    for each of grad_accum micro-batches:  loss = CE(model(x), y) + model.aux_loss(); backward
    clip the gradient norm; AdamW step (lr: linear warmup, then cosine to min_lr)
    update_expert_biases(model)   # aux-loss-free balancing, after the optimizer step
bf16 autocast on CUDA, fp32 on CPU. Host syncs happen only on logging, eval and save steps;
a non-finite loss is recorded on the device and reported (with its step) at the next of those.

The pieces a distributed trainer wraps are separate functions taking the model/optimizer:
build_model, build_optimizer, train_step, clip_gradients, evaluate, save/load in checkpoint.py.
`run` reaches them through a runtime: SingleProcess here, moe.parallel.trainer.Distributed
when torchrun launched the process (expert parallelism, FSDP2, sharded checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..io import checkpoint
from . import metrics
from ..config import ModelConfig
from .data import BatchSampler, TokenView, check_vocab, eval_batches, load_corpus, split_ranges
from ..device import pick_device
from ..layer import MoE, update_expert_biases
from ..model import Transformer
from .run_folder import clear_run_dir, locate_run, rng_state, set_rng_state


class TrainingDiverged(ValueError):
    """The loss became NaN or inf; the last good checkpoint is left in place."""


def _arg(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainArgs:
    """Everything about a training run that is not the model. The CLI flags are these fields."""

    out: str | None = _arg(None, "run folder (default runs/<config name>)")
    data: str | None = _arg(None, "text file, folder of text files, or token file (.npy, .bin); "
                                  "default: the Python standard library's source as bytes")
    token_dtype: str = _arg("uint16", "dtype of a raw .bin token file: uint16 or uint32")
    val_fraction: float = _arg(0.1, "share of the corpus held out for validation")
    steps: int = _arg(600, "optimizer steps; the learning-rate schedule spans them")
    batch_size: int = _arg(16, "sequences per micro-batch")
    seq_len: int | None = _arg(None, "tokens per sequence (default: the config's max_seq_len)")
    grad_accum: int = _arg(1, "micro-batches per optimizer step")
    lr: float = _arg(3e-3, "peak learning rate")
    min_lr: float = _arg(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int | None = _arg(None, "steps of linear warmup (default: 5%% of --steps)")
    weight_decay: float = _arg(0.1, "AdamW weight decay on matrices (not on norms or biases)")
    beta1: float = _arg(0.9, "AdamW beta1")
    beta2: float = _arg(0.95, "AdamW beta2")
    grad_clip: float = _arg(1.0, "clip the gradient norm to this (0: off)")
    eval_every: int = _arg(100, "steps between validation evaluations")
    eval_batches: int = _arg(8, "validation batches per evaluation (a fixed set)")
    log_every: int = _arg(10, "steps between metrics rows")
    save_every: int = _arg(200, "steps between checkpoints (one is always written at the end)")
    keep_last: int = _arg(3, "checkpoints kept")
    seed: int = _arg(0, "seed of the initialisation and of the data order")
    ep: int = _arg(1, "expert parallelism under torchrun: split each layer's experts over this many ranks "
                      "(it must divide the number of processes; the rest is data parallelism)")
    dist_timeout: float = _arg(600.0, "under torchrun: seconds a collective may wait before the run fails")
    device: str = _arg("auto", "cpu, cuda, cuda:N or auto")
    compile: bool = _arg(False, "torch.compile the model")
    resume: str | None = _arg(None, "continue the run in this folder (or from this checkpoint)")
    overwrite: bool = _arg(False, "replace a previous run in the output folder")
    stop_at: int | None = _arg(None, "stop after this step, as if interrupted (the schedule still spans --steps)")
    time_limit: float | None = _arg(None, "stop (and save) after this many seconds of training")
    progress: bool = _arg(True, "show a progress bar")
    plots: bool = _arg(True, "draw PNG plots from metrics.jsonl at the end")

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every",
                    "save_every", "keep_last", "ep", "dist_timeout"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.seq_len is not None and self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if self.warmup_steps is None:
            self.warmup_steps = self.steps // 20
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


# --------------------------------------------------------------------------- building blocks


def build_model(config: ModelConfig, device: torch.device) -> Transformer:
    return Transformer(config).to(device)


def build_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    """AdamW; matrices (weights, expert stacks, embeddings) decay, norms and biases do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2))


def lr_at(step: int, args: TrainArgs) -> float:
    """Learning rate of step (1-based): linear warmup to lr, then cosine decay to min_lr."""
    if step <= args.warmup_steps:
        return args.lr * step / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; CPU trains in fp32 (exact, and resumable bit for bit)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def clip_gradients(model: nn.Module, max_norm: float) -> Tensor:
    """Total gradient norm before clipping (a device tensor: no sync)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


def train_step(model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer,
               sampler: BatchSampler, args: TrainArgs, device: torch.device,
               clip: Callable[[nn.Module, float], Tensor] = clip_gradients) -> dict[str, Tensor]:
    """One optimizer step over grad_accum micro-batches; returns device tensors (no sync).

    `forward` is what runs the batch (the model itself, or its torch.compile wrapper);
    `clip` clips the gradients and returns their norm (a sharded model brings its own).
    """
    model.train()
    ce_sum = aux_sum = torch.zeros((), device=device)
    for _ in range(args.grad_accum):
        x_BT, y_BT = (t.to(device, non_blocking=True) for t in sampler.next_batch())
        with autocast_for(device):
            logits_BTV = forward(x_BT)
        ce = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten())
        aux = model.aux_loss()
        ((ce + aux) / args.grad_accum).backward()
        ce_sum, aux_sum = ce_sum + ce.detach(), aux_sum + aux.detach()
    grad_norm = clip(model, args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_expert_biases(model)  # uses the load of every micro-batch since the last update
    return {"loss": ce_sum / args.grad_accum, "aux_loss": aux_sum / args.grad_accum, "grad_norm": grad_norm}


def evaluate(forward: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device) -> float:
    """Mean cross-entropy (nats per token) over fixed batches."""
    total, count = eval_sums(forward, batches, device)
    return float(total) / count  # host sync, once per evaluation


@torch.no_grad()
def eval_sums(forward: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device) -> tuple[Tensor, int]:
    """(summed cross-entropy as a float64 device tensor, token count) over the batches."""
    forward.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for x_BT, y_BT in batches:
        with autocast_for(device):
            logits_BTV = forward(x_BT.to(device))
        total += F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.to(device).flatten(), reduction="sum")
        count += y_BT.numel()
    forward.train()
    return total, count


def moe_stats(model: Transformer) -> list[dict[str, Any]]:
    """Per MoE layer, the statistics of the last forward (reading them syncs)."""
    rows = []
    for idx, block in enumerate(model.layers):
        if isinstance(block.ffn, MoE):
            stats = block.ffn.stats
            rows.append({"layer": idx, "load": [round(v, 6) for v in stats.pop("load").tolist()], **stats})
    return rows


# --------------------------------------------------------------------------- one process or many


class SingleProcess:
    """What `run` asks of the world it trains in; here, one process holds everything.
    moe.parallel.trainer.Distributed answers the same questions for torchrun's ranks."""

    rank, world_size, is_main = 0, 1, True
    device = staticmethod(pick_device)  # (name) -> torch.device
    clip_gradients = staticmethod(clip_gradients)  # (model, max_norm) -> norm before clipping
    evaluate = staticmethod(evaluate)  # (forward, batches, device) -> mean validation loss
    load_checkpoint = staticmethod(checkpoint.load_checkpoint)  # (path, model, optimizer) -> trainer state
    save_checkpoint = staticmethod(checkpoint.save_checkpoint)  # (root, step, model, optimizer, state, keep_last)

    def wrap(self, model: Transformer) -> nn.Module:
        return model

    def reduce_step(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        return out

    def any(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def _runtime(args: TrainArgs) -> SingleProcess:
    from ..distributed.mesh import under_torchrun

    if under_torchrun():
        from .distributed_runtime import Distributed

        return Distributed(args)
    if args.ep > 1:
        raise ValueError(f"--ep {args.ep} needs several processes: launch with "
                         f"torchrun --nproc-per-node N -m moe train ... --ep {args.ep}")
    return SingleProcess()


# --------------------------------------------------------------------------- the run


def run(config: ModelConfig, args: TrainArgs) -> dict[str, Any]:
    """Train `config` as `args` say, in the run folder; returns a summary:

    run_dir, step, tokens, params, loss (last train row), val_loss_start / val_loss (nats per
    token) and val_bpb_start / val_bpb (bits per byte; None for token data), tokens_per_s
    (median over train rows), elapsed_s, drop_rate, load ({layer: per-expert share, mean of
    the last 10 train rows}), checkpoint (latest folder), metrics (path), plots (paths).

    Launched by torchrun, every rank runs this with moe.parallel's runtime (expert and data
    parallelism, sharded checkpoints); rank 0 writes the run folder.
    """
    runtime = _runtime(args)
    try:
        return _train(config, args, runtime)
    finally:
        runtime.close()


def _train(config: ModelConfig, args: TrainArgs, rt: SingleProcess) -> dict[str, Any]:
    device = rt.device(args.device)
    if args.compile and device.type == "cpu" and config.moe is not None and config.moe.backend == "torch":
        raise ValueError("--compile on CPU needs 'backend: eager' under moe: in the config (torch's "
                         "grouped_mm compiles only in bf16, which CUDA training uses)")
    run_dir, resume_from, continuing = locate_run(config.name, args.out, args.resume, args.overwrite)

    # Everything that can fail on bad input happens before the run folder is touched.
    corpus = load_corpus(args.data, args.token_dtype)
    check_vocab(corpus, config.vocab_size)
    seq_len = args.seq_len or config.max_seq_len
    train_ranges, val_ranges = split_ranges(len(corpus.tokens), args.val_fraction)
    sampler = BatchSampler(TokenView(corpus.tokens, train_ranges), args.batch_size, seq_len, args.seed,
                           rt.rank, rt.world_size)
    # One validation set for any number of ranks: each evaluates its rows of every batch.
    mine = slice(rt.rank * args.batch_size, (rt.rank + 1) * args.batch_size)
    val_set = [(x_BT[mine], y_BT[mine]) for x_BT, y_BT in eval_batches(
        TokenView(corpus.tokens, val_ranges), args.batch_size * rt.world_size, seq_len, args.eval_batches)]
    torch.manual_seed(args.seed)
    model = build_model(config, device)
    params = sum(p.numel() for p in model.parameters())
    model = rt.wrap(model)
    optimizer = build_optimizer(model, args)
    step, tokens, elapsed = 0, 0, 0.0
    if resume_from is not None:
        state = rt.load_checkpoint(resume_from, model, optimizer)
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed_s"]
        sampler.load_state_dict(state["data"])
        set_rng_state(state["rng"])
    rt.barrier()  # every rank has checked the run folder before rank 0 changes it
    if rt.is_main:
        if args.overwrite and not continuing:
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    if rt.is_main and not continuing:
        record = {"config": config.to_dict(), "args": dataclasses.asdict(args), "data": corpus.source,
                  "params": params, "torch": torch.__version__, "device": str(device),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **rt.describe()}
        checkpoint.write_atomic(run_dir / "run.json", json.dumps(record, indent=2).encode())
    log = metrics.MetricsLog(run_dir / "metrics.jsonl", keep_until_step=step) if rt.is_main else None
    forward = torch.compile(model) if args.compile else model
    ckpt_root = run_dir / "checkpoints"

    tokens_per_step = args.batch_size * seq_len * args.grad_accum * rt.world_size
    last = min(args.steps, args.stop_at or args.steps)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step whose loss was not finite
    t0, elapsed0 = time.perf_counter(), elapsed
    clock = lambda: elapsed0 + time.perf_counter() - t0  # noqa: E731
    t_row, tokens_row, paused = clock(), tokens, 0.0  # throughput excludes eval and save time

    def check_finite() -> None:
        bad = int(bad_step)  # host sync, on log / eval / save steps only
        if bad >= 0:
            kept = checkpoint.checkpoint_dirs(ckpt_root)
            raise TrainingDiverged(f"loss became nan or inf at step {bad}; stopped. The last good checkpoint "
                                   f"is {kept[-1] if kept else 'none (none was saved)'}")

    def eval_row() -> None:
        val = rt.evaluate(forward, val_set, device)
        if log:
            log.write({"kind": "eval", "step": step, "tokens": tokens, "elapsed_s": round(clock(), 3),
                       "val_loss": val, "val_bpb": metrics.bits(val) if corpus.is_bytes else None})

    def save() -> None:
        state = {"tokens": tokens, "elapsed_s": clock(), "data": sampler.state_dict(), "rng": rng_state(),
                 "args": dataclasses.asdict(args)}
        rt.save_checkpoint(ckpt_root, step, model, optimizer, state, args.keep_last)

    bar = tqdm(total=args.steps, initial=step, desc=config.name, disable=not (args.progress and rt.is_main),
               dynamic_ncols=True, unit="step")
    try:
        if step == 0:
            eval_row()
        while step < last:
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            out = rt.reduce_step(train_step(model, forward, optimizer, sampler, args, device, rt.clip_gradients))
            tokens += tokens_per_step
            bar.update(1)
            finite = torch.isfinite(out["loss"] + out["aux_loss"])
            bad_step = torch.where((bad_step < 0) & ~finite, step, bad_step)
            stop = step == last or (args.time_limit is not None and rt.any(clock() - elapsed0 > args.time_limit))
            if step % args.log_every == 0 or stop:
                check_finite()
                layers = moe_stats(model)
                now = clock()
                row = {"kind": "train", "step": step, "tokens": tokens, "elapsed_s": round(now, 3),
                       "lr": optimizer.param_groups[0]["lr"], **{k: float(v) for k, v in out.items()},
                       "tokens_per_s": (tokens - tokens_row) / max(now - t_row - paused, 1e-9),
                       "drop_rate": sum(r["drop_rate"] for r in layers) / len(layers) if layers else 0.0,
                       "load_max_mean": max((max(r["load"]) * len(r["load"]) for r in layers), default=1.0),
                       "layers": layers}
                if log:
                    log.write(row)
                t_row, tokens_row, paused = now, tokens, 0.0
                bar.set_postfix_str(f"loss {row['loss']:.3f}  {row['tokens_per_s']:,.0f} tok/s  "
                                    f"drop {row['drop_rate']:.1%}  load max/mean {row['load_max_mean']:.2f}")
            t_pause = clock()
            if step % args.eval_every == 0 or stop:
                check_finite()
                eval_row()
            if step % args.save_every == 0 or stop:
                check_finite()
                save()
            paused += clock() - t_pause
            if stop:
                break
    finally:
        bar.close()
        if log:
            log.close()

    rt.barrier()  # rank 0 has written metrics.jsonl
    rows = metrics.read_rows(run_dir / "metrics.jsonl")
    plots = _draw_plots(run_dir) if args.plots and rt.is_main else []
    first, final = metrics.eval_endpoints(rows)
    train_rows = [r for r in rows if r["kind"] == "train"]
    speeds = sorted(r["tokens_per_s"] for r in train_rows)
    kept = checkpoint.checkpoint_dirs(ckpt_root)
    return {
        "run_dir": str(run_dir), "step": step, "tokens": tokens, "params": params,
        "loss": train_rows[-1]["loss"] if train_rows else None,
        "val_loss_start": first and first["val_loss"], "val_loss": final and final["val_loss"],
        "val_bpb_start": first and first["val_bpb"], "val_bpb": final and final["val_bpb"],
        "tokens_per_s": speeds[len(speeds) // 2] if speeds else None, "elapsed_s": clock(),
        "drop_rate": train_rows[-1]["drop_rate"] if train_rows else None, "load": metrics.final_load(rows),
        "checkpoint": str(kept[-1]) if kept else None, "metrics": str(run_dir / "metrics.jsonl"),
        "plots": [str(p) for p in plots],
    }


def _draw_plots(run_dir: Path) -> list[Path]:
    try:
        from .plots import draw_run
    except ImportError as e:  # matplotlib is optional for the library
        tqdm.write(f"plots skipped: {e}")
        return []
    return draw_run(run_dir)

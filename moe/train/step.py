"""One training step and the pieces around it: the model, its optimizer, the learning rate,
gradient clipping, validation loss and the MoE layers' statistics.

Legend: B = sequences in a micro-batch, S = tokens per sequence, V = vocab size.

One step, as in nanoGPT's train.py:
    for each of grad_accum micro-batches:  loss = CE(model(x), y) + model.aux_loss()
                                           (+ mtp_loss_coef * MTP loss, models with MTP modules); backward
    clip the gradient norm; AdamW step (the caller sets the lr: linear warmup, then cosine)
    update_expert_biases(model)   # aux-loss-free balancing, after the optimizer step
bf16 autocast on CUDA, fp32 on CPU, unless the caller brings its own autocast (`moe bench`).
These are functions of the model and optimizer so that a distributed runtime can wrap them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..layer import MoE, update_expert_biases
from ..model import Transformer
from .args import TrainArgs


class Batches(Protocol):
    """Where train_step takes its micro-batches: data.BatchSampler, or fixed tensors in `moe bench`."""

    def next_batch(self) -> tuple[Tensor, Tensor]: ...  # (inputs [B, S], targets [B, S]) int64


def build_model(config: ModelConfig, device: torch.device) -> Transformer:
    return Transformer(config).to(device)


def build_optimizer(model: nn.Module, args: TrainArgs, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; matrices (weights, expert stacks, embeddings) decay, norms and biases do not.
    fused: torch's fused CUDA kernel; None is torch's default (what `moe train` uses)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=fused)


def lr_at(step: int, args: TrainArgs) -> float:
    """Learning rate of step (1-based): linear warmup to lr, then cosine decay to min_lr."""
    if step <= args.warmup_steps:
        return args.lr * step / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def autocast_for(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA; CPU trains in fp32 (exact, and resumable bit for bit)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def clip_gradients(model: nn.Module, max_norm: float) -> Tensor:
    """Total gradient norm before clipping (a device tensor: no sync)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


def train_step(
    model: nn.Module,
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    args: TrainArgs,
    device: torch.device,
    clip: Callable[[nn.Module, float], Tensor] = clip_gradients,
    autocast: AbstractContextManager | None = None,
) -> dict[str, Tensor]:
    """One optimizer step over grad_accum micro-batches; returns device tensors (no sync).

    `forward` is what runs the batch (the model itself, or its torch.compile wrapper);
    `clip` clips the gradients and returns their norm (a sharded model brings its own);
    `autocast` is entered around each forward (default: autocast_for(device)); torch.autocast
    and nullcontext may be entered again and again, once per micro-batch.
    """
    model.train()
    use_mtp = len(getattr(model, "mtp", ())) > 0
    ce_sum = aux_sum = mtp_sum = torch.zeros((), device=device)
    for _ in range(args.grad_accum):
        x_BS, y_BS = (t.to(device, non_blocking=True) for t in batches.next_batch())
        with autocast if autocast is not None else autocast_for(device):
            if use_mtp:
                with final_hidden(model) as captured:
                    logits_BSV = forward(x_BS)
                mtp = model.mtp_loss(captured[0], x_BS, y_BS)
            else:
                logits_BSV = forward(x_BS)
        ce = F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.flatten())
        aux = model.aux_loss()  # after the MTP modules ran: their MoE layers' losses are in it
        loss = ce + aux
        if use_mtp:
            loss = loss + model.config.mtp_loss_coef * mtp
            mtp_sum = mtp_sum + mtp.detach()
        (loss / args.grad_accum).backward()
        ce_sum, aux_sum = ce_sum + ce.detach(), aux_sum + aux.detach()
    grad_norm = clip(model, args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_expert_biases(model)  # uses the load of every micro-batch since the last update
    out = {"loss": ce_sum / args.grad_accum, "aux_loss": aux_sum / args.grad_accum, "grad_norm": grad_norm}
    if use_mtp:
        out["mtp_loss"] = mtp_sum / args.grad_accum
    return out


@contextmanager
def final_hidden(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collects the input of `model.norm` (the last block's output h [B, S, D]) while `forward`
    runs, whatever wraps the model (torch.compile, FSDP): the MTP modules continue from it."""
    captured: list[Tensor] = []
    handle = model.norm.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


def evaluate(forward: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device) -> float:
    """Mean cross-entropy (nats per token) over fixed batches."""
    total, count = eval_sums(forward, batches, device)
    return float(total) / count  # host sync, once per evaluation


@torch.no_grad()
def eval_sums(forward: nn.Module, batches: list[tuple[Tensor, Tensor]], device: torch.device) -> tuple[Tensor, int]:
    """(summed cross-entropy as a float64 device tensor, token count) over the batches."""
    forward.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for x_BS, y_BS in batches:
        with autocast_for(device):
            logits_BSV = forward(x_BS.to(device))
        total += F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.to(device).flatten(), reduction="sum")
        count += y_BS.numel()
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

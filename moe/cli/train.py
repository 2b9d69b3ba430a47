"""`moe train [--config CONFIG] [--steps N] [--out DIR] [--resume DIR] ...`: a thin wrapper over
`moe.train.run`. Each field of `TrainArgs` is a flag (`--batch-size` for batch_size).

Without --config it trains the shipped `tiny`, or, with --resume, the config the checkpoint
was trained with."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing

from ..config import load_config
from ..shipped_configs import DEFAULT_CONFIG
from ..train import TrainArgs, run
from ..train.resume import checkpoint_config

METAVARS = {"out": "DIR", "resume": "DIR", "data": "PATH", "time_limit": "SECONDS"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="CONFIG",
        help=f"model config: a shipped name (tiny, deepseek-v3-mini, ...) or a YAML / JSON file (default: "
        f"{DEFAULT_CONFIG}; with --resume, the checkpoint's)",
    )
    hints = typing.get_type_hints(TrainArgs)
    for f in dataclasses.fields(TrainArgs):
        flag, hint, help_text = "--" + f.name.replace("_", "-"), hints[f.name], f.metadata["help"]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
        default = "" if f.default is None else f" (default: {f.default})"
        metavar = METAVARS.get(f.name, {int: "N", float: "X", str: "NAME"}[kind])
        parser.add_argument(flag, type=kind, default=f.default, metavar=metavar, help=help_text + default)


def main(args: argparse.Namespace) -> int:
    # The flags first: they are checked without reading a file.
    train_args = TrainArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainArgs)})
    if args.config is not None:
        config = load_config(args.config)
    elif train_args.resume:
        config = checkpoint_config(train_args.resume)
    else:
        config = load_config(DEFAULT_CONFIG)
    summary = run(config, train_args)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary rather than one per rank
        if summary["stopped_by"] == "time_limit":  # one line, before the summary, so it is not missed
            print(
                f"stopped by --time-limit {train_args.time_limit:g} s at step {summary['step']} of "
                f"{summary['steps']}; the checkpoint is saved: --resume {summary['run_dir']} with the same flags "
                f"continues it"
            )
        print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    print(
        f"run {s['run_dir']}: step {s['step']}, {s['tokens'] / 1e6:.2f}M tokens, "
        f"{s['params'] / 1e6:.2f}M params, {s['elapsed_s']:.0f} s of training"
        + (f", {s['tokens_per_s']:,.0f} tokens/s" if s["tokens_per_s"] else "")
    )
    if s["val_loss"] is not None:
        line = f"validation loss: {s['val_loss_start']:.4f} -> {s['val_loss']:.4f} nats per token"
        if s["val_bpb"] is not None:
            line += f" = {s['val_bpb_start']:.3f} -> {s['val_bpb']:.3f} bits per byte"
        print(line)
    if s["load"]:
        print(load_table(s["load"], s["drop_rate"]))
    if s["checkpoint"]:
        print(f"checkpoint: {s['checkpoint']}")
    if s["plots"]:
        print(f"plots: {', '.join(s['plots'])}")


def load_table(load: dict[int, list[float]], drop_rate: float | None) -> str:
    """Layer x expert shares of the routed assignments (one column per expert up to 16)."""
    num_experts = len(next(iter(load.values())))
    lines = [
        f"expert load (share of routed assignments, mean of the last 10 logged steps; "
        f"uniform = {1 / num_experts:.3f}; drop rate {drop_rate or 0:.1%}):"
    ]
    wide = num_experts <= 16
    header = [f"e{i:<4d}" for i in range(num_experts)] if wide else ["min  ", "max  "]
    lines.append("  layer  " + " ".join(header) + "  max/mean")
    for layer, shares in load.items():
        cells = shares if wide else [min(shares), max(shares)]
        lines.append(f"  {layer:5d}  " + " ".join(f"{v:.3f}" for v in cells) + f"  {max(shares) * num_experts:8.2f}")
    return "\n".join(lines)

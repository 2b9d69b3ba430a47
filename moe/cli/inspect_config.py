"""`moe inspect CONFIG`: sizes of a model without building its weights (meta device)."""

from __future__ import annotations

import argparse
import json

from ..config import load_config
from ..model import layer_plan
from ..perf import flops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="model config (YAML or JSON)")
    parser.add_argument("--seq-len", type=int, default=None, help="context for attention FLOPs (default: max_seq_len)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    counts = flops.count(config, args.seq_len)
    plan = layer_plan(config)
    report = {
        "name": config.name,
        "params_total": counts.params_total,
        "params_active": counts.params_active,
        "params_embedding": counts.params_embedding,
        "params_routed_experts": counts.params_routed,
        "train_flops_per_token": counts.train_flops_per_token,
        "seq_len": counts.seq_len,
        "layers_dense": plan.count(False),
        "layers_moe": plan.count(True),
        "weight_bytes": {dtype: counts.weight_bytes(dtype) for dtype in flops.BYTES_PER_PARAM},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    moe = config.moe
    rows = [
        ("model", f"{config.name} ({args.config})"),
        ("layers", f"{config.num_layers} ({plan.count(False)} dense, {plan.count(True)} MoE)"),
    ]
    if moe is not None and any(plan):
        routing = f"{moe.num_experts} routed, top-{moe.top_k}, {moe.score_func}"
        if moe.num_shared_experts:
            routing += f", {moe.num_shared_experts} shared"
        if moe.n_group > 1:
            routing += f", {moe.n_group} groups keep {moe.topk_group}"
        rows.append(("experts", routing))
    rows += [
        ("params total", _human(counts.params_total)),
        ("params active", f"{_human(counts.params_active)} ({counts.params_active / counts.params_total:.1%})"),
        (
            "train FLOPs/token",
            f"{counts.train_flops_per_token:.4g} (6 x active matmul params + attention at context {counts.seq_len})",
        ),
        ("weights", ", ".join(f"{d} {_human(b, 'B')}" for d, b in report["weight_bytes"].items())),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}{unit}".rstrip()
    return f"{n:.0f} {unit}".rstrip()

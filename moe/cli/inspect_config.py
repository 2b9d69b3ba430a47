"""`moe inspect --config NAME_OR_PATH` (or `moe inspect PATH`): sizes of a model without building
its weights (meta device)."""

from __future__ import annotations

import argparse
import json

from ..config import load_config
from ..model import layer_plan
from ..perf import flops
from .configs import add_config_argument, config_spec, human, routing
from .flags import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument(
        "--seq-len", type=positive_int, default=None, help="context for attention FLOPs (default: max_seq_len)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def main(args: argparse.Namespace) -> int:
    spec = config_spec(args)
    config = load_config(spec)
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
    rows = [
        ("model", f"{config.name} ({spec})"),
        ("layers", f"{config.num_layers} ({plan.count(False)} dense, {plan.count(True)} MoE)"),
    ]
    if any(plan):
        rows.append(("experts", routing(config)))
    rows += [
        ("params total", human(counts.params_total)),
        ("params active", f"{human(counts.params_active)} ({counts.params_active / counts.params_total:.1%})"),
        (
            "train FLOPs/token",
            f"{counts.train_flops_per_token:.4g} (6 x active matmul params + attention at context {counts.seq_len})",
        ),
        ("weights", ", ".join(f"{d} {human(b, 'B')}" for d, b in report["weight_bytes"].items())),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0

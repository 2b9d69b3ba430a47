"""`moe configs`: the configs that ship with the package, by name, with their sizes and routing;
and the one way every subcommand takes a config (`--config NAME_OR_PATH`).

    moe configs                      # a table: name, scale, params, active, model, routing
    moe configs --json
    moe train --config tiny          # any subcommand: a shipped name ...
    moe inspect --config configs/full/deepseek-v3.yaml   # ... or a path (a path that exists wins)

Sizes are counted on the meta device (moe.perf.flops): no weights are built.
"""

from __future__ import annotations

import argparse
import json

from ..config import ModelConfig, load_config
from ..errors import InputError
from ..model import layer_plan
from ..perf import flops
from ..shipped_configs import CONFIG_DIR, shipped_configs

# The published model each shipped config is (configs/full/) or mirrors at CPU size (configs/).
# tests/cli/test_configs_cli.py holds every shipped config to an entry here.
FAMILIES = {
    "tiny": "Ling 2.0 / DeepSeek-V3 routing at toy size",
    "deepseek-v3-mini": "DeepSeek-V3",
    "ling-1t-mini": "Ling-1T (Ling 2.0)",
    "mixtral-mini": "Mixtral-8x7B",
    "qwen3-moe-mini": "Qwen3-30B-A3B",
    "dbrx": "DBRX",
    "deepseek-v3": "DeepSeek-V3",
    "ling-1t": "Ling-1T (Ling 2.0)",
    "ling-flash-2.0": "Ling-flash-2.0 (Ling 2.0)",
    "ling-mini-2.0": "Ling-mini-2.0 (Ling 2.0)",
    "mixtral-8x7b": "Mixtral-8x7B",
    "olmoe-1b-7b": "OLMoE-1B-7B",
    "qwen3-30b-a3b": "Qwen3-30B-A3B",
    "seed-speculated-ling-10t": "a seed article's guess at Ling-1T, not a released model",
}


# --------------------------------------------------------------------------- --config, for every subcommand


def add_config_argument(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    """`--config NAME_OR_PATH`; with `positional`, also the older `moe inspect PATH` form."""
    if positional:
        parser.add_argument("config_positional", nargs="?", metavar="CONFIG", help="the same as --config")
    parser.add_argument(
        "--config",
        metavar="NAME_OR_PATH",
        help="a shipped config's name (`moe configs` lists them: tiny, deepseek-v3, ...) or a YAML/JSON file",
    )


def config_spec(args: argparse.Namespace) -> str:
    """The config the command line named, by either form; one line when none or two differ."""
    given = [v for v in (getattr(args, "config_positional", None), args.config) if v is not None]
    if not given:
        raise InputError("no config given: --config NAME_OR_PATH (`moe configs` lists the names)")
    if len(given) == 2 and given[0] != given[1]:
        raise InputError(f"two configs given: {given[0]!r} and --config {given[1]!r}; give one")
    return given[0]


# --------------------------------------------------------------------------- describing a config


def routing(config: ModelConfig) -> str:
    """'256 routed, top-8, sigmoid, 1 shared, 8 groups keep 4', or 'dense' without MoE layers."""
    moe = config.moe
    if moe is None or not any(layer_plan(config)):
        return "dense"
    text = f"{moe.num_experts} routed, top-{moe.top_k}, {moe.score_func}"
    if moe.num_shared_experts:
        text += f", {moe.num_shared_experts} shared"
    if moe.n_group > 1:
        text += f", {moe.n_group} groups keep {moe.topk_group}"
    return text


def human(n: float, unit: str = "") -> str:
    """671026404352 -> '671.03 B' (parameters), with unit 'B' -> '671.03 GB' (bytes)."""
    for scale, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}{unit}".rstrip()
    return f"{n:.0f} {unit}".rstrip()


# --------------------------------------------------------------------------- `moe configs`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def main(args: argparse.Namespace) -> int:
    rows = [_describe(name, path) for name, path in shipped_configs().items()]
    if args.json:
        print(json.dumps({"config_dir": str(CONFIG_DIR), "configs": rows}, indent=2))
        return 0
    table = [("name", "scale", "params", "active", "model", "routing")]
    table += [
        (r["name"], r["scale"], human(r["params_total"]), human(r["params_active"]), r["family"], r["routing"])
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    print(
        "\nGive a name wherever a config is asked for (`moe train --config tiny`, `moe inspect --config "
        "deepseek-v3`) or a path to your own YAML. 'CPU' configs train in minutes on a CPU and keep their "
        "model's routing; 'full' ones are the published sizes (inspect, calibrate)."
    )
    return 0


def _describe(name: str, path) -> dict:
    config = load_config(path)
    counts = flops.count(config)
    return {
        "name": name,
        "path": str(path),
        "scale": "full" if path.parent.name == "full" else "CPU",
        "family": FAMILIES.get(name, "-"),
        "params_total": counts.params_total,
        "params_active": counts.params_active,
        "routing": routing(config),
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
    }

"""The `moe` command line (also `python -m moe`), one module per subcommand.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`main(args) -> exit code`. Errors a user can fix (bad config, missing file, bad shapes)
print one line and exit 2; set MOE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import bench, calibrate, convert, generate, inspect_config, train
from .errors import UserError

# name -> (module, one-line help)
SUBCOMMANDS = {
    "inspect": (inspect_config, "parameters, training FLOPs per token and weight memory of a config"),
    "train": (train, "train a model on the default corpus or your data; checkpoints, metrics, plots"),
    "generate": (generate, "continue a prompt with a trained model (KV-cached sampling)"),
    "convert": (convert, "convert between Hugging Face model folders and our checkpoints"),
    "bench": (bench, "measure training and inference throughput (tokens/s, TFLOP/s, MFU) on this device"),
    "calibrate": (calibrate, "time a full-size model's layers here and project its training cost"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe", description="Mixture-of-Experts transformers: train, generate, benchmark, calibrate, inspect"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._main(args)
    except (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError) as e:
        if os.environ.get("MOE_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""  # torchrun
        print(f"moe {args.command}: error{rank}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moe {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["UserError", "build_parser", "main"]

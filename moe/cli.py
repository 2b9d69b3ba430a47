"""The `moe` command line (also `python -m moe`).

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`main(args) -> exit code`. Errors a user can fix (bad config, missing file, bad shapes)
print one line and exit 2; set MOE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "inspect": ("moe.inspect", "parameters, training FLOPs per token and weight memory of a config"),
    "train": ("moe.train_cli", "train a model on the default corpus or your data; checkpoints, metrics, plots"),
    "generate": ("moe.generate", "continue a prompt with a trained model (KV-cached sampling)"),
    "convert": ("moe.hf.convert", "convert between Hugging Face model folders and our checkpoints"),
    "bench": ("moe.bench", "measure training and inference throughput (tokens/s, TFLOP/s, MFU) on this device"),
    "calibrate": ("moe.calibrate", "time a full-size model's layers here and project its training cost"),
}


class UserError(Exception):
    """An error the user can fix; reported as one line without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description="Mixture-of-Experts transformers: "
                                     "train, generate, benchmark, calibrate, inspect")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
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

"""The `moe` command line (also `python -m moe`), one module per subcommand.

Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`main(args) -> exit code`. Every subcommand takes its config as `--config NAME_OR_PATH`
(`moe configs` lists the names).

What the user can fix is one line on stderr and exit status 2: `moe.errors.InputError` (bad
configs, data, checkpoints, flags), `moe.extras.MissingExtra` (an optional package to install)
and OSErrors (the path and the system's reason: not found, permission denied, disk full). Flags
argparse refuses are one line and status 2 too. Any other exception is a bug in the tool and
keeps its traceback; MOE_DEBUG=1 shows the traceback of the one-line errors as well. Output cut
short by a closed pipe (`moe configs | head -1`) ends quietly.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from typing import NoReturn

import torch

from ..errors import InputError
from ..extras import MissingExtra
from . import bench, calibrate, configs, convert, generate, inspect_config, train
from .errors import UserError

# name -> (module, one-line help)
SUBCOMMANDS = {
    "configs": (configs, "list the shipped configs by name, with their sizes, models and routing"),
    "inspect": (inspect_config, "parameters, training FLOPs per token and weight memory of a config"),
    "train": (train, "train a model on the default corpus or your data; checkpoints, metrics, plots"),
    "generate": (generate, "continue a prompt with a trained model (KV-cached sampling)"),
    "convert": (convert, "convert between Hugging Face model folders and our checkpoints"),
    "bench": (bench, "measure training and inference throughput (tokens/s, TFLOP/s, MFU) on this device"),
    "calibrate": (calibrate, "time a full-size model's layers here and project its training cost"),
}
DISTRIBUTION = "moe-reference"  # the name on PyPI; the import name is `moe`
SIGPIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for a program a closed pipe stopped


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other error of the tool."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def version() -> str:
    """The installed distribution's version; moe.__version__ where none is installed (a bare checkout)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moe", description="Mixture-of-Experts transformers: train, generate, benchmark, calibrate, inspect"
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"{DISTRIBUTION} {version()} (torch {torch.__version__}, Python {platform.python_version()})",
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
        status = args._main(args)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at interpreter exit
        return status
    except BrokenPipeError:  # before OSError: the reader went away (`| head`), nothing went wrong
        _drop_stdout()
        return SIGPIPE_STATUS
    except (InputError, MissingExtra, OSError) as e:
        if os.environ.get("MOE_DEBUG", "") not in ("", "0"):
            raise
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""  # torchrun
        print(f"{_command(args)}: error{rank}: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_command(args)}: interrupted", file=sys.stderr)
        return 130


def one_line(e: BaseException) -> str:
    """The error as one line; an OSError names its path and the system's reason."""
    if isinstance(e, OSError) and e.filename is not None:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
        return f"{where}: {e.strerror or e}"
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _command(args: argparse.Namespace) -> str:
    """'moe bench train': the subcommand, and its own subcommand where it has one (dest '<name>_command')."""
    inner = getattr(args, f"{args.command}_command", None)
    return f"moe {args.command}" + (f" {inner}" if inner else "")


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is still buffered
    does not fail again on the closed pipe (the recipe of Python's signal module documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout has no file descriptor (captured, as in tests)
        pass


__all__ = ["SUBCOMMANDS", "InputError", "UserError", "build_parser", "main", "one_line", "version"]

"""`moe convert SRC DST`: between Hugging Face model folders and our own checkpoints.

    moe convert Qwen3-30B-A3B/ qwen3-ours/             # HF -> ours (the direction is inferred)
    moe convert qwen3-ours/ qwen3-hf/ --dtype bfloat16  # ours -> HF, in bf16
    moe convert Ling-mini-2.0/ ling-resharded/ --to hf --max-shard-size 2GB

A folder whose config.json has a "model_type" is a Hugging Face one; any other is ours
(`Transformer.save_pretrained`). Both sides are safetensors; a progress bar follows the bytes.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from ..io.hf import FAMILIES, load_hf, save_hf
from ..io.hf.writer import SHARD_BYTES
from ..model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="model folder to read (Hugging Face or ours)")
    parser.add_argument("dst", type=Path, help="folder to write")
    parser.add_argument("--to", choices=("hf", "moe"), default=None, help="format to write (default: the other one)")
    parser.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default=None,
        help="Hugging Face family to write (default: the first that fits the model)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="dtype of the written weights (default: as read)"
    )
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=SHARD_BYTES,
        help="largest safetensors shard of a Hugging Face export, e.g. 5GB (default), 500MB",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def is_hf_folder(directory: Path) -> bool:
    config = directory / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{directory}: no config.json")
    try:
        return "model_type" in json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config}: malformed JSON: {e}") from None


def main(args: argparse.Namespace) -> int:
    source_hf = is_hf_folder(args.src)
    to = args.to or ("moe" if source_hf else "hf")
    if not source_hf and to == "moe":
        raise ValueError(f"{args.src} is already in our format; use --to hf")
    if args.src.resolve() == args.dst.resolve():
        raise ValueError(f"source and destination are the same folder: {args.src}")
    dtype, progress = DTYPES.get(args.dtype), not args.no_progress
    if source_hf:
        model = load_hf(args.src, dtype=dtype, progress=progress)
    else:
        model = Transformer.from_pretrained(args.src)
    if to == "hf":
        save_hf(
            model, args.dst, family=args.family, dtype=dtype, max_shard_bytes=args.max_shard_size, progress=progress
        )
    else:
        model.save_pretrained(args.dst)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst} ({to}, {params / 1e6:.2f}M parameters) from {args.src} ({'hf' if source_hf else 'moe'})")
    return 0

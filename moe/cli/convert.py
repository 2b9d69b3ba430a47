"""`moe convert SRC DST`: between Hugging Face model folders and our own checkpoints.

    moe convert Qwen3-30B-A3B/ qwen3-ours/             # HF -> ours (the direction is inferred)
    moe convert qwen3-ours/ qwen3-hf/ --dtype bfloat16  # ours -> HF, in bf16
    moe convert Ling-mini-2.0/ ling-resharded/ --to hf --max-shard-size 2GB
    moe convert Ling-mini-2.0/ ling-ours/ --overwrite   # replace an earlier conversion

A folder whose config.json has a "model_type" is a Hugging Face one; any other is ours
(`Transformer.save_pretrained`). Both sides are safetensors; a progress bar follows the bytes.
The tokenizer files of SRC (TOKENIZER_FILES: regular files inside it, each at most 64 MiB)
are carried across, so that `moe generate` on DST encodes text as SRC's model did.

Nothing is overwritten: DST must be absent or empty unless --overwrite, and SRC and DST may not
be the same folder or lie one inside the other. The new folder is written beside DST under a
temporary name and renamed into place only when complete (with --overwrite, the old DST is
renamed away first and deleted last), so a crash or a full disk leaves DST as it was.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
from pathlib import Path

import torch

from ..errors import InputError
from ..io.checkpoint import CONFIG_FILE, load_pretrained, save_pretrained
from ..io.files import check_destination, folder_file, read_file, read_json, swap_folder, write_atomic
from ..io.hf import FAMILIES, load_hf, save_hf
from ..io.hf.writer import SHARD_BYTES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TOKENIZER_FILE_BYTES = 64 * 2**20  # the largest published tokenizer.json files are about 30 MB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="model folder to read (Hugging Face or ours)")
    parser.add_argument("dst", type=Path, help="folder to write: absent or empty, unless --overwrite")
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
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DST if it holds anything (swapped in once complete)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def is_hf_folder(directory: Path) -> bool:
    """A Hugging Face model folder: its config.json names a "model_type" (ours never does)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such folder")
    return "model_type" in read_json(folder_file(directory, CONFIG_FILE, "model config"))


def check_folders(src: Path, dst: Path, overwrite: bool) -> None:
    """SRC and DST apart (neither is, nor holds, the other), and DST free to write unless overwrite."""
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_src == real_dst:
        raise InputError(f"source and destination are the same folder: {src}")
    if real_dst.is_relative_to(real_src):
        raise InputError(f"destination {dst} is inside the source folder {src}")
    if real_src.is_relative_to(real_dst):
        raise InputError(f"source {src} is inside the destination folder {dst}")
    check_destination(dst, overwrite, "pass --overwrite to replace it")


def tokenizer_files(src: Path) -> list[Path]:
    """SRC's tokenizer files, each checked before the model is read: a hostile one (a symlink out
    of SRC, a FIFO, a file over TOKENIZER_FILE_BYTES) is refused, naming it, rather than skipped."""
    found = [folder_file(src, name, "tokenizer file") for name in TOKENIZER_FILES if os.path.lexists(src / name)]
    for path in found:
        if path.stat().st_size > TOKENIZER_FILE_BYTES:
            raise InputError(f"{path}: {path.stat().st_size:,} bytes, more than a tokenizer file may have")
    return found


def copy_files(paths: list[Path], dst: Path) -> None:
    for path in paths:
        write_atomic(dst / path.name, read_file(path, TOKENIZER_FILE_BYTES))


def main(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    source_hf = is_hf_folder(src)
    to = args.to or ("moe" if source_hf else "hf")
    if not source_hf and to == "moe":
        raise InputError(f"{src} is already in our format; use --to hf")
    check_folders(src, dst, args.overwrite)
    tokenizer = tokenizer_files(src)
    dtype, progress = DTYPES.get(args.dtype), not args.no_progress
    model = load_hf(src, dtype=dtype, progress=progress) if source_hf else load_pretrained(src)

    dst.parent.mkdir(parents=True, exist_ok=True)
    # Beside DST, so that the final rename stays within one file system.
    staging = dst.parent / f".{dst.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        if to == "hf":
            save_hf(
                model, staging, family=args.family, dtype=dtype, max_shard_bytes=args.max_shard_size, progress=progress
            )
        else:
            save_pretrained(model, staging)
        copy_files(tokenizer, staging)
        swap_folder(staging, dst)
    finally:
        if staging.exists():  # not swapped in: a failed conversion leaves nothing behind
            shutil.rmtree(staging, ignore_errors=True)
    params = sum(p.numel() for p in model.parameters())
    carried = f", tokenizer: {', '.join(p.name for p in tokenizer)}" if tokenizer else ""
    print(f"wrote {dst} ({to}, {params / 1e6:.2f}M parameters{carried}) from {src} ({'hf' if source_hf else 'moe'})")
    return 0

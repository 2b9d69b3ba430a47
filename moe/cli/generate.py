"""`moe generate --ckpt DIR --prompt TEXT`: continue a prompt with a trained or published model.

DIR is a run folder (its latest checkpoint), a checkpoint or save_pretrained folder, or a
Hugging Face model folder (config.json with a "model_type"). Where DIR (or the checkpoint it
resolves to) holds tokenizer.json, the prompt is encoded and the output decoded through it
(moe/io/tokenizer.py), generation stops at the folder's end token, and `--chat` renders the
prompt through the folder's chat template and prints only the reply. Without tokenizer.json
the model is byte-level: the prompt is its UTF-8 bytes and the output is printed as before.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import cast

import torch

from ..device import pick_device
from ..errors import InputError, excerpt
from ..generate import decode, generate
from ..io import checkpoint as ckpt
from ..io.files import folder_file, read_json
from ..io.hf import load_hf
from ..io.tokenizer import TextTokenizer, load_tokenizer
from ..model import Transformer
from .flags import nonnegative_int, positive_int

MAX_NEW_TOKENS = 1_000_000  # more is a typo: the CPU decodes a few tokens per second at full size
MIN_TEMPERATURE = 1e-4  # below it logits / T overflow fp32 for large logits; 0 is greedy
MAX_SEED = 2**63 - 1


def model_folder(path: str | Path) -> Path:
    """The folder holding the model's config.json: `path`, or the checkpoint a run folder resolves to."""
    path = Path(path)
    return path if (path / ckpt.CONFIG_FILE).is_file() else ckpt.resolve_checkpoint(path)


def is_hf_folder(folder: Path) -> bool:
    """A Hugging Face model folder: its config.json names a "model_type" (ours never does)."""
    return "model_type" in read_json(folder_file(folder, ckpt.CONFIG_FILE, "model config"))


def load_for_generation(path: str | Path, device: str | torch.device | None = None) -> Transformer:
    """A model from a run folder (its latest checkpoint), a checkpoint or save_pretrained folder,
    or a Hugging Face model folder."""
    folder = model_folder(path)
    if is_hf_folder(folder):
        return load_hf(folder, device=device or "cpu")
    return ckpt.load_pretrained(folder, device=device)


def temperature(text: str) -> float:
    """0 (greedy) or a finite number >= MIN_TEMPERATURE."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {excerpt(text)}") from None
    if not math.isfinite(value) or (value != 0 and not value >= MIN_TEMPERATURE):
        raise argparse.ArgumentTypeError(
            f"must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {excerpt(text)}"
        )
    return value


def max_new_tokens(text: str) -> int:
    value = nonnegative_int(text)
    if value > MAX_NEW_TOKENS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_NEW_TOKENS:,}, got {excerpt(text)}")
    return value


def seed(text: str) -> int:
    value = nonnegative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most 2**63 - 1, got {excerpt(text)}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt", required=True, help="run folder, checkpoint folder, save_pretrained folder or Hugging Face folder"
    )
    parser.add_argument(
        "--prompt", required=True, help="text to continue (the folder's tokenizer.json if any, else UTF-8 bytes)"
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="render the prompt as a user message through the folder's chat template; print only the reply",
    )
    parser.add_argument("--max-new-tokens", type=max_new_tokens, default=200, help="tokens to generate (default: 200)")
    parser.add_argument("--temperature", type=temperature, default=0.8, help="0 = greedy (default: 0.8)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample from the k likeliest tokens only")
    parser.add_argument("--seed", type=seed, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")


def main(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    folder = model_folder(args.ckpt)
    tokenizer = load_tokenizer(dict.fromkeys([Path(args.ckpt), folder]))
    if args.chat and tokenizer is None:
        raise InputError(f"--chat needs the model folder's tokenizer.json and chat template: {folder} has none")
    prompt = tokenizer.encode(args.prompt, chat=args.chat) if tokenizer else list(args.prompt.encode("utf-8"))
    if not prompt:
        raise InputError(f"--prompt {excerpt(args.prompt)} encodes to no tokens; give some text")
    model = load_for_generation(folder, device=device)  # after every check of the small files: weights are slow
    _check_vocabulary(prompt, model.config.vocab_size, tokenizer)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stop_ids = tokenizer.eos_ids if tokenizer else ()  # stop at the end token instead of cutting afterwards
    out = generate(
        model, torch.tensor([prompt]), args.max_new_tokens, args.temperature, args.top_k, generator, stop_ids=stop_ids
    )
    ids: list[int] = cast(torch.Tensor, out)[0].tolist()
    if tokenizer is None:
        print(decode(ids))
        return 0
    reply = tokenizer.until_eos(ids[len(prompt) :])
    print(tokenizer.decode(reply if args.chat else prompt + reply))
    return 0


def _check_vocabulary(prompt: list[int], vocab_size: int, tokenizer: TextTokenizer | None) -> None:
    """Byte prompts of a model trained on a smaller vocabulary, or a tokenizer with more tokens
    than the model has embeddings (not the model's tokenizer), are refused before any work."""
    outside = [i for i in prompt if i >= vocab_size]
    if outside:
        where, hint = (f"{tokenizer.path}: ", ": not this model's tokenizer") if tokenizer else ("", "")
        raise InputError(
            f"{where}prompt token id {outside[0]} is outside the vocabulary (vocab_size {vocab_size}){hint}"
        )

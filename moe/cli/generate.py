"""`moe generate --ckpt DIR --prompt TEXT`: continue a prompt with a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..generate import decode, generate
from ..io import checkpoint as ckpt
from ..model import Transformer


def load_for_generation(path: str | Path, device: str | torch.device | None = None) -> Transformer:
    """A model from a run folder (its latest checkpoint), a checkpoint or a save_pretrained folder."""
    path = Path(path)
    if not (path / ckpt.CONFIG_FILE).is_file():
        path = ckpt.resolve_checkpoint(path)
    return ckpt.load_pretrained(path, device=device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="run folder, checkpoint folder or save_pretrained folder")
    parser.add_argument("--prompt", required=True, help="text to continue (encoded as UTF-8 bytes)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens only")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def main(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    model = load_for_generation(args.ckpt, device=args.device)
    prompt = torch.tensor([list(args.prompt.encode("utf-8"))], dtype=torch.long)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    ids = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, generator)
    print(decode(ids[0].tolist()))
    return 0

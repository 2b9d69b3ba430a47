"""Small configs, corpora and run arguments shared by the data / checkpoint / train / generate tests."""

from __future__ import annotations

import random
from pathlib import Path

from moe import ModelConfig, MoEConfig
from moe.train import TrainArgs

REPO = Path(__file__).resolve().parents[1]


def micro_config(**overrides) -> ModelConfig:
    """Ling-style routing at test size: 3 layers (1 dense + 2 MoE), 4 experts top-2 + 1 shared."""
    base = dict(
        name="micro",
        vocab_size=256,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_seq_len=32,
        first_k_dense=1,
        moe=MoEConfig(
            num_experts=4,
            top_k=2,
            expert_ffn_size=32,
            num_shared_experts=1,
            score_func="sigmoid",
            expert_bias=True,
            bias_update="zero_mean",
            bias_update_rate=1e-2,
            z_loss_coef=1e-4,
            aux_loss_coef=1e-2,
        ),
    )
    base.update(overrides)
    return ModelConfig(**base)


WORDS = (
    "the a router sends each token to its top experts while a shared expert sees every token "
    "and the loss adds a small balancing term so that no expert idles or overflows its capacity"
).split()


def write_corpus(directory: Path, name: str = "corpus.txt") -> Path:
    """100 KB of seeded pseudo-text (words, punctuation, line breaks): the same bytes on every
    machine and at every commit, so that exact-loss tests do not move with unrelated edits."""
    rng = random.Random(0)
    lines, size = [], 0
    while size < 100_000:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + rng.choice(".,;:!?") + "\n"
        lines.append(line)
        size += len(line)
    path = directory / name
    path.write_bytes("".join(lines).encode()[:100_000])
    return path


def fast_args(tmp_path: Path, **overrides) -> TrainArgs:
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = dict(
        out=str(tmp_path / "run"),
        data=str(write_corpus(tmp_path)),
        steps=20,
        batch_size=4,
        warmup_steps=4,
        lr=1e-2,
        min_lr=1e-3,
        log_every=1,
        eval_every=10,
        eval_batches=2,
        save_every=10,
        progress=False,
        plots=False,
    )
    base.update(overrides)
    return TrainArgs(**base)

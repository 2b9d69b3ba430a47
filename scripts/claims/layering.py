"""Claim 2, hierarchical layering: "the 2-4-2-4 dense/MoE pattern trains 30% faster than
all-MoE for 1.2% worse quality".

All plans have 12 layers and the same active parameters per token: a dense layer's FFN is
sized (`matched_dense_ffn`) so that it touches as many weights per token as an MoE layer's
router + top-k routed experts + shared expert; `moe.perf.flops.count` checks it. Plans then differ
only in which layers route and in their total parameters. Throughput is timed in interleaved
rounds (every plan once per round, order rotated) so that the other work on a shared machine
hits all plans alike; validation loss is compared at equal steps over several seeds.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from moe import ModelConfig, load_config
from moe.device import pick_device
from moe.model import layer_plan
from moe.perf.flops import count
from moe.perf.timing import synchronize
from moe.train.args import TrainArgs
from moe.train.data import BatchSampler, TokenView, load_corpus, split_ranges
from moe.train.step import build_model, build_optimizer, train_step

from .common import REPO, Setup, eval_curve, quantiles, replace_moe, train

# name -> (label, layer-plan fields, trained). Every plan is timed; the trained ones are also
# compared in validation loss over several seeds. first-4-dense puts the dense layers of 2-4-2-4
# in front; first-1-dense is the Ling 2.0 / DeepSeek-V3 plan and all-dense the no-routing end:
# both are timed only, to spend the budget on seeds of the plans the claim compares.
PLANS = {
    "all-moe": ("all MoE (12 MoE)", {}, True),
    "2-4-2-4": ("2-4-2-4 (4 dense + 8 MoE)", dict(moe_pattern="2-4-2-4"), True),
    "first-4-dense": ("first 4 dense (4 dense + 8 MoE)", dict(first_k_dense=4), True),
    "first-1-dense": ("first 1 dense (1 dense + 11 MoE)", dict(first_k_dense=1), False),
    "all-dense": ("all dense (12 dense)", dict(moe=None), False),
}
TRAINED = [name for name, (_, _, trained) in PLANS.items() if trained]
CLAIMED_SPEEDUP, CLAIMED_LOSS = 0.30, 0.012
SPEEDUP_MIN = CLAIMED_SPEEDUP / 2  # "within a factor of two of the claim"
LOSS_MAX = CLAIMED_LOSS * 2


def matched_dense_ffn(config: ModelConfig) -> int:
    """Dense FFN width whose active parameters per layer equal one MoE layer's (nearest integer).

    Active parameters are linear in the dense width, so two one-layer counts give the slope."""
    one = dataclasses.replace(config, num_layers=1, first_k_dense=0, moe_pattern=None, moe_layers=None)
    moe_active = count(one).params_active
    dense = [count(dataclasses.replace(one, moe=None, intermediate_size=w)).params_active for w in (1, 2)]
    return 1 + round((moe_active - dense[0]) / (dense[1] - dense[0]))


def base_config(setup: Setup) -> ModelConfig:
    """configs/tiny.yaml's Ling-style routing (8 experts top-2 + 1 shared, sigmoid, zero-mean
    bias, dropless) at 12 layers, so that 2-4-2-4 is one whole period of the seed's pattern."""
    tiny = load_config(REPO / "configs" / "tiny.yaml")
    hidden = setup.scale(64, 32)
    config = dataclasses.replace(
        tiny, name="claims-layering", hidden_size=hidden, num_layers=12, num_heads=4, num_kv_heads=2, first_k_dense=0
    )
    config = replace_moe(config, config.name, expert_ffn_size=hidden)
    return dataclasses.replace(config, intermediate_size=matched_dense_ffn(config))


def plan_configs(setup: Setup) -> dict[str, ModelConfig]:
    base = base_config(setup)
    return {
        name: dataclasses.replace(base, name=f"claims-layering-{name}", **fields)
        for name, (_, fields, _) in PLANS.items()
    }


def measure(setup: Setup) -> dict[str, Any]:
    configs = plan_configs(setup)
    steps = setup.scale(200, 6)
    plans: dict[str, Any] = {}
    for name, config in configs.items():
        counts = count(config, setup.seq_len)
        plan = layer_plan(config)
        plans[name] = {
            "label": PLANS[name][0],
            "layers": "".join("M" if m else "D" for m in plan),
            "params_total": counts.params_total,
            "params_active": counts.params_active,
            "train_flops_per_token": counts.train_flops_per_token,
            "runs": [],
        }
    timing = time_plans(setup, configs, rounds=setup.scale(8, 2), steps_per_sample=setup.scale(3, 1))
    for name, samples in timing.items():
        plans[name]["tokens_per_s"] = samples
    for seed in range(setup.scale(setup.seeds, 1)):
        for name in TRAINED:
            summary, rows = train(
                setup,
                configs[name],
                f"layering/{name}-seed{seed}",
                steps=steps,
                seed=seed,
                log_every=setup.scale(10, 1),
            )
            plans[name]["runs"].append(
                {
                    "seed": seed,
                    "val_loss": summary["val_loss"],
                    "train_tokens_per_s": summary["tokens_per_s"],
                    "eval": eval_curve(rows),
                }
            )
    actives = [p["params_active"] for p in plans.values()]
    return {
        "config": configs["all-moe"].to_dict(),
        "steps": steps,
        "dense_ffn": configs["all-moe"].intermediate_size,
        "active_spread": (max(actives) - min(actives)) / min(actives),
        "timing": {
            "rounds": setup.scale(8, 2),
            "steps_per_sample": setup.scale(3, 1),
            "tokens_per_step": setup.batch_size * setup.seq_len,
        },
        "plans": plans,
        "comparisons": {name: compare(plans, name) for name in PLANS if name != "all-moe"},
    }


def time_plans(setup: Setup, configs: dict[str, ModelConfig], rounds: int, steps_per_sample: int) -> dict[str, list]:
    """Training tokens/s of every plan, `rounds` samples each, interleaved round by round."""
    device = pick_device(setup.device)
    args = TrainArgs(steps=1, batch_size=setup.batch_size, seq_len=setup.seq_len, progress=False)
    corpus = load_corpus(setup.data)
    view = TokenView(corpus.tokens, split_ranges(len(corpus.tokens), args.val_fraction)[0])
    state = {}
    for name, config in configs.items():
        model = build_model(config, device)
        state[name] = (model, build_optimizer(model, args), BatchSampler(view, args.batch_size, args.seq_len))
    tokens = args.batch_size * args.seq_len * steps_per_sample
    samples: dict[str, list] = {name: [] for name in configs}
    names = list(configs)
    for r in range(rounds + 1):  # round 0 warms up (first calls build kernels and allocate) and is dropped
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model, optimizer, sampler = state[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps_per_sample):
                train_step(model, model, optimizer, sampler, args, device)
            synchronize(device)
            if r:
                samples[name].append(tokens / (time.perf_counter() - start))
    return samples


def compare(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """`name` against all-MoE: per-round speedup (paired within a round) and per-seed relative
    validation-loss change (paired by seed)."""
    speedups = [a / b - 1 for a, b in zip(plans[name]["tokens_per_s"], plans["all-moe"]["tokens_per_s"])]
    losses = [a["val_loss"] / b["val_loss"] - 1 for a, b in zip(plans[name]["runs"], plans["all-moe"]["runs"])]
    change = {"mean": float(np.mean(losses)), "min": min(losses), "max": max(losses)} if losses else None
    return {
        "speedup": quantiles(speedups),
        "speedup_samples": speedups,
        "loss_change": change,
        "loss_change_samples": losses,
    }


# --------------------------------------------------------------------------- verdict


RULE = (
    f"**Rule.** Speedup = tokens/s of 2-4-2-4 over all-MoE, paired within each interleaved timing round; "
    f"quality change = relative change of the final validation loss, paired by seed. The speed part holds "
    f"if the 20th percentile of the speedups is at least {SPEEDUP_MIN:.0%} (half the claimed "
    f"{CLAIMED_SPEEDUP:.0%}) and fails if the 80th percentile is below it; the quality part holds if the "
    f"mean loss increase is at most {LOSS_MAX:.1%} (twice the claimed {CLAIMED_LOSS:.1%}) and fails if "
    f"every seed's increase is above it. **Reproduced** if both hold, **not reproduced** if either fails, "
    f"**not measurable at this scale** otherwise (the noise spans the threshold)."
)


def verdict(numbers: dict[str, Any]) -> tuple[str, str]:
    c = numbers["comparisons"]["2-4-2-4"]
    s, q = c["speedup"], c["loss_change"]
    speed = "holds" if s["p20"] >= SPEEDUP_MIN else "fails" if s["p80"] < SPEEDUP_MIN else "unresolved"
    quality = "holds" if q["mean"] <= LOSS_MAX else "fails" if q["min"] > LOSS_MAX else "unresolved"
    seeds = len(c["loss_change_samples"])
    why = (
        f"2-4-2-4 ran {s['median']:+.1%} faster than all-MoE (p20 {s['p20']:+.1%}, p80 {s['p80']:+.1%}; "
        f"speed part {speed}) with a validation loss change of {q['mean']:+.2%} (over {seeds} seed"
        f"{'s' if seeds > 1 else ''}: {q['min']:+.2%} to {q['max']:+.2%}; quality part {quality})"
    )
    if speed == "holds" and quality == "holds":
        return "reproduced", why
    if "fails" in (speed, quality):
        return "not reproduced", why
    return "not measurable at this scale", why


# --------------------------------------------------------------------------- plot


def plot(numbers: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from moe.train.plots import save_figure

    plans = numbers["plans"]
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = list(plans)
    for i, name in enumerate(names):
        samples = plans[name]["tokens_per_s"]
        ax_t.scatter([i] * len(samples), samples, color=f"C{i}", alpha=0.6, s=18)
        ax_t.hlines(np.median(samples), i - 0.3, i + 0.3, color=f"C{i}", lw=2)
    ax_t.set_xticks(range(len(names)), [f"{n}\n{plans[n]['layers']}" for n in names], fontsize=8)
    ax_t.set_ylabel("training tokens/s (one point per round; bar = median)")
    ax_t.set_title("throughput at matched active parameters\n(interleaved rounds; D = dense layer, M = MoE)")
    ax_t.set_ylim(bottom=0)
    ax_t.grid(alpha=0.3, axis="y")
    for i, name in enumerate(names):
        for j, run in enumerate(plans[name]["runs"]):
            ax_l.plot(
                run["eval"]["step"][1:],
                run["eval"]["val_loss"][1:],
                color=f"C{i}",
                marker="o",
                ms=3,
                lw=1.2,
                label=plans[name]["label"] if j == 0 else None,
                alpha=0.8,
            )
    ax_l.set_xlabel("training step")
    ax_l.set_ylabel("validation loss (nats per byte)")
    ax_l.set_title("validation loss at equal steps (one line per seed)")
    ax_l.grid(alpha=0.3)
    ax_l.legend(fontsize=8)
    fig.tight_layout()
    return [save_figure(fig, folder / "layering.png")]

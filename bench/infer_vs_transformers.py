"""Greedy decoding of one Hugging Face checkpoint: ours (moe.Transformer.from_hf + moe.generate)
beside transformers' own `generate`, with each experts implementation it offers.

    PYTHONPATH=. python bench/infer_vs_transformers.py --save                   # small, CPU, ~a minute
    PYTHONPATH=. python bench/infer_vs_transformers.py --preset realish --save  # larger shapes, still CPU-sized
    PYTHONPATH=. python bench/infer_vs_transformers.py --preset gpu --save      # on a GPU (bf16)

For each family (Qwen3-MoE: softmax top-k; DeepSeek-V3: MLA, sigmoid, groups, a shared expert)
a random model is built with transformers' config class, given weights of order one (sharp
router logits, so that greedy choices are not near ties), saved with save_pretrained to a
temporary folder, and loaded from that folder by both sides. Then, at each batch size, the same
random prompt is continued greedily by the same number of new tokens:

    ours          moe.generate.generate(model, prompt, N, temperature=0)   (KV cache)
    transformers  model.generate(prompt, max_new_tokens=N, do_sample=False), no EOS token
                  once per experts implementation (set_experts_implementation): grouped_mm,
                  batched_mm, eager

tokens/s = B x N / median wall time of the whole call (prefill included, on both sides). Each
transformers output is compared with ours token for token: in fp32 they must be the same
(`same_tokens`); in bf16 a near tie may flip a token, and the first divergence is reported.
`--save` writes bench/results/<device>/infer_vs_transformers-<preset>.json and a PNG bar plot
beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from moe import Transformer
from moe.device import pick_device
from moe.extras import require
from moe.generate import generate
from moe.perf import results, timing

HF_IMPLS = ("grouped_mm", "batched_mm", "eager")

QWEN3_SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
)
DSV3_SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    n_shared_experts=1,
)
# Top-8 routing over many experts (64 / 128, n_group 8 keep 4 for DeepSeek-V3) at a width and depth
# a CPU decodes in about a minute (2 cores: four layers and 128 / 256 experts took 4 minutes untimed).
QWEN3_REALISH = dict(
    QWEN3_SMALL,
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=64,
    num_experts_per_tok=8,
)
DSV3_REALISH = dict(
    DSV3_SMALL,
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=128,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
)
# On a GPU: Qwen3-30B-A3B's 128 experts and DeepSeek-V3's 256 (top-8) over four layers.
QWEN3_GPU = dict(QWEN3_REALISH, vocab_size=8192, num_hidden_layers=4, num_experts=128)
DSV3_GPU = dict(DSV3_REALISH, vocab_size=8192, num_hidden_layers=4, n_routed_experts=256)
PRESETS = {
    # name: (families with their config kwargs, prompt tokens, new tokens, batch sizes)
    "small": ({"qwen3_moe": QWEN3_SMALL, "deepseek_v3": DSV3_SMALL}, 16, 16, (1, 8)),
    "realish": ({"qwen3_moe": QWEN3_REALISH, "deepseek_v3": DSV3_REALISH}, 32, 16, (1, 8)),
    "gpu": ({"qwen3_moe": QWEN3_GPU, "deepseek_v3": DSV3_GPU}, 128, 64, (1, 8, 64)),
}


def hf_classes(family: str):
    transformers = require("transformers", "bench/infer_vs_transformers.py")
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM
    return transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights of order one (transformers' init gives std 0.02: flat logits, near-tied greedy picks),
    norms away from 1, selection biases away from 0, router logits sharp (clear top-k margins)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g) + (0.0 if name.endswith("bias") else 1.0))
            continue
        sharp = 3.0 if "gate.weight" in name else 1.0
        p.copy_(sharp * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def write_checkpoint(family: str, kwargs: dict, folder: Path) -> None:
    config_class, model_class = hf_classes(family)
    model = randomize_(model_class(config_class(**kwargs, tie_word_embeddings=False)))
    model.save_pretrained(folder)


def _median_time(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, torch.Tensor]:
    out = None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        timing.synchronize(device)
        start = time.perf_counter()
        out = fn()
        timing.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _first_divergence(a: torch.Tensor, b: torch.Tensor, prompt_len: int) -> int | None:
    """Index of the first new token where any row of `a` and `b` differ, None if none does."""
    if a.shape != b.shape:
        return 0
    differ = (a[:, prompt_len:] != b[:, prompt_len:]).any(dim=0).nonzero()
    return int(differ[0]) if len(differ) else None


def run_family(family: str, kwargs: dict, preset: tuple, device, dtype: torch.dtype, warmup: int, repeats: int):
    _, prompt_len, new_tokens, batch_sizes = preset
    transformers = require("transformers", "bench/infer_vs_transformers.py")
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(family, kwargs, Path(tmp))
        ours = Transformer.from_hf(tmp, dtype=dtype, device=device)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    # No end-of-sequence token: every call runs its N steps. (min_new_tokens would instead forbid
    # the EOS id, a greedy pick ours is free to make, and the two outputs would part there.)
    hf.generation_config.eos_token_id = None
    rows = []
    for B in batch_sizes:
        prompt = torch.randint(kwargs["vocab_size"], (B, prompt_len), generator=torch.Generator().manual_seed(B))
        prompt = prompt.to(device)
        tokens = B * new_tokens
        ours_s, ours_ids = _median_time(
            lambda: generate(ours, prompt, new_tokens, temperature=0.0), device, warmup, repeats
        )
        row = {"batch_size": B, "ours": {"median_s": ours_s, "tokens_per_s": tokens / ours_s}, "transformers": {}}
        for impl in HF_IMPLS:
            try:
                hf.set_experts_implementation(impl)
                hf_s, hf_ids = _median_time(
                    lambda: hf.generate(
                        prompt,
                        attention_mask=torch.ones_like(prompt),
                        max_new_tokens=new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                    ),
                    device,
                    warmup,
                    repeats,
                )
            except Exception as err:  # an implementation this device or shape does not support
                row["transformers"][impl] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
                continue
            diverges = _first_divergence(ours_ids, hf_ids, prompt_len)
            row["transformers"][impl] = {
                "median_s": hf_s,
                "tokens_per_s": tokens / hf_s,
                "same_tokens": diverges is None,
                "first_divergence": diverges,
                "ours_speedup": hf_s / ours_s,
            }
        rows.append(row)
    return {"family": family, "hf_config": kwargs, "rows": rows}


def plot(result: dict, path: Path) -> None:
    require("matplotlib", "the plot of bench/infer_vs_transformers.py")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = result["results"]["families"]
    labels, series = [], {"ours": []} | {f"transformers {i}": [] for i in HF_IMPLS}
    for fam in families:
        for row in fam["rows"]:
            labels.append(f"{fam['family']}\nbatch {row['batch_size']}")
            series["ours"].append(row["ours"]["tokens_per_s"])
            for impl in HF_IMPLS:
                series[f"transformers {impl}"].append(row["transformers"][impl].get("tokens_per_s", 0.0))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(labels)), 4))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_ylabel("generated tokens/s (prefill included)")
    env, s = result["environment"], result["settings"]
    ax.set_title(f"greedy decode, {s['new_tokens']} new tokens, {s['dtype']}, {env['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", help="fp32 (default: outputs must match exactly), bf16, fp16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", action="store_true", help="write the JSON and a PNG plot under --results-dir")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    dtype = timing.pick_dtype(args.dtype, device)
    preset = PRESETS[args.preset]
    torch.manual_seed(0)
    families = [
        run_family(name, kwargs, preset, device, timing.DTYPES[dtype], args.warmup, args.repeats)
        for name, kwargs in preset[0].items()
    ]
    result = results.record(
        "infer_vs_transformers",
        results.environment(device),
        {"preset": args.preset},
        {
            "dtype": dtype,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "prompt_len": preset[1],
            "new_tokens": preset[2],
            "batch_sizes": list(preset[3]),
            "decoding": "greedy",
            "timed": "whole generate call (prefill + decode), median",
        },
        {"families": families},
    )
    name = f"infer_vs_transformers-{args.preset}"
    results.publish(result, name, _print, args.json, args.save, args.results_dir)
    if args.save:
        png = (
            Path(args.results_dir or results.DEFAULT_RESULTS_DIR) / result["environment"]["device_slug"] / f"{name}.png"
        )
        plot(result, png)
        if not args.json:
            print(f"saved {png}")
    return 0


def _print(result: dict) -> None:
    env, s = result["environment"], result["settings"]
    print(
        f"infer vs transformers ({result['config']['preset']}) on {env['device']} [{env['label'].upper()}], "
        f"{s['dtype']}, transformers {env['transformers']}, torch {env['torch']}; greedy, prompt {s['prompt_len']}, "
        f"{s['new_tokens']} new tokens, tokens/s of the whole generate call"
    )
    print(f"  {'family':<13}{'batch':>6}{'implementation':>26}{'tokens/s':>11}{'ours x':>8}  same tokens")
    for fam in result["results"]["families"]:
        for row in fam["rows"]:
            B = row["batch_size"]
            print(f"  {fam['family']:<13}{B:>6}{'ours (moe.generate)':>26}{row['ours']['tokens_per_s']:>11.4g}")
            for impl, r in row["transformers"].items():
                label = f"transformers {impl}"
                if "error" in r:
                    print(f"  {fam['family']:<13}{B:>6}{label:>26}  {r['error']}")
                    continue
                same = "yes" if r["same_tokens"] else f"no (from new token {r['first_divergence']})"
                print(
                    f"  {fam['family']:<13}{B:>6}{label:>26}{r['tokens_per_s']:>11.4g}{r['ours_speedup']:>8.3g}  {same}"
                )
    print("  (ours x = transformers time / our time for the same call)")


if __name__ == "__main__":
    sys.exit(main())

"""Our MoE layer beside transformers' MoE blocks, same shapes and same weights.

    PYTHONPATH=. python bench/moe_vs_transformers.py                 # CPU-sized shapes
    PYTHONPATH=. python bench/moe_vs_transformers.py --preset gpu --save

Blocks: `Qwen3MoeSparseMoeBlock` (softmax top-k, renormalised) and `DeepseekV3MoE` (sigmoid,
selection bias, 8 groups keep 4, x2.5, one shared expert), each run with every experts
implementation transformers offers (`config._experts_implementation`: eager, batched_mm,
grouped_mm), and our `moe.MoE` with each of its expert backends, the weights copied over:

    ours.router.weight       [E, D]      = gate.weight
    ours.router.expert_bias  [E]         = gate.e_score_correction_bias        (DeepSeek-V3)
    ours.experts.w_in        [E, D, 2F]  = experts.gate_up_proj [E, 2F, D] transposed (gate, then up)
    ours.experts.w_out       [E, F, D]   = experts.down_proj    [E, D, F] transposed
    ours.shared_experts.*    = shared_experts.{gate,up,down}_proj                (DeepSeek-V3)

Before any timing, every implementation's output is checked against transformers' eager
path in fp32 (routing in low precision flips near-tied choices, which is no bug); the run
stops if one differs. Then forward and forward + backward are timed in the bench dtype.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm import tqdm

from moe import MoE, MoEConfig
from moe.device import pick_device
from moe.perf import results, timing

HF_IMPLS = ("eager", "batched_mm", "grouped_mm")


@dataclass(frozen=True)
class Shape:
    model: str  # "qwen3_moe" or "deepseek_v3"
    hidden: int
    ffn: int  # per-expert FFN width
    experts: int
    top_k: int
    tokens: int
    n_group: int = 1
    topk_group: int = 1
    shared: int = 0


PRESETS = {
    # Small enough for two CPU cores in seconds, with the routing shape of each model.
    "cpu": [
        Shape("qwen3_moe", 128, 64, 16, 4, 256),
        Shape("deepseek_v3", 128, 64, 32, 4, 256, n_group=8, topk_group=4, shared=1),
    ],
    # One real layer of each model at a 4,096-token micro-batch (Qwen3-30B-A3B, DeepSeek-V3).
    "gpu": [
        Shape("qwen3_moe", 2048, 768, 128, 8, 8192),
        Shape("deepseek_v3", 7168, 2048, 256, 8, 4096, n_group=8, topk_group=4, shared=1),
    ],
}


def build_hf(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The transformers block with seeded random weights (its own init leaves zeros and empties),
    allocated once, directly on `device` in `dtype` (a real DeepSeek-V3 layer is 11B weights)."""
    with torch.device("meta"):
        if shape.model == "qwen3_moe":
            from transformers import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

            cfg = Qwen3MoeConfig(
                hidden_size=shape.hidden,
                moe_intermediate_size=shape.ffn,
                num_experts=shape.experts,
                num_experts_per_tok=shape.top_k,
                norm_topk_prob=True,
            )
            block = Qwen3MoeSparseMoeBlock(cfg)
        elif shape.model == "deepseek_v3":
            from transformers import DeepseekV3Config
            from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

            cfg = DeepseekV3Config(
                hidden_size=shape.hidden,
                moe_intermediate_size=shape.ffn,
                n_routed_experts=shape.experts,
                num_experts_per_tok=shape.top_k,
                n_group=shape.n_group,
                topk_group=shape.topk_group,
                n_shared_experts=shape.shared,
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
            )
            block = DeepseekV3MoE(cfg)
        else:
            raise ValueError(f"unknown model {shape.model!r} (expected qwen3_moe or deepseek_v3)")
    block = block.to(dtype).to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=dtype) * 0.02)
        for b in block.buffers():  # DeepSeek-V3's selection bias: small, so that it matters but rarely
            b.copy_(torch.randn(b.shape, generator=gen, device=device, dtype=dtype) * 1e-3)
    block.hf_config = cfg
    return block


def ours_from(hf: nn.Module, shape: Shape, backend: str) -> MoE:
    """Our layer with `hf`'s weights (copied, in our layout) and the same routing config."""
    if shape.model == "qwen3_moe":
        cfg = MoEConfig(
            num_experts=shape.experts,
            top_k=shape.top_k,
            expert_ffn_size=shape.ffn,
            score_func="softmax",
            norm_topk_prob=True,
            backend=backend,
        )
    else:
        cfg = MoEConfig(
            num_experts=shape.experts,
            top_k=shape.top_k,
            expert_ffn_size=shape.ffn,
            num_shared_experts=shape.shared,
            score_func="sigmoid",
            n_group=shape.n_group,
            topk_group=shape.topk_group,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            expert_bias=True,
            backend=backend,
        )
    device, dtype = hf.gate.weight.device, hf.gate.weight.dtype
    with torch.device("meta"):
        ours = MoE(cfg, shape.hidden)
    ours = ours.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for b in ours.buffers():
            b.zero_()
        ours.router.expert_bias = None if ours.router.expert_bias is None else ours.router.expert_bias.float()
        ours.router.weight.copy_(hf.gate.weight)
        ours.experts.w_in.copy_(hf.experts.gate_up_proj.transpose(1, 2))
        ours.experts.w_out.copy_(hf.experts.down_proj.transpose(1, 2))
        if shape.model == "deepseek_v3":
            ours.router.expert_bias.copy_(hf.gate.e_score_correction_bias)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(ours.shared_experts, name).weight.copy_(getattr(hf.shared_experts, name).weight)
    return ours


def our_backends(device: torch.device) -> list[str]:
    return ["eager", "torch"] + (["triton"] if device.type == "cuda" else [])


def with_backend(layer: MoE, backend: str) -> MoE:
    """Switch the expert backend of `layer` in place (read at every forward): one copy of the
    weights serves every backend."""
    layer.experts.backend = backend
    return layer


def check_shape(shape: Shape, device: torch.device) -> Shape:
    """`shape`, or the same layer with fewer experts when two fp32 copies would not fit in
    40% of the device's memory (the check then says how many experts it used)."""
    capacity = timing.memory_capacity(device) or float("inf")
    experts = shape.experts
    while 2 * 4 * 3 * shape.hidden * shape.ffn * experts > 0.4 * capacity and experts // 2 >= shape.n_group * 2:
        experts //= 2
    return replace(shape, experts=experts)


def check(shape: Shape, device: torch.device, tokens: int = 64) -> dict:
    """fp32 outputs of every implementation against transformers' eager path, on `tokens` tokens.
    Raises if any differs by more than fp32 reordering allows."""
    shape = check_shape(shape, device)
    hf = build_hf(shape, device, torch.float32)
    x = torch.randn(1, tokens, shape.hidden, device=device)
    with torch.no_grad():
        outputs = {}
        for impl in HF_IMPLS:
            hf.hf_config._experts_implementation = impl
            outputs[f"transformers {impl}"] = hf(x)
        ours = ours_from(hf, shape, "torch")
        for backend in our_backends(device):
            outputs[f"moe {backend}"] = with_backend(ours, backend)(x)
    reference = outputs["transformers eager"]
    scale = reference.abs().max().item()
    diffs = {name: (out - reference).abs().max().item() for name, out in outputs.items()}
    tolerance = 1e-4 * scale + 1e-6
    bad = {name: d for name, d in diffs.items() if not d <= tolerance}
    if bad:
        raise AssertionError(f"{shape.model}: outputs differ from transformers eager beyond {tolerance:.2e}: {bad}")
    return {"tokens": tokens, "experts": shape.experts, "dtype": "fp32", "max_abs_diff": diffs, "tolerance": tolerance}


def _flops_per_token(shape: Shape) -> float:
    """Forward FLOPs per token: router, K experts, shared experts (2 per multiply-add)."""
    return 2.0 * (shape.experts * shape.hidden + 3 * shape.hidden * shape.ffn * (shape.top_k + shape.shared))


def _time(module: nn.Module, x: torch.Tensor, device, warmup: int, repeats: int, fwd_flops: float) -> dict:
    params = [p for p in module.parameters() if p.requires_grad]
    grad_out = torch.randn_like(x)
    xg = x.detach().requires_grad_(True)
    with torch.no_grad():
        forward = timing.measure(lambda: module(x), device, warmup, repeats)
    backward = timing.measure(
        lambda: torch.autograd.grad(module(xg), [xg, *params], grad_out, allow_unused=True), device, warmup, repeats
    )
    tokens = x.shape[0] * x.shape[1]
    return {
        "forward": {
            **forward.to_dict(),
            "tokens_per_s": tokens / forward.median_s,
            "tflops": tokens / forward.median_s * fwd_flops / 1e12,
        },
        "forward_backward": {
            **backward.to_dict(),
            "tokens_per_s": tokens / backward.median_s,
            "tflops": tokens / backward.median_s * 3 * fwd_flops / 1e12,
        },
    }


def _timed_row(
    impl: str, module: nn.Module, x: torch.Tensor, device, warmup: int, repeats: int, fwd_flops: float
) -> dict:
    """One implementation's timings, or the out-of-memory error it hit (transformers' batched_mm
    gathers a weight matrix per token: at a full layer's size it asks for hundreds of GiB)."""
    try:
        return {"impl": impl, **_time(module, x, device, warmup, repeats, fwd_flops)}
    except torch.OutOfMemoryError as err:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"impl": impl, "error": f"out of memory: {str(err).splitlines()[0]}"}


def run(shape: Shape, device: torch.device, dtype: str, warmup: int, repeats: int) -> dict:
    checked = check(shape, device)
    x = torch.randn(1, shape.tokens, shape.hidden, device=device, dtype=timing.DTYPES[dtype])
    fwd_flops = _flops_per_token(shape)
    rows = []
    hf = build_hf(shape, device, timing.DTYPES[dtype])
    for impl in tqdm(HF_IMPLS, desc=f"{shape.model} transformers", disable=None):
        hf.hf_config._experts_implementation = impl
        rows.append(_timed_row(f"transformers {impl}", hf, x, device, warmup, repeats, fwd_flops))
    ours = ours_from(hf, shape, "torch")
    del hf  # one set of expert weights at a time: full-size layers are large
    for backend in tqdm(our_backends(device), desc=f"{shape.model} moe", disable=None):
        rows.append(_timed_row(f"moe {backend}", with_backend(ours, backend), x, device, warmup, repeats, fwd_flops))
    return {"shape": shape.__dict__, "check": checked, "forward_flops_per_token": fwd_flops, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--warmup", type=int, default=None, help="default 2 on GPU, 5 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    dtype = timing.pick_dtype(args.dtype, device)
    if args.warmup is None:
        args.warmup = timing.default_warmup(device)
    torch.manual_seed(0)
    blocks = [run(shape, device, dtype, args.warmup, args.repeats) for shape in PRESETS[args.preset]]
    result = results.record(
        "moe_vs_transformers",
        results.environment(device),
        {"preset": args.preset},
        {"dtype": dtype, "warmup": args.warmup, "repeats": args.repeats},
        {"blocks": blocks},
    )
    results.publish(result, f"moe_vs_transformers-{args.preset}", _print, args.json, args.save, args.results_dir)
    return 0


def _print(result: dict) -> None:
    env = result["environment"]
    print(
        f"moe vs transformers on {env['device']} [{env['label'].upper()}], {result['settings']['dtype']}, "
        f"transformers {env['transformers']}, torch {env['torch']}"
    )
    for block in result["results"]["blocks"]:
        s = block["shape"]
        print(
            f"\n{s['model']}: D={s['hidden']} F={s['ffn']} E={s['experts']} top-{s['top_k']}"
            f"{' shared ' + str(s['shared']) if s['shared'] else ''}, {s['tokens']} tokens; outputs match in fp32 "
            f"(max diff {max(block['check']['max_abs_diff'].values()):.2e})"
        )
        print(f"  {'implementation':<26}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd TFLOP/s':>13}{'f+b TFLOP/s':>13}")
        for r in block["rows"]:
            if "error" in r:
                print(f"  {r['impl']:<26}{r['error']}")
                continue
            f, fb = r["forward"], r["forward_backward"]
            print(
                f"  {r['impl']:<26}{f['median_s'] * 1e3:>10.4g}{fb['median_s'] * 1e3:>12.4g}"
                f"{f['tflops']:>13.3g}{fb['tflops']:>13.3g}"
            )


if __name__ == "__main__":
    sys.exit(main())

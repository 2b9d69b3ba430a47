"""The whole MoE layer, forward and forward+backward, on each expert backend.

Shapes: T = tokens, d = model dim, f = expert FFN dim, E = local experts, K = top-k,
R = T*K routed rows.

Where bench/grouped_gemm.py times single GEMMs, this times what a training step pays for
one MoE layer of one GPU: router, dispatch, both expert GEMMs with the activation, combine
and the shared expert, on the "torch" backend (F.grouped_mm with materialised permutes),
the "triton" backend (moe_kernels.expert_ffn, gather/scatter fused into the GEMMs) and the
"eager" loop. Per-GPU expert shapes of Ling-1T (d 8192) and DeepSeek-V3 (d 7168), expert
FFN 2048, 8 to 64 local experts, top-8, 4K to 64K routed rows, balanced or skewed routing
(the router's selection bias is set so that expert loads follow a Zipf law).

Before timing, every backend's bf16 output and input gradient are checked against the
"torch" backend in fp32 (relative error); a failing backend is recorded, not timed.
TFLOP/s counts the expert GEMMs only (6 R d f forward for SwiGLU, three times that forward
+ backward), the work the backends differ in. Results: bench/results/<device>/moe_layer.json,
plot: moe_layer.png beside it.

usage: python bench/moe_layer.py [--quick] [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe import MoE, MoEConfig  # noqa: E402
from moe.device import pick_device  # noqa: E402
from moe.perf.results import environment, record, save
from moe.perf.timing import measure  # noqa: E402

MODELS = {"ling-1t": 8192, "deepseek-v3": 7168}
FFN, TOP_K = 2048, 8
EXPERTS = (8, 16, 32, 64)
ROWS = (4096, 16384, 65536)
QUICK = {"models": ("ling-1t",), "experts": (8, 32), "rows": (4096, 16384)}
SMOKE = {"models": {"smoke": 64}, "experts": (4,), "rows": (64,), "ffn": 32, "top_k": 2}
BACKENDS = ("torch", "triton", "eager")
TOLERANCE = 2e-2  # bf16 relative error against fp32
EAGER_REPEATS = 3


def build(d: int, f: int, experts: int, top_k: int, routing: str, device, dtype) -> MoE:
    cfg = MoEConfig(
        num_experts=experts,
        top_k=top_k,
        expert_ffn_size=f,
        num_shared_experts=1,
        score_func="sigmoid",
        expert_bias=True,
        routed_scaling_factor=2.5,
    )
    torch.manual_seed(0)
    layer = MoE(cfg, d).to(device=device, dtype=dtype)
    if routing == "zipf":  # a selection bias that favours low expert ids ~ log(1 / rank^1.2)
        ranks = torch.arange(1, experts + 1, device=device, dtype=torch.float32)
        layer.router.expert_bias.copy_(-1.2 * torch.log(ranks) * 0.2)
    return layer


def with_backend(layer: MoE, backend: str) -> MoE:
    layer.experts.backend = backend  # the only module that reads it; the weights stay shared
    return layer


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def reference(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and input gradient of an fp32 twin on the "torch" backend (computed once per case:
    where grouped_mm takes no fp32, as on CUDA in torch 2.11, the twin runs the slow eager loop)."""
    ref_layer = with_backend(build_like(layer, torch.float32), "torch")
    x32 = x.detach().float().requires_grad_()
    ref = ref_layer(x32)
    (ref_dx,) = torch.autograd.grad(ref.square().sum(), x32)
    return ref.detach(), ref_dx


def check(layer: MoE, x: torch.Tensor, backend: str, ref: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Worst relative error of output and input gradient against the fp32 reference."""
    xb = x.detach().requires_grad_()
    out = with_backend(layer, backend)(xb)
    (dx,) = torch.autograd.grad(out.float().square().sum(), xb)
    return max(rel_err(out, ref[0]), rel_err(dx, ref[1]))


def build_like(layer: MoE, dtype) -> MoE:
    twin = MoE(layer.config, layer.hidden_size).to(device=layer.router.weight.device)
    twin.load_state_dict(layer.state_dict())
    return twin.to(dtype)


def run_case(
    model: str, d: int, f: int, experts: int, rows: int, top_k: int, routing: str, device, dtype, backends, repeats: int
) -> list[dict]:
    tokens = rows // top_k
    layer = build(d, f, experts, top_k, routing, device, dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d, device=device, dtype=dtype)
    gemm_flops = 6 * rows * d * f
    ref = reference(layer, x)
    out = []
    for backend in backends:
        row = dict(model=model, d=d, f=f, experts=experts, rows=rows, tokens=tokens, routing=routing, backend=backend)
        err = check(layer, x, backend, ref)
        row["rel_err"] = err
        if not math.isfinite(err) or err > TOLERANCE:
            row["status"] = f"wrong: relative error {err:.3g} > {TOLERANCE}"
            out.append(row)
            continue
        with_backend(layer, backend)
        n = min(repeats, EAGER_REPEATS) if backend == "eager" else repeats  # the loop is the slow reference
        fwd = measure(lambda: layer(x), device, warmup=min(2, n), repeats=n)
        step = measure(lambda: layer(x).backward(g), device, warmup=min(2, n), repeats=n)
        row.update(
            status="ok",
            forward=fwd.to_dict(),
            forward_backward=step.to_dict(),
            forward_tflops=gemm_flops / fwd.median_s / 1e12,
            forward_backward_tflops=3 * gemm_flops / step.median_s / 1e12,
            load_max_over_mean=float(layer.stats["load"].max() * experts),
        )
        out.append(row)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"]["cases"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = sorted({(r["model"], r["experts"], r["rows"], r["routing"]) for r in rows})
    width = 0.8 / len(BACKENDS)
    for i, backend in enumerate(BACKENDS):
        values = [
            next(
                (
                    r["forward_backward_tflops"]
                    for r in rows
                    if r["backend"] == backend and (r["model"], r["experts"], r["rows"], r["routing"]) == lab
                ),
                0.0,
            )
            for lab in labels
        ]
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=backend)
    ax.set_xticks([j + width for j in range(len(labels))])
    ax.set_xticklabels([f"{m}\nE{e} R{r // 1024}K {rt}" for m, e, r, rt in labels], fontsize=7)
    ax.set_ylabel("expert-GEMM TFLOP/s, forward + backward")
    ax.set_title(f"MoE layer on {result['environment']['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny fp32 shape, to test the machinery on CPU")
    parser.add_argument("--results-dir", default=None, help="default: bench/results")
    args = parser.parse_args(argv)
    device = pick_device("auto")
    if args.cpu_smoke:
        models, experts, rows, f, top_k, dtype = (
            SMOKE["models"],
            SMOKE["experts"],
            SMOKE["rows"],
            SMOKE["ffn"],
            SMOKE["top_k"],
            torch.float32,
        )
        backends = ("torch", "eager", "triton")
    elif device.type != "cuda":
        print("bench/moe_layer.py needs a CUDA GPU (or --cpu-smoke); nothing was measured", file=sys.stderr)
        return 2
    else:
        shapes = QUICK if args.quick else {"models": MODELS, "experts": EXPERTS, "rows": ROWS}
        models = {m: MODELS[m] for m in shapes["models"]}
        experts, rows, f, top_k, dtype, backends = (
            shapes["experts"],
            shapes["rows"],
            FFN,
            TOP_K,
            torch.bfloat16,
            BACKENDS,
        )
    cases = []
    env = environment(device)
    for model, d in models.items():
        for e in experts:
            for r in rows:
                for routing in ("balanced",) if args.cpu_smoke else ("balanced", "zipf"):
                    cases += run_case(
                        model, d, f, e, r, top_k, routing, device, dtype, backends, repeats=1 if args.cpu_smoke else 10
                    )
                    last = cases[-len(backends) :]
                    print(
                        " ".join(f"{c['backend']}={c.get('forward_backward_tflops', float('nan')):.1f}" for c in last),
                        f"TFLOP/s  {model} E={e} R={r} {routing}",
                        flush=True,
                    )
                    # saved after every case, so that a run stopped by a time limit keeps what it measured
                    result = record(
                        "moe_layer",
                        env,
                        {"ffn": f, "top_k": top_k, "shared_experts": 1},
                        {
                            "dtype": str(dtype),
                            "tolerance": TOLERANCE,
                            "smoke": args.cpu_smoke,
                            "eager_repeats": EAGER_REPEATS,
                        },
                        {"cases": cases},
                    )
                    path = save(result, "moe_layer", args.results_dir)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Grouped GEMM benchmark on one CUDA GPU: TFLOP/s of the moe kernels against torch.

Shapes: M = routed rows on this GPU, K = in dim, N = out dim, E = local experts,
        d = model dim, f = expert hidden dim, T = tokens.

Cases, per model (d, f and top-k read from configs/full/: Ling-1T and DeepSeek-V3 by default,
any of bench/moe_layer_cases.MODELS with --model), per E (8/16/32/64 local experts of a model
too big for one GPU; the whole model's E where its experts fit, as in bench/moe_layer.py),
per M in decode sizes (8, 64, 512 routed rows: 1, 8, 64 tokens at top-8) and prefill/training
sizes (4K, 16K, 64K routed rows), with balanced or Zipf-skewed expert loads:

  grouped_mm   up projection [M, d] x [E, d, 2f] and down projection [M, f] x [E, f, d],
               forward and backward (dA + dB), four implementations:
                 triton       moe_kernels.grouped_mm
                 torch        torch.nn.functional.grouped_mm
                 eager_loop   one torch.mm per non-empty expert (host-known counts)
                 dense_mm     one torch.mm of the same FLOPs: the ceiling
  expert_ffn   swiglu FFN with top-8 gather/scatter, forward and backward:
                 triton       moe_kernels.expert_ffn (permute fused into the GEMMs)
                 torch        gather, F.grouped_mm, silu * up, F.grouped_mm, scatter

Before timing, each case checks bf16 results (forward and every gradient) against
an fp32 reference (relative error, tolerance 1e-2); a failing implementation is
recorded and not timed. Timing: triton.testing.do_bench, median over runs after
warm-up; do_bench flushes L2 before every run and inputs smaller than twice L2
are additionally rotated over several copies. TFLOP/s counts the useful FLOPs
(2 M K N forward, twice that backward). Every figure, with the device, versions
and commit, goes to bench/results/<gpu-slug>/grouped_gemm.json, and a PNG per
model is drawn from that JSON (bench/grouped_gemm_plot.py).

usage: python bench/grouped_gemm.py [--quick] [--model ling-1t] [--op grouped_mm] [--tune]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from moe_layer_cases import MODELS, local_experts, model_shape  # noqa: E402

from moe_kernels.tuning import KINDS  # noqa: E402

DEFAULT_MODELS = ("ling-1t", "deepseek-v3")
EXPERTS = (8, 16, 32, 64)  # local experts of a model too big for one GPU
ROWS = (8, 64, 512, 4096, 16384, 65536)  # decode: 1, 8, 64 tokens x top-8; then prefill/training
QUICK = {"models": ("ling-1t",), "experts": (8, 32), "rows": (64, 4096)}
ROUTINGS = ("balanced", "zipf")
DEVICE, DTYPE = "cuda", torch.bfloat16
ZIPF_S = 1.2  # expert load ~ 1 / rank**s
TOLERANCE = 1e-2  # bf16 relative error vs the fp32 reference
WARMUP_MS, REP_MS = 25, 100


def model_shapes(names) -> dict[str, dict]:
    """name -> d, f, top_k and the local expert counts to run, from the full config."""
    shapes = {}
    for name in names:
        shape = model_shape(name)
        whole = local_experts(shape) == (shape["experts_total"],)
        shape["experts"] = (
            (shape["experts_total"],) if whole else tuple(e for e in EXPERTS if e < shape["experts_total"])
        )
        shapes[name] = shape
    return shapes


def refuse_without_gpu() -> None:
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "bench/grouped_gemm.py needs a CUDA GPU (and TRITON_INTERPRET unset); nothing was measured", file=sys.stderr
        )
        sys.exit(2)


def group_counts(rows: int, experts: int, routing: str) -> list[int]:
    """Rows per expert, summing to `rows`: equal shares, or Zipf shares (expert 0 heaviest)."""
    weights = [1.0] * experts if routing == "balanced" else [1.0 / (i + 1) ** ZIPF_S for i in range(experts)]
    total = sum(weights)
    counts = [int(rows * w / total) for w in weights]
    for i in range(rows - sum(counts)):  # hand out the remainder, heaviest first
        counts[i % experts] += 1
    return counts


def offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=DEVICE)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.float().norm().item()
    return (out.float() - ref.float()).norm().item() / max(scale, 1e-30)


def copies_for(working_set_bytes: int) -> int:
    """How many input copies to rotate so that one pass does not fit in L2."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return min(8, max(1, math.ceil(2 * l2 / max(working_set_bytes, 1))))


def median_ms(fns: list) -> float:
    """do_bench median of calling fns[0], fns[1], ... in turn (rotation over input copies)."""
    import triton.testing

    turn = itertools.cycle(fns)
    return triton.testing.do_bench(lambda: next(turn)(), warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def eager_loop(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """One torch.mm per non-empty expert, as a per-expert Python loop backend would."""
    parts, start = [], 0
    for g, n in enumerate(counts):
        if n:
            parts.append(a[start : start + n] @ b[g])
        start += n
    return torch.cat(parts)


def grouped_mm_case(
    moe_kernels, model: str, shape: dict, proj: str, experts: int, rows: int, routing: str
) -> list[dict]:
    d, f = shape["d"], shape["f"]
    k, n = (d, 2 * f) if proj == "up" else (f, d)
    counts = group_counts(rows, experts, routing)
    offs = offsets(counts)
    flops = {"forward": 2 * rows * k * n, "backward": 4 * rows * k * n}
    case = dict(
        op="grouped_mm", model=model, proj=proj, experts=experts, rows=rows, routing=routing, K=k, N=n, counts=counts
    )

    def inputs():
        a = torch.randn(rows, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
        b = (torch.randn(experts, k, n, device=DEVICE) / k**0.5).to(DTYPE).requires_grad_(True)
        dense_w = b[0].detach().clone().requires_grad_(True)  # the ceiling's own [K, N] weight
        dy = torch.randn(rows, n, device=DEVICE, dtype=DTYPE)
        return a, b, dense_w, dy

    # name -> (product of a and a weight, which weight: 1 = b [E, K, N], 2 = dense_w [K, N])
    impls = {
        "triton": (lambda a, w: moe_kernels.grouped_mm(a, w, offs), 1),
        "torch": (lambda a, w: F.grouped_mm(a, w, offs=offs), 1),
        "eager_loop": (lambda a, w: eager_loop(a, w, counts), 1),
        "dense_mm": (lambda a, w: a @ w, 2),
    }
    copies = [inputs()]
    a, b, _, dy = copies[0]
    with torch.no_grad():
        a32, b32, dy32 = a.float(), b.float(), dy.float()
        ref = moe_kernels.grouped_mm_reference(a32, b32, offs)
        da_ref = moe_kernels.grouped_mm_reference(dy32, b32.transpose(1, 2), offs)
        db_ref = torch.stack([a32[s:e].T @ dy32[s:e] for s, e in zip([0, *offs.tolist()[:-1]], offs.tolist())])
        del a32, b32, dy32
    copies += [inputs() for _ in range(copies_for(a.nbytes + b.nbytes + 2 * dy.nbytes) - 1)]
    results = []
    for name, (fn, weight) in impls.items():
        check = {}
        if name != "dense_mm":  # the ceiling computes a different product: nothing to check
            out = fn(a, b)
            da, db = torch.autograd.grad(out, (a, b), dy)
            check = {"out": rel_err(out, ref), "da": rel_err(da, da_ref), "db": rel_err(db, db_ref)}
            del out, da, db
        ok = all(err <= TOLERANCE for err in check.values())
        for pass_ in ("forward", "backward"):
            row = {**case, "impl": name, "pass": pass_, "check": check, "ok": ok, "ms": None, "tflops": None}
            if ok:
                if pass_ == "forward":
                    fns = [lambda c=c: fn(c[0], c[weight]) for c in copies]
                else:
                    graphs = [(fn(c[0], c[weight]), (c[0], c[weight]), c[3]) for c in copies]
                    fns = [
                        lambda o=o, leaves=leaves, dy=dy: torch.autograd.grad(o, leaves, dy, retain_graph=True)
                        for o, leaves, dy in graphs
                    ]
                row["ms"] = median_ms(fns)
                row["tflops"] = flops[pass_] / row["ms"] / 1e9
            results.append(row)
    return results


def torch_expert_ffn(x, w_in, w_out, offs, row_token, row_slot, num_slots):
    """The unfused path of the MoE layer's "torch" backend: every step materialised."""
    x_rows = x[row_token]  # [R, d] gather copy
    gate, up = F.grouped_mm(x_rows, w_in, offs=offs).chunk(2, dim=-1)
    h = F.silu(gate) * up  # [R, f]
    y_rows = F.grouped_mm(h, w_out, offs=offs)  # [R, d]
    return x.new_zeros(num_slots, x.shape[1]).index_copy(0, row_slot, y_rows)  # scatter


def expert_ffn_case(moe_kernels, model: str, shape: dict, experts: int, rows: int, routing: str) -> list[dict]:
    d, f, top_k = shape["d"], shape["f"], min(shape["top_k"], experts)
    counts = group_counts(rows, experts, routing)
    offs = offsets(counts)
    tokens = math.ceil(rows / top_k)
    flops = {"forward": 6 * rows * d * f, "backward": 12 * rows * d * f}
    case = dict(
        op="expert_ffn",
        model=model,
        proj="ffn",
        experts=experts,
        rows=rows,
        routing=routing,
        K=d,
        N=f,
        top_k=top_k,
        counts=counts,
    )
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    row_slot = torch.randperm(rows, device=DEVICE, generator=gen)  # row r (sorted by expert) -> its slot
    row_token = row_slot // top_k

    def inputs():
        x = torch.randn(tokens, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
        w_in = (torch.randn(experts, d, 2 * f, device=DEVICE) / d**0.5).to(DTYPE).requires_grad_(True)
        w_out = (torch.randn(experts, f, d, device=DEVICE) / f**0.5).to(DTYPE).requires_grad_(True)
        return x, w_in, w_out

    args = (offs, row_token, row_slot, rows)
    impls = {"triton": moe_kernels.expert_ffn, "torch": torch_expert_ffn}
    x, w_in, w_out = inputs()
    dy = torch.randn(rows, d, device=DEVICE, dtype=DTYPE)
    leaves = [t.detach().float().requires_grad_(True) for t in (x, w_in, w_out)]
    ref = moe_kernels.expert_ffn_reference(*leaves, *args)
    ref_grads = torch.autograd.grad(ref, leaves, dy.float())
    checks = {}
    for name, fn in impls.items():
        y = fn(x, w_in, w_out, *args)
        grads = torch.autograd.grad(y, (x, w_in, w_out), dy)
        checks[name] = {
            "y": rel_err(y, ref),
            **{k: rel_err(g, r) for k, g, r in zip(("dx", "dw_in", "dw_out"), grads, ref_grads)},
        }
    del ref, ref_grads, leaves, y, grads  # the fp32 reference is the largest allocation: free it before timing
    copies = [(x, w_in, w_out)] + [inputs() for _ in range(copies_for(x.nbytes + w_in.nbytes + w_out.nbytes) - 1)]
    results = []
    for name, fn in impls.items():
        check = checks[name]
        ok = all(err <= TOLERANCE for err in check.values())
        for pass_ in ("forward", "backward"):
            row = {**case, "impl": name, "pass": pass_, "check": check, "ok": ok, "ms": None, "tflops": None}
            if ok:
                if pass_ == "forward":
                    fns = [lambda c=c: fn(*c, *args) for c in copies]
                else:
                    outs = [(fn(*c, *args), c) for c in copies]
                    fns = [lambda o=o, c=c: torch.autograd.grad(o, c, dy, retain_graph=True) for o, c in outs]
                row["ms"] = median_ms(fns)
                row["tflops"] = flops[pass_] / row["ms"] / 1e9
            results.append(row)
    return results


def summary_line(row: dict) -> str:
    if "error" in row:
        return f"{row['op']:10s} {row['model']:11s} {row['case']}: {row['error']}"
    figure = f"{row['tflops']:8.1f} TFLOP/s" if row["tflops"] else f"not timed, check failed: {row['check']}"
    return (
        f"{row['op']:10s} {row['model']:11s} {row['proj']:4s} E={row['experts']:<3d} M={row['rows']:<6d} "
        f"{row['routing']:8s} {row['pass']:8s} {row['impl']:10s} {figure}"
    )


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout)"


def environment(args) -> dict:
    import triton

    return {
        "bench": "grouped_gemm",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": args.commit or git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "dtype": "bfloat16",
        "zipf_s": ZIPF_S,
        "tolerance": TOLERANCE,
        "timing": f"triton.testing.do_bench median, warmup {WARMUP_MS} ms, rep {REP_MS} ms, "
        "L2 flushed per run, inputs rotated below 2x L2",
    }


def cases_of(shapes: dict[str, dict], sizes, quick: bool) -> list[tuple[str, int, int, str]]:
    """(model, local experts, routed rows, routing) of every case; --quick keeps QUICK's expert
    counts where the model has them (else its first), and one routing where top-k = E makes them equal."""
    cases = []
    for model, shape in shapes.items():
        experts = [e for e in shape["experts"] if not quick or e in QUICK["experts"]] or list(shape["experts"][:1])
        for e, m in itertools.product(experts, sizes):
            routings = ROUTINGS if min(shape["top_k"], e) < e else ("balanced",)
            cases += [(model, e, m, routing) for routing in routings]
    return cases


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run: one model, 2 expert counts, 2 sizes")
    parser.add_argument(
        "--model", choices=MODELS, action="append", help=f"only these models (default {', '.join(DEFAULT_MODELS)})"
    )
    parser.add_argument("--op", choices=("grouped_mm", "expert_ffn"), action="append", help="only these ops")
    parser.add_argument("--commit", help="commit to record when the checkout has no .git")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<gpu-slug>)")
    parser.add_argument("--tune", action="store_true", help="sweep tile configs; rewrite moe_kernels/gemm_configs.json")
    parser.add_argument("--tune-kind", action="append", choices=KINDS, help="with --tune: only these kernel kinds")
    parser.add_argument(
        "--table",
        type=Path,
        help="with --tune: where to write the table "
        "(default moe_kernels/gemm_configs.json; on a remote GPU machine, a path under $OUT)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    refuse_without_gpu()
    import moe_kernels
    from moe_kernels.tuning import device_slug

    if args.tune:
        from grouped_gemm_tune import tune_and_write

        tune_and_write(args.tune_kind, args.commit or git_commit(), *([args.table] if args.table else []))
        return
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references are true fp32
    shapes = model_shapes(args.model or (QUICK["models"] if args.quick else DEFAULT_MODELS))
    sizes = QUICK["rows"] if args.quick else ROWS
    ops = args.op or ("grouped_mm", "expert_ffn")
    out_dir = args.out or ROOT / "bench" / "results" / device_slug(torch.cuda.get_device_name(0))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "grouped_gemm.json"
    env = environment(args)
    results = []
    for model, e, m, routing in cases_of(shapes, sizes, args.quick):
        cases = [(grouped_mm_case, (proj, e, m, routing)) for proj in ("up", "down") if "grouped_mm" in ops]
        cases += [(expert_ffn_case, (e, m, routing))] if "expert_ffn" in ops else []
        for run_case, case_args in cases:
            try:
                rows_done = run_case(moe_kernels, model, shapes[model], *case_args)
            except torch.cuda.OutOfMemoryError:
                rows_done = [
                    {
                        "op": run_case.__name__.removesuffix("_case"),
                        "model": model,
                        "case": list(case_args),
                        "ok": False,
                        "error": "CUDA out of memory",
                    }
                ]
            torch.cuda.empty_cache()
            for row in rows_done:
                print(summary_line(row), flush=True)
            results += rows_done
            # rewritten after every case, so that a run stopped by a time limit keeps what it measured
            path.write_text(json.dumps({**env, "results": results}, indent=1) + "\n")
    print(f"wrote {path}")
    from grouped_gemm_plot import plot

    for png in plot(path):
        print(f"wrote {png}")
    failed = [r for r in results if not r["ok"]]
    if failed:
        print(
            f"{len(failed)} measurements were not taken: failed correctness check or out of memory "
            f"(see 'check' and 'error' in the JSON)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Routed experts of one MoE layer on one GPU, side by side: ours (Triton and torch backends),
transformers' grouped_mm experts and SonicMoE, on the same bf16 weights and the same routing.

Legend: T = tokens, d = model dim, f = expert FFN dim, E = local experts, K = top-k,
R = T*K routed rows.

Shapes (bench/moe_layer_cases.py): the per-GPU expert shapes of every full config (read from configs/full/): Ling-1T,
DeepSeek-V3, Qwen3-30B-A3B, Mixtral 8x7B, OLMoE and Ling-flash by default, any other with
--model. Local experts: the config's full E where its experts fit in 8 GiB (the fine-grained
models), else 8 and 32 (expert parallelism over 32 or 8 GPUs). First the shape a published anchor
was measured at (moe_layer_cases.ANCHOR_ROWS: Qwen3-30B-A3B's experts at 32K tokens), then rows
4K, 16K and 64K; routing balanced (every expert gets R/E rows) or skewed (each token draws its K
experts without replacement with probability ~ 1 / rank^1.2; the load's max/mean is recorded).
Where K = E the two are the same routing, and only the balanced one runs.

Every implementation takes (x [T, d], topk_idx [T, K], topk_weight [T, K]) and returns the weighted
sum [T, d] (bench/moe_layer_peers.py). Per case, correctness first: each one's bf16 output and the
gradients of sum(out * g) for a fixed random g (input, both expert weights, routing weights where it
supports them) against an fp32 reference (a plain loop over experts in bench/moe_layer_cases.py,
independent of everything under test), relative error <= 2e-2; a wrong or failing one is recorded,
not timed. Then (bench/moe_layer_measure.py) forward, backward (of the same graph, retained) and
forward+backward are timed with triton.testing.do_bench (moe.perf.timing.measure; medians, few
repeats on big shapes), the peak memory of one forward+backward is recorded, and TFLOP/s counts the
expert GEMMs: 6 R d f forward, 12 R d f backward, set against a dense bf16 torch.mm measured in the
same run, and against the case's roofline: its FLOPs at that peak or its compulsory bytes (weights,
x, out and gradients; moe_layer_cases.compulsory_bytes) at the copy bandwidth measured in the same
run, whichever is slower (<pass>_of_roofline; the case's "roofline" says which bound it is).

Results: <results-dir>/<device>/moe_layer.json, saved after every case (a run stopped by a time
limit keeps what it measured), and one PNG per model beside it (bench/moe_layer_plot.py).
--kernel-options forces opt-in tile options (TMA, PERSISTENT) on for our Triton kernels, to measure
them at these shapes before a tuning run decides; such a run writes moe_layer-<options>.json, and
--impl keeps it to the implementations it is about.

usage: python bench/moe_layer.py [--quick] [--model NAME ...] [--budget-s S] [--cpu-smoke]
                                [--impl NAME ...] [--kernel-options JSON]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe.device import pick_device  # noqa: E402
from moe.perf.results import environment, record, save  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_layer_peers as peers  # noqa: E402
from moe_layer_cases import (  # noqa: E402
    MODELS,
    PASS_FLOPS,
    QUICK_ROWS,
    ROWS,
    ZIPF_S,
    Case,
    estimate_s,
    grid,
    model_shape,
    reference,
    roofline,
    routing,
)
from moe_layer_measure import check, copy_bandwidth, dense_peak, time_impl  # noqa: E402
from moe_layer_plot import plot_models  # noqa: E402

IMPLS = ("ours-triton", "ours-torch", "transformers", "sonicmoe")
TOLERANCE = 2e-2  # bf16 relative error against fp32
SMOKE = {"name": "smoke", "d": 48, "f": 24, "E": 4, "K": 2, "rows": (32,)}


# --------------------------------------------------------------------------- one case


def build_impls(case: Case, w_in: Tensor, w_out: Tensor, args, sonic_reason: str) -> list[peers.Impl]:
    wanted = args.impl or IMPLS
    layer = peers.our_layer(w_in, w_out, case.top_k, w_in.dtype)
    impls = [peers.ours(layer, backend) for backend in ("triton", "torch") if f"ours-{backend}" in wanted]
    if "transformers" in wanted:
        impls.append(peers.transformers_grouped_mm(w_in, w_out, case.top_k))
    if "sonicmoe" in wanted and sonic_reason:
        impls.append(peers.Impl("sonicmoe", None, reason=sonic_reason))
    elif "sonicmoe" in wanted:
        impls.append(peers.sonicmoe(w_in, w_out, case.top_k, autotune=args.sonic_autotune))
    if args.with_wrong:
        impls.append(peers.wrong(layer))
    return impls


def run_case(case: Case, device, dtype, args, sonic_reason: str, roofs: dict) -> list[dict]:
    torch.manual_seed(0)
    w_in, w_out = peers.canonical_weights(case.experts, case.d, case.f, device, dtype)
    idx, w = routing(case, device)
    x = torch.randn(case.tokens, case.d, device=device, dtype=dtype)
    g = torch.randn(case.tokens, case.d, device=device, dtype=dtype)
    ref = reference(x, idx, w, w_in, w_out, g)
    load = torch.bincount(idx.flatten(), minlength=case.experts).float()
    base = {**case.__dict__, "tokens": case.tokens, "load_max_over_mean": (load.max() / load.mean()).item()}
    peak_tflops, bytes_per_s = roofs.get("tflops"), roofs.get("bytes_per_s")
    roof = None
    if peak_tflops and bytes_per_s:
        roof = roofline(case, int((load > 0).sum()), peak_tflops, bytes_per_s)
        base["roofline"] = roof
    rows = []
    for impl in build_impls(case, w_in, w_out, args, sonic_reason):
        row = {**base, "impl": impl.name, "notes": impl.notes}
        rows.append(row)
        if impl.forward is None:
            row["status"] = f"unavailable: {impl.reason}"
            continue
        try:
            row.update(check(impl, x, idx, w, g, ref, device))
            worst = max(v for v in row["rel_err"].values() if v is not None)
            row["rel_err"] = {k: v if v is None or math.isfinite(v) else str(v) for k, v in row["rel_err"].items()}
            if not math.isfinite(worst) or worst > TOLERANCE:  # NaN compares false: caught here
                row["status"] = f"wrong: relative error {worst:.3g} > {TOLERANCE}"
                continue
            impl.notes["routing_weight_grad"] = row["routing_weight_grad"]
            row.update(time_impl(impl, case, x, idx, w, g, device, args.cpu_smoke))
            for key in PASS_FLOPS:
                if peak_tflops:
                    row[f"{key}_of_peak"] = row[f"{key}_tflops"] / peak_tflops
                if roof:
                    row[f"{key}_of_roofline"] = row[f"{key}_tflops"] / roof[key]["bound_tflops"]
            row["status"] = "ok"
        except Exception as e:  # one failing implementation must not stop the others
            row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
            row["traceback"] = traceback.format_exc()[-2000:]
            if device.type == "cuda" and not cuda_alive(device):
                raise DeviceLost(f"{impl.name} left the CUDA context broken: {e}") from e
    return rows


class DeviceLost(Exception):
    """The CUDA context no longer answers: nothing after this can run in this process."""


def cuda_alive(device) -> bool:
    """After an error: does the device still answer (an illegal access poisons the whole process)?"""
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------- SonicMoE probe


def probe_sonic(device, timeout_s: float, autotune: bool) -> str:
    """Run SonicMoE once on a small case in a child process: '' if it ran, else why not.

    A crash inside its CUDA or MLIR code (segfault, illegal access) would end this process and every
    case after it; the child takes that risk instead. Its compiled kernels land in QuACK's disk
    cache, so the main run loads them instead of compiling again."""
    if device.type != "cuda":
        return "SonicMoE needs a CUDA GPU (Hopper or Blackwell)"
    if importlib.util.find_spec("sonicmoe") is None:  # no child needed to learn that
        return "sonicmoe is not installed (pip install sonic-moe; bench/gpu_session.sh installs it from .whl)"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-sonic"] + (["--sonic-autotune"] if autotune else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"the SonicMoE probe (a small case in a child process) ran over {timeout_s:.0f}s"
    said = [line for line in proc.stdout.splitlines() if line.startswith("sonicmoe ")]
    if proc.returncode == 0 and said and said[-1].startswith("sonicmoe ok"):
        return ""
    if proc.returncode == 0 and said:  # "sonicmoe unavailable: <why>"
        return said[-1].removeprefix("sonicmoe unavailable: ")[:300]
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return f"the SonicMoE probe failed (exit {proc.returncode}): {last[:300]}"


def probe_sonic_main(args) -> int:
    """The child's side: prints "sonicmoe ok: ..." or "sonicmoe unavailable: <why>"; a crash shows as its exit."""
    try:
        device = torch.device("cuda")
        case = Case("probe", 512, 256, 8, 2, 1024, "zipf")
        w_in, w_out = peers.canonical_weights(case.experts, case.d, case.f, device, torch.bfloat16)
        impl = peers.sonicmoe(w_in, w_out, case.top_k, autotune=args.sonic_autotune)
        if impl.forward is None:
            print(f"sonicmoe unavailable: {impl.reason}")
            return 0
        idx, w = routing(case, device)
        x = torch.randn(case.tokens, case.d, device=device, dtype=torch.bfloat16)
        g = torch.randn_like(x)
        result = check(impl, x, idx, w, g, reference(x, idx, w, w_in, w_out, g), device)
    except Exception as e:  # a Python-level failure: the main run records it instead of running SonicMoE
        traceback.print_exc()
        print(f"sonicmoe unavailable: the probe raised {type(e).__name__}: {str(e)[:250]}")
        return 0
    print(f"sonicmoe ok: {result['rel_err']} first call {result['first_call_s']:.1f}s")
    return 0


# --------------------------------------------------------------------------- main


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the anchor, then rows 16K only, each model at its largest local E (~2 min)",
    )
    parser.add_argument(
        "--model", action="append", help=f"a full config name or path (repeatable); default: {', '.join(MODELS)}"
    )
    parser.add_argument("--rows", type=int, action="append", help="routed rows (repeatable); default 4K, 16K, 64K")
    parser.add_argument("--budget-s", type=float, default=None, help="skip cases (recorded) that would end past this")
    parser.add_argument("--cpu-smoke", action="store_true", help="one tiny fp32 shape: tests the machinery on CPU")
    parser.add_argument("--with-wrong", action="store_true", help="add a deliberately wrong implementation (tests)")
    parser.add_argument("--sonic-autotune", action="store_true", help="let QuACK autotune every shape (slow)")
    parser.add_argument("--no-sonic-probe", action="store_true", help="run SonicMoE in this process without a probe")
    parser.add_argument("--probe-sonic", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", action="append", choices=IMPLS, help="only these implementations (repeatable)")
    parser.add_argument(
        "--kernel-options",
        type=json_object,
        default={},
        help='tile options forced on for our Triton kernels, e.g. \'{"TMA": true, "PERSISTENT": 1}\' '
        "(moe_kernels/tuning.py); results go to moe_layer-<options>.json",
    )
    parser.add_argument("--commit", default=None, help="commit to record when the checkout has no .git")
    parser.add_argument("--results-dir", default=None, help="default: bench/results")
    return parser.parse_args(argv)


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def results_name(options: dict) -> str:
    """moe_layer, or moe_layer-<option><value>... for a run with forced kernel options."""
    return "-".join(["moe_layer"] + [f"{k.lower()}{'' if v is True else v}" for k, v in sorted(options.items())])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not args.kernel_options:
        return run(args)
    from moe_kernels.tuning import force_options

    try:
        force_options(args.kernel_options)
    except ValueError as e:
        print(f"--kernel-options: {e}", file=sys.stderr)
        return 2
    try:
        return run(args)
    finally:  # the table decides again for whoever called main in this process
        force_options({})


def run(args) -> int:
    name = results_name(args.kernel_options)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is true fp32
    if args.probe_sonic:
        return probe_sonic_main(args)
    start = time.perf_counter()
    device = pick_device("auto")
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        models = {SMOKE["name"]: {"d": SMOKE["d"], "f": SMOKE["f"], "experts_total": SMOKE["E"], "top_k": SMOKE["K"]}}
        rows = tuple(args.rows or SMOKE["rows"])
    elif device.type != "cuda":
        print("bench/moe_layer.py needs a CUDA GPU (or --cpu-smoke); nothing was measured", file=sys.stderr)
        return 2
    else:
        dtype = torch.bfloat16
        models = {name: model_shape(name) for name in args.model or MODELS}
        rows = tuple(args.rows or (QUICK_ROWS if args.quick else ROWS))
    cases = grid(models, rows, args.quick, anchors=not (args.rows or args.cpu_smoke))
    env = environment(device)
    if args.commit:
        env["commit"] = args.commit
    peak = dense_peak(device, args.cpu_smoke)
    bandwidth = copy_bandwidth(device, args.cpu_smoke)
    sonic_reason = probe_time = ""
    if args.impl and "sonicmoe" not in args.impl:
        sonic_reason = "not asked for (--impl)"
    elif not args.cpu_smoke and not args.no_sonic_probe:
        t0 = time.perf_counter()
        sonic_reason = probe_sonic(device, min(240.0, (args.budget_s or 600) / 2), args.sonic_autotune)
        probe_time = f"{time.perf_counter() - t0:.1f}s"
        print(f"sonicmoe probe ({probe_time}): {sonic_reason or 'ran'}", flush=True)
    elif args.cpu_smoke:
        sonic_reason = "SonicMoE needs a CUDA GPU (Hopper or Blackwell)"
    settings = {
        "dtype": str(dtype),
        "tolerance": TOLERANCE,
        "zipf_exponent": ZIPF_S,
        "rows": list(rows),
        "quick": args.quick,
        "smoke": args.cpu_smoke,
        "budget_s": args.budget_s,
        "sonic_autotune": args.sonic_autotune,
        "impls": list(args.impl or IMPLS),
        "kernel_options": args.kernel_options,  # {}: the tile table decides
        "sonic_probe": {"seconds": probe_time, "result": sonic_reason or "ran"},
        "flops": "expert GEMMs only: 6 R d f forward, 12 R d f backward",
        "timing": "moe.perf.timing.measure: triton.testing.do_bench medians on CUDA, perf_counter on CPU",
        "planned_s": round(sum(estimate_s(c) for c in cases), 1),
    }
    results: dict = {"dense_peak": peak, "bandwidth": bandwidth, "cases": [], "skipped": []}
    roofs = {"tflops": peak and peak["tflops"], "bytes_per_s": bandwidth and bandwidth["bytes_per_s"]}
    path = None
    status = 0
    for case in cases:
        elapsed = time.perf_counter() - start
        if args.budget_s is not None and elapsed + estimate_s(case) > args.budget_s:
            results["skipped"].append(
                {**case.__dict__, "reason": f"time budget {args.budget_s:.0f}s ({elapsed:.0f}s spent)"}
            )
            continue
        try:
            rows_out = run_case(case, device, dtype, args, sonic_reason, roofs)
        except DeviceLost as e:  # save what there is and stop
            results["skipped"].append({**case.__dict__, "reason": str(e)[:300]})
            print(f"stopping: {e}", file=sys.stderr)
            status = 1
            break
        except Exception as e:  # the case itself (its weights, its reference) failed, e.g. out of memory
            rows_out = []
            results["skipped"].append({**case.__dict__, "reason": f"error: {type(e).__name__}: {str(e)[:300]}"})
            print(f"case failed: {case}: {e}", file=sys.stderr)
            status = 1
        finally:
            free(device)
        results["cases"] += rows_out
        print(summary(case, rows_out, time.perf_counter() - start), flush=True)
        result = record("moe_layer", env, {"models": models}, settings, results)
        path = save(result, name, args.results_dir)
    result = record("moe_layer", env, {"models": models}, settings, results)
    path = save(result, name, args.results_dir)
    pngs = plot_models(result, path.parent, name)
    print(f"wrote {path} and {len(pngs)} plots; {len(results['skipped'])} cases skipped")
    return status


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summary(case: Case, rows: list[dict], elapsed: float) -> str:
    cells = []
    for r in rows:
        value = f"{r['forward_backward_tflops']:.3g}" if r["status"] == "ok" else r["status"].split(":")[0]
        cells.append(f"{r['impl']}={value}")
    shape = f"{case.model} E={case.experts} K={case.top_k} R={case.rows} {case.routing}"
    return f"[{elapsed:5.0f}s] {shape}: fwd+bwd TFLOP/s " + " ".join(cells)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

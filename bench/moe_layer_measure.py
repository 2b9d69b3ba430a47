"""What bench/moe_layer.py measures of one implementation, and the two roofs of a run.

check(impl, ...)      one forward+backward against the fp32 reference: relative errors, peak
                      memory, first-call time (compiles included), warnings
time_impl(impl, ...)  do_bench medians of forward, backward and forward+backward, and TFLOP/s
dense_peak(device)    the dense bf16 torch.mm of this run (the compute roof)
copy_bandwidth(device)  bytes/s of a large device copy (the memory roof)
"""

from __future__ import annotations

import sys
import time
import warnings

import moe_layer_peers as peers
import torch
from moe_layer_cases import ASSUMED_TFLOPS, PASS_FLOPS, Case, rel_err
from torch import Tensor

from moe.perf.floor import measure_bandwidth
from moe.perf.timing import matmul_peak, measure, reset_peak_memory, synchronize

TARGET_TIMING_S = 0.2  # do_bench's measured time per figure, about


def check(impl: peers.Impl, x: Tensor, idx: Tensor, w: Tensor, g: Tensor, ref: dict, device) -> dict:
    """One forward+backward: relative errors, peak memory, first-call time (compiles included), warnings."""
    xb, wb = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    synchronize(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    reset_peak_memory(device)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = impl.forward(xb, idx, wb)
        grads = torch.autograd.grad(out, (xb, *impl.weights, wb), g, allow_unused=True)
        synchronize(device)
    first_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    dx, d_weights, dw = grads[0], grads[1:-1], grads[-1]
    dw_in, dw_out = impl.to_ours(d_weights)
    errors = {"out": rel_err(out, ref["out"]), "dx": rel_err(dx, ref["dx"])}
    errors |= {"dw_in": rel_err(dw_in, ref["dw_in"]), "dw_out": rel_err(dw_out, ref["dw_out"])}
    errors["d_routing_weight"] = None if dw is None else rel_err(dw, ref["d_routing_weight"])
    return {
        "rel_err": errors,
        "routing_weight_grad": dw is not None,
        "peak_memory_bytes": peak,
        "first_call_s": first_s,
        "warnings": sorted({str(c.message)[:200] for c in caught}),
    }


def time_impl(impl: peers.Impl, case: Case, x: Tensor, idx: Tensor, w: Tensor, g: Tensor, device, smoke: bool) -> dict:
    """do_bench medians of forward, backward (the retained graph of one forward) and forward+backward."""
    routing_grad = impl.notes.get("routing_weight_grad", True)
    xb, wb = x.detach().requires_grad_(), w.detach().requires_grad_(routing_grad)
    inputs = (xb, *impl.weights) + ((wb,) if routing_grad else ())
    est = 3 * case.gemm_flops / (ASSUMED_TFLOPS * 1e12)
    n = 1 if smoke else max(3, min(10, round(TARGET_TIMING_S / max(est, 1e-9))))
    warmup = 0 if smoke else 1

    def forward():
        return impl.forward(xb, idx, wb)

    def step():
        return torch.autograd.grad(forward(), inputs, g, allow_unused=True)

    out = {"forward": measure(forward, device, warmup, n).to_dict()}
    graph = forward()
    try:
        out["backward"] = measure(
            lambda: torch.autograd.grad(graph, inputs, g, retain_graph=True, allow_unused=True), device, warmup, n
        ).to_dict()
        out["backward_how"] = "autograd.grad on one retained forward graph"
    except RuntimeError as e:  # a backward that cannot run twice: derive it below
        out["backward_how"] = f"forward_backward - forward ({type(e).__name__}: {str(e)[:120]})"
    graph = None  # frees the retained graph before the next measurement
    out["forward_backward"] = measure(step, device, warmup, n).to_dict()
    if "backward" not in out:
        median = max(out["forward_backward"]["median_s"] - out["forward"]["median_s"], 1e-12)
        out["backward"] = {"median_s": median, "derived": True}
    for key, flops in PASS_FLOPS.items():
        out[f"{key}_tflops"] = flops * case.gemm_flops / out[key]["median_s"] / 1e12
    return out


def dense_peak(device, smoke: bool) -> dict | None:
    try:
        if smoke:
            return matmul_peak(device, "fp32", n=128, warmup=1, repeats=3)
        return matmul_peak(device, "bf16", n=8192, warmup=3, repeats=10)
    except Exception as e:  # the comparison stands without it
        print(f"dense peak not measured: {e}", file=sys.stderr)
        return None


def copy_bandwidth(device, smoke: bool) -> dict | None:
    """The memory side of the roofline: bytes/s of a large device copy (moe.perf.floor)."""
    try:
        return measure_bandwidth(device, nbytes=1 << 22 if smoke else None, warmup=1 if smoke else 3, repeats=10)
    except Exception as e:  # the comparison stands without it
        print(f"bandwidth not measured: {e}", file=sys.stderr)
        return None

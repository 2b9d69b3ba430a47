"""`moe calibrate CONFIG`: time a full-size model's layers on this device and project the cost
of training it on a cluster, beside the published and claimed figures.

    moe calibrate configs/full/deepseek-v3.yaml --ep 64 --gpus 2048 --tokens 14.8e12
    moe calibrate configs/full/ling-1t.yaml --json --save

Measured: one attention block, one MoE layer as one expert-parallel rank runs it (E/P local
experts, see moe/components.py), one dense FFN layer, the embedding + LM head + loss; each
forward + backward at the per-GPU micro-batch. Projected (moe/projection.py): everything else.
On a CPU the layers are timed at a fraction of their width and a short sequence and
extrapolated by the FLOP ratio, so the run takes seconds; such output is labelled as a check
of the machinery, not a projection anyone should use.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import asdict

import torch
from tqdm import tqdm

from . import benchmark, components, device_info, flops
from .cli import UserError
from .config import load_config
from .device import pick_device
from .projection import Cluster, Component, ModelShape, compare, implied_tflops_per_gpu, project, \
    projected_value, training_run
from .published import claims_for

CPU_SCALE = 16  # CPU runs time every width / 16 ...
CPU_MIN_WIDTH = 128  # ... but not below a hidden size of 128 ...
CPU_TIMED_SEQ = 128  # ... on sequences of 128 tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a full-size model config, e.g. configs/full/deepseek-v3.yaml")
    m = parser.add_argument_group("measurement")
    m.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    m.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    m.add_argument("--seq-len", type=int, default=None, help="training context (default: the config's max_seq_len)")
    m.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward (default 1)")
    m.add_argument("--scale", type=int, default=None,
                   help=f"time layers at width / SCALE and extrapolate by FLOPs (default: 1 on GPU; on CPU "
                        f"{CPU_SCALE}, or less to keep the hidden size >= {CPU_MIN_WIDTH})")
    m.add_argument("--timed-seq-len", type=int, default=None,
                   help=f"sequence length actually timed (default: --seq-len on GPU, {CPU_TIMED_SEQ} on CPU)")
    m.add_argument("--backend", default=None, help="override the config's expert backend (eager, torch, triton)")
    m.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2 on GPU, 5 on CPU)")
    m.add_argument("--repeats", type=int, default=5)
    c = parser.add_argument_group("cluster (all assumptions; printed with the projection)")
    c.add_argument("--gpus", type=int, default=2048)
    c.add_argument("--gpus-per-node", type=int, default=8)
    c.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: min(8, experts))")
    c.add_argument("--nvlink-gbps", type=float, default=450.0, help="GB/s per GPU and direction inside a node")
    c.add_argument("--ib-gbps", type=float, default=50.0, help="GB/s per GPU between nodes (400 Gb/s = 50)")
    c.add_argument("--overlap", type=float, default=0.0, help="share of communication hidden under compute, 0-1")
    c.add_argument("--a2a-bytes", type=float, default=2.0, help="bytes per element in the all-to-all (bf16 2, fp8 1)")
    c.add_argument("--global-batch-tokens", type=float, default=15360 * 4096)
    r = parser.add_argument_group("training run")
    r.add_argument("--tokens", type=float, default=1e12, help="training tokens (default 1e12)")
    r.add_argument("--price", type=float, default=2.0, help="$ per GPU-hour (default 2.0, DeepSeek-V3's rate)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--save", action="store_true", help="write <results-dir>/<device>/calibrate-<name>.json")
    parser.add_argument("--results-dir", default=None, help=f"default {benchmark.DEFAULT_RESULTS_DIR}")


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.backend:
        if config.moe is None:
            raise ValueError(f"--backend {args.backend}: config {config.name!r} has no MoE layers")
        config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, backend=args.backend))
    device = pick_device(args.device)
    dtype = benchmark.pick_dtype(args.dtype, device)
    if args.warmup is None:
        args.warmup = benchmark.default_warmup(device)
    on_gpu = device.type == "cuda"
    seq_len = args.seq_len or config.max_seq_len
    scale = args.scale or (1 if on_gpu else max(1, min(CPU_SCALE, config.hidden_size // CPU_MIN_WIDTH)))
    timed_seq = args.timed_seq_len or (seq_len if on_gpu else min(seq_len, CPU_TIMED_SEQ))
    counts = components.layer_counts(config)
    ep = args.ep or (min(8, config.moe.num_experts) if config.moe else 1)
    cluster = Cluster(args.gpus, args.gpus_per_node, ep, args.nvlink_gbps, args.ib_gbps, args.overlap,
                      args.a2a_bytes, global_batch_tokens=args.global_batch_tokens)
    for key in ("micro_batch", "scale", "timed_seq_len", "tokens", "price"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {value}")

    timed_config = components.scale_config(config, scale)
    env = benchmark.environment(device)
    peak = benchmark.matmul_peak(device, dtype, warmup=args.warmup, repeats=args.repeats)
    datasheet = device_info.datasheet_tflops(env["device"], dtype) if on_gpu else None
    measured = []
    kinds = [k for k in components.KINDS if counts[k]]
    for kind in tqdm(kinds, desc="timing layers", disable=None):
        try:
            measured.append(_time(kind, config, timed_config, ep, args.micro_batch, seq_len, timed_seq, device,
                                  dtype, args.warmup, args.repeats))
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory timing the {kind} layer of {config.name} on {env['device']}: raise "
                            f"--ep (experts per GPU), lower --micro-batch, or time at --scale 2") from None

    if on_gpu:  # a CPU shared with other jobs times its own matmul peak too noisily for this check
        check_plausible(measured, peak["tflops"], env["device"])
    model = flops.count(config, seq_len)
    shape = ModelShape(config.hidden_size, config.moe.top_k if config.moe else 0, counts["moe"],
                       model.params_total - model.params_routed, model.params_routed, model.train_flops_per_token)
    parts = [Component(m["kind"], m["count"], m["full_seconds_per_token"], m["full_flops_per_token"]) for m in measured]
    peaks = {"measured": peak["tflops"], "datasheet": datasheet}
    projection = project(parts, shape, cluster, peaks)
    run = training_run(projection, args.tokens, cluster.gpus, args.price)
    comparison = _comparison(config.name, parts, shape, cluster, peaks, model.train_flops_per_token)

    settings = {"seq_len": seq_len, "micro_batch": args.micro_batch, "scale": scale, "timed_seq_len": timed_seq,
                "dtype": dtype, "backend": config.moe and config.moe.backend, "ep_degree": ep,
                "warmup": args.warmup, "repeats": args.repeats}
    result = benchmark.record(
        "calibrate", env, {"name": config.name, "path": str(args.config)}, settings,
        {"kind": "projection", "scaled": scale != 1 or timed_seq != seq_len, "matmul_peak": peak,
         "datasheet_tflops": datasheet, "components": measured, "model_flops_per_token": model.train_flops_per_token,
         "projection": projection.to_dict(), "training_run": asdict(run), "comparison": comparison},
        cluster=asdict(cluster), assumptions=assumptions(cluster, scale, timed_seq, seq_len, on_gpu))
    benchmark.publish(result, f"calibrate-{config.name}", lambda r: _print(r, config.name, args.config),
                      args.json, args.save, args.results_dir)
    return 0


def _time(kind, config, timed_config, ep, batch, seq_len, timed_seq, device, dtype, warmup, repeats) -> dict:
    module = components.build(kind, timed_config, ep, device).to(benchmark.DTYPES[dtype])
    step = components.make_step(kind, module, timed_config, batch, timed_seq)
    benchmark.reset_peak_memory(device)
    timing = benchmark.measure(step, device, warmup, repeats)
    memory = benchmark.peak_memory(device)["bytes"] if device.type == "cuda" else None
    del module, step
    timed_tokens = batch * timed_seq
    timed_flops = components.train_flops_per_token(kind, timed_config, timed_seq, ep)
    full_flops = components.train_flops_per_token(kind, config, seq_len, ep)
    per_token = timing.median_s / timed_tokens
    return {"kind": kind, "count": components.layer_counts(config)[kind], "timed_config": timed_config.name,
            "timed_tokens": timed_tokens, "timing": timing.to_dict(), "peak_memory_bytes": memory,
            "timed_flops_per_token": timed_flops, "timed_tflops": timed_flops / per_token / 1e12,
            "full_flops_per_token": full_flops, "full_seconds_per_token": per_token * full_flops / timed_flops}


def check_plausible(measured: list[dict], peak_tflops: float, device: str, slack: float = 1.1) -> None:
    """Refuse a layer timed faster than the dense matmul peak measured in the same run.

    No layer does its counted FLOPs faster than one large torch.mm: such a figure means the layer
    skipped work (the first H100 run timed a MoE layer at 1,514 TFLOP/s against a 789 peak, when
    grouped_mm read strided offsets) or the FLOP count is wrong. `slack` leaves room for timing noise.
    """
    for m in measured:
        if m["timed_tflops"] > slack * peak_tflops:
            raise UserError(f"the {m['kind']} layer ran at {m['timed_tflops']:.4g} TFLOP/s, faster than the "
                            f"{peak_tflops:.4g} TFLOP/s matmul peak measured on {device} in this run: the "
                            f"layer skipped work or its FLOPs are miscounted; nothing was projected or saved")


def _comparison(name, parts, shape, cluster, peaks, flops_per_token) -> list[dict]:
    rows = []
    for claim in claims_for(name):
        # Re-project on the claim's own GPU count: FSDP traffic per token depends on it.
        c = cluster if claim.gpus is None or claim.gpus % cluster.ep_degree else \
            Cluster(**{**asdict(cluster), "gpus": claim.gpus})
        p = project(parts, shape, c, peaks)
        implied = implied_tflops_per_gpu(claim, flops_per_token)
        peak = device_info.datasheet_tflops(claim.hardware, "bf16") if claim.hardware else None
        rows.append({**asdict(claim), "gpus_projected": c.gpus, "implied_tflops_per_gpu": implied,
                     "implied_mfu_bf16": None if implied is None or peak is None else (implied[0] / peak, implied[1] / peak),
                     **compare(claim, projected_value(claim, p, flops_per_token))})
    return rows


def assumptions(c: Cluster, scale: int, timed_seq: int, seq_len: int, on_gpu: bool) -> list[str]:
    lines = [
        f"{c.gpus} GPUs, {c.gpus_per_node} per node; expert parallelism over {c.ep_degree} GPUs; FSDP (ZeRO-3) "
        f"over all of them; no pipeline or tensor parallelism",
        f"tokens per GPU per optimizer step: {c.tokens_per_gpu_step:,.0f} (global batch {c.global_batch_tokens:,.0f})",
        f"all-to-all: 4 x top_k x hidden x {c.a2a_bytes:g} bytes per token and MoE layer (dispatch + combine, "
        f"forward + backward), routing uniform over ranks",
        f"FSDP: weights all-gathered twice in {c.param_bytes:g}-byte, gradients reduce-scattered in "
        f"{c.grad_bytes:g}-byte, ring (n-1)/n",
        f"bandwidth per GPU: NVLink {c.nvlink_GBps:g} GB/s per direction inside a node, InfiniBand "
        f"{c.ib_GBps:g} GB/s between nodes",
        f"overlap of communication with compute: {c.overlap:.0%}",
        "not modelled: pipeline bubbles, the optimizer step, recomputation, expert load imbalance, "
        "node-limited routing, failures and restarts",
        "layer times are this device's; published figures ran on other GPUs, often in FP8",
    ]
    if scale != 1 or timed_seq != seq_len:
        lines.insert(0, f"layers timed at width / {scale} on {timed_seq}-token sequences and extrapolated to full "
                        f"size by the FLOP ratio (assumes equal FLOP/s at both sizes)")
    if not on_gpu:
        lines.insert(0, "CPU RUN: a check of the machinery, not a projection of any real training")
    return lines


def _print(result: dict, name: str, path: str) -> None:
    env, res, s = result["environment"], result["results"], result["settings"]
    label = "CPU" if env["label"] == "cpu" else "GPU"
    print(f"moe calibrate: {name} ({path}) on {env['device']} [{label}], {s['dtype']}")
    print("\nMeasured: one of each layer, forward + backward, median after warm-up")
    print(f"  {'layer':<10}{'count':>6}{'timed ms':>11}{'timed TFLOP/s':>15}{'full us/token':>15}")
    for m in res["components"]:
        print(f"  {m['kind']:<10}{m['count']:>6}{m['timing']['median_s'] * 1e3:>11.3f}{m['timed_tflops']:>15.3g}"
              f"{m['full_seconds_per_token'] * 1e6:>15.4g}")
    pk = res["matmul_peak"]
    print(f"  matmul peak: {pk['tflops']:.3g} TFLOP/s ({pk['dtype']} torch.mm, n={pk['n']}); datasheet: "
          f"{benchmark.format_tflops(res['datasheet_tflops'])}")
    print("\nAssumptions")
    for line in result["assumptions"]:
        print(f"  - {line}")
    p, run = res["projection"], res["training_run"]
    print("\nProjection (arithmetic on the measured layers, not a measurement)")
    rows = [
        ("compute", f"{p['compute_s'] * 1e6:.4g} us/token"),
        ("all-to-all (EP)", f"{p['all_to_all_s'] * 1e6:.4g} us/token"),
        ("FSDP", f"{p['fsdp_s'] * 1e6:.4g} us/token"),
        ("exposed communication", f"{p['exposed_comm_s'] * 1e6:.4g} us/token"),
        ("step time", f"{p['step_s']:.4g} s ({result['cluster']['global_batch_tokens'] / result['cluster']['gpus']:,.0f}"
                      " tokens per GPU)"),
        ("tokens/s per GPU", f"{p['tokens_per_s_per_gpu']:.4g}"),
        ("achieved TFLOP/s per GPU", f"{p['achieved_tflops']:.4g} (model FLOPs {res['model_flops_per_token']:.4g}/token)"),
        ("MFU vs measured peak", benchmark.format_share(p["mfu"]["measured"])),
        ("MFU vs datasheet peak", benchmark.format_share(p["mfu"]["datasheet"])),
        ("GPU-hours per 1T tokens", f"{p['gpu_hours_per_trillion']:.4g}"),
        (f"{run['tokens']:.3g} tokens on {run['gpus']} GPUs",
         f"{run['gpu_hours']:.4g} GPU-hours, {run['days']:.4g} days, ${run['cost']:,.0f} at ${run['price_per_gpu_hour']:g}/GPU-h"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    _print_comparison(res["comparison"], label)


def _print_comparison(rows: list[dict], label: str) -> None:
    if not rows:
        print("\nNo published or claimed figures for this config.")
        return
    print(f"\nPublished and claimed figures (projected on this {label}, with each claim's GPU count)")
    if label == "CPU":
        print("  On a CPU every GPU figure is off by orders of magnitude: these rows check the arithmetic. "
              "'implies' does not depend on this device.")
    units = {"gpu_hours": "GPU-h", "tflops_per_gpu": "TFLOP/s/GPU", "tokens_per_s_per_gpu": "tok/s/GPU"}
    for i, r in enumerate(rows, 1):
        claimed = f"{r['low']:.4g}" + (f"-{r['high']:.4g}" if r["high"] is not None else "")
        implied = r["implied_tflops_per_gpu"]
        implied_text = "n/a" if implied is None else f"{_span(implied, '.3g')} TFLOP/s/GPU"
        if r["implied_mfu_bf16"] is not None:
            implied_text += f" = {_span(r['implied_mfu_bf16'], '.0%')} of {r['hardware']} BF16 peak"
        flags = []
        if r["off_by_more_than_2x"]:
            flags.append("OFF BY MORE THAN 2x")
        if r["implied_mfu_bf16"] is not None and r["implied_mfu_bf16"][0] > 1.0:
            flags.append("ABOVE THE BF16 PEAK")
        ratio = "n/a" if r["ratio"] is None else _span(r["ratio"], ".3g")
        projected = "n/a" if r["projected"] is None else f"{r['projected']:.4g}"
        print(f"  [{i}] {r['label']} ({r['kind']})")
        print(f"      claimed {claimed} {units[r['metric']]}; projected {projected}; claimed/projected {ratio}"
              f"{'; ' + ', '.join(flags) if flags else ''}")
        print(f"      implies {implied_text}")
        print(f"      source: {r['source']}" + (f"; {r['note']}" if r["note"] else ""))


def _span(pair, fmt: str) -> str:
    lo, hi = pair
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}-{format(hi, fmt)}"

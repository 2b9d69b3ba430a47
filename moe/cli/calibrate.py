"""`moe calibrate --config NAME_OR_PATH` (or `moe calibrate PATH`): the command line of
moe.perf.calibrate (what is measured and what is projected is said there)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch
from tqdm import tqdm

from ..config import load_config
from ..device import pick_device
from ..perf import components, device_peaks, flops, results, timing
from ..perf.bench import with_backend
from ..perf.calibrate import (
    CPU_MIN_WIDTH,
    CPU_SCALE,
    CPU_TIMED_SEQ,
    assumptions,
    check_plausible,
    comparison,
    time_layer,
)
from ..perf.projection import Cluster, Component, ModelShape, project, training_run
from .configs import add_config_argument, config_spec
from .errors import UserError
from .flags import fraction, nonnegative_int, positive_float, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)  # a full-size model: deepseek-v3, ling-1t, configs/full/*.yaml
    m = parser.add_argument_group("measurement")
    m.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    m.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    m.add_argument(
        "--seq-len", type=positive_int, default=None, help="training context (default: the config's max_seq_len)"
    )
    m.add_argument("--micro-batch", type=positive_int, default=1, help="sequences per GPU per forward (default 1)")
    m.add_argument(
        "--scale",
        type=positive_int,
        default=None,
        help=f"time layers at width / SCALE and extrapolate by FLOPs (default: 1 on GPU; on CPU "
        f"{CPU_SCALE}, or less to keep the hidden size >= {CPU_MIN_WIDTH})",
    )
    m.add_argument(
        "--timed-seq-len",
        type=positive_int,
        default=None,
        help=f"sequence length actually timed (default: --seq-len on GPU, {CPU_TIMED_SEQ} on CPU)",
    )
    m.add_argument("--backend", default=None, help="override the config's expert backend (eager, torch, triton)")
    m.add_argument(
        "--warmup", type=nonnegative_int, default=None, help="untimed calls first (default 2 on GPU, 5 on CPU)"
    )
    m.add_argument("--repeats", type=positive_int, default=5)
    c = parser.add_argument_group("cluster (all assumptions; printed with the projection)")
    c.add_argument("--gpus", type=positive_int, default=2048)
    c.add_argument("--gpus-per-node", type=positive_int, default=8)
    c.add_argument("--ep", type=positive_int, default=None, help="expert-parallel degree (default: min(8, experts))")
    c.add_argument("--nvlink-gbps", type=positive_float, default=450.0, help="GB/s per GPU and direction inside a node")
    c.add_argument("--ib-gbps", type=positive_float, default=50.0, help="GB/s per GPU between nodes (400 Gb/s = 50)")
    c.add_argument("--overlap", type=fraction, default=0.0, help="share of communication hidden under compute, 0-1")
    c.add_argument(
        "--a2a-bytes", type=positive_float, default=2.0, help="bytes per element in the all-to-all (bf16 2, fp8 1)"
    )
    c.add_argument("--global-batch-tokens", type=positive_float, default=15360 * 4096)
    r = parser.add_argument_group("training run")
    r.add_argument("--tokens", type=positive_float, default=1e12, help="training tokens (default 1e12)")
    r.add_argument("--price", type=positive_float, default=2.0, help="$ per GPU-hour (default 2.0, DeepSeek-V3's rate)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--save", action="store_true", help="write <results-dir>/<device>/calibrate-<name>.json")
    parser.add_argument("--results-dir", default=None, help=f"default {results.DEFAULT_RESULTS_DIR}")


def main(args: argparse.Namespace) -> int:
    spec = config_spec(args)
    config = load_config(spec)
    if args.backend:
        config = with_backend(config, args.backend)
    device = pick_device(args.device)
    dtype = timing.pick_dtype(args.dtype, device)
    if args.warmup is None:
        args.warmup = timing.default_warmup(device)
    on_gpu = device.type == "cuda"
    seq_len = args.seq_len or config.max_seq_len
    scale = args.scale or (1 if on_gpu else max(1, min(CPU_SCALE, config.hidden_size // CPU_MIN_WIDTH)))
    timed_seq = args.timed_seq_len or (seq_len if on_gpu else min(seq_len, CPU_TIMED_SEQ))
    # The flags' types refused zero and negatives; what is left to check depends on the config.
    if scale > config.hidden_size:
        raise UserError(f"--scale {scale} is more than the hidden size {config.hidden_size}: no width would be left")
    if timed_seq > seq_len:
        raise UserError(f"--timed-seq-len {timed_seq} is longer than the training context --seq-len {seq_len}")
    counts = components.layer_counts(config)
    ep = args.ep if args.ep is not None else (min(8, config.moe.num_experts) if config.moe else 1)
    if args.ep is not None and config.moe is not None and config.moe.num_experts % ep:
        raise UserError(f"--ep {ep} must divide the {config.moe.num_experts} experts of {config.name}")
    cluster = Cluster(
        args.gpus,
        args.gpus_per_node,
        ep,
        args.nvlink_gbps,
        args.ib_gbps,
        args.overlap,
        args.a2a_bytes,
        global_batch_tokens=args.global_batch_tokens,
    )

    timed_config = components.scale_config(config, scale)
    env = results.environment(device)
    peak = timing.matmul_peak(device, dtype, warmup=args.warmup, repeats=args.repeats)
    datasheet = device_peaks.datasheet_tflops(env["device"], dtype) if on_gpu else None
    measured = []
    kinds = [k for k in components.KINDS if counts[k]]
    for kind in tqdm(kinds, desc="measured layers", disable=None):
        try:
            measured.append(
                time_layer(
                    kind,
                    config,
                    timed_config,
                    ep,
                    args.micro_batch,
                    seq_len,
                    timed_seq,
                    device,
                    dtype,
                    args.warmup,
                    args.repeats,
                )
            )
        except torch.OutOfMemoryError:
            raise UserError(
                f"out of memory measured the {kind} layer of {config.name} on {env['device']}: raise "
                f"--ep (experts per GPU), lower --micro-batch, or time at --scale 2"
            ) from None

    if on_gpu:  # a CPU shared with other jobs times its own matmul peak too noisily for this check
        check_plausible(measured, peak["tflops"], env["device"])
    model = flops.count(config, seq_len)
    shape = ModelShape(
        config.hidden_size,
        config.moe.top_k if config.moe else 0,
        counts["moe"],
        model.params_total - model.params_routed,
        model.params_routed,
        model.train_flops_per_token,
    )
    parts = [Component(m["kind"], m["count"], m["full_seconds_per_token"], m["full_flops_per_token"]) for m in measured]
    peaks = {"measured": peak["tflops"], "datasheet": datasheet}
    projection = project(parts, shape, cluster, peaks)
    run = training_run(projection, args.tokens, cluster.gpus, args.price)
    compared = comparison(config.name, parts, shape, cluster, peaks, model.train_flops_per_token)

    settings = {
        "seq_len": seq_len,
        "micro_batch": args.micro_batch,
        "scale": scale,
        "timed_seq_len": timed_seq,
        "dtype": dtype,
        "backend": config.moe and config.moe.backend,
        "ep_degree": ep,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    result = results.record(
        "calibrate",
        env,
        {"name": config.name, "path": str(spec)},
        settings,
        {
            "kind": "projection",
            "scaled": scale != 1 or timed_seq != seq_len,
            "matmul_peak": peak,
            "datasheet_tflops": datasheet,
            "components": measured,
            "model_flops_per_token": model.train_flops_per_token,
            "projection": projection.to_dict(),
            "training_run": asdict(run),
            "comparison": compared,
        },
        cluster=asdict(cluster),
        assumptions=assumptions(cluster, scale, timed_seq, seq_len, on_gpu),
    )
    results.publish(
        result,
        f"calibrate-{config.name}",
        lambda r: _print(r, config.name, spec),
        args.json,
        args.save,
        args.results_dir,
    )
    return 0


def _print(result: dict, name: str, path: str) -> None:
    env, res, s = result["environment"], result["results"], result["settings"]
    label = "CPU" if env["label"] == "cpu" else "GPU"
    print(f"moe calibrate: {name} ({path}) on {env['device']} [{label}], {s['dtype']}")
    print("\nMeasured: one of each layer, forward + backward, median after warm-up")
    print(f"  {'layer':<10}{'count':>6}{'timed ms':>11}{'timed TFLOP/s':>15}{'full us/token':>15}")
    for m in res["components"]:
        print(
            f"  {m['kind']:<10}{m['count']:>6}{m['measured']['median_s'] * 1e3:>11.3f}{m['timed_tflops']:>15.3g}"
            f"{m['full_seconds_per_token'] * 1e6:>15.4g}"
        )
    pk = res["matmul_peak"]
    print(
        f"  matmul peak: {pk['tflops']:.3g} TFLOP/s ({pk['dtype']} torch.mm, n={pk['n']}); datasheet: "
        f"{results.format_tflops(res['datasheet_tflops'])}"
    )
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
        (
            "step time",
            f"{p['step_s']:.4g} s ({result['cluster']['global_batch_tokens'] / result['cluster']['gpus']:,.0f}"
            " tokens per GPU)",
        ),
        ("tokens/s per GPU", f"{p['tokens_per_s_per_gpu']:.4g}"),
        (
            "achieved TFLOP/s per GPU",
            f"{p['achieved_tflops']:.4g} (model FLOPs {res['model_flops_per_token']:.4g}/token)",
        ),
        ("MFU vs measured peak", results.format_share(p["mfu"]["measured"])),
        ("MFU vs datasheet peak", results.format_share(p["mfu"]["datasheet"])),
        ("GPU-hours per 1T tokens", f"{p['gpu_hours_per_trillion']:.4g}"),
        (
            f"{run['tokens']:.3g} tokens on {run['gpus']} GPUs",
            f"{run['gpu_hours']:.4g} GPU-hours, {run['days']:.4g} days, "
            f"${run['cost']:,.0f} at ${run['price_per_gpu_hour']:g}/GPU-h",
        ),
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
        print(
            "  On a CPU every GPU figure is off by orders of magnitude: these rows check the arithmetic. "
            "'implies' does not depend on this device."
        )
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
        print(
            f"      claimed {claimed} {units[r['metric']]}; projected {projected}; claimed/projected {ratio}"
            f"{'; ' + ', '.join(flags) if flags else ''}"
        )
        print(f"      implies {implied_text}")
        print(f"      source: {r['source']}" + (f"; {r['note']}" if r["note"] else ""))


def _span(pair, fmt: str) -> str:
    lo, hi = pair
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}-{format(hi, fmt)}"

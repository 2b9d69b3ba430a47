"""`moe bench train|infer|layers --config NAME_OR_PATH` (or `moe bench train PATH`): the command
line of moe.perf.bench (what the figures mean is said there)."""

from __future__ import annotations

import argparse

import torch

from ..config import load_config
from ..device import pick_device
from ..errors import excerpt
from ..perf import device_peaks, results, timing
from ..perf.bench import check_backend, run_infer, run_layers, run_train, with_backend
from .configs import add_config_argument, config_spec
from .errors import UserError
from .flags import nonnegative_int, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    specs = [
        ("train", "time forward + backward + AdamW steps of a whole model", _train_arguments, run_train),
        ("infer", "time prefill and KV-cached decoding of a whole model", _infer_arguments, run_infer),
        ("layers", "time each layer of a model, the MoE layer once per expert backend", _layers_arguments, run_layers),
    ]
    for name, help_text, add, run in specs:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_config_argument(p)
        add(p)
        p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
        p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
        p.add_argument(
            "--warmup", type=nonnegative_int, default=None, help="untimed calls first (default 2 on GPU, 5 on CPU)"
        )
        p.add_argument(
            "--repeats", type=positive_int, default=5, help="timed calls; the median is reported (default 5)"
        )
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        p.add_argument("--save", action="store_true", help="write <results-dir>/<device>/<bench>-<config>.json")
        p.add_argument("--results-dir", default=None, help=f"default {results.DEFAULT_RESULTS_DIR}")
        p.set_defaults(_bench=run, _bench_name=name)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default: max_seq_len)")
    p.add_argument("--backend", default=None, help="override the config's expert backend (eager, torch, triton)")


def _infer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive_int, default=4, help="prompts decoded together (default 4)")
    p.add_argument(
        "--prompt-len", type=positive_int, default=None, help="prompt tokens (default: min(128, max_seq_len))"
    )
    p.add_argument("--new-tokens", type=positive_int, default=16, help="tokens decoded after the prompt (default 16)")
    p.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=None,
        help="comma-separated batch sizes, e.g. 1,8,64: each timed and set against its memory-bandwidth floor "
        "(default: --batch-size)",
    )
    p.add_argument("--backend", default=None, help="override the config's expert backend (eager, torch, triton)")


def _batch_sizes(text: str) -> list[int]:
    """The --batch-sizes text, e.g. "1,8,64" -> [1, 8, 64]; each a positive integer."""
    try:
        return [positive_int(part.strip()) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be positive integers separated by commas, got {excerpt(text)}"
        ) from None


def _layers_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive_int, default=4, help="sequences per call (default 4)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default: max_seq_len)")
    p.add_argument(
        "--backends", default=None, help="expert backends, comma-separated (default: eager,torch and triton on GPUs)"
    )


def main(args: argparse.Namespace) -> int:
    spec = config_spec(args)
    config = load_config(spec)
    if getattr(args, "backend", None):
        config = with_backend(config, args.backend)
    if getattr(args, "backends", None):
        for backend in args.backends.split(","):
            check_backend(backend, "--backends")  # here, before any timing, as well as in run_layers
    device = pick_device(args.device)
    dtype = timing.pick_dtype(args.dtype, device)
    if args.warmup is None:
        args.warmup = timing.default_warmup(device)
    env = results.environment(device)
    peak = timing.matmul_peak(device, dtype, warmup=args.warmup, repeats=args.repeats)
    datasheet = device_peaks.datasheet_tflops(env["device"], dtype) if device.type == "cuda" else None
    try:
        settings, figures = args._bench(args, config, device, dtype)
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of memory running {config.name} on {env['device']}: use a smaller batch or a "
            f"-mini config (`moe calibrate` projects full-size models layer by layer)"
        ) from None
    figures = {**figures, "matmul_peak": peak, "datasheet_tflops": datasheet}
    for key, tflops in list(figures.items()):
        if key.endswith("achieved_tflops"):
            prefix = key[: -len("achieved_tflops")]
            figures[prefix + "mfu"] = {
                "measured": tflops / peak["tflops"],
                "datasheet": tflops / datasheet if datasheet else None,
            }
    result = results.record(
        args._bench_name,
        env,
        {"name": config.name, "path": str(spec)},
        {"dtype": dtype, "warmup": args.warmup, "repeats": args.repeats, **settings},
        figures,
    )
    results.publish(result, f"{args._bench_name}-{config.name}", _print, args.json, args.save, args.results_dir)
    return 0


# --------------------------------------------------------------------------- printing


def _print(result: dict) -> None:
    env, res, s, bench = result["environment"], result["results"], result["settings"], result["bench"]
    label = "CPU: not representative of a GPU" if env["label"] == "cpu" else "GPU"
    print(
        f"moe bench {bench}: {result['config']['name']} on {env['device']} [{label}], {s['dtype']}, "
        f"torch {env['torch']}, commit {(env['commit'] or 'unknown')[:10]}{' (dirty)' if env['dirty'] else ''}"
    )
    peak = res["matmul_peak"]
    print(
        f"  measured matmul peak {peak['tflops']:.3g} TFLOP/s ({peak['dtype']}, n={peak['n']}); "
        f"datasheet {results.format_tflops(res['datasheet_tflops'])}"
    )
    if bench == "train":
        _rows(
            [
                (
                    "step",
                    f"{res['step']['median_s'] * 1e3:.4g} ms median ({res['tokens_per_step']} tokens; "
                    f"p20-p80 {res['step']['p20_s'] * 1e3:.4g}-{res['step']['p80_s'] * 1e3:.4g} ms)",
                ),
                ("tokens/s", f"{res['tokens_per_s']:.4g}"),
                ("achieved TFLOP/s", f"{res['achieved_tflops']:.4g} ({res['train_flops_per_token']:.4g} FLOPs/token)"),
                ("MFU", _mfu(res["mfu"])),
                ("peak memory", _memory(res["peak_memory"])),
                ("last loss", f"{res['last_loss']:.4g}"),
            ]
        )
    elif bench == "infer":
        _rows(
            [
                (
                    "prefill",
                    f"{res['prefill_tokens_per_s']:.4g} tokens/s ({s['batch_size']} x {s['prompt_len']} "
                    f"tokens in {res['prefill']['median_s'] * 1e3:.4g} ms)",
                ),
                ("prefill TFLOP/s", f"{res['prefill_achieved_tflops']:.4g}; MFU {_mfu(res['prefill_mfu'])}"),
                (
                    "decode",
                    f"{res['decode_tokens_per_s']:.4g} tokens/s ({s['batch_size']} sequences, "
                    f"{res['decode_ms_per_step']:.4g} ms per step, KV cache)",
                ),
                ("peak memory", _memory(res["peak_memory"])),
                (
                    "bandwidth",
                    f"{res['bandwidth']['bytes_per_s'] / 1e9:.4g} GB/s measured "
                    f"({res['bandwidth']['copy_bytes'] / 2**20:.0f} MiB copy)",
                ),
            ]
        )
        _floor_table(res["batches"], s["prompt_len"])
    else:
        print(f"  {'layer':<10}{'backend':<9}{'fwd ms':>10}{'fwd+bwd ms':>12}{'tokens/s':>12}{'TFLOP/s':>10}")
        for r in res["layers"]:
            fb = r["forward_backward"]
            print(
                f"  {r['layer']:<10}{r['backend'] or '-':<9}{r['forward']['median_s'] * 1e3:>10.4g}"
                f"{fb['median_s'] * 1e3:>12.4g}{fb['tokens_per_s']:>12.4g}{fb['tflops']:>10.3g}"
            )
        print("  (tokens/s and TFLOP/s of forward + backward)")


def _floor_table(batches: list[dict], prompt_len: int) -> None:
    """Each step against its memory-bandwidth floor (bytes it must read / measured bandwidth)."""
    head = f"{'step':<16}{'batch':>6}{'tokens/s':>11}{'ms/step':>10}{'MB/step':>10}{'GB/s':>9}{'floor ms':>10}"
    print(f"  {head}{'ratio':>9}")
    for row in batches:
        for kind in ("prefill", "decode"):
            r = row[kind]
            label = f"prefill x{prompt_len}" if kind == "prefill" else "decode"
            print(
                f"  {label:<16}{row['batch_size']:>6}{r['tokens_per_s']:>11.4g}{r['step_s'] * 1e3:>10.4g}"
                f"{r['bytes_per_step'] / 1e6:>10.4g}{r['achieved_bytes_per_s'] / 1e9:>9.3g}"
                f"{r['floor_s'] * 1e3:>10.4g}{r['ratio']:>9.4g}"
            )
    print("  (ratio = step time / floor; floor = bytes the step must read / measured bandwidth)")


def _rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _mfu(mfu: dict) -> str:
    return (
        f"{results.format_share(mfu['measured'])} of measured peak, "
        f"{results.format_share(mfu['datasheet'])} of datasheet"
    )


def _memory(memory: dict) -> str:
    if memory["bytes"] is None:
        return "unavailable"
    return f"{memory['bytes'] / 2**20:.1f} MiB ({memory['kind']})"

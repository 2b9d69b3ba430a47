"""`moe bench train|infer|layers --config C`: what this device really does on a model.

    moe bench train  --config configs/deepseek-v3-mini.yaml   # forward + backward + AdamW step
    moe bench infer  --config configs/tiny.yaml                # prefill and KV-cached decode
    moe bench layers --config configs/qwen3-moe-mini.yaml      # each layer, MoE per expert backend

Figures: tokens/s = tokens per call / median call time (warm-up excluded); achieved TFLOP/s =
tokens/s x FLOPs per token (moe/flops.py: 6 x active matmul params + causal attention for
training, a third of it for a forward); MFU against the dense matmul peak this run measures
(torch.mm in the same dtype) and against the datasheet peak (moe/device_info.py; none for
CPUs). Inputs are random tokens, so routing is close to uniform: real data's expert skew is
not in these numbers. `--save` writes bench/results/<device>/<bench>-<config>.json.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from . import benchmark, components, device_info, flops
from .cli import UserError
from .config import ModelConfig, load_config
from .device import pick_device
from .layer import update_expert_biases
from .model import Transformer

# Bytes per parameter to train with fp32 weights, fp32 gradients and two fp32 AdamW moments.
TRAIN_BYTES_PER_PARAM = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    specs = [("train", "time forward + backward + AdamW steps of a whole model", _train_arguments, run_train),
             ("infer", "time prefill and KV-cached decoding of a whole model", _infer_arguments, run_infer),
             ("layers", "time each layer of a model, the MoE layer once per expert backend", _layers_arguments,
              run_layers)]
    for name, help_text, add, run in specs:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", required=True, help="model config (YAML or JSON)")
        add(p)
        p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
        p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
        p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2 on GPU, 5 on CPU)")
        p.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported (default 5)")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        p.add_argument("--save", action="store_true", help="write <results-dir>/<device>/<bench>-<config>.json")
        p.add_argument("--results-dir", default=None, help=f"default {benchmark.DEFAULT_RESULTS_DIR}")
        p.set_defaults(_bench=run, _bench_name=name)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: max_seq_len)")
    p.add_argument("--backend", default=None, help="override the config's expert backend (eager, torch, triton)")


def _infer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=4, help="prompts decoded together (default 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: min(128, max_seq_len))")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens decoded after the prompt (default 16)")
    p.add_argument("--backend", default=None, help="override the config's expert backend (eager, torch, triton)")


def _layers_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=4, help="sequences per call (default 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: max_seq_len)")
    p.add_argument("--backends", default=None, help="expert backends, comma-separated (default: eager,torch "
                                                    "and triton on GPUs)")


def main(args: argparse.Namespace) -> int:
    for key in ("batch_size", "seq_len", "prompt_len", "new_tokens", "repeats"):
        value = getattr(args, key, None)
        if value is not None and value <= 0:
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {value}")
    config = load_config(args.config)
    if getattr(args, "backend", None):
        config = _with_backend(config, args.backend)
    device = pick_device(args.device)
    dtype = benchmark.pick_dtype(args.dtype, device)
    if args.warmup is None:
        args.warmup = benchmark.default_warmup(device)
    env = benchmark.environment(device)
    peak = benchmark.matmul_peak(device, dtype, warmup=args.warmup, repeats=args.repeats)
    datasheet = device_info.datasheet_tflops(env["device"], dtype) if device.type == "cuda" else None
    try:
        settings, results = args._bench(args, config, device, dtype)
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory running {config.name} on {env['device']}: use a smaller batch or a "
                        f"-mini config (`moe calibrate` projects full-size models layer by layer)") from None
    results = {**results, "matmul_peak": peak, "datasheet_tflops": datasheet}
    for key, tflops in list(results.items()):
        if key.endswith("achieved_tflops"):
            prefix = key[: -len("achieved_tflops")]
            results[prefix + "mfu"] = {"measured": tflops / peak["tflops"],
                                       "datasheet": tflops / datasheet if datasheet else None}
    result = benchmark.record(args._bench_name, env, {"name": config.name, "path": str(args.config)},
                              {"dtype": dtype, "warmup": args.warmup, "repeats": args.repeats, **settings}, results)
    benchmark.publish(result, f"{args._bench_name}-{config.name}", _print, args.json, args.save, args.results_dir)
    return 0


def _with_backend(config: ModelConfig, backend: str) -> ModelConfig:
    if config.moe is None:
        raise ValueError(f"--backend {backend}: config {config.name!r} has no MoE layers")
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, backend=backend))


def _check_fits(needed_bytes: float, device: torch.device, what: str) -> None:
    capacity = benchmark.memory_capacity(device)
    if capacity is not None and needed_bytes > capacity:
        raise UserError(f"{what} needs about {needed_bytes / 2**30:.1f} GiB but {device.type} has "
                        f"{capacity / 2**30:.1f} GiB: use a -mini config, or `moe calibrate` for full-size models")


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=benchmark.DTYPES[dtype], enabled=dtype != "fp32")


# --------------------------------------------------------------------------- train


def run_train(args, config: ModelConfig, device: torch.device, dtype: str) -> tuple[dict, dict]:
    seq = args.seq_len or config.max_seq_len
    counts = flops.count(config, seq)
    _check_fits(counts.params_total * TRAIN_BYTES_PER_PARAM, device, f"training {config.name}")
    torch.manual_seed(0)
    model = Transformer(config).to(device)  # fp32 master weights; matmuls in `dtype` under autocast
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(config.vocab_size, (args.batch_size, seq + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step() -> torch.Tensor:
        with _autocast(device, dtype):
            logits = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) + model.aux_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_biases(model)
        return loss.detach()

    benchmark.reset_peak_memory(device)
    timing = benchmark.measure(step, device, args.warmup, args.repeats)
    memory = benchmark.peak_memory(device)
    last_loss = float(step())  # sync, once, after timing: the steps must have produced a number
    tokens = args.batch_size * seq
    tokens_per_s = tokens / timing.median_s
    settings = {"batch_size": args.batch_size, "seq_len": seq, "backend": config.moe and config.moe.backend,
                "optimizer": "AdamW (fused on CUDA)", "precision": f"fp32 weights, {dtype} autocast"}
    return settings, {"tokens_per_step": tokens, "step": timing.to_dict(), "tokens_per_s": tokens_per_s,
                      "train_flops_per_token": counts.train_flops_per_token,
                      "achieved_tflops": tokens_per_s * counts.train_flops_per_token / 1e12,
                      "params_total": counts.params_total, "params_active": counts.params_active,
                      "peak_memory": memory, "last_loss": last_loss}


# --------------------------------------------------------------------------- infer


def run_infer(args, config: ModelConfig, device: torch.device, dtype: str) -> tuple[dict, dict]:
    prompt_len = args.prompt_len or min(128, config.max_seq_len)
    counts = flops.count(config, prompt_len)
    _check_fits(counts.params_total * benchmark.DTYPES[dtype].itemsize, device, f"inference of {config.name}")
    torch.manual_seed(0)
    model = Transformer(config).to(device=device, dtype=benchmark.DTYPES[dtype]).eval()
    prompt = torch.randint(config.vocab_size, (args.batch_size, prompt_len), device=device)
    benchmark.reset_peak_memory(device)
    with torch.no_grad():
        prefill = benchmark.measure(lambda: model(prompt, model.new_cache()), device, args.warmup, args.repeats)
        base = model.new_cache()
        first = model(prompt, base)[:, -1:].argmax(-1)  # [B, 1]

        def decode() -> torch.Tensor:
            # The cache's update concatenates into new tensors, so a shallow copy of the prefilled
            # cache restarts every repeat from the same prompt.
            cache = model.new_cache()
            cache.layers, cache.seq_len = list(base.layers), base.seq_len
            token = first
            for _ in range(args.new_tokens):
                token = model(token, cache)[:, -1:].argmax(-1)  # greedy; stays on the device
            return token

        decoding = benchmark.measure(decode, device, args.warmup, args.repeats)
    memory = benchmark.peak_memory(device)
    prefill_tps = args.batch_size * prompt_len / prefill.median_s
    settings = {"batch_size": args.batch_size, "prompt_len": prompt_len, "new_tokens": args.new_tokens,
                "backend": config.moe and config.moe.backend, "precision": f"{dtype} weights", "decoding": "greedy"}
    return settings, {"prefill": prefill.to_dict(), "prefill_tokens_per_s": prefill_tps,
                      "prefill_forward_flops_per_token": counts.forward_flops_per_token,
                      "prefill_achieved_tflops": prefill_tps * counts.forward_flops_per_token / 1e12,
                      "decode": decoding.to_dict(),
                      "decode_tokens_per_s": args.batch_size * args.new_tokens / decoding.median_s,
                      "decode_ms_per_step": decoding.median_s / args.new_tokens * 1e3, "peak_memory": memory}


# --------------------------------------------------------------------------- layers


def run_layers(args, config: ModelConfig, device: torch.device, dtype: str) -> tuple[dict, dict]:
    seq = args.seq_len or config.max_seq_len
    backends = (args.backends.split(",") if args.backends else
                ["eager", "torch"] + (["triton"] if device.type == "cuda" else []))
    for b in backends:
        if b not in ("eager", "torch", "triton"):
            raise ValueError(f"--backends: unknown expert backend {b!r} (expected eager, torch, triton)")
    counts = components.layer_counts(config)
    jobs = [(kind, None) for kind in ("attention", "dense", "head") if counts[kind]]
    jobs += [("moe", b) for b in backends] if counts["moe"] else []
    rows = []
    for kind, backend in jobs:
        cfg = _with_backend(config, backend) if backend else config
        largest = sum(p.numel() for p in components.build(kind, cfg, device="meta").parameters())
        _check_fits(largest * 4 * 3, device, f"the {kind} layer of {config.name}")  # weights, grads, activations
        torch.manual_seed(0)
        module = components.build(kind, cfg, device=device).to(benchmark.DTYPES[dtype])
        train_flops = components.train_flops_per_token(kind, cfg, seq)
        row = {"layer": kind, "backend": backend, "train_flops_per_token": train_flops}
        for mode, backward in (("forward", False), ("forward_backward", True)):
            step = components.make_step(kind, module, cfg, args.batch_size, seq, backward=backward)
            with torch.no_grad() if not backward else torch.enable_grad():
                timing = benchmark.measure(step, device, args.warmup, args.repeats)
            tps = args.batch_size * seq / timing.median_s
            row[mode] = {**timing.to_dict(), "tokens_per_s": tps,
                         "tflops": tps * train_flops / (1 if backward else 3) / 1e12}
        rows.append(row)
        del module
    return {"batch_size": args.batch_size, "seq_len": seq, "backends": backends}, {"layers": rows}


# --------------------------------------------------------------------------- printing


def _print(result: dict) -> None:
    env, res, s, bench = result["environment"], result["results"], result["settings"], result["bench"]
    label = "CPU: not representative of a GPU" if env["label"] == "cpu" else "GPU"
    print(f"moe bench {bench}: {result['config']['name']} on {env['device']} [{label}], {s['dtype']}, "
          f"torch {env['torch']}, commit {(env['commit'] or 'unknown')[:10]}{' (dirty)' if env['dirty'] else ''}")
    peak = res["matmul_peak"]
    print(f"  measured matmul peak {peak['tflops']:.3g} TFLOP/s ({peak['dtype']}, n={peak['n']}); "
          f"datasheet {benchmark.format_tflops(res['datasheet_tflops'])}")
    if bench == "train":
        _rows([("step", f"{res['step']['median_s'] * 1e3:.4g} ms median ({res['tokens_per_step']} tokens; "
                        f"p20-p80 {res['step']['p20_s'] * 1e3:.4g}-{res['step']['p80_s'] * 1e3:.4g} ms)"),
               ("tokens/s", f"{res['tokens_per_s']:.4g}"),
               ("achieved TFLOP/s", f"{res['achieved_tflops']:.4g} ({res['train_flops_per_token']:.4g} FLOPs/token)"),
               ("MFU", _mfu(res["mfu"])), ("peak memory", _memory(res["peak_memory"])),
               ("last loss", f"{res['last_loss']:.4g}")])
    elif bench == "infer":
        _rows([("prefill", f"{res['prefill_tokens_per_s']:.4g} tokens/s ({s['batch_size']} x {s['prompt_len']} "
                           f"tokens in {res['prefill']['median_s'] * 1e3:.4g} ms)"),
               ("prefill TFLOP/s", f"{res['prefill_achieved_tflops']:.4g}; MFU {_mfu(res['prefill_mfu'])}"),
               ("decode", f"{res['decode_tokens_per_s']:.4g} tokens/s ({s['batch_size']} sequences, "
                          f"{res['decode_ms_per_step']:.4g} ms per step, KV cache)"),
               ("peak memory", _memory(res["peak_memory"]))])
    else:
        print(f"  {'layer':<10}{'backend':<9}{'fwd ms':>10}{'fwd+bwd ms':>12}{'tokens/s':>12}{'TFLOP/s':>10}")
        for r in res["layers"]:
            fb = r["forward_backward"]
            print(f"  {r['layer']:<10}{r['backend'] or '-':<9}{r['forward']['median_s'] * 1e3:>10.4g}"
                  f"{fb['median_s'] * 1e3:>12.4g}{fb['tokens_per_s']:>12.4g}{fb['tflops']:>10.3g}")
        print("  (tokens/s and TFLOP/s of forward + backward)")


def _rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _mfu(mfu: dict) -> str:
    return (f"{benchmark.format_share(mfu['measured'])} of measured peak, "
            f"{benchmark.format_share(mfu['datasheet'])} of datasheet")


def _memory(memory: dict) -> str:
    if memory["bytes"] is None:
        return "unavailable"
    return f"{memory['bytes'] / 2**20:.1f} MiB ({memory['kind']})"

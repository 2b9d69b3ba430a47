"""What expert parallelism costs on CPU processes joined by gloo: the EP layer against the
single-process layer doing the same work per process, and the share of the EP layer's time
spent in its collectives.

Shapes: T = tokens per rank, d = model dim, f = expert FFN dim, E = experts, K = top-k,
W = processes (each holds E / W experts).

Every rank runs, forward + backward, with every rank busy at the same time:
- "local": MoE(E experts) on its own T tokens, no communication: the same router, dispatch
  and expert FLOPs per rank as the EP layer when routing is balanced;
- "ep": the expert-parallel layer on its T tokens (count exchange, all_to_all of the rows,
  the local experts, all_to_all back, and the batch-wide statistics).
overhead = ep / local - 1. A torch.profiler pass over the EP layer sums the time inside its
labelled ranges (moe.ep.count_exchange, moe.ep.all_to_all forward and backward,
moe.scope.gather, the batch scope's one all-gather forward and its all-reduce backward) as a
share of the profiled step.

These are CPU figures: gloo over loopback TCP between processes that share a few cores. They
show the machinery's fixed costs (one host sync per layer, four row exchanges per step);
they say nothing about NCCL over NVLink or InfiniBand. Results (per rank, and from each
time's max over ranks): bench/results/<cpu>/ep_overhead.json.

usage: python bench/ep_overhead.py [--world 2] [--tokens 256 1024 4096] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe import MoE, MoEConfig  # noqa: E402
from moe.distributed import make_context, shard_experts  # noqa: E402
from moe.perf.results import environment, record, save
from moe.perf.timing import measure  # noqa: E402

LABELS = ("moe.ep.count_exchange", "moe.ep.all_to_all", "moe.scope.gather")


def layer_config(experts: int, ffn: int) -> MoEConfig:
    return MoEConfig(num_experts=experts, top_k=2, expert_ffn_size=ffn, aux_loss_coef=0.01)


def step(layer: MoE, x: torch.Tensor) -> None:
    (layer(x).square().mean() + layer.aux_loss).backward()


def bench_rank(
    rank: int, world: int, init: str, tokens: list[int], dims: dict[str, int], reps: int, out_file: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        ctx = make_context(world, torch.device("cpu"))
        cfg = layer_config(dims["experts"], dims["ffn"])
        rows = []
        for T in tokens:
            torch.manual_seed(0)
            local = MoE(cfg, dims["d"])
            ep = MoE(cfg, dims["d"])
            ep.load_state_dict(local.state_dict())
            shard_experts(ep, ctx)
            x = torch.randn(T, dims["d"], generator=torch.Generator().manual_seed(rank))
            dist.barrier()
            t_local = measure(lambda: step(local, x), torch.device("cpu"), warmup=3, repeats=reps)
            dist.barrier()
            t_ep = measure(lambda: step(ep, x), torch.device("cpu"), warmup=3, repeats=reps)
            profiled = profile_ep(ep, x, reps)
            mine = torch.tensor([t_local.median_s, t_ep.median_s, *profiled.values()], dtype=torch.float64)
            everyone = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(everyone, mine)
            # A step waits for the slowest rank: the summary takes each time's max over ranks.
            slowest = figures(torch.stack(everyone).max(dim=0).values.tolist())
            rows.append({"tokens_per_rank": T, **slowest, "per_rank": [figures(v.tolist()) for v in everyone]})
            if rank == 0:
                print(
                    f"T={T:5d}: local {slowest['local_s'] * 1e3:7.2f} ms  ep {slowest['ep_s'] * 1e3:7.2f} ms  "
                    f"overhead {slowest['overhead']:+.0%}  count exchange + all_to_all "
                    f"{slowest['count_exchange_and_all_to_all_share']:.0%} of the EP step, all collectives "
                    f"{slowest['collective_share']:.0%}",
                    flush=True,
                )
        if rank == 0:
            Path(out_file).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def figures(values: list[float]) -> dict[str, float]:
    """One rank's figures from [local_s, ep_s, profiled step_s, seconds in each of LABELS]."""
    local_s, ep_s, step_s, *inside = values
    return {
        "local_s": local_s,
        "ep_s": ep_s,
        "overhead": ep_s / local_s - 1,
        "profiled_step_s": step_s,
        **{f"{label}_s": v for label, v in zip(LABELS, inside)},
        "count_exchange_and_all_to_all_share": sum(inside[:2]) / step_s,
        "collective_share": sum(inside) / step_s,
    }


def profile_ep(layer: MoE, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Profiled step time first, then seconds per step inside each labelled range."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            with record_function("bench.ep_step"):
                step(layer, x)
    events = {e.key: e.cpu_time_total / 1e6 / repeats for e in prof.key_averages()}
    return {"step": events["bench.ep_step"], **{label: events.get(label, 0.0) for label in LABELS}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="gloo processes (default 2)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096], help="tokens per rank")
    parser.add_argument("--d", type=int, default=256, help="model dim (default 256)")
    parser.add_argument("--ffn", type=int, default=512, help="expert FFN dim (default 512)")
    parser.add_argument("--experts", type=int, default=8, help="experts (default 8)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per figure (default 10)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats, nothing saved")
    parser.add_argument("--results-dir", default=None, help="default bench/results")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = [64, 256], 3
    dims = {"d": args.d, "ffn": args.ffn, "experts": args.experts}
    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "rows.json")
        mp.start_processes(
            bench_rank,
            args=(args.world, f"file://{tmp}/store", args.tokens, dims, args.repeats, out_file),
            nprocs=args.world,
            start_method="spawn",
        )
        rows = json.loads(Path(out_file).read_text())
    env = environment(torch.device("cpu"))
    settings = {
        "processes": args.world,
        "threads_per_process": 1,
        "backend": "gloo (TCP loopback)",
        "timer": "time.perf_counter median; collective shares from torch.profiler ranges",
        "repeats": args.repeats,
        "warmup": 3,
        "figures": "per rank, and from the max over ranks of each time",
        "caveat": "CPU processes sharing the machine's cores; nothing here describes NCCL, NVLink or InfiniBand",
    }
    config = {
        **dims,
        "top_k": 2,
        "backend": "torch",
        "routing": "learned router at init (near-balanced)",
        "work": "forward + backward of one MoE layer",
    }
    result = record("ep_overhead", env, config, settings, {"rows": rows})
    if not args.quick:
        print(f"wrote {save(result, 'ep_overhead', args.results_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

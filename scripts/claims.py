"""Measure the seed article's three MoE claims on our own runs and write docs/claims.md.

    python scripts/claims.py                 # every run (about half an hour on 2 CPU cores)
    python scripts/claims.py --quick         # a few steps per run: checks the machinery (CI)
    python scripts/claims.py --report-only   # rewrite the page and plots from claims.json

Seed 002, section 1.1 claims that (1) a balancing loss takes expert utilisation from
30-70% uneven to a steady 12-15% (k/E), (2) a 2-4-2-4 dense/MoE layering trains 30% faster
than all-MoE for 1.2% worse quality, (3) dynamic capacity cuts the token drop rate from 8%
to under 2%. Each claim lives in scripts/claims/<claim>.py: its configs, its measurement,
its verdict rule and its plot. Runs go to runs/claims/<claim>/<variant>/ (metrics.jsonl
as moe/train/metrics.py documents it); the numbers to claims.json, the page to claims.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (see the Makefile): set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]  # the moe package, when run from a checkout without installing

from claims import balance, capacity, layering, report  # noqa: E402  (scripts/claims/)
from claims.common import Setup, prepare_data, progress_bar, rounded  # noqa: E402

CLAIMS = {"balance": balance, "layering": layering, "capacity": capacity}
SCHEMA = "moe.claims/1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps per run on tiny models (checks the machinery)")
    p.add_argument("--report-only", action="store_true", help="rewrite the page and the plots from claims.json")
    p.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="run folders (default runs/claims, or runs/claims-quick with --quick)",
    )
    p.add_argument(
        "--docs-dir",
        type=Path,
        default=None,
        help="where claims.md and claims/ go (default docs, or the runs folder with --quick)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per trained layer plan for claim 2 (default 3)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    args.runs_dir = args.runs_dir or ROOT / "runs" / ("claims-quick" if args.quick else "claims")
    args.docs_dir = args.docs_dir or (args.runs_dir if args.quick else ROOT / "docs")
    return args


def measure(args: argparse.Namespace, command: str) -> dict:
    from moe.device import pick_device
    from moe.perf.results import environment

    start = time.perf_counter()
    setup = Setup(runs_dir=args.runs_dir, quick=args.quick, device=args.device, seeds=args.seeds)
    env = environment(pick_device(args.device))  # before the runs: the load average of the machine as found
    data = prepare_data(setup)
    runs = (
        len(balance.METHODS)
        + len(layering.TRAINED) * (1 if args.quick else args.seeds)
        + len(capacity.SETTINGS) * len(capacity.MODES)
    )
    with progress_bar(runs) as setup.bar:
        claims = {key: module.measure(setup) for key, module in CLAIMS.items()}
    load_end = environment(pick_device(args.device))["load_average_1m"]
    return {
        "schema": SCHEMA,
        "command": command,
        "quick": args.quick,
        "environment": env,
        "data": data,
        "wall_s": time.perf_counter() - start,
        "load_average_end": load_end,
        "claims": claims,
    }


def judge_and_draw(result: dict, docs_dir: Path) -> Path:
    """Apply each claim's rule to its numbers, draw the plots, write the page."""
    figures = docs_dir / "claims"
    figures.mkdir(parents=True, exist_ok=True)
    for key, module in CLAIMS.items():
        label, why = module.verdict(result["claims"][key])
        result["claims"][key]["verdict"] = {"label": label, "why": why}
        module.plot(result["claims"][key], figures)
    return report.write(result, docs_dir)


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    args = parse_args(argv)
    json_path = args.docs_dir / "claims" / "claims.json"
    if args.report_only:
        if not json_path.is_file():
            print(f"claims: error: {json_path} not found (run without --report-only first)", file=sys.stderr)
            return 2
        result = json.loads(json_path.read_text())
    else:
        command = "python scripts/claims.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
        result = rounded(measure(args, command))
    page = judge_and_draw(result, args.docs_dir)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {page}, {json_path} and the plots in {json_path.parent}")
    for key in CLAIMS:
        print(f"  {key}: {result['claims'][key]['verdict']['label']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

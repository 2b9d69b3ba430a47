"""Every calibration benchmark of this device in one command; results saved as JSON under
bench/results/<device>/ (a GPU session runs this and commits what it wrote).

    python bench/run_all.py                   # everything, sized for this device
    python bench/run_all.py --only calibrate  # one group: train, infer, layers, calibrate, vs-hf

Jobs run one after another in this process; a failing job is reported and the rest go on
(exit status 1 if any failed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, the folder of this file is on the path, not the repo
    sys.path.insert(0, str(ROOT))
MIRRORS = ["tiny", "deepseek-v3-mini", "ling-1t-mini", "mixtral-mini", "qwen3-moe-mini"]
# Expert-parallel degree per full config where the default (8) would not fit one GPU's memory.
EP = {"seed-speculated-ling-10t": 32}
GROUPS = ("train", "infer", "layers", "calibrate", "vs-hf")


def jobs(on_gpu: bool, results_dir: str | None) -> list[tuple[str, str, list[str]]]:
    save = ["--save"] + (["--results-dir", results_dir] if results_dir else [])
    out = []
    for name in MIRRORS:
        config = str(ROOT / "configs" / f"{name}.yaml")
        train_batch, infer_batch = ("64", "32") if on_gpu else ("8", "4")
        out += [
            ("train", name, ["bench", "train", "--config", config, "--batch-size", train_batch, *save]),
            ("infer", name, ["bench", "infer", "--config", config, "--batch-size", infer_batch, *save]),
            ("layers", name, ["bench", "layers", "--config", config, "--batch-size", train_batch, *save]),
        ]
    for path in sorted((ROOT / "configs" / "full").glob("*.yaml")):
        ep = ["--ep", str(EP[path.stem])] if path.stem in EP else []
        out.append(("calibrate", path.stem, ["calibrate", str(path), *ep, *save]))
    out.append(("vs-hf", "gpu" if on_gpu else "cpu", ["--preset", "gpu" if on_gpu else "cpu", *save]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=GROUPS, action="append", help="run only these groups (repeatable)")
    parser.add_argument("--results-dir", default=None, help="default bench/results")
    args = parser.parse_args(argv)
    from bench import moe_vs_transformers
    from moe.cli import main as moe_main

    todo = [j for j in jobs(torch.cuda.is_available(), args.results_dir) if not args.only or j[0] in args.only]
    failed = []
    for group, name, job_argv in tqdm(todo, desc="benchmarks"):
        run = moe_vs_transformers.main if group == "vs-hf" else moe_main
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                status = run(job_argv)
        except Exception:  # a failing job must not stop the others; its traceback is shown
            status = 1
            log.write(traceback.format_exc())
        if status:
            failed.append(f"{group} {name}")
            print(f"\n{group} {name} failed:\n{log.getvalue()}", file=sys.stderr)
        else:
            tqdm.write(log.getvalue().rstrip().splitlines()[-1])  # the "saved <path>" line
    print(f"{len(todo) - len(failed)} of {len(todo)} jobs saved" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

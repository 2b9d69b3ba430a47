"""What every benchmark shares: dtype choice, timing, the measured matmul peak, peak memory,
the environment record and the JSON result files.

Timing rules (the same for every figure the project publishes):
- warm-up calls run first and are never timed (allocator, autotuning, lazy init);
- CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed between calls), median and the
  20th / 80th percentiles; without triton, a loop of CUDA events with the same statistics;
- CPU: `time.perf_counter` around each call, the same statistics. CPU figures are labelled
  "cpu" everywhere: they check the machinery, they say nothing about a GPU.

Results go to `<results_dir>/<device-slug>/<name>.json`, one object per run, with the device,
library versions and git commit that produced it. Files are written whole (temporary file,
then rename) and never edited by hand.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from . import device_info

SCHEMA = "moe.bench/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_RESULTS_DIR = Path("bench") / "results"


# --------------------------------------------------------------------------- device and dtype


def pick_dtype(name: str, device: torch.device) -> str:
    """"auto" is bf16 on GPUs (what training runs use) and fp32 on CPUs (bf16 is emulated there)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected one of auto, {', '.join(DTYPES)}")
    return name


def default_warmup(device: torch.device) -> int:
    """Untimed calls before timing. CPUs need more: the first calls of each op and shape build
    oneDNN primitives and wake thread pools, and run up to 50x slower for 3-4 calls."""
    return 2 if device.type == "cuda" else 5


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    """Folder name of a device's results: "nvidia-h100-80gb-hbm3", "cpu-amd-epyc"."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return slug if device.type == "cuda" else f"cpu-{slug}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    warmup: int
    repeats: int
    timer: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(fn: Callable[[], Any], device: torch.device, warmup: int = 2, repeats: int = 5) -> Timing:
    """Time `fn` after `warmup` untimed calls: median and 20/80th percentiles of `repeats` calls."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    if device.type == "cuda":
        return _measure_cuda(fn, device, warmup, repeats)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return _summary(times, warmup, repeats, "time.perf_counter")


def _measure_cuda(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Timing:
    # One untimed call first: do_bench sizes its loops from a 5-call estimate, which a first
    # call (allocation, autotuning) would distort.
    fn()
    torch.cuda.synchronize(device)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        estimate_ms = max(start.elapsed_time(end), 1e-3)
        p20, median, p80 = do_bench(fn, warmup=estimate_ms * warmup, rep=estimate_ms * repeats,
                                    quantiles=[0.2, 0.5, 0.8])
        return Timing(median / 1e3, p20 / 1e3, p80 / 1e3, warmup, repeats, "triton.testing.do_bench")
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return _summary([s.elapsed_time(e) / 1e3 for s, e in events], warmup, repeats, "cuda events")


def _summary(times: list[float], warmup: int, repeats: int, timer: str) -> Timing:
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], warmup, repeats, timer)
    deciles = statistics.quantiles(times, n=10, method="inclusive")  # 10%, 20%, ..., 90%
    return Timing(statistics.median(times), deciles[1], deciles[7], warmup, repeats, timer)


def matmul_peak(device: torch.device, dtype: str, n: int | None = None, warmup: int = 2,
                repeats: int = 5) -> dict[str, Any]:
    """The dense matmul throughput this device really reaches: an [n, n] @ [n, n] torch.mm.

    The denominator of "MFU vs measured peak". n defaults to 8192 on GPUs (large enough to
    saturate an H100's tensor cores) and 1024 on CPUs (a few GFLOP, quick on two cores).
    """
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    timing = measure(lambda: torch.mm(a, b), device, warmup, repeats)
    return {"tflops": 2 * n**3 / timing.median_s / 1e12, "n": n, "dtype": dtype, "timing": timing.to_dict()}


# --------------------------------------------------------------------------- memory


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory since the last reset (CUDA), or the process's peak RSS (CPU: no per-run
    counter exists, so the figure includes Python, the libraries and earlier work)."""
    if device.type == "cuda":
        return {"bytes": torch.cuda.max_memory_allocated(device), "kind": "torch.cuda.max_memory_allocated"}
    try:
        import resource

        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {"bytes": rss_kib * 1024, "kind": "process peak RSS (includes everything the process did)"}
    except ImportError:
        return {"bytes": None, "kind": "unavailable"}


def memory_capacity(device: torch.device) -> int | None:
    """Bytes of memory the device has, for refusing runs that cannot fit."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# --------------------------------------------------------------------------- environment and results


def environment(device: torch.device) -> dict[str, Any]:
    """Everything needed to tell two result files apart: device, versions, commit, time."""
    name = device_name(device)
    spec = device_info.lookup(name) if device.type == "cuda" else None
    return {
        "label": "gpu" if device.type == "cuda" else "cpu",
        "device": name,
        "device_type": device.type,
        "device_slug": device_slug(device),
        "datasheet": spec.key if spec else None,
        "threads": torch.get_num_threads(),
        "load_average_1m": _load_average(),  # other work on the machine (CPU figures suffer from it)
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **_git(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> dict[str, Any]:
    """Commit of the checkout the code runs from, and whether it had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def record(bench: str, env: dict[str, Any], config: dict[str, Any], settings: dict[str, Any],
           results: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One result object; every bench writes this shape (tests/test_benchmark.py holds it)."""
    return {"schema": SCHEMA, "bench": bench, "environment": env, "config": config,
            "settings": settings, "results": results, **extra}


def save(result: dict[str, Any], name: str, results_dir: str | Path | None = None) -> Path:
    """Write `result` to <results_dir>/<device-slug>/<name>.json atomically; returns the path."""
    folder = Path(results_dir or DEFAULT_RESULTS_DIR) / result["environment"]["device_slug"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def publish(result: dict[str, Any], name: str, print_table: Callable[[dict[str, Any]], None], as_json: bool,
            save_result: bool, results_dir: str | Path | None = None) -> None:
    """What every bench command does with its record: print it (JSON, or the bench's own table)
    and, when asked, save it as <name>.json, saying where unless the output is JSON."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    if save_result:
        path = save(result, name, results_dir)
        if not as_json:
            print(f"saved {path}")


def format_tflops(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}"


def format_share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"

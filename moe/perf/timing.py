"""Timing, the measured matmul peak and peak memory: the rules every published figure follows.

- warm-up calls run first and are never timed (allocator, autotuning, lazy init);
- CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed between calls), median and the
  20th / 80th percentiles; without triton, a loop of CUDA events with the same statistics;
- CPU: `time.perf_counter` around each call, the same statistics. CPU figures are labelled
  "cpu" everywhere: they check the machinery, they say nothing about a GPU.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, excerpt

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- device and dtype


def pick_dtype(name: str, device: torch.device) -> str:
    """ "auto" is bf16 on GPUs (what training runs use) and fp32 on CPUs (bf16 is emulated there)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in DTYPES:
        raise InputError(f"--dtype {excerpt(name)}: expected one of auto, {', '.join(DTYPES)}")
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
        raise InputError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
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
        p20, median, p80 = do_bench(
            fn, warmup=estimate_ms * warmup, rep=estimate_ms * repeats, quantiles=[0.2, 0.5, 0.8]
        )
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


def matmul_peak(
    device: torch.device, dtype: str, n: int | None = None, warmup: int = 2, repeats: int = 5
) -> dict[str, Any]:
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

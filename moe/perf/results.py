"""Benchmark results as data: the environment record and the JSON result files.

Results go to `<results_dir>/<device-slug>/<name>.json`, one object per run, with the device,
library versions and git commit that produced it. Files are written whole (temporary file,
then rename) and never edited by hand.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..io.files import write_atomic
from . import device_peaks
from .timing import device_name, device_slug

SCHEMA = "moe.bench/1"
DEFAULT_RESULTS_DIR = Path("bench") / "results"


def environment(device: torch.device) -> dict[str, Any]:
    """Everything needed to tell two result files apart: device, versions, commit, time."""
    name = device_name(device)
    spec = device_peaks.lookup(name) if device.type == "cuda" else None
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
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def record(
    bench: str,
    env: dict[str, Any],
    config: dict[str, Any],
    settings: dict[str, Any],
    results: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """One result object; every bench writes this shape (tests/perf/test_timing_results.py holds it)."""
    return {
        "schema": SCHEMA,
        "bench": bench,
        "environment": env,
        "config": config,
        "settings": settings,
        "results": results,
        **extra,
    }


def save(result: dict[str, Any], name: str, results_dir: str | Path | None = None) -> Path:
    """Write `result` to <results_dir>/<device-slug>/<name>.json atomically; returns the path."""
    folder = Path(results_dir or DEFAULT_RESULTS_DIR) / result["environment"]["device_slug"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    write_atomic(path, (json.dumps(result, indent=2) + "\n").encode())
    return path


def publish(
    result: dict[str, Any],
    name: str,
    print_table: Callable[[dict[str, Any]], None],
    as_json: bool,
    save_result: bool,
    results_dir: str | Path | None = None,
) -> None:
    """What every bench command does with its record: when asked, save it as <name>.json; then
    print it (JSON, or the bench's own table), saying where it was saved unless the output is JSON.
    Saving comes first: a save that fails (disk full, no permission) prints no result to stdout."""
    path = save(result, name, results_dir) if save_result else None
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        if path is not None:
            print(f"saved {path}")


def format_tflops(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}"


def format_share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"

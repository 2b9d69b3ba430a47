import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs the benchmark script in a subprocess

ROOT = Path(__file__).resolve().parents[2]


def test_moe_layer_bench_machinery_on_cpu(tmp_path):
    # The real shapes need a GPU; --cpu-smoke runs every backend on a tiny fp32 layer.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "moe_layer.py"), "--cpu-smoke", "--results-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    (result_file,) = tmp_path.glob("*/moe_layer.json")
    result = json.loads(result_file.read_text())
    cases = result["results"]["cases"]
    assert {c["backend"] for c in cases} == {"torch", "eager", "triton"}
    assert all(c["status"] == "ok" and c["rel_err"] < 1e-5 for c in cases)
    assert all(c["forward_backward"]["median_s"] > 0 for c in cases)
    assert result_file.with_suffix(".png").stat().st_size > 0


def test_moe_layer_bench_refuses_cpu_without_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "moe_layer.py"), "--results-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr

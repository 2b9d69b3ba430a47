"""bench/grouped_gemm.py's cases come from the full configs (the timing itself needs a GPU)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import grouped_gemm  # noqa: E402
import moe_layer_cases  # noqa: E402


def test_shapes_and_expert_counts_follow_the_configs():
    shapes = grouped_gemm.model_shapes(moe_layer_cases.MODELS)
    assert (shapes["ling-1t"]["d"], shapes["ling-1t"]["f"], shapes["ling-1t"]["top_k"]) == (8192, 2048, 8)
    assert (shapes["deepseek-v3"]["d"], shapes["deepseek-v3"]["f"]) == (7168, 2048)
    assert shapes["ling-1t"]["experts"] == (8, 16, 32, 64)  # expert-parallel shares of 256
    assert shapes["mixtral-8x7b"]["experts"] == (8,)  # the whole model fits: its own E
    assert shapes["qwen3-30b-a3b"]["experts"] == (128,)
    assert shapes["qwen3-30b-a3b"]["f"] == 768 and shapes["mixtral-8x7b"]["top_k"] == 2


def test_cases_cover_every_shape_and_skip_skew_where_every_token_takes_every_expert():
    shapes = grouped_gemm.model_shapes(["ling-1t", "mixtral-8x7b"])
    cases = grouped_gemm.cases_of(shapes, grouped_gemm.ROWS, quick=False)
    ling = [c for c in cases if c[0] == "ling-1t"]
    assert {(e, r) for _, e, _, r in ling if e == 8} == {(8, "balanced")}, "top-8 of 8 experts: no skew"
    assert {(e, r) for _, e, _, r in ling if e == 32} == {(32, "balanced"), (32, "zipf")}
    assert len(ling) == (1 + 2 + 2 + 2) * len(grouped_gemm.ROWS)
    mixtral = [c for c in cases if c[0] == "mixtral-8x7b"]
    assert {r for _, _, _, r in mixtral} == {"balanced", "zipf"}  # top-2 of 8
    quick = grouped_gemm.cases_of(shapes, grouped_gemm.QUICK["rows"], quick=True)
    assert {(m, e) for m, e, _, _ in quick} == {("ling-1t", 8), ("ling-1t", 32), ("mixtral-8x7b", 8)}


def test_refuses_a_machine_without_a_gpu():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "grouped_gemm.py"), "--model", "qwen3-30b-a3b"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr

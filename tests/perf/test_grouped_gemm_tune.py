"""bench/grouped_gemm_tune.py's problems run the kernels they tune, in both expert shapes (the
sweep itself needs a GPU; here tiny shapes run through the Triton interpreter)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import grouped_gemm_tune as tune  # noqa: E402

from moe_kernels.tuning import INTERPRET_CONFIG  # noqa: E402


@pytest.mark.parametrize("kind, count", [("rows", 4), ("swiglu_up", 2), ("act_backward", 2), ("dw", 5)])
def test_every_kind_has_problems_in_both_shapes_and_they_run(monkeypatch, kind, count):
    monkeypatch.setattr(tune, "DEVICE", "cpu")
    monkeypatch.setattr(tune, "DTYPE", torch.float32)
    # the real shapes' structure (8 coarse experts, many fine ones) at sizes the interpreter runs
    monkeypatch.setattr(tune, "SHAPES", ((3, 40, 24, {"small": 8}), (6, 32, 16, {"small": 5})))
    runs = tune.problems(kind, "small")
    assert len(runs) == count  # per shape: two projections (rows, dw) or one kernel; dw: a skewed case on the first
    for run in runs:
        out = run(INTERPRET_CONFIG)
        assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_the_shapes_are_the_ends_of_the_full_configs():
    coarse, fine = tune.SHAPES
    assert coarse[:3] == (8, 8192, 2048) and fine[:3] == (128, 2048, 768)
    assert set(coarse[3]) == set(fine[3]) == {"decode", "small", "large"}
    assert tune.ROWS_PER_GROUP is coarse[3]

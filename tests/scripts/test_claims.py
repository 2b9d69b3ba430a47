"""scripts/claims.py end to end in --quick mode, and the verdict rules on hand-made numbers.

The quick run's numbers mean nothing; the test checks that the page and the JSON are written
from the runs, and that every verdict is the stated rule applied to the JSON's numbers (the
rules are re-implemented here from the page's wording, not imported).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe.perf.flops import count
from moe.train.metrics import read_rows

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from claims import balance, capacity, layering  # noqa: E402  (scripts/claims/)

VERDICTS = {"reproduced", "not reproduced", "not measurable at this scale"}


def run_script(*args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "claims.py"),
            *args,
            "--runs-dir",
            str(tmp_path / "runs"),
            "--docs-dir",
            str(tmp_path / "docs"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("claims")
    proc = run_script("--quick", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = tmp_path / "docs"
    return tmp_path, json.loads((docs / "claims" / "claims.json").read_text()), (docs / "claims.md").read_text()


@pytest.mark.slow
def test_page_has_every_section_plot_and_verdict(quick):
    tmp_path, result, page = quick
    assert page.startswith("# The seed article's MoE claims") and "QUICK MODE" in page
    for heading in (
        "## Summary",
        "## 1. Load balancing",
        "## 2. Hierarchical layering",
        "## 3. Dynamic expert capacity",
    ):
        assert heading in page
    assert page.count("**Rule.**") == 3
    assert "python scripts/claims.py --quick" in result["command"] and result["quick"]
    assert result["environment"]["torch"] in page
    for name in ("balance", "layering", "capacity"):
        assert f"](claims/{name}.png)" in page
        assert (tmp_path / "docs" / "claims" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        label = result["claims"][name]["verdict"]["label"]
        assert label in VERDICTS
        assert f"**Verdict: {label}.**" in page


@pytest.mark.slow
def test_verdicts_follow_the_stated_rules(quick):
    _, result, _ = quick
    claims = result["claims"]
    assert claims["balance"]["verdict"]["label"] == balance_rule(claims["balance"])
    assert claims["layering"]["verdict"]["label"] == layering_rule(claims["layering"])
    assert claims["capacity"]["verdict"]["label"] == capacity_rule(claims["capacity"])


@pytest.mark.slow
def test_numbers_come_from_the_runs(quick):
    tmp_path, result, _ = quick
    runs = tmp_path / "runs"
    # Claim 3: the drop rates are the runs' logged ones; dynamic capacity drops nothing at factor >= 1.
    for name, entry in result["claims"]["capacity"]["settings"].items():
        for mode, numbers in entry["modes"].items():
            rows = read_rows(runs / "capacity" / f"{name}-{mode}" / "metrics.jsonl")
            rows = [r for r in rows if r["kind"] == "train"]
            assert numbers["drop_mean"] == pytest.approx(np.mean([r["drop_rate"] for r in rows]), abs=1e-6)
        assert entry["modes"]["dynamic"]["drop_max"] == 0.0  # every setting has factor >= 1
    # Claim 1: the window utilisation is K x the load averaged over the last third of the logged rows.
    numbers = result["claims"]["balance"]
    rows = [r for r in read_rows(runs / "balance" / "none" / "metrics.jsonl") if r["kind"] == "train"]
    window = rows[-max(1, round(len(rows) / 3)) :]
    u_LE = numbers["top_k"] * np.mean([[e["load"] for e in r["layers"]] for r in window], axis=0)
    assert numbers["methods"]["none"]["window"]["util_max"] == pytest.approx(u_LE.max(), abs=1e-6)
    assert numbers["methods"]["none"]["window"]["util_sorted"][0] == pytest.approx(sorted(u_LE[0])[::-1], abs=1e-6)
    # Claim 2: every plan has the same active parameters (a dense FFN sized to an MoE layer's).
    plans = result["claims"]["layering"]["plans"]
    actives = [p["params_active"] for p in plans.values()]
    assert (max(actives) - min(actives)) / min(actives) < 0.01
    assert len({p["params_total"] for p in plans.values()}) > 1  # ... but not the same total parameters
    assert plans["2-4-2-4"]["layers"] == "DDMMMMDDMMMM"
    assert all(len(p["tokens_per_s"]) == result["claims"]["layering"]["timing"]["rounds"] for p in plans.values())


@pytest.mark.slow
def test_report_only_rewrites_the_same_page_from_the_json(quick, tmp_path):
    quick_dir, _, page = quick
    docs = tmp_path / "docs"
    (docs / "claims").mkdir(parents=True)
    (docs / "claims" / "claims.json").write_text((quick_dir / "docs" / "claims" / "claims.json").read_text())
    proc = run_script("--report-only", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (docs / "claims.md").read_text() == page
    assert (docs / "claims" / "layering.png").stat().st_size > 0


@pytest.mark.slow
def test_report_only_without_json_is_a_one_line_error(tmp_path):
    proc = run_script("--report-only", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "claims.json not found" in proc.stderr and not (tmp_path / "docs" / "claims.md").exists()


# --------------------------------------------------------------------------- the rules, as the page states them


def balance_rule(n):
    if n["uniform"]["p_band"] < 0.5:
        return "not measurable at this scale"
    uneven = n["methods"]["none"]["window"]["max_mean_worst"] >= 2.0
    held = any(m["window"]["in_band_share"] == 1.0 for name, m in n["methods"].items() if name != "none")
    return "reproduced" if uneven and held else "not reproduced"


def layering_rule(n):
    c = n["comparisons"]["2-4-2-4"]
    speed_holds, speed_fails = c["speedup"]["p20"] >= 0.15, c["speedup"]["p80"] < 0.15
    quality_holds, quality_fails = c["loss_change"]["mean"] <= 0.024, c["loss_change"]["min"] > 0.024
    if speed_holds and quality_holds:
        return "reproduced"
    return "not reproduced" if speed_fails or quality_fails else "not measurable at this scale"


def capacity_rule(n):
    outcomes = []
    for entry in n["settings"].values():
        static, dynamic = entry["modes"]["static"]["drop_mean"], entry["modes"]["dynamic"]["drop_mean"]
        if static >= 0.02:
            outcomes.append(dynamic < 0.02)
    if not outcomes:
        return "not measurable at this scale"
    return "reproduced" if all(outcomes) else "not reproduced"


def balance_numbers(p_band, none_worst, in_band):
    window = lambda worst, share: {
        "max_mean_worst": worst,
        "in_band_share": share,
        "util_min": 0.1,  # noqa: E731
        "util_max": 0.2,
    }
    methods = {
        "none": {"label": "none", "window": window(none_worst, 0.1)},
        "switch": {"label": "switch", "window": window(1.1, in_band)},
    }
    return {"uniform": {"p_band": p_band}, "methods": methods, "top_k": 4, "num_experts": 32}


def layering_numbers(speedups, losses):
    q = lambda v: {
        "median": float(np.median(v)),
        "p20": float(np.quantile(v, 0.2)),  # noqa: E731
        "p80": float(np.quantile(v, 0.8)),
    }
    return {
        "comparisons": {
            "2-4-2-4": {
                "speedup": q(speedups),
                "loss_change_samples": losses,
                "loss_change": {"mean": float(np.mean(losses)), "min": min(losses), "max": max(losses)},
            }
        }
    }


def capacity_numbers(*pairs):
    return {
        "settings": {
            f"s{i}": {"label": f"s{i}", "modes": {"static": {"drop_mean": s}, "dynamic": {"drop_mean": d}}}
            for i, (s, d) in enumerate(pairs)
        }
    }


@pytest.mark.parametrize(
    "numbers, expected",
    [
        (balance_numbers(0.9, 8.0, 1.0), "reproduced"),
        (balance_numbers(0.9, 8.0, 0.97), "not reproduced"),  # one expert outside the band
        (balance_numbers(0.9, 1.5, 1.0), "not reproduced"),  # the baseline was not uneven
        (balance_numbers(0.2, 8.0, 1.0), "not measurable at this scale"),  # noise wider than the band
    ],
)
def test_balance_rule(numbers, expected):
    assert balance.verdict(numbers)[0] == balance_rule(numbers) == expected


@pytest.mark.parametrize(
    "speedups, losses, expected",
    [
        ([0.3, 0.32, 0.35], [0.01, 0.012], "reproduced"),
        ([0.02, 0.05, 0.04], [0.01, 0.012], "not reproduced"),  # not faster
        ([0.3, 0.32, 0.35], [0.05, 0.06], "not reproduced"),  # much worse on every seed
        ([0.05, 0.2, 0.3], [0.01, 0.012], "not measurable at this scale"),  # timing noise spans 15%
        ([0.3, 0.32, 0.35], [0.01, 0.05], "not measurable at this scale"),  # seeds disagree
    ],
)
def test_layering_rule(speedups, losses, expected):
    numbers = layering_numbers(speedups, losses)
    assert layering.verdict(numbers)[0] == layering_rule(numbers) == expected


@pytest.mark.parametrize(
    "pairs, expected",
    [
        ([(0.08, 0.01), (0.01, 0.0)], "reproduced"),  # the second setting has nothing to cut
        ([(0.08, 0.03)], "not reproduced"),
        ([(0.01, 0.0)], "not measurable at this scale"),
    ],
)
def test_capacity_rule(pairs, expected):
    numbers = capacity_numbers(*pairs)
    assert capacity.verdict(numbers)[0] == capacity_rule(numbers) == expected


def test_dense_ffn_matches_an_moe_layers_active_parameters():
    from moe import ModelConfig, MoEConfig

    config = ModelConfig(
        hidden_size=48,
        num_layers=3,
        num_heads=4,
        moe=MoEConfig(num_experts=16, top_k=3, expert_ffn_size=40, num_shared_experts=1, activation="gelu"),
    )
    width = layering.matched_dense_ffn(config)
    dense = count(ModelConfig(**{**config.__dict__, "moe": None, "intermediate_size": width})).params_active
    per_unit = 2 * 48  # a GELU FFN has two matrices: one unit of width is 2 x hidden parameters
    assert math.isclose(dense, count(config).params_active, abs_tol=per_unit / 2 * 3)

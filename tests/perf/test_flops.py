import json
from pathlib import Path

import pytest

from moe import ModelConfig, MoEConfig, Transformer, load_config
from moe.cli import main
from moe.perf.flops import count

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Published totals / active parameters (embeddings included, MTP excluded).
PUBLISHED = {
    "deepseek-v3": (671e9, 37e9),
    "ling-1t": (1000e9, 51e9),  # the card says "about 50B", the Ling 2.0 report 51B
    "ling-flash-2.0": (100e9, 6.1e9),
    "ling-mini-2.0": (16.26e9, 1.43e9),
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "qwen3-30b-a3b": (30.5e9, 3.3e9),
    "dbrx": (132e9, 36e9),
    "olmoe-1b-7b": (6.9e9, 1.3e9),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_full_configs_match_published_parameter_counts(name):
    counts = count(load_config(CONFIGS / "full" / f"{name}.yaml"))
    total, active = PUBLISHED[name]
    # Ling-flash-2.0's "100B" is rounded: its safetensors hold 102.9B.
    total_tol = 0.035 if name == "ling-flash-2.0" else 0.02
    assert abs(counts.params_total / total - 1) < total_tol, counts.params_total
    assert abs(counts.params_active / active - 1) < 0.02, counts.params_active


def test_counts_by_hand_on_a_small_model():
    cfg = ModelConfig(
        vocab_size=10,
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        intermediate_size=12,
        first_k_dense=1,
        max_seq_len=5,
        moe=MoEConfig(num_experts=4, top_k=1, expert_ffn_size=6, num_shared_experts=1),
    )
    c = count(cfg)
    model = Transformer(cfg)
    assert c.params_total == sum(p.numel() for p in model.parameters())
    attn = 4 * 8 * 8  # q, k, v, o of 8x8
    norms = 2 * 8
    dense = 3 * 8 * 12
    router, expert, shared = 4 * 8, 3 * 8 * 6, 3 * 8 * 6
    embed = head = 10 * 8
    moe_active = router + expert + shared
    assert c.params_active == embed + head + 8 + 2 * (attn + norms) + dense + moe_active
    # Everything active but the embedding lookup; norm weights are no matmul but too few to matter.
    matmul = head + 8 + 2 * (attn + norms) + dense + moe_active
    assert c.matmul_params_active == matmul
    attention = 3 * 2 * 2 * 2 * (4 + 4) * 3  # 3x(fwd) * L * 2 * H * (Dqk + Dv) * mean context (5+1)/2
    assert c.train_flops_per_token == 6 * matmul + attention


def test_inspect_prints_the_deepseek_v3_figures(capsys):
    assert main(["inspect", str(CONFIGS / "full" / "deepseek-v3.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert round(report["params_total"] / 1e9) == 671
    assert round(report["params_active"] / 1e9, 0) in (37, 38)
    assert report["train_flops_per_token"] > 6 * 36e9
    assert main(["inspect", str(CONFIGS / "full" / "deepseek-v3.yaml")]) == 0
    table = capsys.readouterr().out
    assert "671.03 B" in table and "61 (3 dense, 58 MoE)" in table


@pytest.mark.slow
def test_every_shipped_config_loads_and_inspects(capsys):
    for path in sorted(CONFIGS.rglob("*.yaml")):
        assert main(["inspect", str(path), "--json"]) == 0, path
        assert json.loads(capsys.readouterr().out)["params_total"] > 0


def test_inspect_reports_bad_configs_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layers: 2\nmoe:\n  top_k: 99\n")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "moe.top_k" in err
    assert main(["inspect", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err

import json

import pytest

from moe import ModelConfig, MoEConfig, load_config


def test_defaults_are_valid():
    cfg = ModelConfig()
    assert cfg.moe == MoEConfig()
    assert MoEConfig(num_experts=8, top_k=2).capacity_factor is None


def test_yaml_and_json_load_the_same(tmp_path):
    data = {"hidden_size": 64, "num_heads": 4, "moe": {"num_experts": 4, "top_k": 1, "score_func": "sigmoid"}}
    (tmp_path / "a.json").write_text(json.dumps(data))
    (tmp_path / "a.yaml").write_text(
        "hidden_size: 64\nnum_heads: 4\nmoe:\n  num_experts: 4\n  top_k: 1\n  score_func: sigmoid\n"
    )
    a, b = load_config(tmp_path / "a.json"), load_config(tmp_path / "a.yaml")
    assert a == b
    assert isinstance(a.moe, MoEConfig) and a.moe.score_func == "sigmoid"


@pytest.mark.parametrize(
    "text, key",
    [
        ("hidden_sise: 64\n", "hidden_sise"),
        ("moe:\n  num_expert: 4\n", "moe.num_expert"),
    ],
)
def test_unknown_keys_are_named(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"unknown config key '{key}'"):
        load_config(path)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(top_k=9, num_experts=8), "top_k"),
        (dict(num_experts=10, n_group=4), "num_experts"),
        (dict(num_experts=8, n_group=4, topk_group=5), "topk_group"),
        (dict(num_experts=8, top_k=5, n_group=4, topk_group=2), "top_k"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_mode="elastic"), "capacity_mode"),
        (dict(score_func="relu"), "score_func"),
        (dict(backend="cuda"), "backend"),
        (dict(num_experts="8"), "num_experts"),
        (dict(top_k=2.0), "top_k"),
        (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
        (dict(expert_bias="yes"), "expert_bias"),
    ],
)
def test_impossible_moe_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        MoEConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(num_heads=6, num_kv_heads=4, head_dim=16), "num_heads"),
        (dict(hidden_size=100, num_heads=3), "hidden_size"),
        (dict(num_layers=0), "num_layers"),
        (dict(moe_pattern="2-x"), "moe_pattern"),
        (dict(moe_pattern="2-4-2"), "moe_pattern"),
        (dict(moe_pattern="2-0"), "moe_pattern"),
        (dict(moe_pattern="2-4", first_k_dense=1), "moe_pattern"),
        (dict(moe_layers=[0, 9]), "moe_layers"),
        (dict(first_k_dense=5), "first_k_dense"),
        (dict(rope_fraction=0.0), "rope_fraction"),
        (dict(attention="flash"), "attention"),
        (dict(moe=None, moe_pattern="1-1"), "moe"),
        (dict(attention_out_bias="no"), "attention_out_bias"),
        (dict(latent_norm_eps=0.0), "latent_norm_eps"),
        (dict(rope_scaling="yarn"), "rope_scaling"),
        (
            dict(rope_scaling={"type": "linear", "factor": 2.0, "original_max_position_embeddings": 8}),
            "rope_scaling.type",
        ),
        (dict(rope_scaling={"type": "yarn", "factr": 2.0}), "rope_scaling.factr"),
        (dict(rope_scaling={"type": "yarn", "original_max_position_embeddings": 8}), "rope_scaling.factor"),
        (
            dict(rope_scaling={"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 8}),
            "rope_scaling.factor",
        ),
        (
            dict(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 8.5}),
            "rope_scaling.original_max_position_embeddings",
        ),
    ],
)
def test_impossible_model_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        ModelConfig(**kwargs)


def test_nested_errors_name_the_full_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("moe:\n  num_experts: 4\n  top_k: 5\n")
    with pytest.raises(ValueError, match=r"c.yaml: config key 'moe.top_k' = 5 must be <= num_experts \(4\)"):
        load_config(path)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("moe: [unclosed\n")
    with pytest.raises(ValueError, match="malformed config"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_config(scalar)


def test_ints_are_accepted_for_floats_and_null_means_none():
    cfg = MoEConfig(capacity_factor=1, routed_scaling_factor=2)
    assert cfg.capacity_factor == 1.0 and isinstance(cfg.capacity_factor, float)
    assert MoEConfig(capacity_factor=None).capacity_factor is None


def test_yarn_scaling_loads_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "rope_scaling:\n  type: yarn\n  factor: 40\n  original_max_position_embeddings: 4096\n"
        "  mscale: 1.0\n  mscale_all_dim: 1.0\n"
    )
    cfg = load_config(path)
    assert cfg.rope_scaling == {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }

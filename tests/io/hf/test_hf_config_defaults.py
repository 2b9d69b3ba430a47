"""A config.json that omits a key gets the family's own default, not ours: for each family, a
config.json with only the required size keys loads the model its reference builds from it
(transformers for Mixtral, Qwen3-MoE and DeepSeek-V3; the authors' Ling 2.0 defaults with the
independent reference forward of ling_reference.py), logits and greedy continuation alike."""

import json

import ling_reference as ling
import pytest
import torch
from hf_utils import assert_parity, hf_logits, randomize_
from safetensors.torch import save_file

from moe import Transformer, layer_plan
from moe.io.hf import FAMILIES, family_of

transformers = pytest.importorskip("transformers", reason="parity tests need transformers (pip install -e '.[dev]')")

# Only the keys each family requires: every other key takes its default.
MINIMAL = {
    "mixtral": dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=16,  # the default num_key_value_heads is 8
        num_local_experts=4,
    ),
    "qwen3_moe": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=8,  # the default num_key_value_heads is 4
        num_experts=8,  # the default num_experts_per_tok is 8
        moe_intermediate_size=12,
    ),
    "deepseek_v3": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=40,
        moe_intermediate_size=12,
        num_hidden_layers=4,  # the first 3 are dense by default
        num_attention_heads=4,
        n_routed_experts=16,  # the default groups: 8 of 2 experts, 4 kept, top-8
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
    ),
}
CLASSES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
}
# Keys a family reads that its transformers configuration class has no field for.
NOT_FIELDS = {
    "mixtral": {"rope_scaling", "rope_parameters"},
    "qwen3_moe": {"head_dim", "rope_scaling", "rope_parameters"},
    "deepseek_v3": {
        "rope_scaling",
        "rope_parameters",
        "quantization_config",
        "scoring_func",
        "topk_method",
        "moe_layer_freq",
    },
}


def class_default(config, key):
    if key == "rope_theta":  # v5 keeps it in rope_parameters
        return config.rope_parameters["rope_theta"]
    return getattr(config, key)


@pytest.mark.parametrize("family", CLASSES)
def test_default_tables_are_those_of_the_transformers_configuration_class(family):
    config = getattr(transformers, CLASSES[family][0])()
    defaults = FAMILIES[family].defaults
    compared = [key for key in defaults if key not in NOT_FIELDS[family]]
    assert len(compared) >= 10
    for key in compared:
        ours = [] if key == "mlp_only_layers" and defaults[key] is None else defaults[key]  # null means []
        assert ours == class_default(config, key), key


@pytest.mark.parametrize("family", MINIMAL)
def test_a_config_json_of_sizes_only_loads_what_transformers_builds(family, tmp_path):
    config_class, model_class = CLASSES[family]
    config = getattr(transformers, config_class)(**MINIMAL[family])
    torch.manual_seed(0)
    reference = randomize_(getattr(transformers, model_class)(config), seed=1).eval()
    reference.save_pretrained(tmp_path)
    minimal = {"model_type": family, "architectures": [model_class], **MINIMAL[family]}
    (tmp_path / "config.json").write_text(json.dumps(minimal))  # transformers wrote every key: drop them

    ours = Transformer.from_hf(tmp_path)
    c, moe = ours.config, ours.config.moe
    assert c.kv_heads == (config.num_attention_heads if family == "deepseek_v3" else config.num_key_value_heads)
    assert c.rope_theta == config.rope_parameters["rope_theta"]
    assert c.max_seq_len == config.max_position_embeddings and c.norm_eps == config.rms_norm_eps
    assert moe.top_k == config.num_experts_per_tok
    if family == "deepseek_v3":
        assert (moe.n_group, moe.topk_group, moe.routed_scaling_factor) == (8, 4, 2.5)
        assert (c.q_lora_rank, moe.num_shared_experts) == (config.q_lora_rank, config.n_shared_experts)
        assert layer_plan(c) == [False, False, False, True]
    if family == "qwen3_moe":
        assert moe.norm_topk_prob is False
    assert_parity(hf_logits(reference), ours, config.vocab_size)


# The authors' BailingMoeV2Config defaults (inclusionAI/Ling-V2 models/configuration_bailing_moe_v2.py,
# commit af8837e), transcribed here independently of moe/io/hf/bailing_moe_v2.py, plus what their
# modeling code assumes for partial_rotary_factor when a config has none (1.0).
LING_AUTHORS = dict(
    num_key_value_heads=4,
    head_dim=128,
    hidden_act="silu",
    use_qkv_bias=False,
    use_bias=False,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    max_position_embeddings=32768,
    rope_theta=600000.0,
    rope_scaling=None,
    num_shared_experts=1,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    first_k_dense_replace=1,
    use_qk_norm=True,
    num_nextn_predict_layers=0,
    routed_scaling_factor=1.0,
    partial_rotary_factor=1.0,
)
LING_MINIMAL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_experts=16,
    moe_intermediate_size=12,
)


def test_a_ling_config_json_of_sizes_only_loads_with_the_authors_defaults(tmp_path):
    reference_config = {**LING_AUTHORS, **LING_MINIMAL}
    weights = ling.random_weights(reference_config, seed=3)
    minimal = {"model_type": "bailing_moe", "architectures": ["BailingMoeV2ForCausalLM"], **LING_MINIMAL}
    (tmp_path / "config.json").write_text(json.dumps(minimal))
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    ours = Transformer.from_hf(tmp_path)
    c, moe = ours.config, ours.config.moe
    assert (c.rope_theta, moe.routed_scaling_factor, moe.n_group, moe.topk_group) == (600000.0, 1.0, 8, 4)
    assert (c.kv_heads, c.dim_per_head, c.qk_norm, moe.num_shared_experts, moe.top_k) == (4, 128, True, 1, 8)
    assert layer_plan(c) == [False, True, True] and c.rope_fraction == 1.0
    assert_parity(lambda ids: ling.forward(reference_config, weights, ids), ours, LING_MINIMAL["vocab_size"])


@pytest.mark.parametrize(
    "hf, field, expected",
    [
        (
            {**MINIMAL["mixtral"], "model_type": "mixtral", "num_key_value_heads": None},
            "kv_heads",
            16,
        ),
        ({**MINIMAL["qwen3_moe"], "model_type": "qwen3_moe", "num_key_value_heads": None}, "kv_heads", 8),
        ({**MINIMAL["deepseek_v3"], "model_type": "deepseek_v3", "q_lora_rank": None}, "q_lora_rank", None),
        (
            {**MINIMAL["deepseek_v3"], "model_type": "deepseek_v3", "n_group": None, "topk_group": None},
            "moe.n_group",
            1,
        ),
        (
            {**LING_MINIMAL, "model_type": "bailing_moe_v2", "num_shared_experts": None},
            "moe.num_shared_experts",
            0,
        ),
        ({**LING_MINIMAL, "model_type": "bailing_moe_v2", "head_dim": None}, "head_dim", 8),
    ],
)
def test_an_explicit_null_keeps_its_meaning_where_a_missing_key_takes_the_default(hf, field, expected):
    config = family_of(hf).to_config(hf, name="m")
    value = config
    for part in field.split("."):
        value = getattr(value, part)
    assert value == expected
    missing = {k: v for k, v in hf.items() if v is not None or k in family_of(hf).required}
    default = family_of(missing).to_config(missing, name="m")
    for part in field.split("."):
        default = getattr(default, part)
    assert default != expected  # the family default differs from what null means

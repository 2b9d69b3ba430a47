"""Ling 2.0 (BailingMoeV2ForCausalLM): transformers has no implementation, so both directions are
held to an independent reference forward written from the published description
(tests/hf/ling_reference.py), and our export must load back bit for bit."""

import json

import ling_reference as ling
import pytest
import torch
from hf_utils import assert_parity, randomize_
from safetensors.torch import load_file, save_file

from moe import ModelConfig, MoEConfig, Transformer, layer_plan

HF_SHAPES = {
    "mini-like": ling.config(),
    "odd-biases-tied": ling.config(
        vocab_size=71,
        hidden_size=36,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=12,
        use_qkv_bias=True,
        use_bias=True,
        use_qk_norm=False,
        num_experts=6,
        num_experts_per_tok=3,
        num_shared_experts=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=0,
        num_hidden_layers=2,
        tie_word_embeddings=True,
    ),
    "top1-mtp-v2-name": ling.config(
        model_type="bailing_moe_v2",
        num_experts_per_tok=1,
        partial_rotary_factor=1.0,
        num_hidden_layers=4,
        num_nextn_predict_layers=1,
        first_k_dense_replace=2,
        n_group=1,
        topk_group=1,
        rms_norm_eps=1e-5,
    ),
}


def write(directory, cfg, weights):
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_published_layout_loads_with_the_reference_logits(shape, tmp_path, recwarn):
    cfg = HF_SHAPES[shape]
    weights = ling.random_weights(cfg, seed=1)
    write(tmp_path, cfg, weights)
    ours = Transformer.from_hf(tmp_path)
    main = cfg["num_hidden_layers"] - cfg["num_nextn_predict_layers"]
    assert layer_plan(ours.config) == [i >= cfg["first_k_dense_replace"] for i in range(main)]
    if cfg["num_nextn_predict_layers"]:
        assert any("multi-token-prediction layer(s) [3]" in str(w.message) for w in recwarn)
    assert_parity(lambda ids: ling.forward(cfg, weights, ids), ours, cfg["vocab_size"])


OUR_SHAPES = {
    "ling-like": ModelConfig(
        vocab_size=64,
        hidden_size=40,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=10,
        intermediate_size=36,
        qk_norm=True,
        rope_fraction=0.4,
        rope_theta=600000.0,
        first_k_dense=1,
        moe=MoEConfig(
            num_experts=8,
            top_k=2,
            expert_ffn_size=12,
            num_shared_experts=1,
            score_func="sigmoid",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            expert_bias=True,
            bias_update="zero_mean",
        ),
    ),
    "no-bias-buffer-biases": ModelConfig(
        vocab_size=53,
        hidden_size=24,
        num_layers=2,
        num_heads=2,
        attention_bias=True,
        attention_out_bias=True,
        tie_embeddings=True,
        moe=MoEConfig(
            num_experts=4, top_k=1, norm_topk_prob=False, expert_ffn_size=20, score_func="sigmoid", backend="eager"
        ),
    ),
}


@pytest.mark.parametrize("shape", OUR_SHAPES)
def test_export_matches_the_reference_and_loads_back_exactly(shape, tmp_path):
    torch.manual_seed(0)
    ours = randomize_(Transformer(OUR_SHAPES[shape]), seed=2, stacked_in_dim=True).eval()
    ours.save_pretrained(tmp_path, format="hf")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"]) == ("bailing_moe", ["BailingMoeV2ForCausalLM"])
    weights = load_file(tmp_path / "model.safetensors")
    assert all(weights[n].dtype == torch.float32 for n in weights if n.endswith("gate.expert_bias"))
    assert_parity(lambda ids: ling.forward(cfg, weights, ids), ours, ours.config.vocab_size)
    again = Transformer.from_hf(tmp_path)
    for name, tensor in again.state_dict().items():
        if name in ours.state_dict():
            assert torch.equal(ours.state_dict()[name], tensor), name
        else:  # our model had no selection bias: the export wrote zeros, which change nothing
            assert name.endswith("expert_bias") and not tensor.any()

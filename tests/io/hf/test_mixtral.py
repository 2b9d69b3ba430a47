"""Mixtral: logits and greedy continuations match transformers' MixtralForCausalLM both ways."""

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers", reason="parity tests need transformers (pip install -e '.[dev]')")

from hf_utils import assert_parity, hf_logits, randomize_  # noqa: E402

from moe import ModelConfig, MoEConfig, Transformer  # noqa: E402

HF_SHAPES = {
    "base": dict(
        vocab_size=64,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "odd-top3": dict(
        vocab_size=97,
        hidden_size=36,
        intermediate_size=20,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        num_local_experts=8,
        num_experts_per_tok=3,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    ),
    "head-dim-tied-top1": dict(
        vocab_size=50,
        hidden_size=30,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=6,
        num_experts_per_tok=1,
        tie_word_embeddings=True,
    ),
}


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_hf_checkpoint_loads_with_the_same_logits(shape, tmp_path):
    torch.manual_seed(0)
    hf = randomize_(transformers.MixtralForCausalLM(transformers.MixtralConfig(**HF_SHAPES[shape])), seed=1).eval()
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_hf(tmp_path)
    assert ours.config.moe.num_experts == HF_SHAPES[shape]["num_local_experts"]
    assert ours.config.tie_embeddings == HF_SHAPES[shape].get("tie_word_embeddings", False)
    assert_parity(hf_logits(hf), ours, HF_SHAPES[shape]["vocab_size"])


OUR_SHAPES = {
    "base": ModelConfig(
        vocab_size=64,
        hidden_size=24,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        norm_eps=1e-5,
        rope_theta=1e6,
        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=40),
    ),
    "odd": ModelConfig(
        vocab_size=61,
        hidden_size=45,
        num_layers=3,
        num_heads=5,
        head_dim=12,
        tie_embeddings=True,
        moe=MoEConfig(num_experts=5, top_k=2, expert_ffn_size=28, backend="eager"),
    ),
}


@pytest.mark.parametrize("shape", OUR_SHAPES)
def test_export_loads_in_transformers_with_the_same_logits(shape, tmp_path):
    torch.manual_seed(0)
    ours = randomize_(Transformer(OUR_SHAPES[shape]), seed=2, stacked_in_dim=True).eval()
    ours.save_pretrained(tmp_path, format="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert_parity(hf_logits(hf), ours, ours.config.vocab_size)
    again = Transformer.from_hf(tmp_path)
    assert again.state_dict().keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_stacked_expert_layout_of_transformers_v5_loads_too(tmp_path):
    """transformers v5 keeps experts stacked in memory and can save them so (save_original_format=False)."""
    hf = randomize_(transformers.MixtralForCausalLM(transformers.MixtralConfig(**HF_SHAPES["base"])), seed=3).eval()
    hf.save_pretrained(tmp_path, save_original_format=False)
    names = load_file(tmp_path / "model.safetensors").keys()
    if "model.layers.0.mlp.experts.gate_up_proj" not in names:
        pytest.skip(f"transformers {transformers.__version__} writes no stacked expert layout")
    assert_parity(hf_logits(hf), Transformer.from_hf(tmp_path), HF_SHAPES["base"]["vocab_size"])

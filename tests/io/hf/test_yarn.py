"""YaRN RoPE: our frequencies and attention factor equal transformers' for the settings in use."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="parity tests need transformers (pip install -e '.[dev]')")

from moe import ModelConfig, MoEConfig  # noqa: E402
from moe.attention import MLAttention  # noqa: E402
from moe.rope import rope_frequencies  # noqa: E402

CASES = {
    "deepseek-v3": dict(
        factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0
    ),
    "qwen3-128k": dict(factor=4.0, original_max_position_embeddings=32768),
    "mscales-differ": dict(factor=8.0, original_max_position_embeddings=512, mscale=0.9, mscale_all_dim=0.7),
    "untruncated-betas": dict(
        factor=16.0, original_max_position_embeddings=2048, beta_fast=16, beta_slow=2, truncate=False
    ),
    "explicit-factor": dict(factor=2.0, original_max_position_embeddings=1024, attention_factor=1.25),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dim, theta", [(64, 10000.0), (32, 1e6)])
def test_frequencies_and_attention_factor_match_transformers(case, dim, theta):
    params = CASES[case]
    hf_config = transformers.Qwen3MoeConfig(
        hidden_size=dim * 2,
        num_attention_heads=2,
        head_dim=dim,
        max_position_embeddings=params["original_max_position_embeddings"] * 4,
        rope_theta=theta,
        rope_scaling={"rope_type": "yarn", **params},
    )
    yarn = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"]
    expected_freq, expected_factor = yarn(hf_config, None)  # (config, device) in transformers 4 and 5
    freq, factor = rope_frequencies(dim, theta, {"type": "yarn", **params})
    torch.testing.assert_close(freq, expected_freq.float(), rtol=1e-6, atol=0)
    assert math.isclose(factor, expected_factor, rel_tol=1e-12)


def test_mla_softmax_scale_grows_by_mscale_all_dim_squared():
    base = dict(
        hidden_size=32,
        num_heads=2,
        attention="mla",
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        moe=MoEConfig(num_experts=2, top_k=1),
    )
    plain = MLAttention(ModelConfig(**base), 0).scale
    scaling = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale_all_dim": 1.0}
    yarn = MLAttention(ModelConfig(**base, rope_scaling=scaling), 0).scale
    assert plain == 12**-0.5
    assert math.isclose(yarn, plain * (0.1 * math.log(40.0) + 1) ** 2)

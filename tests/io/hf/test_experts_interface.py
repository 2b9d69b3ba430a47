"""experts_implementation="moe_kernels": our fused expert FFN inside transformers' Mixtral, Qwen3-MoE
and DeepSeek-V3 gives the logits and gradients of transformers' own eager experts loop.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1, so "triton" here is moe_kernels.expert_ffn
through the Triton interpreter on CPU tensors; "torch" is the F.grouped_mm fallback, forced.
"""

import os
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the experts interface needs transformers")
pytest.importorskip("transformers.integrations.moe", reason="the experts interface needs transformers >= 5")

from hf_utils import ATOL, randomize_  # noqa: E402

from moe.errors import InputError  # noqa: E402
from moe.extras import MissingExtra  # noqa: E402
from moe.io.hf import experts_interface  # noqa: E402

# Tiny fp32 checkpoints of each family: odd sizes (not tile multiples), a dense first layer and
# grouped routing for DeepSeek-V3. The Triton interpreter is slow: keep T and the widths small.
FAMILIES = {
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(
            vocab_size=48,
            hidden_size=24,
            intermediate_size=12,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(
            vocab_size=40,
            hidden_size=24,
            intermediate_size=28,
            moe_intermediate_size=10,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=8,
            num_experts=5,
            num_experts_per_tok=3,
            norm_topk_prob=True,
        ),
    ),
    "deepseek_v3": (
        transformers.DeepseekV3Config,
        transformers.DeepseekV3ForCausalLM,
        dict(
            vocab_size=44,
            hidden_size=24,
            intermediate_size=30,
            moe_intermediate_size=14,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            q_lora_rank=12,
            kv_lora_rank=8,
            qk_nope_head_dim=4,
            qk_rope_head_dim=4,
            v_head_dim=6,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            n_shared_experts=1,
        ),
    ),
}


def experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "gate_up_proj")]


def run(model, ids, probe):
    """Logits, and the gradients of a fixed linear function of them: (logits, d embeddings, d experts)."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    (logits * probe).sum().backward()
    expert_grads = [p.grad for m in experts_modules(model) for p in (m.gate_up_proj, m.down_proj)]
    return logits.detach(), embeds.grad, expert_grads


@pytest.fixture(autouse=True)
def registered():
    experts_interface.register()


@pytest.fixture(params=["kernels", "torch-fallback"])
def path(request, monkeypatch):
    """The path the experts must take: the kernels where they run here, or the torch fallback, forced."""
    if request.param == "torch-fallback":
        monkeypatch.setattr(experts_interface, "_triton_unavailable", lambda device, dtype: "forced by the test")
        return "torch"
    return experts_interface.kernel_path(torch.device("cpu"), torch.float32)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_match_transformers_eager(family, path, tmp_path):
    config_class, model_class, shape = FAMILIES[family]
    torch.manual_seed(0)
    randomize_(model_class(config_class(**shape)), seed=1).save_pretrained(tmp_path)
    load = transformers.AutoModelForCausalLM.from_pretrained
    eager = load(tmp_path, experts_implementation="eager", dtype=torch.float32)
    ours = load(tmp_path, experts_implementation=experts_interface.NAME, dtype=torch.float32)
    ids = torch.randint(0, shape["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(2))
    probe = torch.randn(2, 5, shape["vocab_size"], generator=torch.Generator().manual_seed(3))

    expected = run(eager, ids, probe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(ours, ids, probe)

    ran = {m.moe_kernels_path for m in experts_modules(ours)}
    assert ran == {path}, f"expected every experts module on {path!r}, ran {ran}"
    assert not any(hasattr(m, "moe_kernels_path") for m in experts_modules(eager))
    fallback_warnings = [w for w in caught if experts_interface.NAME in str(w.message)]
    assert bool(fallback_warnings) == (path == "torch")

    assert expected[0].std() > 0.3, "logits too flat for the comparison to mean anything"
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)
    assert len(got[2]) == len(expected[2]) > 0
    for g, e in zip(got[2], expected[2], strict=True):
        assert e.abs().max() > 1e-3, "an expert weight without gradient tests nothing"
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def mixtral_experts(dtype=torch.float32, **overrides):
    config = transformers.MixtralConfig(
        hidden_size=20, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2, **overrides
    )
    experts = transformers.models.mixtral.modeling_mixtral.MixtralExperts(config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) / 20**0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) / 12**0.5)
    return experts.to(dtype)


def call(experts, implementation, x, index, weights):
    experts.config._experts_implementation = implementation
    return experts(x, index, weights)


def test_the_interpreter_runs_the_kernels_on_cpu_when_asked():
    """What the comparisons above ran: the Triton path whenever the interpreter is on (no CUDA here)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU kernels need TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")
    assert experts_interface.kernel_path(torch.device("cpu"), torch.float32) == ("triton", "moe_kernels.moe_ffn")
    path, reason = experts_interface.kernel_path(torch.device("cpu"), torch.bfloat16)
    assert path == "torch" and "bfloat16" in reason


def test_bfloat16_on_cpu_falls_back_to_torch_and_says_why():
    experts = mixtral_experts(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 20, generator=g).bfloat16()
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(7)])
    weights = torch.rand(7, 2, generator=g)
    with pytest.warns(RuntimeWarning, match="using torch"):
        got = call(experts, experts_interface.NAME, x, index, weights)
    assert experts.moe_kernels_path == "torch"  # CPU kernels run only through the interpreter, which lacks bf16
    expected = call(experts.float(), "eager", x.float(), index, weights)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_expert_parallel_sentinels_come_out_as_zeros():
    """transformers' EP marks assignments of experts on other ranks with id E and weight 0."""
    experts = mixtral_experts()
    experts._is_expert_parallel = True
    x = torch.randn(5, 20, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([[0, 4], [4, 4], [1, 3], [4, 2], [3, 0]])
    weights = torch.where(index == 4, 0.0, torch.rand(5, 2, generator=torch.Generator().manual_seed(3)))
    got = call(experts, experts_interface.NAME, x, index, weights)
    expected = call(experts, "eager", x, index, weights)
    assert got[1].abs().max() == 0  # both of token 1's experts live elsewhere
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_layout_the_kernels_do_not_compute_is_refused_by_name():
    experts = mixtral_experts(hidden_act="gelu")
    x, index, weights = torch.randn(3, 20), torch.tensor([[0, 1]] * 3), torch.full((3, 2), 0.5)
    with pytest.raises(InputError, match="MixtralExperts has activation GELUActivation"):
        call(experts, experts_interface.NAME, x, index, weights)


def test_register_is_idempotent_and_the_name_is_selectable():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert experts_interface.register() == experts_interface.register() == "moe_kernels"
    assert ALL_EXPERTS_FUNCTIONS["moe_kernels"] is experts_interface.experts_forward
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**FAMILIES["mixtral"][2]))
    model.set_experts_implementation("moe_kernels")
    assert model.config._experts_implementation == "moe_kernels"


def test_a_transformers_without_the_experts_interface_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers.integrations.moe", None)  # as in transformers 4.x
    with pytest.raises(MissingExtra, match=r"transformers >= 5\.0 .*found " + transformers.__version__):
        experts_interface.register()

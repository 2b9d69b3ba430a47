"""The router's aux-loss-free state stays float32 whatever dtype the model is converted to."""

import pytest
import torch

from moe import ModelConfig, MoE, MoEConfig, Transformer, update_expert_biases
from moe.router import Router

BIASED = MoEConfig(num_experts=4, top_k=2, score_func="sigmoid", expert_bias=True, bias_update_rate=1e-3)

CONVERSIONS = {
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
    "half()": lambda m: m.half(),
    "bfloat16()": lambda m: m.bfloat16(),
    "to(device, dtype)": lambda m: m.to("cpu", torch.bfloat16),
    "double()": lambda m: m.double(),
}


def small_model() -> Transformer:
    return Transformer(
        ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=16, moe=BIASED)
    )


@pytest.mark.parametrize("convert", CONVERSIONS.values(), ids=CONVERSIONS.keys())
def test_conversions_keep_the_bias_and_the_load_counter_exact(convert):
    model = small_model()
    layer = model.moe_layers()[0]
    bias = torch.tensor([0.5123, -0.25, 1e-4, 3.0])  # 0.5123 and 1e-4 are not bf16 numbers
    layer.router.expert_bias.copy_(bias)
    convert(model)
    assert layer.router.weight.dtype != torch.float32  # the gate weight follows the dtype ...
    assert layer.router.expert_bias.dtype == torch.float32  # ... the bias keeps its values
    assert torch.equal(layer.router.expert_bias, bias)
    assert layer.load_since_update.dtype == torch.int64  # counts: integers, untouched by dtype conversions
    assert model.state_dict()["layers.0.ffn.router.expert_bias"].dtype == torch.float32


def test_bf16_model_takes_bias_steps_of_1e_3_and_still_runs():
    torch.manual_seed(0)
    model = small_model().to(torch.bfloat16).train()
    layer = model.moe_layers()[0]
    layer.router.expert_bias.fill_(0.5)  # near 0.5 bf16 steps by 2**-9 ~ 2e-3: a 1e-3 step would vanish
    before = layer.router.expert_bias.clone()
    logits = model(torch.randint(0, 32, (2, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    (logits.float().square().mean() + model.aux_loss()).backward()
    update_expert_biases(model)
    step = layer.router.expert_bias - before
    # sign update: +-rate per expert (fp32 rounding at 0.5 is 6e-8); a bf16 bias would move by 0 or 2**-9
    assert step.abs().max().item() == pytest.approx(1e-3, rel=1e-4)
    assert layer.router.expert_bias.dtype == torch.float32
    assert model(torch.randint(0, 32, (1, 4))).dtype == torch.bfloat16


def test_bf16_checkpoint_round_trip_keeps_the_fp32_bias(tmp_path):
    model = small_model()
    for layer in model.moe_layers():
        layer.router.expert_bias.copy_(torch.tensor([0.5123, -0.25, 1e-4, 3.0]))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    loaded = Transformer.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    for name, tensor in model.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == (torch.float32 if name.endswith("expert_bias") else torch.bfloat16), name
        assert torch.equal(got, tensor), name


def test_router_on_the_meta_device_converts_without_data():
    with torch.device("meta"):
        router = Router(BIASED, 8)
    router.to(torch.bfloat16)
    assert router.expert_bias.is_meta and router.expert_bias.dtype == torch.float32
    router.to_empty(device="cpu")
    assert router.expert_bias.device.type == "cpu" and router.expert_bias.dtype == torch.float32


def test_layer_without_bias_converts_normally():
    layer = MoE(MoEConfig(num_experts=4, top_k=2), 8).to(torch.bfloat16)
    assert layer.router.expert_bias is None
    assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16

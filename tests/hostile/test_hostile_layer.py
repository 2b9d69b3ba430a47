"""The MoE layer and the decoder on degenerate input: zero tokens, NaN and inf, the wrong dtype,
device or shape, token ids outside the vocabulary. What each does is in MoE's and
Transformer.forward's docstrings."""

import pytest
import torch

from moe import ModelConfig, MoE, MoEConfig, Transformer, update_expert_biases
from moe.errors import InputError

D = 16
# Every switch whose arithmetic divides by the batch: all three losses, the bias, shared experts.
EVERYTHING = dict(
    num_experts=8,
    top_k=2,
    score_func="sigmoid",
    n_group=2,
    topk_group=1,
    num_shared_experts=1,
    aux_loss_coef=0.01,
    seq_aux_loss_coef=0.01,
    z_loss_coef=0.01,
    expert_bias=True,
    bias_update_rate=1e-3,
)
CONFIGS = {
    "dropless": EVERYTHING,
    "static": {**EVERYTHING, "capacity_factor": 1.0},
    "dynamic": {**EVERYTHING, "capacity_factor": 0.5, "capacity_mode": "dynamic", "score_func": "softmax"},
    "eager": {**EVERYTHING, "backend": "eager"},
}


def make_layer(**overrides) -> MoE:
    torch.manual_seed(0)
    layer = MoE(MoEConfig(**{**EVERYTHING, **overrides}), D).train()
    layer.router.expert_bias.normal_(std=0.1)
    return layer


# --------------------------------------------------------------------------- zero tokens


@pytest.mark.parametrize("shape", [(0, D), (3, 0, D), (0, 5, D), (2, 0, 4, D)], ids=str)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_zero_tokens_give_an_empty_output_zero_losses_and_no_nan(shape, config):
    layer = make_layer(**config)
    bias_before = layer.router.expert_bias.clone()
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert layer.aux_loss.item() == 0.0  # exactly: a mean over no tokens adds nothing
    stats = layer.stats
    assert set(stats) == {"load", "drop_rate", "switch_aux", "seq_aux", "z_loss"}
    assert torch.equal(stats["load"], torch.zeros(8))
    assert all(stats[k] == 0.0 for k in ("drop_rate", "switch_aux", "seq_aux", "z_loss"))

    (out.sum() + layer.aux_loss).backward()
    assert x.grad.shape == x.shape
    for name, p in layer.named_parameters():
        assert p.grad is None or (torch.isfinite(p.grad).all() and p.grad.abs().max() == 0), name

    assert torch.equal(layer.load_since_update, torch.zeros(8, dtype=torch.long))
    layer.update_expert_bias()
    assert torch.equal(layer.router.expert_bias, bias_before)  # nothing was counted: no step


def test_zero_tokens_in_eval_mode_and_under_no_grad():
    layer = make_layer().eval()
    with torch.no_grad():
        assert layer(torch.randn(0, D)).shape == (0, D)
    assert layer.aux_loss.item() == 0.0


def test_a_batch_of_zero_tokens_leaves_the_next_batchs_statistics_alone():
    layer = make_layer()
    x = torch.randn(4, 6, D)
    layer(x)
    want_load, want_loss = layer.stats["load"], layer.aux_loss.item()
    layer.load_since_update.zero_()
    layer(torch.randn(0, D))
    layer(x)
    torch.testing.assert_close(layer.stats["load"], want_load)
    assert layer.aux_loss.item() == pytest.approx(want_loss, rel=1e-6)
    assert layer.load_since_update.sum() == x.shape[0] * x.shape[1] * 2


# --------------------------------------------------------------------------- NaN and inf


def poisoned(T: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] whose tokens 1 and 5 are NaN in one element, token 8 is +inf: (x, finite_T)."""
    torch.manual_seed(1)
    x = torch.randn(T, D)
    x[1, 3] = float("nan")
    x[5, 0] = float("nan")
    x[8, 7] = float("inf")
    finite = torch.ones(T, dtype=torch.bool)
    finite[[1, 5, 8]] = False
    return x, finite


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_nan_and_inf_stay_in_the_rows_of_the_tokens_that_had_them(backend):
    layer = make_layer(backend=backend)  # dropless: a poisoned token takes no other token's slot
    x, finite = poisoned()
    out = layer(x)
    assert torch.isnan(out[~finite]).all(dim=-1).any()  # poisoned rows are poisoned ...
    assert torch.isfinite(out[finite]).all()  # ... the others are finite,
    torch.testing.assert_close(out[finite], layer(x[finite]), rtol=1e-5, atol=1e-6)  # and as without them


def test_nan_in_the_batch_makes_the_losses_nan_for_the_training_loop_to_see():
    layer = make_layer()
    layer(poisoned()[0])
    assert torch.isnan(layer.aux_loss)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_bias_update_counts_only_finite_tokens_and_stays_finite(config):
    layer = make_layer(**config)
    x, finite = poisoned()
    layer(x)
    # Before: every routed assignment counted, the NaN tokens' arbitrary choices included.
    assert layer.load_since_update.sum() == int(finite.sum()) * layer.config.top_k
    clean = make_layer(**config)
    clean(x[finite])
    assert torch.equal(layer.load_since_update, clean.load_since_update)
    layer.update_expert_bias()
    assert torch.isfinite(layer.router.expert_bias).all()


def test_an_all_nan_batch_moves_no_bias():
    layer = make_layer()
    before = layer.router.expert_bias.clone()
    layer(torch.full((6, D), float("nan")))
    layer(torch.full((6, D), float("-inf")))
    assert layer.load_since_update.sum() == 0
    update_expert_biases(layer)
    assert torch.equal(layer.router.expert_bias, before)


# --------------------------------------------------------------------------- wrong dtype, device, shape


def refuses(layer: MoE, x: torch.Tensor, *parts: str) -> None:
    """InputError whose message names every part, raised before the layer computed anything."""
    with pytest.raises(InputError) as err:
        layer(x)
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    assert layer._stats == {} and layer.load_since_update.sum() == 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_non_float_input_is_refused(dtype):
    refuses(make_layer(), torch.zeros(3, D, dtype=dtype), "torch.float32", str(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_float_input_of_another_dtype_is_refused(dtype):
    refuses(make_layer(), torch.randn(3, D).to(dtype), "torch.float32", str(dtype))


def test_a_bf16_layer_refuses_fp32_input():
    layer = make_layer().to(torch.bfloat16)
    refuses(layer, torch.randn(3, D), "torch.bfloat16", "torch.float32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_autocast_sets_the_compute_dtype_so_it_takes_what_it_casts(dtype):
    layer = make_layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(3, D, dtype=dtype))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        refuses(make_layer(), torch.randn(3, D, dtype=torch.float64), "torch.float32", "torch.float64")


def test_input_on_another_device_is_refused():
    refuses(make_layer(), torch.empty(3, D, device="meta"), "cpu", "meta")


@pytest.mark.parametrize("shape", [(3, D + 1), (D, 3), ()], ids=str)
def test_input_of_the_wrong_width_is_refused(shape):
    refuses(make_layer(), torch.randn(shape), f"[..., {D}]", str(tuple(shape)))


# --------------------------------------------------------------------------- the decoder's token ids


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=16, moe=MoEConfig(4, 2))
    return Transformer(cfg)


@pytest.mark.parametrize(
    "ids, parts",
    [
        (torch.tensor([[1, 2, 32]]), ["token id 32 at [0, 2]", "0..31"]),
        (torch.tensor([[1, 2], [3, -1]]), ["token id -1 at [1, 1]", "0..31"]),
        (torch.tensor([[1, 2**40]]), [str(2**40)]),
        (torch.tensor([1, 2, 3]), ["[batch, tokens]", "(3,)"]),
        (torch.zeros(1, 2, 3, dtype=torch.long), ["[batch, tokens]", "(1, 2, 3)"]),
        (torch.tensor([[1.0, 2.0]]), ["int64 or int32", "torch.float32"]),
        (torch.tensor([[True]]), ["torch.bool"]),
        (torch.zeros(1, 2, dtype=torch.long, device="meta"), ["cpu", "meta"]),
    ],
    ids=["past-vocab", "negative", "huge", "1-D", "3-D", "float", "bool", "device"],
)
def test_bad_token_ids_are_refused(model, ids, parts):
    cache = model.new_cache()
    with pytest.raises(InputError) as err:
        model(ids, cache)
    for part in parts:
        assert part in str(err.value), (part, str(err.value))
    assert cache.seq_len == 0 and cache.layers == [None, None]  # refused before anything ran


def test_int32_ids_and_empty_batches_are_taken(model):
    ids = torch.tensor([[1, 31, 0]])
    torch.testing.assert_close(model(ids.int()), model(ids))
    assert model(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 32)
    assert model(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 32)

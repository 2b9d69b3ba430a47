import pytest
import torch

from moe import ModelConfig, MoE, MoEConfig, Transformer, layer_plan
from moe.errors import InputError
from moe.mlp import MLP
from moe.rope import Rotary

D, M = False, True


@pytest.mark.parametrize(
    "kwargs, plan",
    [
        (dict(num_layers=4), [M, M, M, M]),
        (dict(num_layers=5, first_k_dense=2), [D, D, M, M, M]),
        (dict(num_layers=6, moe_every=2), [D, M, D, M, D, M]),
        (dict(num_layers=7, first_k_dense=1, moe_every=3), [D, D, D, M, D, D, M]),
        (dict(num_layers=12, moe_pattern="2-4-2-4"), [D, D, M, M, M, M] * 2),
        (dict(num_layers=8, moe_pattern="1-2"), [D, M, M, D, M, M, D, M]),
        (dict(num_layers=4, moe_layers=[1, 3]), [D, M, D, M]),
        (dict(num_layers=3, moe=None), [D, D, D]),
    ],
)
def test_layer_plans(kwargs, plan):
    cfg = ModelConfig(**kwargs)
    assert layer_plan(cfg) == plan
    model = Transformer(cfg)
    assert [isinstance(b.ffn, MoE) for b in model.layers] == plan
    assert all(isinstance(b.ffn, MLP) for b, m in zip(model.layers, plan) if not m)


def small(**kw):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=32,
        first_k_dense=1,
        moe=MoEConfig(
            num_experts=4, top_k=2, num_shared_experts=1, score_func="sigmoid", expert_bias=True, aux_loss_coef=0.01
        ),
    )
    base.update(kw)
    return ModelConfig(**base)


MLA = dict(
    attention="mla",
    q_lora_rank=16,
    kv_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    rope_interleave=True,
    num_kv_heads=None,
)
VARIANTS = {
    "gqa": {},
    "mha-qknorm-partial-rope": dict(num_kv_heads=None, qk_norm=True, rope_fraction=0.5),
    "mla": MLA,
    "mla-no-q-lora": {**MLA, "q_lora_rank": None},
    "tied-bias": dict(tie_embeddings=True, attention_bias=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shape_and_causality(variant):
    torch.manual_seed(0)
    model = Transformer(small(**VARIANTS[variant])).eval()
    ids = torch.randint(0, 64, (2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, 64)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 64
    torch.testing.assert_close(model(changed)[:, :6], logits[:, :6])
    assert not torch.allclose(model(changed)[:, 6:], logits[:, 6:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_matches_full_recomputation(variant):
    torch.manual_seed(0)
    model = Transformer(small(**VARIANTS[variant])).eval()
    ids = torch.randint(0, 64, (2, 12))
    full = model(ids)
    cache = model.new_cache()
    pieces = [model(ids[:, :5], cache)]  # a prompt, then a chunk, then single tokens
    pieces.append(model(ids[:, 5:8], cache))
    for t in range(8, 12):
        pieces.append(model(ids[:, t : t + 1], cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.seq_len == 12


@pytest.mark.parametrize("interleave", [False, True])
def test_rope_scores_depend_only_on_relative_position(interleave):
    torch.manual_seed(0)
    rope = Rotary(8, 10000.0, interleave)
    q, k = torch.randn(1, 1, 1, 12), torch.randn(1, 1, 1, 12)

    def score(pq, pk):
        cq, sq = rope.angles(torch.tensor([pq]))
        ck, sk = rope.angles(torch.tensor([pk]))
        return (rope(q, cq, sq) * rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(3, 1), score(10, 8))
    assert not torch.allclose(score(3, 1), score(3, 2))
    cos, sin = rope.angles(torch.tensor([5]))
    assert torch.equal(rope(q, cos, sin)[..., 8:], q[..., 8:])  # partial: the tail passes through
    torch.testing.assert_close(rope(q, cos, sin).norm(), q.norm())  # rotations keep the norm


def test_aux_loss_sums_the_moe_layers():
    torch.manual_seed(0)
    model = Transformer(small(num_layers=4))
    model(torch.randint(0, 64, (2, 8)))
    layers = model.moe_layers()
    assert len(layers) == 3
    expected = sum(m.aux_loss for m in layers)
    torch.testing.assert_close(model.aux_loss(), expected)
    assert model.aux_loss() > 0
    dense = Transformer(small(moe=None))
    dense(torch.randint(0, 64, (1, 4)))
    assert dense.aux_loss().item() == 0.0


def test_model_trains_a_step_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = Transformer(small(num_layers=2, first_k_dense=0))
    ids = torch.randint(0, 64, (4, 16))
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + model.aux_loss()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_input_ids_must_be_2d():
    model = Transformer(small())
    with pytest.raises(InputError, match=r"input_ids must be \[batch, tokens\]"):
        model(torch.zeros(5, dtype=torch.long))


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    model = Transformer(small()).to(torch.bfloat16)
    inv_freq = model.layers[0].attn.rotary.inv_freq
    assert inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq, Transformer(small()).layers[0].attn.rotary.inv_freq)
    assert model.embed_tokens.weight.dtype == torch.bfloat16

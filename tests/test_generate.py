import pytest
import torch
from train_helpers import micro_config

from moe import Transformer
from moe.errors import InputError
from moe.generate import decode, generate, sample_next

MLA = dict(
    attention="mla",
    q_lora_rank=16,
    kv_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    rope_interleave=True,
)


def model_for(attention: str, **config) -> Transformer:
    torch.manual_seed(0)
    return Transformer(micro_config(**(MLA if attention == "mla" else {}), **config)).eval()


@pytest.mark.parametrize("attention", ["gqa", "mla"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_decoding_gives_the_logits_of_full_recomputation(attention, temperature):
    model = model_for(attention)
    prompt = torch.randint(0, 256, (2, 5))
    generator = torch.Generator().manual_seed(1)
    ids, logits = generate(model, prompt, 12, temperature=temperature, generator=generator, return_logits=True)
    assert ids.shape == (2, 17) and logits.shape == (2, 12, 256)
    assert torch.equal(ids[:, :5], prompt)
    with torch.no_grad():
        full = model(ids[:, :-1])[:, 4:]  # logits that predicted each new token, recomputed without a cache
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-5)
    if temperature == 0:
        assert torch.equal(ids[:, 5:], full.argmax(dim=-1))


def test_the_window_slides_past_max_seq_len():
    model = model_for("gqa")  # max_seq_len 32
    prompt = torch.randint(0, 256, (1, 20))
    ids, logits = generate(model, prompt, 30, temperature=0.0, return_logits=True)
    assert ids.shape == (1, 50)
    # The cache is full once it holds 32 tokens: token 33 is predicted from the last 16, read afresh.
    with torch.no_grad():
        before, after = model(ids[:, :32])[:, -1], model(ids[:, 17:33])[:, -1]
    torch.testing.assert_close(logits[:, 12], before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[:, 13], after, rtol=1e-4, atol=1e-5)


def test_sampling_is_reproducible_and_respects_top_k():
    model = model_for("gqa")
    prompt = torch.randint(0, 256, (3, 4))
    runs = [generate(model, prompt, 10, 1.0, None, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*runs)
    greedy = generate(model, prompt, 10, temperature=0.0)
    assert torch.equal(generate(model, prompt, 10, 1.0, top_k=1, generator=torch.Generator().manual_seed(3)), greedy)
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    draws = {int(sample_next(logits, 2.0, 2, torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {1, 2}


def test_bad_prompts_are_refused():
    model = model_for("gqa", vocab_size=128)
    with pytest.raises(InputError, match=r"prompt token id 200 is outside the vocabulary \(vocab_size 128\)"):
        generate(model, torch.tensor([[5, 200]]), 3)
    with pytest.raises(InputError, match="at least one token"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)


def test_decode_replaces_what_is_not_utf8():
    assert decode(list("héllo".encode())) == "héllo"
    assert decode([104, 0xFF, 105, 300]) == "h\ufffdi\ufffd"

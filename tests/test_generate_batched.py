"""generate_batch: prompts of different lengths decoded together, left-padded with per-row
positions and an attention mask. Equality with decoding each prompt alone holds for dropless
MoE layers (these configs: capacity_factor None) and dense ones; with a capacity limit the rows'
tokens compete for expert slots, so no such equality is claimed."""

import pytest
import torch
from test_generate import model_for

from moe.errors import InputError
from moe.generate import generate, generate_batch

PROMPTS = [[5, 17, 99, 3, 250, 8, 41], [77], [1, 2, 3]]


def alone(model, prompt, n, **kwargs):
    return generate(model, torch.tensor([prompt]), n, temperature=0.0, **kwargs)[0, len(prompt) :].tolist()


@pytest.mark.parametrize("attention", ["gqa", "mla"])
@pytest.mark.parametrize("moe", [True, False])
@pytest.mark.parametrize("static_cache", [False, True])
def test_greedy_batch_equals_each_prompt_alone(attention, moe, static_cache):
    model = model_for(attention, **({} if moe else {"moe": None}))
    assert model.moe_layers() if moe else not model.moe_layers()
    got = generate_batch(model, PROMPTS, 10, temperature=0.0, static_cache=static_cache)
    assert got == [alone(model, p, 10) for p in PROMPTS]


def test_tensor_prompts_and_per_row_limits():
    model = model_for("gqa")
    got = generate_batch(model, [torch.tensor(p) for p in PROMPTS], [4, 0, 9], temperature=0.0)
    assert [len(g) for g in got] == [4, 0, 9]
    assert got[0] == alone(model, PROMPTS[0], 4) and got[2] == alone(model, PROMPTS[2], 9)


def test_each_row_stops_at_its_first_stop_id():
    model = model_for("gqa")
    free = generate_batch(model, PROMPTS, 12, temperature=0.0)
    stop = free[0][3]  # row 0 draws it at step 4
    got = generate_batch(model, PROMPTS, 12, temperature=0.0, stop_ids=[stop])
    for row, full in zip(got, free):
        cut = full[: full.index(stop) + 1] if stop in full else full
        assert row == cut
    assert got[0] == free[0][:4]


def test_generate_stops_once_every_row_drew_a_stop_id():
    model = model_for("gqa")
    prompt = torch.tensor([PROMPTS[0]])
    free = generate(model, prompt, 12, temperature=0.0)
    stop = int(free[0, len(PROMPTS[0]) + 2])
    ids, logits = generate(model, prompt, 12, temperature=0.0, stop_ids=[stop], return_logits=True)
    assert torch.equal(ids, free[:, : len(PROMPTS[0]) + 3]) and logits.shape[1] == 3


def test_sampling_is_reproducible_and_greedy_at_top_k_1():
    model = model_for("mla")
    runs = [generate_batch(model, PROMPTS, 6, 1.0, None, torch.Generator().manual_seed(4)) for _ in range(2)]
    assert runs[0] == runs[1] and [len(r) for r in runs[0]] == [6, 6, 6]
    top1 = generate_batch(model, PROMPTS, 6, 1.0, top_k=1, generator=torch.Generator().manual_seed(4))
    assert top1 == generate_batch(model, PROMPTS, 6, temperature=0.0)


def test_the_window_slides_for_the_whole_batch():
    """max_seq_len 32: the longest row (7 prompt tokens) fills it after 25 new tokens; the batch
    then re-reads its last 16 columns, in the growing and in the static cache alike."""
    model = model_for("gqa")
    growing = generate_batch(model, PROMPTS, 40, temperature=0.0)
    static = generate_batch(model, PROMPTS, 40, temperature=0.0, static_cache=True)
    assert growing == static and [len(g) for g in growing] == [40, 40, 40]
    assert growing[0] == alone(model, PROMPTS[0], 40)  # the longest row slides as it would alone


def test_bad_batches_are_refused():
    model = model_for("gqa")
    with pytest.raises(InputError, match="prompt 1 is empty"):
        generate_batch(model, [[1], []], 3)
    with pytest.raises(InputError, match="outside the vocabulary"):
        generate_batch(model, [[1], [256]], 3)
    with pytest.raises(InputError, match="one per prompt"):
        generate_batch(model, [[1], [2]], [3])
    assert generate_batch(model, [], 3) == []


def test_forward_refuses_positions_and_masks_of_the_wrong_shape():
    model = model_for("gqa")
    ids = torch.randint(0, 256, (2, 3))
    with pytest.raises(InputError, match=r"positions must be \[batch, tokens\] = \[2, 3\]"):
        model(ids, positions=torch.arange(4))
    cache = model.new_cache()
    model(ids, cache)
    with pytest.raises(InputError, match=r"attention_mask must be \[batch, keys\] = \[2, 4\]"):
        model(ids[:, :1], cache, attention_mask=torch.ones(2, 1, dtype=torch.bool))  # the cached keys count too
    with pytest.raises(InputError, match=r"= \[2, 16\]"):
        model(ids, model.new_cache(static=True, batch_size=2, max_len=16), attention_mask=torch.ones(2, 3))


def test_a_padded_row_computes_what_it_computes_alone():
    """The logits, not only the greedy tokens: padding keys get no attention, positions skip them."""
    model = model_for("mla")
    ids = torch.tensor([[0, 0, 0, 9, 8, 7], [1, 2, 3, 4, 5, 6]])
    real = torch.tensor([[False] * 3 + [True] * 3, [True] * 6])
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(ids, attention_mask=real, positions=positions)
        torch.testing.assert_close(padded[0, 3:], model(ids[:1, 3:])[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(padded[1], model(ids[1:])[0], rtol=1e-5, atol=1e-6)
        assert padded.isfinite().all()  # padding queries see their own slot: no all-masked (NaN) row

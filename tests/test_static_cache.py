"""The static (preallocated) KV cache: same logits as the growing cache, and a decode step that
torch.compile captures as one graph (fixed shapes, no graph break)."""

import pytest
import torch
from test_generate import model_for

from moe.attention import StaticKVCache
from moe.errors import InputError


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_static_cache_gives_the_logits_of_the_growing_cache(attention):
    model = model_for(attention)
    ids = torch.randint(0, 256, (2, 12))
    static, growing = model.new_cache(static=True, batch_size=2, max_len=20), model.new_cache()
    assert isinstance(static, StaticKVCache) and static.max_len == 20
    with torch.no_grad():
        chunks = [ids[:, :5], ids[:, 5:6], ids[:, 6:9], *ids[:, 9:].split(1, dim=1)]  # prefill, steps, a chunk
        for chunk in chunks:
            torch.testing.assert_close(model(chunk, static), model(chunk, growing), rtol=1e-5, atol=1e-6)
    assert int(static.index) == growing.seq_len == 12
    static.reset()
    with torch.no_grad():  # reused for another batch: the old keys are masked out
        torch.testing.assert_close(model(ids[:, 3:7], static), model(ids[:, 3:7]), rtol=1e-5, atol=1e-6)


def test_static_cache_needs_a_size():
    model = model_for("gqa")
    with pytest.raises(InputError, match="batch_size"):
        model.new_cache(static=True)
    with pytest.raises(InputError, match="max_len"):
        model.new_cache(static=True, batch_size=1, max_len=0)
    assert model.new_cache(static=True, batch_size=1).max_len == model.config.max_seq_len


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_a_decode_step_compiles_without_graph_breaks(attention):
    model = model_for(attention)
    cache = model.new_cache(static=True, batch_size=2, max_len=16)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 4)), cache)
        explained = torch._dynamo.explain(model)(torch.randint(0, 256, (2, 1)), cache)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_the_compiled_decode_step_runs_every_step_without_recompiling():
    model = model_for("gqa")
    ids = torch.randint(0, 256, (2, 8))
    static, growing = model.new_cache(static=True, batch_size=2, max_len=16), model.new_cache()
    torch._dynamo.reset()
    step = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        model(ids[:, :4], static), model(ids[:, :4], growing)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for t in range(4, 8):
                got = step(ids[:, t : t + 1], static)
                torch.testing.assert_close(got, model(ids[:, t : t + 1], growing), rtol=1e-5, atol=1e-6)

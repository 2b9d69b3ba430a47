"""Self-speculative decoding: exactly plain greedy decoding's output, drafts as the MTP modules
compute them without a cache, cache truncation."""

from __future__ import annotations

import functools

import pytest
import torch
from train_helpers import micro_config

import moe.speculative as spec
from moe import Transformer
from moe.errors import InputError
from moe.generate import generate
from moe.speculative import speculative_generate, truncate_cache
from moe.train import TrainArgs
from moe.train.step import build_optimizer, train_step


def mla_config(**overrides):
    mla = dict(attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8)
    mla["v_head_dim"], mla["rope_interleave"] = 8, True
    return micro_config(**mla, **overrides)


CONFIGS = {
    "gqa": lambda **kw: micro_config(max_seq_len=64, **kw),
    "mla": lambda **kw: mla_config(max_seq_len=64, **kw),
}


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("n_mtp, K", [(1, 1), (1, 3), (2, 2)])
def test_untrained_model_gives_plain_greedy_output(kind, n_mtp, K):
    torch.manual_seed(0)
    model = Transformer(CONFIGS[kind](num_mtp_layers=n_mtp))
    prompt = torch.randint(0, 256, (1, 5))
    out, stats = speculative_generate(model, prompt, 24, draft_len=K)
    assert torch.equal(out, generate(model, prompt, 24, temperature=0))
    assert stats.drafted == K * stats.rounds and 0 <= stats.accepted <= stats.drafted
    # The prompt's forward gives the first token; every round confirms 1 + accepted more.
    assert stats.rounds + stats.accepted + 1 >= 24


@functools.cache
def trained_model(kind: str, steps: int = 25) -> tuple[Transformer, torch.Tensor]:
    """A model briefly trained on a repeating pattern, which its MTP modules learn to predict."""
    torch.manual_seed(1)
    model = Transformer(CONFIGS[kind](num_mtp_layers=2))
    args = TrainArgs(steps=steps, batch_size=4, lr=1e-2, warmup_steps=1)
    opt = build_optimizer(model, args)
    period = torch.randint(0, 256, (7,))
    data = period.repeat(4, 6)[:, :33]

    class Batches:
        def next_batch(self):
            return data[:, :-1], data[:, 1:]

    for _ in range(steps):
        train_step(model, model, opt, Batches(), args, torch.device("cpu"))
    return model, period


@pytest.mark.parametrize("kind", CONFIGS)
def test_trained_model_accepts_drafts_and_still_gives_plain_greedy_output(kind):
    model, period = trained_model(kind)
    prompt = period.repeat(2)[None, :10]
    out, stats = speculative_generate(model, prompt, 30, draft_len=2)
    assert torch.equal(out, generate(model, prompt, 30, temperature=0))
    assert stats.acceptance_rate > 0.5  # the pattern is learnt: most drafts are right
    assert stats.rounds < 30


def reference_drafts(model: Transformer, tokens: list[int], n: int, K: int) -> list[int]:
    """The MTP chain at position n-1 computed from scratch (no cache) over the whole prefix."""
    seq = list(tokens[: n + 1])
    h = model.hidden(torch.tensor([seq[:n]]))
    for k in range(1, K + 1):
        module = model.mtp[min(k, len(model.mtp)) - 1]
        h = module(h, model.embed_tokens(torch.tensor([seq[k : n + k]])), torch.arange(n))
        seq.append(int(model.lm_head(module.norm(h[:, -1])).argmax(-1)))
    return seq[n + 1 :]


@pytest.mark.parametrize("K", [2, 3])
def test_cached_drafts_equal_the_mtp_chain_computed_from_scratch(monkeypatch, K):
    model, period = trained_model("gqa")
    seen = []
    draft = spec._draft

    def checked(model, tokens, n, hs, caches):
        drafts = draft(model, tokens, n, hs, caches)
        seen.append((drafts, reference_drafts(model, tokens, n, K)))
        return drafts

    monkeypatch.setattr(spec, "_draft", checked)
    speculative_generate(model, period.repeat(2)[None, :9], 25, draft_len=K)
    assert len(seen) > 3
    assert all(got == want for got, want in seen)


def test_truncated_cache_continues_as_if_the_cut_tokens_were_never_read():
    torch.manual_seed(2)
    for config in (micro_config(), mla_config()):
        model = Transformer(config).eval()
        x = torch.randint(0, 256, (1, 9))
        with torch.no_grad():
            cut = model.new_cache()
            model(x, cut)
            truncate_cache(cut, 6)
            fresh = model.new_cache()
            model(x[:, :6], fresh)
            extra = torch.randint(0, 256, (1, 2))
            torch.testing.assert_close(model(extra, cut), model(extra, fresh))
        assert cut.seq_len == fresh.seq_len == 8


def test_bad_requests_raise_input_errors():
    model = Transformer(micro_config(num_mtp_layers=1))
    with pytest.raises(InputError, match="MTP modules"):
        speculative_generate(Transformer(micro_config()), torch.zeros((1, 3), dtype=torch.long), 4)
    with pytest.raises(InputError, match=r"\[1, tokens\]"):
        speculative_generate(model, torch.zeros((2, 3), dtype=torch.long), 4)
    with pytest.raises(InputError, match="max_seq_len"):
        speculative_generate(model, torch.zeros((1, 20), dtype=torch.long), 12)
    with pytest.raises(InputError, match="draft_len"):
        speculative_generate(model, torch.zeros((1, 3), dtype=torch.long), 4, draft_len=0)
    out, stats = speculative_generate(model, torch.zeros((1, 3), dtype=torch.long), 0)
    assert out.shape == (1, 3) and stats.rounds == 0


def test_dense_model_without_moe_also_works():
    torch.manual_seed(4)
    model = Transformer(micro_config(moe=None, num_mtp_layers=1, max_seq_len=64))
    prompt = torch.randint(0, 256, (1, 4))
    assert torch.equal(speculative_generate(model, prompt, 10, 2)[0], generate(model, prompt, 10, temperature=0))

import math

import pytest
import torch

from moe import MoEConfig, Router


def make_router(d=6, **kw):
    router = Router(MoEConfig(**kw), d)
    if router.expert_bias is not None:
        router.expert_bias.normal_(std=0.3)
    return router


def reference_gate(x, weight, bias, cfg):
    """The gate written out token by token with Python floats (float64)."""
    idx_out, w_out = [], []
    for row in x.double().tolist():
        logits = [sum(a * b for a, b in zip(row, w)) for w in weight.double().tolist()]
        if cfg.score_func == "softmax":
            m = max(logits)
            exps = [math.exp(z - m) for z in logits]
            scores = [e / sum(exps) for e in exps]
        else:
            scores = [1 / (1 + math.exp(-z)) for z in logits]
        choice = [s + (bias[i] if bias is not None else 0.0) for i, s in enumerate(scores)]
        size = cfg.num_experts // cfg.n_group
        groups = list(range(cfg.n_group))
        if cfg.n_group > 1:
            group_score = [sum(sorted(choice[g * size : (g + 1) * size], reverse=True)[:2]) for g in groups]
            groups = sorted(groups, key=lambda g: -group_score[g])[: cfg.topk_group]
        candidates = [e for g in groups for e in range(g * size, (g + 1) * size)]
        chosen = sorted(candidates, key=lambda e: -choice[e])[: cfg.top_k]
        w = [scores[e] for e in chosen]
        if cfg.norm_topk_prob:
            w = [v / sum(w) for v in w]
        idx_out.append(chosen)
        w_out.append([v * cfg.routed_scaling_factor for v in w])
    return torch.tensor(idx_out), torch.tensor(w_out, dtype=torch.float64)


def test_worked_example_softmax():
    router = make_router(d=4, num_experts=4, top_k=2)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    r = router(torch.tensor([[2.0, 1.0, 0.0, -1.0]]))
    assert r.topk_idx.tolist() == [[0, 1]]
    e = torch.tensor([2.0, 1.0, 0.0, -1.0]).exp()
    torch.testing.assert_close(r.topk_weight, (e[:2] / e[:2].sum())[None], rtol=1e-6, atol=0)
    torch.testing.assert_close(r.probs, (e / e.sum())[None], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_experts=8, top_k=2),  # Mixtral
        dict(num_experts=16, top_k=4, norm_topk_prob=False),  # Qwen3 with norm_topk_prob off
        dict(
            num_experts=16,
            top_k=4,
            score_func="sigmoid",
            expert_bias=True,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
        ),  # DeepSeek-V3 / Ling 2.0 shape
        dict(num_experts=12, top_k=3, score_func="sigmoid", n_group=6, topk_group=3, norm_topk_prob=False),
        dict(num_experts=8, top_k=2, score_func="softmax", n_group=8, topk_group=2),  # groups of one expert
    ],
)
def test_router_matches_token_by_token_reference(kw):
    torch.manual_seed(0)
    router = make_router(**kw)
    x = torch.randn(33, 6)
    r = router(x)
    bias = router.expert_bias.tolist() if router.expert_bias is not None else None
    ref_idx, ref_w = reference_gate(x, router.weight.detach(), bias, router.config)
    assert torch.equal(r.topk_idx, ref_idx)
    torch.testing.assert_close(r.topk_weight.double(), ref_w, rtol=1e-5, atol=1e-7)
    assert r.probs.shape == (33, kw["num_experts"])
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(33))


def test_bias_moves_selection_but_not_weights():
    torch.manual_seed(1)
    router = make_router(num_experts=8, top_k=2, score_func="sigmoid", expert_bias=True, norm_topk_prob=False)
    router.expert_bias.zero_()
    x = torch.randn(50, 6)
    before = router(x)
    router.expert_bias[3] = 10.0  # expert 3 now wins every selection ...
    after = router(x)
    assert (after.topk_idx[:, 0] == 3).all()
    scores = torch.sigmoid(x @ router.weight.detach().t())
    # ... but its weight is still its unbiased score.
    torch.testing.assert_close(after.topk_weight[:, 0], scores[:, 3])
    assert not torch.equal(before.topk_idx, after.topk_idx)


def test_group_limit_hand_case():
    # 4 groups of 2 experts. Group score = sum of its top-2: g0 0.91, g1 1.21, g2 1.0, g3 0.2.
    target = torch.tensor([0.9, 0.01, 0.61, 0.6, 0.5, 0.5, 0.1, 0.1])

    def route(**kw):
        router = make_router(d=8, num_experts=8, top_k=2, score_func="sigmoid", **kw)
        with torch.no_grad():
            router.weight.copy_(torch.eye(8))
        return router(torch.logit(target)[None]).topk_idx.tolist()

    # Only g1 and g2 are eligible, so the single best expert (0, in g0) is not chosen.
    assert route(n_group=4, topk_group=2) == [[2, 3]]
    assert route() == [[0, 2]]


def test_scores_are_fp32_for_low_precision_inputs():
    router = make_router(num_experts=4, top_k=2).to(torch.bfloat16)
    r = router(torch.randn(5, 6, dtype=torch.bfloat16))
    assert r.topk_weight.dtype == r.probs.dtype == r.logits.dtype == torch.float32

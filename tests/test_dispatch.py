import pytest
import torch

from moe.dispatch import combine, expert_load, permute, plan_dispatch, position_in_expert, unpermute


def test_worked_example():
    topk = torch.tensor([[1, 0], [1, 2], [0, 1]])
    plan = plan_dispatch(topk, expert_load(topk, 3))
    assert plan.row_slot.tolist() == [2, 3, 0, 1, 5, 4]
    assert plan.row_token.tolist() == [2, 0, 0, 1, 2, 1]
    assert plan.offs.tolist() == [2, 5, 6] and plan.offs.dtype == torch.int32
    assert expert_load(topk, 3).tolist() == [2, 3, 1]


def reference_positions(experts):
    seen, out = {}, []
    for e in experts:
        out.append(seen.get(e, 0))
        seen[e] = seen.get(e, 0) + 1
    return out


@pytest.mark.parametrize("seed", range(4))
def test_position_in_expert_matches_python(seed):
    g = torch.Generator().manual_seed(seed)
    experts = torch.randint(0, 5, (40,), generator=g)
    pos = position_in_expert(experts, torch.bincount(experts, minlength=5))
    assert pos.tolist() == reference_positions(experts.tolist())


@pytest.mark.parametrize("capacity", [None, [3, 0, 5, 1, 9, 2, 2]])
def test_round_trip_is_exact(capacity):
    torch.manual_seed(0)
    T, K, E, D = 13, 3, 7, 5
    topk = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    cap = None if capacity is None else torch.tensor(capacity)
    plan = plan_dispatch(topk, expert_load(topk, E), cap)
    x = torch.randn(T, D)
    rows = permute(x, plan)
    # Rows are grouped by expert: every row in group e came from a token that chose e.
    starts = [0] + plan.offs.tolist()[:-1]
    for e, (s, t) in enumerate(zip(starts, plan.offs.tolist())):
        for r in range(s, t):
            assert e in topk[plan.row_token[r]].tolist()
    slots = unpermute(rows, plan)  # identity experts
    expected = x.repeat(K, 1) * plan.kept[:, None]  # slot a = k*T + t holds token t
    assert torch.equal(slots, expected)
    w = torch.rand(T, K)
    out = combine(slots, w, plan)
    kept_w = (w * plan.kept.view(K, T).t()).sum(-1, keepdim=True)
    torch.testing.assert_close(out, x * kept_w)
    if capacity is not None:
        kept_per_expert = torch.bincount(topk.t().reshape(-1)[plan.kept], minlength=E)
        assert (kept_per_expert <= cap).all()
        assert torch.equal(kept_per_expert, torch.minimum(expert_load(topk, E), cap))


def test_no_tokens():
    topk = torch.zeros(0, 2, dtype=torch.long)
    plan = plan_dispatch(topk, expert_load(topk, 4))
    assert plan.offs.tolist() == [0, 0, 0, 0]
    out = combine(unpermute(permute(torch.zeros(0, 3), plan), plan), torch.zeros(0, 2), plan)
    assert out.shape == (0, 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_combine_gradients_match_plain_autograd_and_keep_no_fp32_copy(dtype):
    T, K, D = 5, 3, 4
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(K * T, D, generator=gen).to(dtype).requires_grad_()
    w = torch.rand(T, K, generator=gen).requires_grad_()
    grad = torch.randn(T, D, generator=gen).to(dtype)
    plan = plan_dispatch(torch.zeros(T, K, dtype=torch.long), torch.tensor([T * K]))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = combine(y, w, plan)
    got = torch.autograd.grad(out, (y, w), grad)
    plain = (y.view(K, T, D).float() * w.t().unsqueeze(-1)).sum(0).to(dtype)  # the formula, autograd'd
    want = torch.autograd.grad(plain, (y, w), grad)
    assert torch.equal(out, plain)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    assert {t.dtype for t in saved} <= {dtype, torch.float32} and all(t.numel() < y.numel() or t is y for t in saved)

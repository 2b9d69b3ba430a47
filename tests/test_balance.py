import torch

from moe import MoE, MoEConfig, update_expert_biases
from moe.balance import bias_update, router_z_loss, seq_aux_loss, switch_aux_loss


def switch_loss_by_definition(probs, topk_idx):
    """Switch eq. 4 in its top-k form, written with loops: E * sum_i f_i * P_i."""
    T, E = probs.shape
    K = topk_idx.shape[1]
    total = 0.0
    for i in range(E):
        f_i = sum(int(e == i) for row in topk_idx.tolist() for e in row) / (T * K)
        p_i = sum(probs[t, i].item() for t in range(T)) / T
        total += f_i * p_i
    return E * total


def test_switch_loss_is_one_when_uniform():
    E, K = 8, 2
    probs = torch.full((16, E), 1 / E)
    topk_idx = torch.arange(16 * K).view(16, K) % E  # every expert gets exactly 4 assignments
    assert switch_aux_loss(probs, topk_idx).item() == 1.0


def test_switch_loss_matches_definition_and_grows_with_imbalance():
    torch.manual_seed(0)
    probs = torch.randn(20, 6).softmax(-1)
    topk_idx = probs.topk(2, dim=-1).indices
    assert abs(switch_aux_loss(probs, topk_idx).item() - switch_loss_by_definition(probs, topk_idx)) < 1e-6
    collapsed = torch.zeros(20, 6)
    collapsed[:, 0] = 1.0
    assert switch_aux_loss(collapsed, torch.zeros(20, 1, dtype=torch.long)).item() == 6.0


def test_seq_loss_is_the_mean_of_per_sequence_switch_losses():
    torch.manual_seed(1)
    probs = torch.randn(3, 10, 8).softmax(-1)
    topk_idx = probs.topk(2, dim=-1).indices
    expected = sum(switch_loss_by_definition(probs[b], topk_idx[b]) for b in range(3)) / 3
    assert abs(seq_aux_loss(probs, topk_idx).item() - expected) < 1e-6
    # Balanced over the batch but each sequence on its own experts: the batch loss misses it.
    probs = torch.zeros(2, 4, 2)
    probs[0, :, 0] = probs[1, :, 1] = 1.0
    idx = probs.argmax(-1, keepdim=True)
    assert switch_aux_loss(probs.view(8, 2), idx.view(8, 1)).item() == 1.0
    assert seq_aux_loss(probs, idx).item() == 2.0


def test_z_loss_matches_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = (torch.log(torch.exp(logits).sum(-1)) ** 2).mean()
    torch.testing.assert_close(router_z_loss(logits), expected)


def test_bias_update_direction():
    load = torch.tensor([10.0, 2.0, 6.0, 6.0])  # mean 6
    step = bias_update(load, 1e-3, "sign")
    torch.testing.assert_close(step, torch.tensor([-1e-3, 1e-3, 0.0, 0.0]))
    centred = bias_update(torch.tensor([10.0, 2.0, 3.0, 5.0]), 1e-3, "zero_mean")
    assert abs(centred.sum().item()) < 1e-9
    assert centred[0] < 0 < centred[1]


def test_aux_loss_free_updates_balance_a_skewed_router():
    torch.manual_seed(0)
    layer = MoE(
        MoEConfig(num_experts=8, top_k=2, score_func="sigmoid", expert_bias=True, bias_update_rate=0.01), hidden_size=16
    )
    with torch.no_grad():
        layer.router.weight[0] += 0.1  # expert 0 is preferred by every token
    x = torch.randn(256, 16) + 1.0
    layer.train()
    layer(x)
    first = layer.stats["load"]
    loads = []
    for _ in range(60):
        layer(x)
        loads.append(layer.stats["load"])
        update_expert_biases(layer)
    # On a fixed batch the sign update ends in a small oscillation: average over it.
    settled = torch.stack(loads[-20:]).mean(0)
    assert first.max() >= 0.5  # all 256 tokens send one of their 2 slots to expert 0
    assert settled.max() < 0.16 and settled.min() > 0.09  # a band around the ideal 1/8
    assert layer.router.expert_bias[0] < 0


def test_aux_loss_adds_enabled_losses_with_their_coefficients():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.1, seq_aux_loss_coef=0.01, z_loss_coef=0.001)
    layer = MoE(cfg, 8)
    layer(torch.randn(2, 5, 8))
    s = layer.stats
    expected = 0.1 * s["switch_aux"] + 0.01 * s["seq_aux"] + 0.001 * s["z_loss"]
    assert abs(layer.aux_loss.item() - expected) < 1e-6
    assert layer.aux_loss.requires_grad
    off = MoE(MoEConfig(num_experts=4, top_k=2), 8)
    off(torch.randn(3, 8))
    assert off.aux_loss.item() == 0.0 and "switch_aux" not in off.stats

"""Multi-token prediction: config, the modules' causality and targets, the training loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_helpers import micro_config

from moe import ModelConfig, Transformer
from moe.config import config_from_dict
from moe.errors import InputError
from moe.layer import MoE
from moe.mtp import mtp_logits
from moe.train import TrainArgs
from moe.train.step import build_optimizer, train_step


def mtp_config(**overrides) -> ModelConfig:
    return micro_config(num_mtp_layers=2, **overrides)


@pytest.mark.parametrize(
    "key, value, words",
    [("num_mtp_layers", -1, "must be >= 0"), ("num_mtp_layers", 4, "<= num_layers"), ("mtp_loss_coef", -0.1, ">= 0")],
)
def test_config_rejects_bad_mtp_values(key, value, words):
    base = micro_config().to_dict()
    with pytest.raises(InputError, match=f"'{key}'.*{words}"):
        config_from_dict({**base, key: value})


def test_no_mtp_modules_by_default_and_names_when_asked():
    assert not any(name.startswith("mtp.") for name in Transformer(micro_config()).state_dict())
    names = Transformer(mtp_config()).state_dict()
    for k in (0, 1):
        for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "norm.weight", "block.attn.q_proj.weight"):
            assert f"mtp.{k}.{part}" in names
    # The last main layer is MoE in micro_config, so the MTP blocks are too; dense when it is dense.
    assert isinstance(Transformer(mtp_config()).mtp[0].block.ffn, MoE)
    assert not isinstance(Transformer(mtp_config(moe_layers=[1])).mtp[0].block.ffn, MoE)


def test_mtp_parameters_are_initialised():
    model = Transformer(mtp_config())
    w = model.mtp[1].eh_proj.weight
    assert 0.5 * model.config.init_std < float(w.detach().std()) < 2 * model.config.init_std


def test_depth_k_at_position_i_reads_tokens_up_to_i_plus_k_only():
    torch.manual_seed(0)
    model = Transformer(mtp_config()).eval()
    S, j = 12, 7
    x = torch.randint(0, 256, (1, S))
    y = x.clone()
    y[0, j] = (x[0, j] + 1) % 256
    with torch.no_grad():
        a = mtp_logits(model, model.hidden(x), x)
        b = mtp_logits(model, model.hidden(y), y)
    for k, (la, lb) in enumerate(zip(a, b), start=1):
        assert la.shape == (1, S - k, 256)
        changed = (la - lb).abs().amax(-1)[0] > 1e-6
        # Position i reads t_0..t_{i+k}: positions i >= j - k see the change, earlier ones cannot.
        assert not changed[: j - k].any()
        assert changed[j - k]


def test_mtp_loss_is_the_mean_cross_entropy_of_the_shifted_targets():
    torch.manual_seed(1)
    model = Transformer(mtp_config())
    x = torch.randint(0, 256, (2, 10))
    targets = torch.randint(0, 256, (2, 10))  # any targets: depth k must read targets[:, k:]
    h = model.hidden(x)
    logits = mtp_logits(model, h, x)
    expected = sum(F.cross_entropy(lg.flatten(0, 1), targets[:, k:].flatten()) for k, lg in enumerate(logits, 1)) / 2
    torch.testing.assert_close(model.mtp_loss(h, x, targets), expected)
    model.mtp_loss(h, x, targets).backward()
    # The shared embedding and head, the main model and both depths all learn from it.
    for p in (model.embed_tokens.weight, model.lm_head.weight, model.layers[0].attn.q_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for module in model.mtp:
        assert module.eh_proj.weight.grad.abs().sum() > 0


def test_short_windows_drop_the_depths_with_no_position():
    model = Transformer(mtp_config())
    x = torch.randint(0, 256, (1, 2))
    assert [t.shape[1] for t in mtp_logits(model, model.hidden(x), x)] == [1]
    one = torch.randint(0, 256, (1, 1))
    assert float(model.mtp_loss(model.hidden(one), one, one)) == 0.0


class FixedBatches:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def next_batch(self):
        return self.x, self.y


@pytest.mark.parametrize("coef", [0.0, 0.5])
def test_train_step_adds_the_weighted_mtp_loss_and_logs_it(coef):
    torch.manual_seed(2)
    # A dense MTP block (the last main layer is dense): no balancing loss reaches it but the MTP loss.
    model = Transformer(mtp_config(mtp_loss_coef=coef, moe_layers=[1]))
    args = TrainArgs(steps=10, batch_size=2, lr=1e-2, weight_decay=0.0, warmup_steps=1)
    opt = build_optimizer(model, args)
    data = torch.randint(0, 256, (2, 17))
    before = model.mtp[0].eh_proj.weight.detach().clone()
    out = train_step(model, model, opt, FixedBatches(data[:, :-1], data[:, 1:]), args, torch.device("cpu"))
    assert set(out) == {"loss", "aux_loss", "mtp_loss", "grad_norm"}
    h = model.hidden(data[:, :-1])
    assert float(out["mtp_loss"]) > 0 and torch.isfinite(out["mtp_loss"])
    moved = not torch.equal(model.mtp[0].eh_proj.weight, before)
    assert moved == (coef > 0)  # with weight 0 the MTP modules get no gradient (and no decay here)
    assert h.shape == (2, 16, 32)


def test_train_step_without_mtp_logs_no_mtp_loss():
    model = Transformer(micro_config())
    args = TrainArgs(steps=10, batch_size=2, warmup_steps=1)
    data = torch.randint(0, 256, (2, 9))
    out = train_step(
        model, model, build_optimizer(model, args), FixedBatches(data[:, :-1], data[:, 1:]), args, torch.device("cpu")
    )
    assert "mtp_loss" not in out


def test_training_lowers_the_mtp_loss():
    torch.manual_seed(3)
    model = Transformer(mtp_config())
    args = TrainArgs(steps=40, batch_size=4, lr=1e-2, warmup_steps=1)
    opt = build_optimizer(model, args)
    period = torch.randint(0, 256, (5,))
    data = period.repeat(4, 4)[:, :17]  # a repeating pattern: every future token is predictable
    batches = FixedBatches(data[:, :-1], data[:, 1:])
    losses = [float(train_step(model, model, opt, batches, args, torch.device("cpu"))["mtp_loss"]) for _ in range(25)]
    assert losses[-1] < 0.3 * losses[0]

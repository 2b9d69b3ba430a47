"""The expert-parallel MoE layer equals the single-process layer on the concatenated batch:
outputs, every gradient, aux losses, statistics, capacity drops and the aux-loss-free bias,
on 2 and 4 gloo processes, with uneven token counts and with all tokens routed to one
rank's experts. Each launch checks several configurations (a launch costs seconds)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from launch import spawn

from moe import MoE, MoEConfig
from moe.distributed import make_context, shard_experts

D = 16


def cases() -> dict[str, tuple[MoEConfig, str]]:
    """name -> (config, input kind): "3d" = [2 sequences, 5, D] per rank; "2d" = [6 + 3 * rank, D]."""
    base = dict(num_experts=8, top_k=2, expert_ffn_size=12)
    return {
        "dropless, shared expert, all three losses": (
            MoEConfig(**base, num_shared_experts=1, aux_loss_coef=0.1, seq_aux_loss_coef=0.05, z_loss_coef=0.01),
            "3d",
        ),
        "static capacity, eager backend": (
            MoEConfig(**base, capacity_factor=1.0, aux_loss_coef=0.1, backend="eager"),
            "2d",
        ),
        "dynamic capacity, 2-D sequence-wise loss": (
            MoEConfig(**base, capacity_factor=0.5, capacity_mode="dynamic", seq_aux_loss_coef=0.1, z_loss_coef=0.01),
            "2d",
        ),
        "all tokens to rank 0's experts": (
            MoEConfig(**base, score_func="sigmoid", expert_bias=True, aux_loss_coef=0.1, num_shared_experts=1),
            "skew",
        ),
        "static capacity, skewed": (
            MoEConfig(**base, score_func="sigmoid", expert_bias=True, capacity_factor=1.0),
            "skew",
        ),
    }


def inputs(kind: str, world: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "3d":
        return [torch.randn(2, 5, D, generator=g) for _ in range(world)]
    return [torch.randn(6 + 3 * r, D, generator=g) for r in range(world)]


def check_layer(rank: int, world: int, ep: int) -> None:
    ctx = make_context(ep, torch.device("cpu"))
    for name, (cfg, kind) in cases().items():
        torch.manual_seed(0)
        ref = MoE(cfg, D)
        if kind == "skew":  # sigmoid scores are < 1: a bias of 10 puts both choices on rank 0's experts
            ref.router.expert_bias[: cfg.num_experts // ep] = 10.0
        layer = copy.deepcopy(ref)
        shard_experts(layer, ctx)
        xs, gs = inputs(kind, world, 1), inputs(kind, world, 2)

        # One process, the concatenated batch; its loss is the mean of the ranks' losses.
        x_ref = torch.cat(xs).requires_grad_()
        y_ref = ref(x_ref)
        sizes = [x.shape[0] for x in xs]
        loss_ref = sum((y * g).sum() for y, g in zip(y_ref.split(sizes), gs)) / world + ref.aux_loss
        loss_ref.backward()

        x = xs[rank].clone().requires_grad_()
        y = layer(x)
        ((y * gs[rank]).sum() + layer.aux_loss).backward()

        msg = f"{name} (rank {rank}, ep {ep})"
        torch.testing.assert_close(y, y_ref.split(sizes)[rank], atol=1e-5, rtol=1e-4, msg=msg)
        torch.testing.assert_close(layer.aux_loss, ref.aux_loss, msg=msg)
        for key, value in ref.stats.items():
            torch.testing.assert_close(torch.as_tensor(layer.stats[key]), torch.as_tensor(value), msg=f"{msg}: {key}")
        # Input gradients are those of the sum of the ranks' losses: world x the mean's.
        torch.testing.assert_close(x.grad, world * x_ref.grad.split(sizes)[rank], atol=1e-5, rtol=1e-4, msg=msg)
        check_gradients(layer, ref, ctx, msg)
        if kind == "skew":
            assert ref.stats["load"][cfg.num_experts // ep :].sum() == 0, msg  # the skew really happened


def check_gradients(layer: MoE, ref: MoE, ctx, msg: str) -> None:
    """Averaged as data parallelism averages them, every gradient equals the reference's."""
    ref_grads = dict(ref.named_parameters())
    for pname, param in layer.named_parameters():
        grad = param.grad.clone()
        want = ref_grads[pname].grad
        if pname.startswith("experts."):
            if ctx.ep > 1:  # this rank's experts; already the mean over the EP group
                first = layer.dispatcher.first_expert
                want = want[first : first + layer.dispatcher.num_local]
            group, size = ctx.mesh.get_group("dp"), ctx.dp
            if ctx.ep == 1:
                group, size = ctx.world_group, ctx.world_size
        else:
            group, size = ctx.world_group, ctx.world_size
        dist.all_reduce(grad, group=group)
        torch.testing.assert_close(grad / size, want, atol=1e-5, rtol=1e-4, msg=f"{msg}: grad of {pname}")


def check_bias(rank: int, world: int, ep: int) -> None:
    """Three steps of forward, backward, bias update: the biases follow the reference and
    are bitwise identical on every rank, although every rank routed different tokens."""
    ctx = make_context(ep, torch.device("cpu"))
    cfg = MoEConfig(
        num_experts=8,
        top_k=2,
        expert_ffn_size=12,
        score_func="sigmoid",
        expert_bias=True,
        bias_update="zero_mean",
        bias_update_rate=0.05,
    )
    torch.manual_seed(0)
    ref = MoE(cfg, D)
    layer = copy.deepcopy(ref)
    shard_experts(layer, ctx)
    for step in range(3):
        xs = inputs("3d", world, 10 + step)
        ref(torch.cat(xs)).sum().backward()
        layer(xs[rank]).sum().backward()
        ref.update_expert_bias()
        layer.update_expert_bias()
    bias = layer.router.expert_bias
    assert bias.abs().sum() > 0
    torch.testing.assert_close(bias, ref.router.expert_bias, atol=0, rtol=0)
    everyone = [torch.empty_like(bias) for _ in range(world)]
    dist.all_gather(everyone, bias)
    assert all(torch.equal(b, bias) for b in everyone), f"rank {rank}: biases differ across ranks"


def check_all(rank: int, world: int, eps: tuple[int, ...]) -> None:
    for ep in eps:
        check_layer(rank, world, ep)
        check_bias(rank, world, ep)


@pytest.mark.parametrize("world, eps", [(2, (2, 1)), (4, (4, 2))], ids=["2 ranks: ep2, dp2", "4 ranks: ep4, dp2xep2"])
def test_expert_parallel_layer_equals_one_process(world, eps):
    spawn(check_all, world, eps, timeout=240)

"""FSDP2 over a (dp 2, ep 2) mesh of 4 gloo processes, on a model whose sizes do not divide
evenly (FSDP's chunks are uneven, one rank's chunk of some tensors is empty): the clipped
gradient norm equals the single-process norm; a sharded checkpoint assembles in one process
into the full tensors, restores every rank's weights and AdamW state bit for bit, refuses
another layout, and catches a corrupt file."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from launch import spawn

from moe import ModelConfig, MoEConfig, Transformer
from moe.distributed import apply_fsdp, clip_grad_norm_, expert_rows, make_context, shard_experts
from moe.distributed.checkpoint import load_sharded, save_sharded
from moe.io.files import seal_trainer_state
from moe.io.sharded import read_full_model

CONFIG = ModelConfig(
    name="odd",
    vocab_size=37,
    hidden_size=20,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=27,
    max_seq_len=8,
    first_k_dense=1,
    moe=MoEConfig(
        num_experts=6,
        top_k=2,
        expert_ffn_size=9,
        num_shared_experts=1,
        score_func="sigmoid",
        expert_bias=True,
        aux_loss_coef=0.01,
    ),
)


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(rank))
    return ids[:, :-1], ids[:, 1:]


def loss_of(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten()) + model.aux_loss()


def sharded(ref: Transformer, ctx) -> tuple[Transformer, torch.optim.Optimizer]:
    model = copy.deepcopy(ref)
    shard_experts(model, ctx)
    apply_fsdp(model, ctx)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def check(rank: int, world: int, folder: str) -> None:
    ctx = make_context(2, torch.device("cpu"))
    torch.manual_seed(0)
    ref = Transformer(CONFIG)
    model, optimizer = sharded(ref, ctx)

    # The gradient norm over parameters on two meshes, against one process on all 4 batches.
    batches = [batch(r) for r in range(world)]
    loss_of(ref, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])).backward()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    loss_of(model, *batches[rank]).backward()
    got = clip_grad_norm_(model, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    grads = [p.grad.to_local() for p in model.parameters()]
    square = torch.stack([g.square().sum() for g in grads]).sum()
    dist.all_reduce(square)
    torch.testing.assert_close(square.sqrt(), torch.tensor(0.1), rtol=1e-4, atol=0)  # clipped to max_norm
    optimizer.step()

    root = Path(folder)
    final = save_sharded(root, 1, model, optimizer, {"rng": {"rank": rank}}, keep_last=1, ctx=ctx)
    full = read_full_model(final)
    experts = expert_rows(model)
    for name, param in model.named_parameters():
        whole = param.full_tensor()  # a collective: every rank gathers its copy
        if name in experts:
            first = experts[name][0]
            assert full[name].shape[0] == CONFIG.moe.num_experts
            whole_rows = full[name][first : first + whole.shape[0]]
        else:
            whole_rows = full[name]
        assert torch.equal(whole_rows, whole), name
    empty = torch.tensor(int(any(p.to_local().shape[0] == 0 for p in model.parameters())))
    dist.all_reduce(empty, op=dist.ReduceOp.MAX)
    assert empty, "no rank held an empty chunk: the sizes no longer test that case"

    restored, restored_optimizer = sharded(Transformer(CONFIG), ctx)
    state = load_sharded(final, restored, restored_optimizer, ctx)
    assert state["step"] == 1 and state["rng"] == {"rank": rank}
    for (name, p), q in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(p.to_local(), q.to_local()), name
        for key, value in optimizer.state[p].items():
            other = restored_optimizer.state[q][key]
            assert torch.equal(_local(value), _local(other)), (name, key)
    for a, b in zip(model.moe_layers(), restored.moe_layers()):
        assert torch.equal(a.router.expert_bias, b.router.expert_bias)

    elsewhere = root / "other_layout"
    if rank == 0:
        shutil.copytree(final, elsewhere)
        trainer = json.loads((elsewhere / "trainer.json").read_text())
        trainer["parallel"] = {"world": 4, "dp": 4, "ep": 1}
        (elsewhere / "trainer.json").write_bytes(seal_trainer_state(trainer))  # a consistent trainer.json
    dist.barrier()
    with pytest.raises(ValueError, match=r"saved on 4 ranks \(dp 4 x ep 1\); this run has 4 ranks \(dp 2 x ep 2\)"):
        load_sharded(elsewhere, restored, restored_optimizer, ctx)
    dist.barrier()
    if rank == 0:
        shard = final / "model-rank00003-of-00004.safetensors"
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
        with pytest.raises(
            ValueError, match=r"model-rank00003-of-00004.safetensors: contents differ from the checksum"
        ):
            read_full_model(final)


def test_sharded_training_state_on_uneven_chunks(tmp_path):
    spawn(check, 4, str(tmp_path), timeout=180)

"""Process groups for expert and data parallelism, set up from torchrun's environment.

The world of W = dp x ep processes is a DeviceMesh of shape (dp, ep), rank = d * ep + j:

    W = 4, ep = 2:        ep index j = 0   j = 1
         dp index d = 0:      rank 0   rank 1      one EP group: the experts split in two
         dp index d = 1:      rank 2   rank 3      another EP group, a replica of the first

An EP group is `ep` consecutive ranks (one node's GPUs when ep <= GPUs per node, so the
all-to-all stays on NVLink). Rank d * ep + j holds experts [j * E/ep, (j + 1) * E/ep); FSDP
shards those over the dp group (ranks j, ep + j, ...), and every other parameter over all
W ranks. Every rank reads its own tokens: the batch is all W ranks' batches, in rank order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..errors import InputError


@dataclass
class ParallelContext:
    mesh: DeviceMesh  # (dp, ep)
    world_mesh: DeviceMesh  # every rank in one dimension: non-expert parameters shard over it
    device: torch.device

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def dp(self) -> int:
        return self.mesh.size(0)

    @property
    def ep(self) -> int:
        return self.mesh.size(1)

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def world_group(self) -> dist.ProcessGroup:
        return self.world_mesh.get_group()

    def describe(self) -> dict[str, int]:
        return {"world": self.world_size, "dp": self.dp, "ep": self.ep}


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher that sets its variables) started this process."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def rank_device(name: str = "auto") -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when CUDA is there (or asked for), else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    if name not in ("auto", "cuda"):
        raise InputError(f"under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda or auto, not {name!r}")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def init_parallel(ep: int, device: str = "auto", timeout_s: float = 600.0) -> ParallelContext:
    """Join the process group torchrun describes (NCCL for CUDA tensors, gloo for CPU ones)
    and lay the ranks out as (dp, ep). A collective that waits longer than timeout_s fails
    the run instead of hanging it."""
    world = int(os.environ["WORLD_SIZE"])
    check_layout(world, ep)
    torch_device = rank_device(device)
    # gloo also serves the CPU tensors of a CUDA run (barriers, checkpoint bookkeeping).
    backend = "cpu:gloo,cuda:nccl" if torch_device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return make_context(ep, torch_device)


def check_layout(world: int, ep: int) -> None:
    if ep < 1 or world % ep:
        raise InputError(f"--ep {ep} must divide the number of processes ({world})")


def make_context(ep: int, device: torch.device) -> ParallelContext:
    """The (dp, ep) layout over an already initialised default process group."""
    world = dist.get_world_size()
    check_layout(world, ep)
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    world_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("world",))
    return ParallelContext(mesh, world_mesh, device)

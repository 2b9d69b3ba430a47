"""Which device a command runs on."""

from __future__ import annotations

import torch


def pick_device(name: str = "auto") -> torch.device:
    """ "auto" is the GPU when there is one, else the CPU; a named CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device

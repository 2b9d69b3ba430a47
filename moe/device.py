"""Which device a command runs on: `--device auto | cpu | cuda | cuda:N`."""

from __future__ import annotations

import re

import torch

from .errors import InputError, excerpt

_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def valid_devices() -> str:
    """The device names this machine accepts, for error messages."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda = f"cuda, cuda:0..cuda:{gpus - 1}" if gpus else "no cuda on this machine"
    return f"auto, cpu ({cuda})"


def check_device_name(name: str) -> None:
    """Raise InputError unless `name` is spelled as a device (whether it exists is pick_device's check)."""
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        raise InputError(f"--device {excerpt(name)} is not a device: use {valid_devices()}")


def pick_device(name: str = "auto") -> torch.device:
    """ "auto" is the GPU when there is one, else the CPU; a named CUDA device must exist."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name} requested but CUDA is not available on this machine: use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name} does not exist: use {valid_devices()}")
    return device

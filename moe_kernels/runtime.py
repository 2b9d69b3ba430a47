"""Where the Triton kernels can run, and why not when they cannot.

The MoE layer asks `triton_available(device, dtype)` once and falls back to
torch.nn.functional.grouped_mm with one warning when the answer is False.

Triton runs on CUDA tensors (compute capability 8.0 or newer: bf16 tensor cores),
or on CPU tensors through the interpreter, which must be switched on with
TRITON_INTERPRET=1 *before* triton is imported: triton.jit reads it when a kernel
is decorated, so what counts is how this package's kernels were built.
"""

from __future__ import annotations

import functools

import torch

_INTERPRETER_HINT = "set TRITON_INTERPRET=1 before triton is first imported to run the kernels on CPU"


_INTERPRETING: bool | None = None


def interpreting() -> bool:
    """True when this package's kernels were built by the Triton interpreter."""
    global _INTERPRETING
    if _INTERPRETING is None:
        # Decided once, when the package is imported (moe_kernels/__init__.py asks): Dynamo cannot
        # evaluate isinstance on a compiled kernel object, but it can read a module-level bool.
        from triton.runtime.interpreter import InterpretedFunction

        from .schedule import tile_map_kernel

        _INTERPRETING = isinstance(tile_map_kernel, InterpretedFunction)
    return _INTERPRETING


def triton_available(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Can the kernels run on `device` (default: cuda if present, else cpu) for `dtype`?

    Returns (ok, reason). The reason names what is missing when ok is False, and
    which runtime will be used when ok is True.
    """
    try:
        import triton
    except ImportError as err:
        return False, f"triton is not importable ({err})"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"dtype {dtype} is not supported (float16, bfloat16, float32 are)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available to torch"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return False, f"compute capability {major}.{minor} < 8.0 (the kernels need bf16 tensor cores)"
        if interpreting():
            return True, "CUDA tensors through the Triton interpreter (TRITON_INTERPRET=1): correct but slow"
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        if not interpreting():
            return False, f"CPU tensors need the Triton interpreter: {_INTERPRETER_HINT}"
        if dtype == torch.bfloat16:
            return False, (
                "the Triton interpreter cannot multiply bfloat16 blocks (tl.dot); use float16 or float32 on CPU"
            )
        return True, "CPU tensors through the Triton interpreter (TRITON_INTERPRET=1)"
    return False, f"device type {device.type!r} is not supported (cuda, or cpu with the interpreter)"


@functools.cache
def _cached_availability(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    return triton_available(device, dtype)


def require_runnable(device: torch.device, dtype: torch.dtype) -> None:
    """Raise RuntimeError with triton_available's reason when a launch would fail.

    Cached per (device, dtype): the answer cannot change within a process, and
    launchers call this on every launch.
    """
    ok, reason = _cached_availability(device, dtype)
    if not ok:
        raise RuntimeError(f"moe kernels cannot run here: {reason}")

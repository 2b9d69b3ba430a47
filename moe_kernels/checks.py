"""Argument checks of the kernels' public functions.

Shapes: M = rows, K = in dim, N = out dim, G = groups/experts, R = permuted rows,
        T = tokens, d = model dim, f = expert hidden dim.

Two kinds of checks:

* cheap ones read only shapes, dtypes, devices and strides (no device work, no
  sync). The launchers and the fake (meta) implementations run them on every call.
* checks of *values* (offsets monotonic and within M, row indices in range and
  unique) need the data on the host: a device->host sync. They never run on the
  hot path; call `check_offs` / `check_routing` yourself when debugging. Without
  them, malformed values give wrong numbers but no out-of-bounds access for
  `offs` (the kernels clamp it to [0, M]); out-of-range row indices are not
  clamped and are the caller's contract.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def tensors(**named) -> None:
    """TypeError for a non-tensor argument; the public functions run this before
    the custom op, whose dispatcher would otherwise reject it less clearly."""
    for name, t in named.items():
        _tensor(name, t)


def _float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def _index(name: str, t: torch.Tensor, dtype: torch.dtype, length: int | None = None) -> None:
    _tensor(name, t)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != 1 or (length is not None and t.numel() != length):
        want = f"[{length}]" if length is not None else "1-D"
        raise ValueError(f"{name} must have shape {want}, got {_shape(t)}")
    if t.numel() > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def _matrix_layout(name: str, t: torch.Tensor) -> None:
    """The kernels take any strides, but one of the last two must be 1 to be fast."""
    rows, cols = t.shape[-2], t.shape[-1]
    if t.stride(-1) != 1 and t.stride(-2) != 1 and rows > 1 and cols > 1:
        raise ValueError(
            f"{name} {_shape(t)} with strides {t.stride()} is neither row- nor column-major "
            f"in its last two dims; pass {name}.contiguous()"
        )


def _same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def grouped_mm_args(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> tuple[int, int, int, int]:
    """Check grouped_mm(a [M, K], b [G, K, N], offs int32 [G]); return (M, K, N, G)."""
    _tensor("a", a)
    _tensor("b", b)
    _tensor("offs", offs)
    if a.dim() != 2:
        raise ValueError(f"a must be 2-D [M, K], got shape {_shape(a)}")
    if b.dim() != 3:
        raise ValueError(f"b must be 3-D [G, K, N], got shape {_shape(b)}")
    m, k = a.shape
    g, kb, n = b.shape
    if kb != k:
        raise ValueError(f"a [M, K] = {_shape(a)} and b [G, K, N] = {_shape(b)} disagree on K")
    if g < 1:
        raise ValueError(f"b must hold at least one group, got shape {_shape(b)}")
    _index("offs", offs, torch.int32, g)
    _float("a", a)
    if b.dtype != a.dtype:
        raise TypeError(f"a and b must share a dtype, got a {a.dtype} and b {b.dtype}")
    _same_device(a=a, b=b, offs=offs)
    _matrix_layout("a", a)
    _matrix_layout("b", b)
    return m, k, n, g


def expert_ffn_args(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offs: torch.Tensor,
    row_token: torch.Tensor,
    row_slot: torch.Tensor,
    num_slots: int,
    activation: str,
) -> tuple[int, int, int, int, int]:
    """Check the expert_ffn arguments; return (T, d, f, E, R)."""
    t, d, f, e, r = _ffn_args(x, w_in, w_out, offs, row_token, activation)
    _index("row_slot", row_slot, torch.int64, r)
    if not isinstance(num_slots, (int, torch.SymInt)) or num_slots < r:
        raise ValueError(f"num_slots must be an int >= R = {r} (every row writes its own slot), got {num_slots!r}")
    _same_device(x=x, row_slot=row_slot)
    return t, d, f, e, r


def moe_ffn_args(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offs: torch.Tensor,
    row_token: torch.Tensor,
    row_weight: torch.Tensor,
    activation: str,
) -> tuple[int, int, int, int, int]:
    """Check the moe_ffn arguments; return (T, d, f, E, R)."""
    t, d, f, e, r = _ffn_args(x, w_in, w_out, offs, row_token, activation)
    _tensor("row_weight", row_weight)
    if row_weight.dim() != 1 or row_weight.shape[0] != r:
        raise ValueError(f"row_weight must be [R] = [{r}] (one weight per row), got shape {_shape(row_weight)}")
    _float("row_weight", row_weight)
    _same_device(x=x, row_weight=row_weight)
    return t, d, f, e, r


def _ffn_args(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offs: torch.Tensor,
    row_token: torch.Tensor,
    activation: str,
) -> tuple[int, int, int, int, int]:
    """The checks expert_ffn and moe_ffn share; return (T, d, f, E, R)."""
    for name, t in (("x", x), ("w_in", w_in), ("w_out", w_out)):
        _tensor(name, t)
    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"activation must be 'swiglu' or 'gelu', got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, d], got shape {_shape(x)}")
    if w_in.dim() != 3 or w_out.dim() != 3:
        raise ValueError(f"w_in must be [E, d, 2f or f] and w_out [E, f, d], got {_shape(w_in)} and {_shape(w_out)}")
    t, d = x.shape
    e, f, d_out = w_out.shape
    width = 2 * f if activation == "swiglu" else f
    if tuple(w_in.shape) != (e, d, width) or d_out != d:
        raise ValueError(
            f"with x [T, d] = {_shape(x)} and w_out [E, f, d] = {_shape(w_out)}, "
            f"{activation} needs w_in [E, d, {'2f' if activation == 'swiglu' else 'f'}] = "
            f"{(e, d, width)}, got {_shape(w_in)}"
        )
    if e < 1:
        raise ValueError(f"w_out must hold at least one expert, got shape {_shape(w_out)}")
    _index("offs", offs, torch.int32, e)
    _index("row_token", row_token, torch.int64)
    r = row_token.numel()
    _float("x", x)
    if w_in.dtype != x.dtype or w_out.dtype != x.dtype:
        raise TypeError(f"x, w_in and w_out must share a dtype, got {x.dtype}, {w_in.dtype}, {w_out.dtype}")
    _same_device(x=x, w_in=w_in, w_out=w_out, offs=offs, row_token=row_token)
    for name, tensor in (("x", x), ("w_in", w_in), ("w_out", w_out)):
        _matrix_layout(name, tensor)
    return t, d, f, e, r


def check_offs(offs: torch.Tensor, num_rows: int) -> None:
    """Value checks of offs (host sync): non-decreasing, within [0, num_rows]."""
    values = offs.tolist()  # sync: debugging aid only
    bad = [i for i in range(1, len(values)) if values[i] < values[i - 1]]
    if bad:
        raise ValueError(
            f"offs must be non-decreasing, but offs[{bad[0]}] = {values[bad[0]]} "
            f"< offs[{bad[0] - 1}] = {values[bad[0] - 1]}"
        )
    if values and (values[0] < 0 or values[-1] > num_rows):
        raise ValueError(f"offs must lie in [0, {num_rows}] (rows of a), got first {values[0]}, last {values[-1]}")


def check_routing(
    offs: torch.Tensor, row_token: torch.Tensor, row_slot: torch.Tensor, num_tokens: int, num_slots: int
) -> None:
    """Value checks of expert_ffn's index maps (host sync): offs valid, tokens in
    [0, T), slots in [0, num_slots) and distinct."""
    check_offs(offs, row_token.numel())
    if row_token.numel():
        lo, hi = int(row_token.min()), int(row_token.max())  # sync: debugging aid only
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"row_token must lie in [0, {num_tokens}), got values in [{lo}, {hi}]")
        lo, hi = int(row_slot.min()), int(row_slot.max())
        if lo < 0 or hi >= num_slots:
            raise ValueError(f"row_slot must lie in [0, {num_slots}), got values in [{lo}, {hi}]")
        if row_slot.unique().numel() != row_slot.numel():
            raise ValueError("row_slot must not repeat a slot (two rows would write the same output row)")

"""Activation memory of the MoE layer: the bytes autograd keeps for the backward, per routed row,
on each expert backend, at the per-GPU expert shapes of the published models.

Shapes: T = tokens, d = model dim, f = expert FFN dim, E = experts, K = top-k, R = T*K routed rows.

One forward of `moe.MoE` runs under `torch.autograd.graph.saved_tensors_hooks` with x requiring
grad; every tensor packed for the backward is recorded by its storage, so that two saved views
of one storage (the gate and up halves of a SwiGLU pre-activation) count once, at the size of
the whole storage, which is what stays alive. Storages of the layer's parameters and buffers and
of x itself are left out (they are alive anyway). Tensors a custom autograd Function keeps as
attributes of its ctx bypass the hooks; they are found by walking the graph and counted too.

- "torch" and "triton" run under FakeTensorMode: full-size shapes (E as published, T = 4096
  tokens), no memory, no arithmetic. The CPU interpreter of Triton refuses bf16, so "triton"
  is measured in fp16, which has bf16's element size (the record says `measured_dtype`).
- "eager" reads the expert offsets on the host (`.tolist()`), which fake tensors cannot give:
  it runs for real at the same d, f, K and E with few tokens, the experts' stacked weights
  being one expert's weights expanded E times (a stride-0 view: 1/E of the memory, the same
  saved tensors).

Each case runs at two token counts; bytes per routed row is the slope between them, and what
does not grow with T (a fp32 copy of the router weight, the offsets [E]) is reported as
`fixed_bytes`. Which backend really ran is checked from the ops it dispatched
(`moe_kernels::*` for "triton", grouped_mm for "torch", neither for "eager"); a fallback is
recorded as such, not as a figure. Components: `router`, `shared_experts`, and `routed`
(dispatch, routed experts and combine: the part the backends differ in).

usage: python bench/activation_memory.py [--models a,b] [--results-dir DIR] [--no-plot] [--smoke]
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the Triton interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moe  # noqa: E402
from moe.errors import InputError  # noqa: E402
from moe.perf.results import environment, record, save  # noqa: E402

BACKENDS = ("torch", "triton", "eager")
DTYPE = torch.bfloat16
# The shipped full configs, less the seed article's guess (`seed-speculated-ling-10t`, not a released model).
MODELS = (
    "ling-1t",
    "deepseek-v3",
    "ling-flash-2.0",
    "ling-mini-2.0",
    "qwen3-30b-a3b",
    "olmoe-1b-7b",
    "mixtral-8x7b",
    "dbrx",
)
FAKE_TOKENS = (2048, 4096)  # free under fake tensors: a per-GPU micro-batch
REAL_TOKENS = (4, 8)  # "eager" computes for real: few tokens (bytes per row do not depend on T)
COMPONENTS = ("router", "shared_experts")  # submodules whose saves are told apart; the rest is "routed"


# ------------------------------------------------------------------ what autograd keeps


def storage_key(t: Tensor) -> int:
    """Identity of t's storage (the StorageImpl's address): equal for every view of one storage,
    fake tensors included. Stable while the storage lives; the log holds every tensor it saw."""
    return t.untyped_storage()._cdata


@dataclasses.dataclass
class Saved:
    shape: list[int]  # of the largest saved view (bytes are the whole storage's)
    dtype: str
    nbytes: int
    component: str


class SavedLog:
    """Pack hook that records each storage autograd keeps, once, minus the excluded storages."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.saved: dict[int, Saved] = {}
        self.packed = 0  # tensors packed, views of one storage each counted
        self.component = "routed"
        self._alive: list[Tensor] = []  # a freed storage's address could be reused by a later one

    def add(self, t: Tensor, component: str) -> None:
        self._alive.append(t)
        key = storage_key(t)
        if key in self.exclude:
            return
        known = self.saved.get(key)
        if known is None:
            dtype = str(t.dtype).removeprefix("torch.")
            self.saved[key] = Saved(list(t.shape), dtype, t.untyped_storage().nbytes(), component)
        elif t.numel() > math.prod(known.shape):  # name a storage by its largest saved view
            known.shape = list(t.shape)

    def pack(self, t: Tensor) -> Tensor:
        self.packed += 1
        self.add(t, self.component)
        return t

    def bytes(self, component: str | None = None) -> int:
        return sum(s.nbytes for s in self.saved.values() if component in (None, s.component))


class OpLog(TorchDispatchMode):
    """The ops a forward dispatched, by qualified name ("aten.mm", "moe_kernels.expert_ffn")."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def backend_that_ran(ops: set[str]) -> str:
    if any(op.startswith("moe_kernels.") for op in ops):
        return "triton"
    if ops & {"aten._grouped_mm", "moe.grouped_mm"}:
        return "torch"
    return "eager"


@contextlib.contextmanager
def tagging(layer: nn.Module, log: SavedLog):
    """Attribute saves made inside the router and the shared experts to them."""

    def enter(name):
        def hook(module, args):
            log.component = name

        return hook

    def leave(module, args, output):
        log.component = "routed"

    handles = []
    for name in COMPONENTS:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def add_ctx_attributes(log: SavedLog, roots: list[Tensor]) -> None:
    """Tensors that custom autograd Functions keep as ctx attributes (the hooks never see them)."""
    seen, stack = set(), [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(t, Tensor):
                    log.add(t, f"ctx of {type(node).__name__}")
        stack += [fn for fn, _ in node.next_functions]


def measure(layer: nn.Module, x: Tensor, exclude_kept: bool = True) -> tuple[SavedLog, set[str], list[str]]:
    """One forward with x requiring grad -> (what autograd keeps, ops dispatched, warnings).
    exclude_kept=False counts the parameters, buffers and x too (the tests compare the two)."""
    kept = itertools.chain(layer.parameters(), layer.buffers(), [x]) if exclude_kept else ()
    log = SavedLog({storage_key(t) for t in kept})
    ops = OpLog()
    with warnings.catch_warnings(record=True) as caught, tagging(layer, log):
        warnings.simplefilter("always")
        with torch.autograd.graph.saved_tensors_hooks(log.pack, lambda t: t), ops:
            out = layer(x)
    add_ctx_attributes(log, [out, getattr(layer, "aux_loss", out)])
    return log, ops.ops, [str(w.message) for w in caught]


# ------------------------------------------------------------------ layers, fake and real


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters are created in `dtype` (Module.to(dtype) cannot swap fake parameters)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_fake(cfg: moe.MoEConfig, d: int, dtype: torch.dtype) -> moe.MoE:
    """The layer under the current FakeTensorMode: full size, no memory."""
    with default_dtype(dtype):
        return moe.MoE(cfg, d)


def build_real(cfg: moe.MoEConfig, d: int, dtype: torch.dtype, expand_experts: bool, routing: str = "balanced"):
    """The layer on the CPU, built on the meta device and then materialised; with `expand_experts`
    the stacked expert weights are one expert's weights expanded E times (1/E of the memory)."""
    with torch.device("meta"), default_dtype(dtype):
        layer = moe.MoE(cfg, d)
    seeds = itertools.count()
    for module in layer.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            stacked = expand_experts and p.dim() == 3
            shape = p.shape[1:] if stacked else p.shape
            gen = torch.Generator().manual_seed(next(seeds))  # one seed a parameter: the router's
            value = torch.randn(shape, generator=gen).mul_(0.02).to(p.dtype)  # whatever the experts' shape
            setattr(module, name, nn.Parameter(value.expand(p.shape) if stacked else value))
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
        for name, value in list(vars(module).items()):  # plain tensor attributes (aux_loss)
            if isinstance(value, Tensor) and value.is_meta:
                setattr(module, name, torch.zeros(value.shape, dtype=value.dtype))
    bias = getattr(layer.router, "expert_bias", None)
    if routing == "zipf" and bias is not None:  # favours low expert ids ~ log(1 / rank^1.2), as bench/moe_layer.py
        bias.copy_(-1.2 * torch.log(torch.arange(1, bias.numel() + 1, dtype=torch.float32)) * 0.2)
    return layer


def measured_dtype(backend: str, dtype: torch.dtype, fake: bool) -> torch.dtype:
    """fp16 for "triton" in bf16 on CPU: the interpreter refuses bf16 (same element size)."""
    if backend == "triton" and fake and dtype == torch.bfloat16:
        import moe_kernels

        if not moe_kernels.triton_available("cpu", dtype)[0] and moe_kernels.triton_available("cpu", torch.float16)[0]:
            return torch.float16
    return dtype


def run_tokens(cfg, d, dtype, tokens, fake: bool, expand_experts=True, routing="balanced"):
    """[(tokens, SavedLog, ops, warnings)] of one layer at each token count."""
    runs = []
    with FakeTensorMode() if fake else contextlib.nullcontext():
        layer = build_fake(cfg, d, dtype) if fake else build_real(cfg, d, dtype, expand_experts, routing)
        for t in tokens:
            x = torch.randn(t, d, generator=torch.Generator().manual_seed(t), dtype=dtype, requires_grad=True)
            runs.append((t, *measure(layer, x)))
    return runs


def case(
    name: str,
    cfg: moe.MoEConfig,
    d: int,
    backend: str,
    dtype: torch.dtype = DTYPE,
    fake: bool | None = None,
    tokens: tuple[int, int] | None = None,
    routing: str = "balanced",
    expand_experts: bool = True,
) -> dict:
    """Bytes per routed row of one backend at one shape: the slope between two token counts."""
    fake = backend != "eager" if fake is None else fake
    tokens = tokens or (FAKE_TOKENS if fake else REAL_TOKENS)
    cfg = dataclasses.replace(cfg, backend=backend)
    run_dtype = measured_dtype(backend, dtype, fake)
    runs = run_tokens(cfg, d, run_dtype, tokens, fake, expand_experts, routing)
    (t1, log1, _, _), (t2, log2, ops, caught) = runs[0], runs[-1]
    r1, r2 = t1 * cfg.top_k, t2 * cfg.top_k
    row_bytes = d * torch.empty((), dtype=dtype).element_size()

    def slope(component=None):
        return (log2.bytes(component) - log1.bytes(component)) / (r2 - r1)

    components = sorted({s.component for s in log2.saved.values()} | {"routed"})
    ran = backend_that_ran(ops)
    out = dict(
        model=name,
        backend=backend,
        ran=ran,
        status="ok" if ran == backend else f"fell back: requested {backend}, ran {ran}",
        mode="fake" if fake else "real",
        dtype=str(dtype).removeprefix("torch."),
        measured_dtype=str(run_dtype).removeprefix("torch."),
        d=d,
        f=cfg.ffn_size(d),
        experts=cfg.num_experts,
        top_k=cfg.top_k,
        activation=cfg.activation,
        shared_experts=cfg.num_shared_experts,
        routing=routing,
        tokens=t2,
        rows=r2,
        total_bytes=log2.bytes(),
        bytes_per_row_at_tokens=log2.bytes() / r2,
        bytes_per_row=slope(),
        fixed_bytes=log2.bytes() - slope() * r2,
        d_rows_per_row=slope() / row_bytes,
        bytes_per_row_by_component={c: slope(c) for c in components},
        d_rows_per_row_by_component={c: slope(c) / row_bytes for c in components},
        storages=len(log2.saved),
        tensors_packed=log2.packed,
        breakdown=[
            [s.shape, s.dtype, s.nbytes, s.component] for s in sorted(log2.saved.values(), key=lambda s: -s.nbytes)
        ],
        grouped_ops=sorted(op for op in ops if "grouped" in op or op.startswith("moe")),
        warnings=caught,
    )
    return out


# ------------------------------------------------------------------ the run


def model_shape(name: str) -> tuple[moe.MoEConfig, int]:
    config = moe.load_config(name)
    if config.moe is None:
        raise InputError(f"{name}: the config has no MoE layer")
    return config.moe, config.hidden_size


HEADER = (
    f"{'model':<16}{'backend':<8}{'mode':<6}{'d':>6}{'f':>7}{'K':>3}"
    f"{'B/row':>10}{'d-rows':>8}{'routed':>8}{'fixed MiB':>10}  status"
)


def table_row(c: dict) -> str:
    """One case: bytes and d-rows per routed row (all, and the routed path alone), fixed bytes."""
    routed = c["d_rows_per_row_by_component"].get("routed", 0.0)
    return (
        f"{c['model']:<16}{c['backend']:<8}{c['mode']:<6}{c['d']:>6}{c['f']:>7}{c['top_k']:>3}"
        f"{c['bytes_per_row']:>10.0f}{c['d_rows_per_row']:>8.2f}{routed:>8.2f}{c['fixed_bytes'] / 2**20:>10.1f}  "
        f"{c['status']}"
    )


def routed_bytes(c: dict) -> float:
    return c["bytes_per_row_by_component"].get("routed", 0.0)


def ratio(cases: list[dict], model: str, key=lambda c: c["bytes_per_row"]) -> float | None:
    by = {c["backend"]: c for c in cases if c["model"] == model and c["status"] == "ok"}
    if "triton" in by and "torch" in by and key(by["torch"]):
        return key(by["triton"]) / key(by["torch"])
    return None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in result["results"]["cases"] if c["status"] == "ok"]
    models = list(dict.fromkeys(c["model"] for c in cases))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(models) + 2), 4.5))
    width = 0.8 / len(BACKENDS)
    for i, backend in enumerate(BACKENDS):
        values = [
            next((c["bytes_per_row"] / 1024 for c in cases if c["model"] == m and c["backend"] == backend), 0.0)
            for m in models
        ]
        ax.bar([j + i * width for j in range(len(models))], values, width, label=backend)
    for j, m in enumerate(models):
        r = ratio(cases, m)
        top = max(c["bytes_per_row"] / 1024 for c in cases if c["model"] == m)
        if r is not None:
            ax.annotate(f"triton/torch {r:.2f}", (j + width, top), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + width for j in range(len(models))])
    ax.set_xticklabels(models, fontsize=8, rotation=15)
    ax.set_ylabel("KiB kept for backward per routed row")
    ax.set_title(f"MoE layer: bytes autograd keeps per routed row ({result['settings']['dtype']})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="shipped config names, comma-separated")
    parser.add_argument("--results-dir", default=None, help="default: bench/results")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="the tiny config only (activation_memory-smoke.json)")
    args = parser.parse_args(argv)
    models = ["tiny"] if args.smoke else [m for m in args.models.split(",") if m]
    shapes = {m: model_shape(m) for m in models}  # bad names fail before anything runs
    cases = []
    print(HEADER)
    for m, (cfg, d) in shapes.items():
        for backend in BACKENDS:
            cases.append(case(m, cfg, d, backend))
            print(table_row(cases[-1]), flush=True)
    name = "activation_memory-smoke" if args.smoke else "activation_memory"
    result = record(
        "activation_memory",
        environment(torch.device("cpu")),
        {"models": models},
        {
            "dtype": str(DTYPE).removeprefix("torch."),
            "fake_tokens": FAKE_TOKENS,
            "real_tokens": REAL_TOKENS,
            "bytes_per_row": "slope between the two token counts; fixed_bytes is the rest",
            "excluded": "storages of parameters, buffers and the input x",
        },
        {
            "cases": cases,
            "triton_over_torch": {m: ratio(cases, m) for m in models},
            "triton_over_torch_routed": {m: ratio(cases, m, routed_bytes) for m in models},
        },
    )
    for m in models:
        whole, routed = ratio(cases, m), ratio(cases, m, routed_bytes)
        if whole is not None and routed is not None:
            print(f"{m}: triton/torch {whole:.2f} (layer), {routed:.2f} (routed path)")
    path = save(result, name, args.results_dir)
    if not args.no_plot:
        plot(result, path.with_suffix(".png"))
    print(f"wrote {path}" + ("" if args.no_plot else f" and {path.with_suffix('.png')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What bench/moe_layer.py measures: the cases (per-GPU expert shapes of the full configs, routed
rows, routing), their routing, the fp32 reference every implementation is checked against, and
the roofline each is held to.

Legend: T = tokens, d = model dim, f = expert FFN dim, E = local experts, K = top-k,
R = T*K routed rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import moe
from moe.errors import InputError

MODELS = ("ling-1t", "deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b", "ling-flash-2.0")
ROWS = (4096, 16384, 65536)
QUICK_ROWS = (16384,)  # --quick: one size, each model at its largest local E
ROUTINGS = ("balanced", "zipf")
EP_LOCAL_EXPERTS = (8, 32)  # local experts of a model too big for one GPU: EP over 32 or 8 GPUs
FITS_BYTES = 8 << 30  # bf16 expert weights up to this stay whole on one GPU
ZIPF_S = 1.2  # as bench/grouped_gemm.py
ASSUMED_TFLOPS = 300.0  # for planning only: repeats per case and the time budget
# the shapes published anchors were measured at, run first: Liger's fused MoE (413 TFLOP/s fwd+bwd
# on an H100) at E 128, d 2048, f 768, top-8, 32K tokens = Qwen3-30B-A3B's experts at 256K rows
ANCHOR_ROWS = {"qwen3-30b-a3b": 32768 * 8}


@dataclass(frozen=True)
class Case:
    model: str
    d: int
    f: int
    experts: int
    top_k: int
    rows: int
    routing: str

    @property
    def tokens(self) -> int:
        return self.rows // self.top_k

    @property
    def gemm_flops(self) -> int:
        """Forward FLOPs of the expert GEMMs: 2 R d (2f) up, 2 R f d down."""
        return 6 * self.rows * self.d * self.f


# --------------------------------------------------------------------------- shapes


def model_shape(name: str) -> dict:
    cfg = moe.load_config(name)
    m = cfg.moe
    if m.activation != "swiglu":
        raise InputError(f"--model {name}: the peers compute SwiGLU experts, this config has {m.activation}")
    return {"d": cfg.hidden_size, "f": m.ffn_size(cfg.hidden_size), "experts_total": m.num_experts, "top_k": m.top_k}


def local_experts(shape: dict) -> tuple[int, ...]:
    """The whole model's experts where they fit one GPU, else the expert-parallel shares."""
    E = shape["experts_total"]
    if E * 3 * shape["d"] * shape["f"] * 2 <= FITS_BYTES:
        return (E,)
    return tuple(e for e in EP_LOCAL_EXPERTS if e < E) or (E,)


def grid(models: dict[str, dict], rows: tuple[int, ...], quick: bool, anchors: bool = False) -> list[Case]:
    """The anchors' shapes first (with `anchors`, balanced routing), then small rows first across
    every model: a run cut short by its time budget still covers every model."""
    cases = []
    for name, r in ANCHOR_ROWS.items() if anchors else ():
        if name in models:
            s = models[name]
            cases.append(Case(name, s["d"], s["f"], s["experts_total"], s["top_k"], r, "balanced"))
    for r in rows:
        for name, s in models.items():
            experts = local_experts(s)
            for e in experts[-1:] if quick else experts:
                k = min(s["top_k"], e)
                for routing in ROUTINGS if k < e else ("balanced",):
                    cases.append(Case(name, s["d"], s["f"], e, k, r, routing))
    return cases


def estimate_s(case: Case) -> float:
    """Planned seconds of one case, in forward-equivalents of its GEMMs at ASSUMED_TFLOPS: per
    implementation a checked forward+backward (3) and three measure() calls of 9 + n runs each
    (moe.perf.timing: 1 untimed, 1 estimate, do_bench's 1 + 5 estimate + 1 warm-up, then n; n = 3
    on the big shapes) of forward (1), backward (2, after one forward) and forward+backward (3):
    ~76; four implementations and an fp32 reference (~6x slower): ~330. Plus ~3 s of fixed costs."""
    return 330 * case.gemm_flops / (ASSUMED_TFLOPS * 1e12) + 3.0


# --------------------------------------------------------------------------- roofline

PASS_FLOPS = {"forward": 1, "backward": 2, "forward_backward": 3}  # multiples of Case.gemm_flops


def compulsory_bytes(case: Case, experts_used: int, elt: int = 2) -> dict[str, int]:
    """Bytes to and from memory that no implementation of the pass can avoid, whatever it fuses:

        forward   read x [T, d], the used experts' weights W (3 d f each) and the routing
                  (fp32 weight and int64 index per routed row); write out [T, d]
        backward  read W again (for dx) and write dW; read x (for dW_in) and dout, write dx;
                  read the routing, write the routing weights' gradient
    Intermediates ([R, f] activations, the saved z, permuted copies) are left out, so the bound
    is one no real design reaches exactly: a lower bound on time, an upper bound on TFLOP/s."""
    weights = experts_used * 3 * case.d * case.f * elt
    act = case.tokens * case.d * elt
    routing = case.rows * (4 + 8)
    forward = weights + 2 * act + routing
    backward = 2 * weights + 3 * act + routing + case.rows * 4
    return {"forward": forward, "backward": backward, "forward_backward": forward + backward}


def roofline(case: Case, experts_used: int, peak_tflops: float, bytes_per_s: float) -> dict[str, dict]:
    """Per pass: the compulsory bytes, the time of its FLOPs at the dense peak and of its bytes at
    the copy bandwidth (both measured in the same run), which one bounds it, and the TFLOP/s bound."""
    out = {}
    for key, nbytes in compulsory_bytes(case, experts_used).items():
        flops = PASS_FLOPS[key] * case.gemm_flops
        compute_s, memory_s = flops / (peak_tflops * 1e12), nbytes / bytes_per_s
        out[key] = {
            "bytes": nbytes,
            "compute_s": compute_s,
            "memory_s": memory_s,
            "bound": "compute" if compute_s >= memory_s else "memory",
            "bound_tflops": flops / max(compute_s, memory_s) / 1e12,
        }
    return out


# --------------------------------------------------------------------------- routing and reference


def routing(case: Case, device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """topk_idx [T, K] int64 (K distinct experts per token) and topk_weight [T, K] fp32 (softmax)."""
    T, K, E = case.tokens, case.top_k, case.experts
    g = torch.Generator(device=device).manual_seed(seed)
    if case.routing == "balanced":  # slot t*K + k takes expert (t*K + k) mod E, experts and tokens shuffled
        perm = torch.randperm(E, device=device, generator=g)
        slots = torch.arange(T * K, device=device).view(T, K) % E
        idx = perm[slots][torch.randperm(T, device=device, generator=g)]
    else:
        p = torch.arange(1, E + 1, device=device, dtype=torch.float32).pow(-ZIPF_S)
        idx = torch.multinomial(p.expand(T, E).contiguous(), K, replacement=False, generator=g)
    weight = torch.randn(T, K, device=device, generator=g).softmax(-1)
    return idx, weight


def reference(x: Tensor, idx: Tensor, w: Tensor, w_in: Tensor, w_out: Tensor, g: Tensor) -> dict[str, Tensor]:
    """fp32 output and gradients of sum(out * g): a loop over experts, nothing shared with the peers."""
    x, w = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    w_in, w_out = w_in.detach().float().requires_grad_(), w_out.detach().float().requires_grad_()
    F = w_out.shape[1]
    tokens, ys = [], []
    for e in range(w_in.shape[0]):
        token, k = torch.nonzero(idx == e, as_tuple=True)
        h = x[token] @ w_in[e]
        ys.append((torch.nn.functional.silu(h[:, :F]) * h[:, F:]) @ w_out[e] * w[token, k, None])
        tokens.append(token)
    out = torch.zeros_like(x).index_add(0, torch.cat(tokens), torch.cat(ys))  # one [T, d] buffer, not E
    dx, dw_in, dw_out, dw = torch.autograd.grad(out, (x, w_in, w_out, w), g.float())
    return {"out": out.detach(), "dx": dx, "dw_in": dw_in, "dw_out": dw_out, "d_routing_weight": dw}


def rel_err(got: Tensor, ref: Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()

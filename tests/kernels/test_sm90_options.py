"""The opt-in Hopper variants (TMA loads, split dW, persistent tile loops) compile for sm_90,
with the instructions and the loop structure they exist for.

Like test_sm90_build.py: the real Triton compiler builds each variant for an H100/H200
(sm_90) without a GPU, with the H100 table's tiles and launch-like specialisation,
in a subprocess that imports the kernels without TRITON_INTERPRET. The PTX must hold
wgmma (Hopper's warpgroup MMA) for the 16-bit tiles and, for TMA, the bulk tensor
copy `cp.async.bulk.tensor` (2-d for A's tiles in the row GEMM, 3-d for the weights').
A persistent variant must come out with its tile loop flattened into the K loop
(FLATTENED): an innermost loop in the TTGIR that both issues the warpgroup MMA and
stores a tile, i.e. the next tile's K steps are pipelined against this tile's
epilogue. (The compiler fuses the loops only when the K loop's bounds are the same
for every tile; it keeps the unfused nest as a fallback.) Run this file as a script
to see each variant's shared memory and MMA / copy instructions.
"""

import importlib.util
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

# Ling-1T-like sizes: d = 8192, f = 2048, 8 local experts, 32K routed rows
M, D, F, E = 32768, 8192, 2048, 8
TMA_COPY, WGMMA = "cp.async.bulk.tensor", "wgmma.mma_async"
TMA_A = "cp.async.bulk.tensor.2d"  # A [M, K]'s tiles (B's descriptors are 3-d: [G, K, N])
FLATTENED = "tile loop flattened into the K loop"


def loop_bodies(ir: str) -> list[str]:
    """The body text of every scf.for in MLIR text (a loop closes at the first `}` at its indent)."""
    lines, bodies = ir.splitlines(), []
    for i, line in enumerate(lines):
        if "scf.for" in line and line.rstrip().endswith("{"):
            indent = len(line) - len(line.lstrip())
            end = next(j for j in range(i + 1, len(lines)) if lines[j][indent:].startswith("}"))
            bodies.append("\n".join(lines[i + 1 : end]))
    return bodies


def flattened(ttgir: str) -> bool:
    """Does an innermost loop that issues the warpgroup MMA also store tiles? (Unfused, the
    innermost MMA loop is the K loop, and the stores follow it in the tile loop.)"""
    innermost = [body for body in loop_bodies(ttgir) if "ttng.warp_group_dot " in body and "scf.for" not in body]
    return any("tt.store" in body for body in innermost)


def _rows(dt, k, n, block_m, block_k, block_n, scatter=False, transposed=False, tma=True):
    """Pointers (None: absent), integer arguments and the descriptor types of a TMA row GEMM: B's
    (transposed: B = W^T with the descriptor of W [G, N, K], as for dA and dx) and A's; tma=False: none."""
    pointers = {"a_ptr": dt, "b_ptr": dt, "c_ptr": dt, "c_rows_ptr": "*i64" if scatter else None, "offs_ptr": "*i32"}
    block = (block_n, block_k) if transposed else (block_k, block_n)
    if tma:
        pointers["b_desc"] = f"tensordesc<{dt[1:]}[1,{block[0]},{block[1]}]>"
        pointers["a_desc"] = f"tensordesc<{dt[1:]}[{block_m},{block_k}]>"
    ints = dict(M=M, N=n, K=k, G=E, stride_am=k, stride_ak=1, stride_bg=k * n, stride_bk=n)
    ints.update(stride_bn=1, stride_cm=n, stride_cn=1)
    return pointers, ints


def _dw(dt, gather_a=False):
    pointers = {"a_ptr": dt, "a_rows_ptr": "*i64" if gather_a else None, "dy_ptr": dt, "dy_rows_ptr": None}
    pointers.update(out_ptr="*fp32", offs_ptr="*i32")  # the split's fp32 workspace [S, G, K, N]
    ints = dict(M=M, K=D, N=F, stride_am=D, stride_ak=1, stride_dm=F, stride_dn=1, stride_og=D * F, stride_ok=F)
    ints.update(stride_on=1, stride_os=E * D * F)
    return pointers, ints


def _ffn(kind, block_k, block_n):
    """The expert FFN kernels with a descriptor of their weights (test_sm90_build.py's arguments)."""
    from test_sm90_build import _act_backward, _up

    if kind == "up":
        pointers, ints = _up(2 * F, weighted=True)
        pointers["w_desc"] = f"tensordesc<bf16[1,{block_k},{block_n}]>"
    else:  # dh: the descriptor of w_out [E, f, d], tiles [BLOCK_N of f, BLOCK_K of d] transposed in the kernel
        pointers, ints = _act_backward(2 * F, weighted=True)
        pointers["w_desc"] = f"tensordesc<bf16[1,{block_n},{block_k}]>"
    return pointers, ints


def variants():
    """name -> (kernel, pointers, ints, constexprs, tuning key, instructions the PTX must hold)."""
    from test_sm90_build import _act_backward

    from moe_kernels.ffn_kernels import ffn_act_backward_kernel, ffn_up_kernel
    from moe_kernels.gemm_dw import grouped_dw_kernel, sum_splits_kernel
    from moe_kernels.gemm_rows import grouped_rows_kernel
    from moe_kernels.tuning import table_config

    def tiles(key):
        return table_config(key, "h100")["BLOCK_K"], table_config(key, "h100")["BLOCK_N"]

    def row_tiles(key):
        return table_config(key, "h100")["BLOCK_M"], *tiles(key)

    gemm = {"BLOCK_G": 16, "EVEN_K": True, "PRECISION": "ieee"}
    large, decode, small = "rows/16bit/large", "rows/16bit/decode", "rows/16bit/small"
    dh = "act_backward/16bit/large"
    return {
        "grouped_mm forward bf16, TMA": (
            grouped_rows_kernel,
            *_rows("*bf16", D, F, *row_tiles(large)),
            gemm,
            large,
            (WGMMA, TMA_COPY, TMA_A),
        ),
        "grouped_mm forward fp16, TMA": (
            grouped_rows_kernel,
            *_rows("*fp16", D, F, *row_tiles(small)),
            gemm,
            small,
            (WGMMA, TMA_COPY, TMA_A),
        ),
        "grouped_mm dA / ffn dx bf16, TMA of W^T": (
            grouped_rows_kernel,
            *_rows("*bf16", F, D, *row_tiles(large), transposed=True),
            {**gemm, "B_TRANSPOSED": True},
            large,
            (WGMMA, TMA_COPY, TMA_A),
        ),
        "grouped_mm decode ragged K, TMA": (
            grouped_rows_kernel,
            *_rows("*bf16", 100, F, *row_tiles(decode)),
            {**gemm, "EVEN_K": False},
            decode,
            (TMA_COPY, TMA_A),
        ),
        "ffn down (scatter), TMA": (
            grouped_rows_kernel,
            *_rows("*bf16", F, D, *row_tiles(large), scatter=True),
            gemm,
            large,
            (WGMMA, TMA_COPY, TMA_A),
        ),
        "moe_ffn up swiglu, TMA": (
            ffn_up_kernel,
            *_ffn("up", *tiles("swiglu_up/16bit/large")),
            {**gemm, "ACTIVATION": "swiglu", "STORE_Z": True},
            "swiglu_up/16bit/large",
            (WGMMA, TMA_COPY),
        ),
        "moe_ffn dh + ds, TMA of w_out^T": (
            ffn_act_backward_kernel,
            *_ffn("dh", *tiles(dh)),
            {**gemm, "ACTIVATION": "swiglu"},
            dh,
            (WGMMA, TMA_COPY),
        ),
        "grouped_mm forward bf16, PERSISTENT": (
            grouped_rows_kernel,
            *_rows("*bf16", D, F, *row_tiles(large), tma=False),
            {**gemm, "PERSISTENT": True},
            large,
            (WGMMA, FLATTENED),
        ),
        "ffn down (scatter), PERSISTENT + TMA": (
            grouped_rows_kernel,
            *_rows("*bf16", F, D, *row_tiles(large), scatter=True),
            {**gemm, "PERSISTENT": True},
            large,
            (WGMMA, TMA_COPY, TMA_A, FLATTENED),
        ),
        "moe_ffn up swiglu, PERSISTENT + TMA": (
            ffn_up_kernel,
            *_ffn("up", *tiles("swiglu_up/16bit/large")),
            {**gemm, "ACTIVATION": "swiglu", "STORE_Z": True, "PERSISTENT": True},
            "swiglu_up/16bit/large",
            (WGMMA, TMA_COPY, FLATTENED),
        ),
        "moe_ffn dh + ds, PERSISTENT": (
            ffn_act_backward_kernel,
            *_act_backward(2 * F, weighted=True),
            {**gemm, "ACTIVATION": "swiglu", "PERSISTENT": True},
            dh,
            (WGMMA, FLATTENED),
        ),
        "grouped_mm dB bf16, SPLIT": (
            grouped_dw_kernel,
            *_dw("*bf16"),
            {"PRECISION": "ieee"},
            "dw/16bit/large",
            (WGMMA,),
        ),
        "ffn dW_in (gather x), SPLIT": (
            grouped_dw_kernel,
            *_dw("*bf16", gather_a=True),
            {"PRECISION": "ieee"},
            "dw/16bit/small",
            (WGMMA,),
        ),
        "split sum to bf16": (
            sum_splits_kernel,
            {"ws_ptr": "*fp32", "out_ptr": "*bf16"},
            dict(numel=E * D * F, S=4),
            {"BLOCK": 1024},
            None,
            (),
        ),
    }


def build(name: str) -> tuple[str, list[str]]:
    """Compile one variant for sm_90; (summary line, missing required instructions)."""
    from test_sm90_build import compile_sm90, spill_stores

    from moe_kernels.tuning import table_config

    kernel, pointers, ints, constexprs, key, required = variants()[name]
    cfg = table_config(key, "h100") if key else {"num_warps": 4, "num_stages": 2}
    compiled = compile_sm90(kernel, pointers, ints, constexprs, cfg)
    ptx = compiled.asm["ptx"]
    found = sorted(set(re.findall(r"\b(wgmma\.mma_async|mma\.sync|cp\.async\.bulk\.tensor\.\w+)", ptx)))
    missing = [ins for ins in required if not (flattened(compiled.asm["ttgir"]) if ins == FLATTENED else ins in ptx)]
    line = (
        f"{name:40s} {key or '-':24s} shared {compiled.metadata.shared:6d} B  spills {spill_stores(ptx):5d} B  "
        f"{', '.join(found) or 'no mma'}"
    )
    return line, missing


def main() -> int:
    import triton

    print(f"triton {triton.__version__}")
    failed = 0
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for line, missing in pool.map(build, variants()):
            print(line + (f"  MISSING {missing}" if missing else ""))
            failed += bool(missing)
    return 1 if failed else 0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests launch the kernels for real")
@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no CUDA backend in triton")
def test_hopper_options_build_for_sm90_with_tma_and_wgmma():
    from test_sm90_build import run_compiled

    done = run_compiled(__file__)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    assert done.stdout.count("\n") == 1 + len(variants()), done.stdout


if __name__ == "__main__":
    sys.exit(main())
